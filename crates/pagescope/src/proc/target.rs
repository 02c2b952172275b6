//! The pinned target process: a pidfd plus an fd of its `/proc/PID`
//! directory, through which every per-process file is opened.
//!
//! Pinning once means a PID recycled in the middle of a long scan cannot
//! silently switch targets: `openat` on the directory fd keeps answering for
//! the original process (or fails once it is gone).

use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::process::{Pid, PidfdFlags};

use super::maps::{self, MapsEntry};
use super::mountinfo::{self, Mount};
use super::smaps::{self, SmapsEntry};
use super::stat::{self, Stat};
use crate::addr::VirtRange;
use crate::error::ErrorKind;
use crate::sys;

/// Errors reading a target's `/proc` files.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcError {
    /// No process with this PID.
    #[error("no process with PID {pid}")]
    NoSuchProcess {
        /// The PID asked for.
        pid: u32,
    },
    /// The process exited after it was pinned.
    #[error("process {pid} exited")]
    Exited {
        /// The target.
        pid: u32,
    },
    /// The caller may not read this file of the target.
    #[error(
        "permission denied opening /proc/{pid}/{file} (needs ptrace access to the process{hint})"
    )]
    PermissionDenied {
        /// The target.
        pid: u32,
        /// File below `/proc/PID`.
        file: String,
        /// Extra advice, such as a capability that would help.
        hint: &'static str,
    },
    /// The process has no user address space.
    #[error("process {pid} is {what} and has no user address space")]
    NoAddressSpace {
        /// The target.
        pid: u32,
        /// `"a kernel thread"` or `"a zombie"`.
        what: &'static str,
    },
    /// Any other I/O error.
    #[error("cannot read /proc/{pid}/{file}")]
    Io {
        /// The target.
        pid: u32,
        /// File below `/proc/PID`.
        file: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file whose contents could not be parsed.
    #[error("cannot parse /proc/{pid}/{file}: {detail}")]
    Parse {
        /// The target.
        pid: u32,
        /// File below `/proc/PID`.
        file: String,
        /// What was wrong.
        detail: String,
    },
}

impl ProcError {
    /// The broad class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::NoSuchProcess { .. } => ErrorKind::NoSuchProcess,
            Self::Exited { .. } => ErrorKind::TargetExited,
            Self::PermissionDenied { .. } => ErrorKind::PermissionDenied,
            Self::NoAddressSpace { .. } => ErrorKind::NoAddressSpace,
            Self::Io { .. } | Self::Parse { .. } => ErrorKind::Other,
        }
    }
}

/// A process pinned by pidfd and `/proc/PID` directory fd.
#[derive(Debug)]
pub struct Target {
    pid: u32,
    pidfd: OwnedFd,
    dir: OwnedFd,
}

