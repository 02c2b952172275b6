//! Running `userfaultfd()` inside another process from a helper process
//! that cannot be interrupted half-way (x86_64).
//!
//! [`userfaultfd_in`] forks a helper that seizes one thread of the target
//! with ptrace, runs `userfaultfd()` there, copies the new fd out with
//! `pidfd_getfd`, runs `close()` on the target's copy, restores the
//! registers, detaches, and passes the fd back over a socket
//! (`SCM_RIGHTS`, `wire.rs`).
//!
//! When the system call is refused: with pagescope's own
//! `/dev/userfaultfd` in the plan (pagescope runs as root), every thread
//! of the target is stopped (`threads.rs`) and the device is handed to it
//! for `USERFAULTFD_IOC_NEW` (`device.rs`): a full uffd, even for an
//! unprivileged target. Otherwise (or if the target refuses that) the
//! helper retries with `UFFD_USER_MODE_ONLY` on `EPERM`, then tries
//! `open("/dev/userfaultfd")` in the target.
//!
//! The helper blocks every catchable signal and is not tied to its
//! parent's life: whatever happens to pagescope while a thread of the
//! target runs injected registers, the helper puts them back. Signals that
//! reach the target meanwhile are handed back at detach.
//!
//! The helper is a child forked from a possibly multi-threaded process:
//! everything it runs below is plain system calls on stack memory (no
//! allocation, no locks, no panics).
//!
//! # References
//! - `ptrace(2)`, `userfaultfd(2)`, `pidfd_getfd(2)`, `unix(7)`
//!   (`SCM_RIGHTS`), `signal-safety(7)`

mod device;
mod step;
mod threads;
mod wire;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use rustix::io::Errno;
use rustix::net::{AddressFamily, SocketFlags, SocketType};
use rustix::process::PidfdGetfdFlags;

pub use step::{Failpoint, Step};
use threads::Others;
use wire::{Outcome, receive, send};

use super::ptrace::{self, NR_CLOSE, NR_USERFAULTFD, Regs, Stop};
use super::uffd::UFFD_USER_MODE_ONLY;

/// How the userfaultfd was obtained inside the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UffdOrigin {
    /// `userfaultfd(2)`.
    Syscall,
    /// `userfaultfd(UFFD_USER_MODE_ONLY)`, after `EPERM`.
    UserModeOnly,
    /// `/dev/userfaultfd` opened by the target + `USERFAULTFD_IOC_NEW`.
    DevUserfaultfd,
    /// `/dev/userfaultfd` opened by pagescope (root), handed to the target
    /// (`SCM_RIGHTS`), `USERFAULTFD_IOC_NEW` there: a full uffd for a
    /// target that may not create one itself.
    HandedDevice,
}

impl UffdOrigin {
    /// The origin's number on the wire from the helper.
    fn as_raw(self) -> i32 {
        match self {
            Self::Syscall => 0,
            Self::UserModeOnly => 1,
            Self::DevUserfaultfd => 2,
            Self::HandedDevice => 3,
        }
    }

    /// The origin numbered `n` ([`Self::as_raw`]).
    fn from_raw(n: i32) -> Self {
        match n {
            0 => Self::Syscall,
            1 => Self::UserModeOnly,
            3 => Self::HandedDevice,
            _ => Self::DevUserfaultfd,
        }
    }

    /// Whether the uffd handles only user-mode faults (then synchronous
    /// write-protect would make kernel-mode writes fail with `EFAULT`).
    pub fn user_mode_only(self) -> bool {
        self == Self::UserModeOnly
    }
}

/// What the helper works on (computed before the fork).
#[derive(Clone, Copy, Debug)]
pub struct InjectPlan<'a> {
    /// The target's PID.
    pub tgid: i32,
    /// The thread to seize.
    pub tid: i32,
    /// The target's pidfd (for `pidfd_getfd`).
    pub pidfd: BorrowedFd<'a>,
    /// Address of a `syscall` instruction in the target (its vDSO).
    pub insn: u64,
    /// A test-only fault, if any.
    pub failpoint: Option<Failpoint>,
    /// pagescope's own `/dev/userfaultfd`, handed to the target when it may
    /// not create a full userfaultfd itself.
    pub device: Option<BorrowedFd<'a>>,
    /// What to do in the target.
    pub job: Job,
}

