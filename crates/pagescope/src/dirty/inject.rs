//! Creating a userfaultfd inside another process (x86_64).
//!
//! A userfaultfd tracks only the mm of the process that created it, so to
//! track a target the `userfaultfd()` call must run *in* the target. This
//! seizes its main thread, runs `userfaultfd(O_CLOEXEC|O_NONBLOCK)` there
//! with the `syscall` instruction of its vDSO, takes a copy of the new fd
//! with `pidfd_getfd`, runs `close()` on the target's copy, restores every
//! register and detaches. The target sees no signal and no fd; a thread
//! that was blocked in a system call simply restarts it.

use std::os::fd::OwnedFd;

use rustix::io::Errno;
use rustix::process::PidfdGetfdFlags;

use super::TrackError;
use crate::proc::Target;
use crate::sys::ptrace::{NR_CLOSE, NR_USERFAULTFD, SYSCALL_INSN, Seized};

/// Finds a `syscall` instruction in the target's vDSO. The vDSO image is
/// the same in every process of an ABI, so the offset is found in our own
/// copy and no byte of the target is read.
fn syscall_insn(target: &Target) -> Result<u64, TrackError> {
    let pid = target.pid();
    let theirs = target
        .maps()?
        .into_iter()
        .find(|e| e.path.as_bytes() == b"[vdso]");
    let ours = crate::proc::Target::current()?
        .maps()?
        .into_iter()
        .find(|e| e.path.as_bytes() == b"[vdso]");
    let (Some(theirs), Some(ours)) = (theirs, ours) else {
        return Err(TrackError::Inject {
            pid,
            step: "find a [vdso] to run a system call from",
            source: Errno::NOENT,
        });
    };
    if theirs.range.len() != ours.range.len() {
        return Err(TrackError::Inject {
            pid,
            step: "match the target's vDSO with ours",
            source: Errno::INVAL,
        });
    }
    let mut bytes = vec![0u8; usize::try_from(ours.range.len()).unwrap_or(0)];
    let mem = std::fs::File::open("/proc/self/mem").map_err(|e| TrackError::Io {
        pid,
        what: "read our own vDSO",
        source: e,
    })?;
    std::os::unix::fs::FileExt::read_exact_at(&mem, &mut bytes, ours.range.start().get()).map_err(
        |e| TrackError::Io {
            pid,
            what: "read our own vDSO",
            source: e,
        },
    )?;
    let off = bytes
        .windows(2)
        .position(|w| w == SYSCALL_INSN)
        .ok_or(TrackError::Inject {
            pid,
            step: "find a syscall instruction in the vDSO",
            source: Errno::NOENT,
        })?;
    Ok(theirs.range.start().get() + off as u64)
}

/// Runs `userfaultfd()` inside `target` and returns our copy of the fd.
pub fn userfaultfd_in(target: &Target) -> Result<OwnedFd, TrackError> {
    let pid = target.pid();
    let insn = syscall_insn(target)?;
    let tid = i32::try_from(pid).map_err(|_| TrackError::Inject {
        pid,
        step: "pid",
        source: Errno::INVAL,
    })?;
    let err = |step: &'static str| move |source| TrackError::Inject { pid, step, source };
    let mut seized = Seized::seize(tid).map_err(err("seize the process with ptrace"))?;
    let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
    let fd = seized
        .syscall(insn, NR_USERFAULTFD, [flags, 0, 0, 0, 0, 0])
        .map_err(err("run userfaultfd()"))?;
    if fd < 0 {
        let e = Errno::from_raw_os_error(i32::try_from(-fd).unwrap_or(libc::EINVAL));
        return Err(TrackError::Inject {
            pid,
            step: "userfaultfd() in the target",
            source: e,
        });
    }
    let ours = rustix::process::pidfd_getfd(target.pidfd(), fd as i32, PidfdGetfdFlags::empty())
        .map_err(err("copy the fd with pidfd_getfd"));
    let closed = seized
        .syscall(insn, NR_CLOSE, [fd.unsigned_abs(), 0, 0, 0, 0, 0])
        .map_err(err("run close()"));
    drop(seized);
    let ours = ours?;
    closed?;
    Ok(ours)
}
