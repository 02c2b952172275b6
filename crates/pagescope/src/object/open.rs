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

use super::ObjectError;
use crate::error::ErrorKind;
use crate::proc::{ProcError, Target};
use crate::vma::{ObjectId, Vma};

/// How an object was opened (named when its identity is wrong).
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
    /// Device and inode.
    pub id: ObjectId,
    /// Size in bytes.
    pub size: u64,
    /// `statfs` magic of its filesystem.
    pub fs_type: u64,
}

/// Opens the object behind `vma`, or says why it cannot be (every way
/// tried, and the broad class of the failure).
pub fn open_object(
    target: &Target,
    vma: &Vma,
    privileged_map_files: bool,
) -> Result<OpenObject, ObjectError> {
    let mut tried = Vec::new();
    let mut kinds = Vec::new();
    let mut failed = |why: String, kind: ErrorKind| {
        tried.push(why);
        kinds.push(kind);
    };
    if privileged_map_files {
        match target
            .map_file(vma.range)
            .map_err(|e| (e.to_string(), e.kind()))
            .and_then(|fd| check(fd, vma, OpenedVia::MapFiles))
        {
            Ok(o) => return Ok(o),
            Err((why, kind)) => failed(why, kind),
        }
    } else {
        failed(
            "map_files needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE".to_owned(),
            ErrorKind::PermissionDenied,
        );
    }
    match open_via_fd(target, vma) {
        Ok(Some(o)) => return Ok(o),
        Ok(None) => failed(
            format!(
                "process {} holds no fd for inode {}",
                target.pid(),
                vma.inode
            ),
            ErrorKind::PermissionDenied,
        ),
        Err((why, kind)) => failed(why, kind),
    }
    if !vma.path.is_deleted() && vma.path.as_bytes().starts_with(b"/") {
        match open_via_path(target, vma) {
            Ok(o) => return Ok(o),
            Err((why, kind)) => failed(why, kind),
        }
    }
    let kind = if kinds.contains(&ErrorKind::TargetExited) {
        ErrorKind::TargetExited
    } else if kinds.iter().all(|k| *k == ErrorKind::PermissionDenied) {
        ErrorKind::PermissionDenied
    } else {
        ErrorKind::Other
    };
    Err(ObjectError::Open {
        pid: target.pid(),
        range: vma.range,
        inode: vma.inode,
        tried: tried.join("; "),
        kind,
    })
}

type Attempt<T> = Result<T, (String, ErrorKind)>;

fn proc_failure(e: ProcError) -> (String, ErrorKind) {
    (e.to_string(), e.kind())
}

fn open_via_fd(target: &Target, vma: &Vma) -> Attempt<Option<OpenObject>> {
    let fds = target.fds().map_err(proc_failure)?;
    for n in fds {
        let name = format!("fd/{n}");
        let Ok(st) = target.stat_file(&name) else {
            continue;
        };
        if ObjectId::of_stat(&st) == ObjectId::of_entry(vma) {
            let fd = target.open_fd(n).map_err(proc_failure)?;
            return check(fd, vma, OpenedVia::Fd(n)).map(Some);
        }
    }
    Ok(None)
}

fn open_via_path(target: &Target, vma: &Vma) -> Attempt<OpenObject> {
    let fd = target
        .open_in_root(vma.path.as_bytes())
        .map_err(proc_failure)?;
    check(fd, vma, OpenedVia::Path)
}

fn check(fd: OwnedFd, vma: &Vma, via: OpenedVia) -> Attempt<OpenObject> {
    let st = rustix::fs::fstat(&fd).map_err(|e| (format!("fstat: {e}"), ErrorKind::Other))?;
    let id = ObjectId::of_stat(&st);
    if id != ObjectId::of_entry(vma) {
        return Err((
            format!(
                "{:?} leads to inode {} on {}, not the mapped inode {}",
                via, id.inode, id.dev, vma.inode
            ),
            ErrorKind::Other,
        ));
    }
    let fs_type = rustix::fs::fstatfs(fd.as_fd())
        .map(|s| u64::try_from(s.f_type).unwrap_or(0))
        .unwrap_or(0);
    Ok(OpenObject {
        fd,
        id,
        size: u64::try_from(st.st_size).unwrap_or(0),
        fs_type,
    })
}