/// What the helper does inside the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Job {
    /// Create a userfaultfd and hand pagescope a copy; with
    /// `keep_in_target`, the target keeps its own copy too (so tracking
    /// outlives pagescope: `dump --keep-tracking`).
    CreateUffd {
        /// Leave the target's copy open.
        keep_in_target: bool,
    },
    /// Close fd `fd` in the target (a userfaultfd left there earlier).
    Close {
        /// The fd number.
        fd: i32,
    },
}

/// What the injection produced.
#[derive(Debug)]
pub struct Injected {
    /// pagescope's copy of the fd (none for [`Job::Close`]).
    pub fd: Option<OwnedFd>,
    /// How it was created.
    pub origin: UffdOrigin,
    /// The fd number the target kept (`keep_in_target`).
    pub target_fd: Option<i32>,
}

/// Why it failed: the step and its errno.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failed {
    /// The step that failed.
    pub step: Step,
    /// Its errno (`TIMEDOUT`: the helper did not answer in time; it still
    /// finishes restoring the target on its own).
    pub errno: Errno,
}

/// Runs the injection in a helper process and waits up to `timeout` for
/// its answer.
pub fn userfaultfd_in(plan: &InjectPlan<'_>, timeout: Duration) -> Result<Injected, Failed> {
    let fail = |step| move |errno| Failed { step, errno };
    let (ours, theirs) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(fail(Step::Seize))?;
    let sock = theirs.as_fd();
    // SAFETY: `helper` makes only system calls, on the plain values of
    // `plan` and on stack buffers: no allocation, no locks, no panics.
    let pid =
        unsafe { ptrace::fork_quiet_helper(|| helper(plan, sock)) }.map_err(fail(Step::Seize))?;
    drop(theirs);
    let answer = receive(ours.as_fd(), timeout);
    if !matches!(
        answer,
        Err(Failed {
            errno: Errno::TIMEDOUT,
            ..
        })
    ) {
        // It answered and is exiting; one that has not is left to finish
        // restoring the target on its own.
        let _ = ptrace::reap(pid);
    }
    answer
}

// ---- the helper (runs in the forked child: no allocation below) ----

/// Signals that arrived for the thread while it was stopped, handed back
/// at detach (the first through `PTRACE_DETACH`, the rest with `tgkill`).
struct Thread {
    tgid: i32,
    tid: i32,
    pending: [i32; 4],
    npending: usize,
    failpoint: Option<Failpoint>,
    /// Whether the failpoint fired already (it fires once: steps that
    /// retry then recover, as they would from a transient failure).
    fired: std::cell::Cell<bool>,
}

