//! Opening the object behind a mapping of another process.
//!
//! In order of preference:
//! 1. `/proc/PID/map_files/START-END` (CAP_SYS_ADMIN or
//!    CAP_CHECKPOINT_RESTORE): works for every shmem kind (memfd, tmpfs,
//!    SysV, `MAP_SHARED|MAP_ANONYMOUS`) and every file.
//! 2. `/proc/PID/fd/N`, for an fd the target holds on the same inode (a
//!    memfd or tmpfs file it kept open). Same-uid access suffices.
//! 3. For files with a path, `/proc/PID/root/PATH` (the target's mount
//!    namespace), accepted only if device and inode match.
//!
//! Every candidate is checked with `fstat` against the device and inode in
//! maps, so a recycled fd or renamed file is never mistaken for the object.

use std::os::fd::{AsFd, OwnedFd};

use crate::proc::Target;
use crate::proc::maps::DevId;
use crate::vma::Vma;

/// How an object was opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenedVia {
    /// `/proc/PID/map_files/START-END`.
    MapFiles,
    /// `/proc/PID/fd/N`.
    Fd(u32),
    /// `/proc/PID/root/PATH`.
    Path,
}

/// An opened object with its identity and size.
#[derive(Debug)]
pub struct OpenObject {
    /// The fd (read-only).
    pub fd: OwnedFd,
    /// Device.
    pub dev: DevId,
    /// Inode.
    pub inode: u64,
    /// Size in bytes.
    pub size: u64,
    /// `statfs` magic of its filesystem.
    pub fs_type: u64,
    /// How it was reached.
    pub via: OpenedVia,
}

/// Opens the object behind `vma`, or says why it cannot be.
pub fn open_object(
    target: &Target,
    vma: &Vma,
    privileged_map_files: bool,
) -> Result<OpenObject, String> {
    let mut why = Vec::new();
    if privileged_map_files {
        match target
            .map_file(vma.range)
            .map_err(|e| e.to_string())
            .and_then(|fd| check(fd, vma, OpenedVia::MapFiles))
        {
            Ok(o) => return Ok(o),
            Err(e) => why.push(e),
        }
    } else {
        why.push("map_files needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE".to_owned());
    }
    match open_via_fd(target, vma) {
        Ok(Some(o)) => return Ok(o),
        Ok(None) => why.push(format!(
            "process {} holds no fd for inode {}",
            target.pid(),
            vma.inode
        )),
        Err(e) => why.push(e),
    }
    if !vma.path.is_deleted() && vma.path.as_bytes().starts_with(b"/") {
        match open_via_path(target, vma) {
            Ok(o) => return Ok(o),
            Err(e) => why.push(e),
        }
    }
    Err(why.join("; "))
}

fn open_via_fd(target: &Target, vma: &Vma) -> Result<Option<OpenObject>, String> {
    let fds = target.fds().map_err(|e| e.to_string())?;
    for n in fds {
        let name = format!("fd/{n}");
        let Ok(st) = target.stat_file(&name) else {
            continue;
        };
        if st.st_ino == vma.inode && DevId::from_st_dev(st.st_dev) == vma.dev {
            let fd = target.open_fd(n).map_err(|e| e.to_string())?;
            return check(fd, vma, OpenedVia::Fd(n)).map(Some);
        }
    }
    Ok(None)
}

fn open_via_path(target: &Target, vma: &Vma) -> Result<OpenObject, String> {
    let fd = target
        .open_in_root(vma.path.as_bytes())
        .map_err(|e| e.to_string())?;
    check(fd, vma, OpenedVia::Path)
}

fn check(fd: OwnedFd, vma: &Vma, via: OpenedVia) -> Result<OpenObject, String> {
    let st = rustix::fs::fstat(&fd).map_err(|e| format!("fstat: {e}"))?;
    let dev = DevId::from_st_dev(st.st_dev);
    if st.st_ino != vma.inode || dev != vma.dev {
        return Err(format!(
            "{:?} leads to inode {} on {dev}, not the mapped inode {}",
            via, st.st_ino, vma.inode
        ));
    }
    let fs_type = rustix::fs::fstatfs(fd.as_fd())
        .map(|s| u64::try_from(s.f_type).unwrap_or(0))
        .unwrap_or(0);
    Ok(OpenObject {
        fd,
        dev,
        inode: st.st_ino,
        size: u64::try_from(st.st_size).unwrap_or(0),
        fs_type,
        via,
    })
}
