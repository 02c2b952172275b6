//! Creating a userfaultfd inside another process (x86_64), safely.
//!
//! A userfaultfd tracks only the mm of the process that created it, so to
//! track a target the `userfaultfd()` call must run *in* the target. The
//! raw part (`crate::sys::inject`) runs in a short-lived helper process:
//! it seizes the target's main thread, runs `userfaultfd()` there with the
//! `syscall` instruction of its vDSO, copies the new fd out with
//! `pidfd_getfd`, closes the target's copy, restores every register,
//! detaches and hands the fd over. The target sees no signal and keeps no
//! fd; a thread blocked in a system call simply restarts it (one in a
//! call the kernel never restarts after a stop, `epoll_wait` and the like,
//! is rewound to issue it again: `crate::sys::restart`; a thread outside
//! such calls is preferred).
//!
//! Why a helper: while the thread runs injected registers, a tracer that
//! dies makes the kernel detach it *as it is*, and the target resumes at
//! the injected instruction with the wrong registers. The helper blocks
//! every catchable signal and outlives pagescope if it must, so `SIGINT`,
//! `SIGTERM`, `SIGHUP`, `SIGQUIT`, `SIGPIPE` or `SIGKILL` sent to pagescope
//! during the injection cannot leave the target half-done. (A `SIGKILL`
//! aimed at the helper itself, e.g. at the whole process group, still
//! could: it lives about a millisecond.)
//!
//! When `userfaultfd()` is refused (an unprivileged target and
//! `vm.unprivileged_userfaultfd = 0`, or a seccomp filter) and pagescope
//! can open `/dev/userfaultfd` itself (root), it hands the device to the
//! target with every thread of it stopped, and the target creates a full
//! uffd from it (`USERFAULTFD_IOC_NEW`): an unprivileged target is then
//! tracked like a root-owned one, synchronously where that matters. Else
//! the helper retries with `UFFD_USER_MODE_ONLY` on `EPERM` (in
//! write-protect async mode the kernel resolves kernel-mode writes,
//! `read()` into a tracked page, itself, so nothing is lost; synchronous
//! mode is impossible with it), then tries `/dev/userfaultfd` inside the
//! target.

use std::time::Duration;

use rustix::io::Errno;

pub use crate::sys::inject::{Step, UffdOrigin};

use super::TrackError;
use crate::proc::Target;
use crate::sys::inject::{Failed, Failpoint, InjectPlan, Injected, Job};
use crate::sys::ptrace::SYSCALL_INSN;

/// How long pagescope waits for the helper before giving up on the target
/// (the helper still finishes restoring it).
const HELPER_TIMEOUT: Duration = Duration::from_secs(10);

/// A userfaultfd made inside a target: pagescope's copy, how it was
/// made, and the fd number the target kept (`keep_in_target`).
#[derive(Debug)]
pub struct InTarget {
    /// pagescope's copy.
    pub fd: std::os::fd::OwnedFd,
    /// How it was created.
    pub origin: UffdOrigin,
    /// The target's own copy, if it keeps one.
    pub target_fd: Option<i32>,
}

/// Whether pagescope may hand its own `/dev/userfaultfd` to a target that
/// cannot create a full userfaultfd itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    /// When pagescope can open it (root).
    #[default]
    Hand,
    /// Never (the target then gets what it may create itself).
    Keep,
}

/// Runs `userfaultfd()` inside `target` (through a helper process) and
/// returns pagescope's copy of the fd and how it was made; with
/// `keep_in_target` the target keeps its copy open (tracking outlives
/// pagescope).
pub fn userfaultfd_in(target: &Target, keep_in_target: bool) -> Result<InTarget, TrackError> {
    userfaultfd_in_with(target, keep_in_target, Device::Hand)
}

/// [`userfaultfd_in`], handing pagescope's `/dev/userfaultfd` to the
/// target only as `device` allows.
pub fn userfaultfd_in_with(
    target: &Target,
    keep_in_target: bool,
    device: Device,
) -> Result<InTarget, TrackError> {
    let pid = target.pid();
    // Opened per injection, so pagescope holds no device fd between them.
    let dev = match device {
        Device::Hand => crate::sys::uffd::open_device().ok(),
        Device::Keep => None,
    };
    let got = run(target, Job::CreateUffd { keep_in_target }, dev.as_ref())?;
    let fd = got.fd.ok_or(TrackError::Inject {
        pid,
        step: Step::Send.describe(),
        source: Errno::BADF,
    })?;
    Ok(InTarget {
        fd,
        origin: got.origin,
        target_fd: got.target_fd,
    })
}