impl Target {
    /// Pins process `pid`: `pidfd_open(pid)`, then `open("/proc/PID")`, then
    /// checks through the pidfd that the directory belongs to the same,
    /// still-existing process.
    pub fn open(pid: u32) -> Result<Self, ProcError> {
        let gone = |_| ProcError::NoSuchProcess { pid };
        let raw = i32::try_from(pid)
            .ok()
            .and_then(Pid::from_raw)
            .ok_or(ProcError::NoSuchProcess { pid })?;
        let pidfd = rustix::process::pidfd_open(raw, PidfdFlags::empty()).map_err(gone)?;
        let dir = rustix::fs::open(
            format!("/proc/{pid}"),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(gone)?;
        sys::pidfd::pidfd_is_alive(pidfd.as_fd()).map_err(gone)?;
        Ok(Self { pid, pidfd, dir })
    }

    /// Pins the calling process.
    pub fn current() -> Result<Self, ProcError> {
        Self::open(std::process::id())
    }

    /// The target's PID.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The pidfd (for `pidfd_getfd`, `process_madvise`, `poll`).
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// Whether the process still exists (zombies count as existing).
    pub fn is_alive(&self) -> bool {
        sys::pidfd::pidfd_is_alive(self.pidfd.as_fd()).is_ok()
    }

    /// Opens `/proc/PID/<file>` read-only.
    pub(crate) fn open_file(&self, file: &str) -> Result<OwnedFd, ProcError> {
        rustix::fs::openat(
            &self.dir,
            file,
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.errno_error(file, e))
    }

    /// Reads the whole of `/proc/PID/<file>`.
    pub(crate) fn read_file(&self, file: &str) -> Result<Vec<u8>, ProcError> {
        let fd = self.open_file(file)?;
        let mut buf = Vec::with_capacity(64 * 1024);
        std::fs::File::from(fd)
            .read_to_end(&mut buf)
            .map_err(|e| self.io_error(file, e))?;
        Ok(buf)
    }

    /// Writes `data` to `/proc/PID/<file>` (e.g. `clear_refs`).
    pub(crate) fn write_file(&self, file: &str, data: &[u8]) -> Result<(), ProcError> {
        let fd = rustix::fs::openat(
            &self.dir,
            file,
            OFlags::WRONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.errno_error(file, e))?;
        rustix::io::write(&fd, data).map_err(|e| self.errno_error(file, e))?;
        Ok(())
    }

    /// `/proc/PID/stat`.
    pub(crate) fn stat(&self) -> Result<Stat, ProcError> {
        let buf = self.read_file("stat")?;
        stat::parse_stat(&buf).ok_or_else(|| self.parse_error("stat", "malformed".into()))
    }

    /// Fails with [`ProcError::NoAddressSpace`] for kernel threads and
    /// zombies, whose maps and pagemap read as empty.
    pub fn require_address_space(&self) -> Result<(), ProcError> {
        let st = self.stat()?;
        let what = if st.is_kernel_thread() {
            "a kernel thread"
        } else if st.is_zombie() {
            "a zombie"
        } else {
            return Ok(());
        };
        Err(ProcError::NoAddressSpace {
            pid: self.pid,
            what,
        })
    }

    /// `/proc/PID/maps`, parsed.
    #[doc(hidden)] // the fixture reads its own layout through it
    pub fn maps(&self) -> Result<Vec<MapsEntry>, ProcError> {
        let buf = self.read_file("maps")?;
        maps::parse_maps(&buf).map_err(|e| self.parse_error("maps", e.to_string()))
    }

    /// `/proc/PID/smaps`, parsed (walks every page table of the target).
    #[doc(hidden)] // the fixture reads its own layout through it
    pub fn smaps(&self) -> Result<Vec<SmapsEntry>, ProcError> {
        let buf = self.read_file("smaps")?;
        smaps::parse_smaps(&buf).map_err(|e| self.parse_error("smaps", e.to_string()))
    }

    /// `/proc/PID/mountinfo`, parsed (the target's mount namespace).
    pub(crate) fn mountinfo(&self) -> Result<Vec<Mount>, ProcError> {
        Ok(mountinfo::parse_mountinfo(&self.read_file("mountinfo")?))
    }

    /// Opens `/proc/PID/pagemap`. The kernel decides at open time whether
    /// this fd sees PFNs and swap entries (CAP_SYS_ADMIN).
    #[doc(hidden)] // a hook for the tests and benches
    pub fn pagemap(&self) -> Result<OwnedFd, ProcError> {
        self.open_file("pagemap")
    }

    /// Opens the object backing a mapping through
    /// `/proc/PID/map_files/START-END` (needs CAP_SYS_ADMIN or
    /// CAP_CHECKPOINT_RESTORE; `readlink` works without).
    #[doc(hidden)] // a hook for the tests and benches
    pub fn map_file(&self, range: VirtRange) -> Result<OwnedFd, ProcError> {
        let name = format!(
            "map_files/{:x}-{:x}",
            range.start().get(),
            range.end().get()
        );
        self.open_file(&name)
    }

    /// Opens `/proc/PID/fd/N` (re-opens the file the target holds).
    pub(crate) fn open_fd(&self, fd: u32) -> Result<OwnedFd, ProcError> {
        self.open_file(&format!("fd/{fd}"))
    }

    /// `stat` of `/proc/PID/<file>`, following the final link (so
    /// `fd/N` gives the open file's identity).
    pub(crate) fn stat_file(&self, file: &str) -> Result<rustix::fs::Stat, ProcError> {
        rustix::fs::statat(&self.dir, file, rustix::fs::AtFlags::empty())
            .map_err(|e| self.errno_error(file, e))
    }

    /// Opens `PATH` as the target sees it, through `/proc/PID/root` (its
    /// root directory and mount namespace), read-only.
    pub(crate) fn open_in_root(&self, path: &[u8]) -> Result<OwnedFd, ProcError> {
        use std::os::unix::ffi::OsStrExt;
        let mut rel = b"root".to_vec();
        rel.extend_from_slice(path);
        let name = std::ffi::OsStr::from_bytes(&rel);
        rustix::fs::openat(
            &self.dir,
            name,
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.errno_error(&String::from_utf8_lossy(&rel), e))
    }

    /// The IDs of the target's threads (`/proc/PID/task`).
    #[doc(hidden)] // a hook for the tests and benches
    pub fn tasks(&self) -> Result<Vec<u32>, ProcError> {
        self.list_numbers("task")
    }

    /// The numbers of the target's open file descriptors.
    #[doc(hidden)] // a hook for the tests and benches
    pub fn fds(&self) -> Result<Vec<u32>, ProcError> {
        self.list_numbers("fd")
    }

    /// The numeric entries of the directory `/proc/PID/<name>`.
    fn list_numbers(&self, name: &str) -> Result<Vec<u32>, ProcError> {
        let dir = self.open_dir(name)?;
        let mut out = Vec::new();
        for entry in rustix::fs::Dir::read_from(&dir).map_err(|e| self.errno_error(name, e))? {
            let entry = entry.map_err(|e| self.errno_error(name, e))?;
            if let Some(n) = entry.file_name().to_str().ok().and_then(|s| s.parse().ok()) {
                out.push(n);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// The PIDs of the process's children (`/proc/PID/task/*/children`,
    /// `CONFIG_PROC_CHILDREN`); empty if unreadable.
    pub(crate) fn children(&self) -> Vec<u32> {
        let mut out = Vec::new();
        let Ok(dir) = self.open_dir("task") else {
            return out;
        };
        let Ok(entries) = rustix::fs::Dir::read_from(&dir) else {
            return out;
        };
        for entry in entries.flatten() {
            let Ok(tid) = entry.file_name().to_str() else {
                continue;
            };
            if tid.starts_with('.') {
                continue;
            }
            if let Ok(buf) = self.read_file(&format!("task/{tid}/children")) {
                out.extend(
                    String::from_utf8_lossy(&buf)
                        .split_whitespace()
                        .filter_map(|s| s.parse::<u32>().ok()),
                );
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    fn open_dir(&self, name: &str) -> Result<OwnedFd, ProcError> {
        rustix::fs::openat(
            &self.dir,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.errno_error(name, e))
    }

    /// Turns an errno from a `/proc/PID/<file>` operation into a
    /// [`ProcError`], telling "target exited" from "not allowed".
    pub(crate) fn errno_error(&self, file: &str, e: Errno) -> ProcError {
        self.io_error(file, e.into())
    }

    fn io_error(&self, file: &str, e: std::io::Error) -> ProcError {
        let pid = self.pid;
        match Errno::from_io_error(&e) {
            Some(Errno::ACCESS | Errno::PERM) => ProcError::PermissionDenied {
                pid,
                file: file.to_owned(),
                hint: if file.starts_with("map_files") {
                    " and CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE"
                } else {
                    ""
                },
            },
            Some(Errno::SRCH | Errno::NOENT) if !self.is_alive() => ProcError::Exited { pid },
            Some(Errno::SRCH) => ProcError::Exited { pid },
            _ => ProcError::Io {
                pid,
                file: file.to_owned(),
                source: e,
            },
        }
    }

    fn parse_error(&self, file: &str, detail: String) -> ProcError {
        ProcError::Parse {
            pid: self.pid,
            file: file.to_owned(),
            detail,
        }
    }
}