impl Thread {
    /// Applies a failpoint at `step`, if one is set there.
    fn at(&self, step: Step) -> Result<(), Errno> {
        match self.failpoint {
            Some(f) if f.step == step.number() && !self.fired.replace(true) => {
                if f.signal == 0 {
                    return Err(Errno::IO);
                }
                ptrace::signal_parent(f.signal);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn remember(&mut self, sig: i32) {
        if self.npending < self.pending.len() && !self.pending[..self.npending].contains(&sig) {
            self.pending[self.npending] = sig;
            self.npending += 1;
        }
    }

    /// Waits for the interrupt stop (a signal-delivery stop first is
    /// remembered; the thread is stopped either way).
    fn wait_stopped(&mut self) -> Result<(), Errno> {
        if let Stop::Signal(s) = ptrace::wait_stop(self.tid)? {
            self.remember(s);
        }
        Ok(())
    }

    /// Runs `nr(args)` from `saved` registers at `insn`; returns the raw
    /// result (negative errno on failure).
    fn call(&mut self, saved: &Regs, insn: u64, nr: i64, args: [u64; 6]) -> Result<i64, Errno> {
        saved.calling(insn, nr, args).set(self.tid)?;
        for _ in 0..16 {
            ptrace::single_step(self.tid)?;
            match ptrace::wait_stop(self.tid)? {
                Stop::Trap => return Ok(Regs::get(self.tid)?.return_value()),
                Stop::Event => {}
                Stop::Signal(s) => self.remember(s),
            }
        }
        Err(Errno::AGAIN)
    }

    /// Puts back the saved registers, retrying a failed attempt.
    fn restore(&self, saved: &Regs) -> Result<(), Errno> {
        let mut last = Ok(());
        for _ in 0..3 {
            last = self.at(Step::Restore).and_then(|()| saved.set(self.tid));
            if last.is_ok() {
                break;
            }
        }
        last
    }

    /// Detaches, handing back the signals that arrived meanwhile.
    fn detach(&self) -> Result<(), Errno> {
        let first = if self.npending > 0 {
            self.pending[0]
        } else {
            0
        };
        let r = self
            .at(Step::Detach)
            .and_then(|()| ptrace::detach(self.tid, first));
        if r.is_err() {
            // A failed detach leaves us the tracer; exiting detaches too.
            let _ = ptrace::detach(self.tid, first);
        }
        for &s in &self.pending[1..self.npending.max(1)] {
            let _ = ptrace::tgkill(self.tgid, self.tid, s);
        }
        r
    }
}

/// The helper's whole job; returns its exit code.
fn helper(plan: &InjectPlan<'_>, sock: BorrowedFd<'_>) -> i32 {
    // The fork copied every fd of the parent (other userfaultfds among
    // them, which would stay alive, protections and all, while this runs):
    // keep only what the helper uses.
    let raw = std::os::fd::AsRawFd::as_raw_fd;
    ptrace::close_all_but(&[
        raw(&sock),
        raw(&plan.pidfd),
        plan.device.as_ref().map_or(-1, raw),
    ]);
    let mut t = Thread {
        tgid: plan.tgid,
        tid: plan.tid,
        pending: [0; 4],
        npending: 0,
        failpoint: plan.failpoint,
        fired: std::cell::Cell::new(false),
    };
    let mut out = Outcome {
        target_fd: -1,
        ..Outcome::default()
    };
    let mut ours: Option<OwnedFd> = None;
    if let Err((step, e)) = attach_and_inject(&mut t, plan, &mut out, &mut ours) {
        out.errno = e.raw_os_error();
        out.step = step.number();
        ours = None;
    }
    if t.at(Step::Send).is_err() {
        return 1;
    }
    send(sock, &out, ours.as_ref());
    0
}

type StepResult<T> = Result<T, (Step, Errno)>;

fn step<T>(t: &Thread, s: Step, r: impl FnOnce() -> Result<T, Errno>) -> StepResult<T> {
    t.at(s).and_then(|()| r()).map_err(|e| (s, e))
}

/// Seize, stop, save, inject, restore, detach. Every path that changed
/// the thread's registers restores them and detaches before returning.
fn attach_and_inject(
    t: &mut Thread,
    plan: &InjectPlan<'_>,
    out: &mut Outcome,
    ours: &mut Option<OwnedFd>,
) -> StepResult<()> {
    let tid = t.tid;
    step(t, Step::Seize, || ptrace::seize(tid))?;
    let saved = match stop_and_save(t) {
        Ok(saved) => saved,
        Err(e) => {
            let _ = t.detach();
            return Err(e);
        }
    };
    let mut others = Others::none(t.tgid);
    let injected = inject(t, plan, &saved, &mut others, out, ours);
    // A never-restarted call the interrupt cut short is issued again.
    let back = super::restart::reissue(t.tgid, tid, &saved, t.npending > 0).unwrap_or(saved);
    let restored = t.restore(&back).map_err(|e| (Step::Restore, e));
    let detached = t.detach().map_err(|e| (Step::Detach, e));
    others.resume();
    injected.and(restored).and(detached)
}

/// Interrupts the seized thread and saves its registers.
fn stop_and_save(t: &mut Thread) -> StepResult<Regs> {
    let tid = t.tid;
    step(t, Step::Interrupt, || ptrace::interrupt(tid))?;
    t.at(Step::WaitStop).map_err(|e| (Step::WaitStop, e))?;
    t.wait_stopped().map_err(|e| (Step::WaitStop, e))?;
    step(t, Step::SaveRegs, || Regs::get(tid))
}

/// The system calls run inside the target, with the original registers
/// as the base of each.
fn inject(
    t: &mut Thread,
    plan: &InjectPlan<'_>,
    saved: &Regs,
    others: &mut Others,
    out: &mut Outcome,
    ours: &mut Option<OwnedFd>,
) -> StepResult<()> {
    let keep = match plan.job {
        Job::Close { fd } => {
            return close_fd(t, plan, saved, i64::from(fd), Step::CloseInTarget);
        }
        Job::CreateUffd { keep_in_target } => keep_in_target,
    };
    let fd = create(t, plan, saved, others, out)?;
    let theirs = fd as i32;
    let got = step(t, Step::GetFd, || {
        rustix::process::pidfd_getfd(plan.pidfd, theirs, PidfdGetfdFlags::empty())
    });
    if keep && got.is_ok() {
        out.target_fd = theirs;
        *ours = Some(got?);
        return Ok(());
    }
    let closed = close_fd(t, plan, saved, fd, Step::CloseInTarget);
    *ours = Some(got?);
    closed
}

/// Creates the uffd in the target, the first way that works; its fd
/// number there (`out.origin` says which way).
fn create(
    t: &mut Thread,
    plan: &InjectPlan<'_>,
    saved: &Regs,
    others: &mut Others,
    out: &mut Outcome,
) -> StepResult<i64> {
    let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
    let first = inject_call(t, Step::Userfaultfd, |t| {
        t.call(saved, plan.insn, NR_USERFAULTFD, [flags, 0, 0, 0, 0, 0])
    })?;
    if first >= 0 {
        return Ok(first);
    }
    out.first_errno = (-first) as i32;
    let mut fd = first;
    let mut last = Step::Userfaultfd;
    if let Some(device) = plan.device {
        let tid = t.tid;
        step(t, Step::StopThreads, || others.stop_all(tid))?;
        out.origin = UffdOrigin::HandedDevice.as_raw();
        fd = device::handed_userfaultfd(t, plan, saved, device, flags)?;
        last = Step::HandIoctl;
    }
    if fd < 0 && first == -i64::from(libc::EPERM) {
        out.origin = UffdOrigin::UserModeOnly.as_raw();
        let umo = flags | u64::from(UFFD_USER_MODE_ONLY);
        fd = inject_call(t, Step::UserModeOnly, |t| {
            t.call(saved, plan.insn, NR_USERFAULTFD, [umo, 0, 0, 0, 0, 0])
        })?;
        last = Step::UserModeOnly;
    }
    if fd < 0 && plan.device.is_none() {
        out.origin = UffdOrigin::DevUserfaultfd.as_raw();
        fd = inject_call(t, Step::DevUserfaultfd, |t| {
            device::opened_by_target(t, plan, saved, flags)
        })?;
        last = Step::DevUserfaultfd;
    }
    if fd < 0 {
        return Err((last, Errno::from_raw_os_error((-fd) as i32)));
    }
    Ok(fd)
}

/// `close(fd)` in the target as step `s`; the target must not keep a copy
/// it was not meant to: a failed close is retried (the failpoint fails
/// only the first attempt).
fn close_fd(
    t: &mut Thread,
    plan: &InjectPlan<'_>,
    saved: &Regs,
    fd: i64,
    s: Step,
) -> StepResult<()> {
    let mut closed = inject_call(t, s, |t| {
        t.call(
            saved,
            plan.insn,
            NR_CLOSE,
            [fd.unsigned_abs(), 0, 0, 0, 0, 0],
        )
    });
    for _ in 0..2 {
        if matches!(closed, Ok(0)) {
            break;
        }
        closed = t
            .call(
                saved,
                plan.insn,
                NR_CLOSE,
                [fd.unsigned_abs(), 0, 0, 0, 0, 0],
            )
            .map_err(|e| (s, e));
    }
    match closed? {
        0 => Ok(()),
        e => Err((s, Errno::from_raw_os_error((-e) as i32))),
    }
}

fn inject_call(
    t: &mut Thread,
    s: Step,
    f: impl FnOnce(&mut Thread) -> Result<i64, Errno>,
) -> StepResult<i64> {
    t.at(s).map_err(|e| (s, e))?;
    f(t).map_err(|e| (s, e))
}