/// Closes fd `fd` inside `target` (a userfaultfd an earlier dump left
/// there).
pub fn close_in_target(target: &Target, fd: i32) -> Result<(), TrackError> {
    run(target, Job::Close { fd }, None).map(drop)
}

fn run(
    target: &Target,
    job: Job,
    device: Option<&std::os::fd::OwnedFd>,
) -> Result<Injected, TrackError> {
    let pid = target.pid();
    let tgid = i32::try_from(pid).map_err(|_| TrackError::Inject {
        pid,
        step: "name the process",
        source: Errno::INVAL,
    })?;
    let tid = quiet_thread(target, tgid);
    let plan = InjectPlan {
        tgid,
        tid,
        pidfd: target.pidfd(),
        insn: syscall_insn(target)?,
        failpoint: failpoint_from_env(),
        device: device.map(std::os::fd::AsFd::as_fd),
        job,
    };
    let mut got = crate::sys::inject::userfaultfd_in(&plan, HELPER_TIMEOUT);
    if tid != tgid
        && matches!(
            got,
            Err(Failed {
                step: Step::Seize,
                errno: Errno::SRCH
            })
        )
    {
        // The chosen thread exited meanwhile: the main thread then.
        got = crate::sys::inject::userfaultfd_in(&InjectPlan { tid: tgid, ..plan }, HELPER_TIMEOUT);
    }
    got.map_err(|Failed { step, errno }| TrackError::Inject {
        pid,
        step: step.describe(),
        source: errno,
    })
}

/// The thread to inject into: the main thread unless it sits in a system
/// call the interrupt would cut short for good (`epoll_wait`, ...: it is
/// re-issued, but a finite timeout then starts again), and another thread
/// does not (`/proc/PID/task/TID/syscall`; `running` or any other call).
fn quiet_thread(target: &Target, tgid: i32) -> i32 {
    let in_never_restarted = |tid: u32| {
        std::fs::read_to_string(format!("/proc/{tgid}/task/{tid}/syscall"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<i64>().ok())
            .is_some_and(|nr| crate::sys::restart::NEVER_RESTARTED.contains(&nr))
    };
    let main = tgid.unsigned_abs();
    if !in_never_restarted(main) {
        return tgid;
    }
    target
        .tasks()
        .unwrap_or_default()
        .into_iter()
        .find(|&t| t != main && !in_never_restarted(t))
        .and_then(|t| i32::try_from(t).ok())
        .unwrap_or(tgid)
}

/// `PAGESCOPE_FAILPOINT=inject:STEP:fail` makes that step fail as if its
/// system call had; `inject:STEP:signal-parent:SIG` sends `SIG` to
/// pagescope itself at that step (test builds only: feature `failpoints`).
#[cfg(feature = "failpoints")]
fn failpoint_from_env() -> Option<Failpoint> {
    let v = std::env::var("PAGESCOPE_FAILPOINT").ok()?;
    let mut parts = v.split(':');
    if parts.next()? != "inject" {
        return None;
    }
    let step = parts.next()?.parse().ok()?;
    let signal = match parts.next()? {
        "fail" => 0,
        "signal-parent" => parts.next()?.parse().ok()?,
        _ => return None,
    };
    Some(Failpoint { step, signal })
}

#[cfg(not(feature = "failpoints"))]
fn failpoint_from_env() -> Option<Failpoint> {
    None
}

/// Finds a `syscall` instruction in the target's vDSO. The vDSO image is
/// the same in every process of an ABI, so the offset is found in our own
/// copy and no byte of the target is read.
fn syscall_insn(target: &Target) -> Result<u64, TrackError> {
    let pid = target.pid();
    let vdso = |t: &Target| -> Result<_, TrackError> {
        Ok(t.maps()?
            .into_iter()
            .find(|e| e.path.as_bytes() == b"[vdso]"))
    };
    let (Some(theirs), Some(ours)) = (vdso(target)?, vdso(&Target::current()?)?) else {
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
