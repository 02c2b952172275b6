//! Running `userfaultfd()` inside another process from a helper process
//! that cannot be interrupted half-way (x86_64).
//!
//! [`userfaultfd_in`] forks a helper that seizes one thread of the target
//! with ptrace, runs `userfaultfd()` there (falling back to
//! `UFFD_USER_MODE_ONLY` on `EPERM` and to `/dev/userfaultfd` +
//! `USERFAULTFD_IOC_NEW` when the system call is refused), copies the new
//! fd out with `pidfd_getfd`, runs `close()` on the target's copy,
//! restores the registers, detaches, and passes the fd back over a socket
//! (`SCM_RIGHTS`).
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

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};
use rustix::process::PidfdGetfdFlags;

use super::ptrace::{self, NR_CLOSE, NR_IOCTL, NR_OPENAT, NR_USERFAULTFD, Regs, Stop};
use super::uffd::{UFFD_USER_MODE_ONLY, USERFAULTFD_IOC_NEW};

/// How the userfaultfd was obtained inside the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UffdOrigin {
    /// `userfaultfd(2)`.
    Syscall,
    /// `userfaultfd(UFFD_USER_MODE_ONLY)`, after `EPERM`.
    UserModeOnly,
    /// `/dev/userfaultfd` + `USERFAULTFD_IOC_NEW`.
    DevUserfaultfd,
}

/// The helper's steps, in order (test failpoints name them by number,
/// from 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// `PTRACE_SEIZE`.
    Seize,
    /// `PTRACE_INTERRUPT`.
    Interrupt,
    /// Waiting for the thread to stop.
    WaitStop,
    /// `PTRACE_GETREGS` of the original registers.
    SaveRegs,
    /// `userfaultfd()` in the target.
    Userfaultfd,
    /// `userfaultfd(UFFD_USER_MODE_ONLY)` in the target.
    UserModeOnly,
    /// `open("/dev/userfaultfd")` + `USERFAULTFD_IOC_NEW` in the target.
    DevUserfaultfd,
    /// `pidfd_getfd` of the new fd.
    GetFd,
    /// `close()` of the target's copy.
    CloseInTarget,
    /// `PTRACE_SETREGS` of the original registers.
    Restore,
    /// `PTRACE_DETACH`.
    Detach,
    /// Handing the fd to pagescope.
    Send,
}

/// Every step, in order: `ALL[n - 1]` is step number `n`.
const ALL: [Step; Step::LAST as usize] = [
    Step::Seize,
    Step::Interrupt,
    Step::WaitStop,
    Step::SaveRegs,
    Step::Userfaultfd,
    Step::UserModeOnly,
    Step::DevUserfaultfd,
    Step::GetFd,
    Step::CloseInTarget,
    Step::Restore,
    Step::Detach,
    Step::Send,
];

impl Step {
    /// The last step's number.
    pub const LAST: i32 = 12;

    /// The step's number (1 for the first).
    pub fn number(self) -> i32 {
        let i = ALL.iter().position(|s| *s == self).unwrap_or(0);
        i32::try_from(i + 1).unwrap_or(0)
    }

    /// The step numbered `n`.
    pub fn from_raw(n: i32) -> Option<Self> {
        usize::try_from(n - 1)
            .ok()
            .and_then(|i| ALL.get(i))
            .copied()
    }

    /// What the step does, for error messages.
    pub fn describe(self) -> &'static str {
        match self {
            Step::Seize => {
                "seize the process with ptrace (is a debugger or strace attached, or are ptrace rights missing?)"
            }
            Step::Interrupt => "interrupt the process with ptrace",
            Step::WaitStop => "wait for the process to stop",
            Step::SaveRegs => "read the process's registers",
            Step::Userfaultfd | Step::UserModeOnly | Step::DevUserfaultfd => {
                "create a userfaultfd inside the process"
            }
            Step::GetFd => "copy the userfaultfd out of the process (pidfd_getfd)",
            Step::CloseInTarget => "close the userfaultfd's copy inside the process",
            Step::Restore => "restore the process's registers",
            Step::Detach => "detach from the process",
            Step::Send => "receive the userfaultfd from the injection helper",
        }
    }
}

/// A test-only fault at one step of the helper.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failpoint {
    /// The step ([`Step`] as a number).
    pub step: i32,
    /// 0: the step fails as if its system call had (`EIO`); otherwise
    /// this signal is sent to the helper's parent (pagescope) there, and
    /// the helper carries on.
    pub signal: i32,
}

/// What the helper works on (computed before the fork).
#[derive(Clone, Copy, Debug)]
pub struct Plan<'a> {
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
pub fn userfaultfd_in(plan: &Plan<'_>, timeout: Duration) -> Result<Injected, Failed> {
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

/// The helper's answer (sent as bytes, with the fd attached on success).
#[derive(Clone, Copy, Default)]
#[repr(C)]
struct Outcome {
    /// 0, or the errno of the failed step.
    errno: i32,
    /// The failed step.
    step: i32,
    /// [`UffdOrigin`] as 0, 1, 2.
    origin: i32,
    /// The errno of the first `userfaultfd()` attempt, if it failed.
    first_errno: i32,
    /// The fd number left in the target (`keep_in_target`), else -1.
    target_fd: i32,
}

const OUTCOME_LEN: usize = std::mem::size_of::<Outcome>();

impl Outcome {
    fn to_bytes(self) -> [u8; OUTCOME_LEN] {
        let mut b = [0u8; OUTCOME_LEN];
        for (i, v) in [
            self.errno,
            self.step,
            self.origin,
            self.first_errno,
            self.target_fd,
        ]
        .into_iter()
        .enumerate()
        {
            b[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
        }
        b
    }

    fn from_bytes(b: &[u8; OUTCOME_LEN]) -> Self {
        let at =
            |i: usize| i32::from_ne_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]]);
        Self {
            errno: at(0),
            step: at(1),
            origin: at(2),
            first_errno: at(3),
            target_fd: at(4),
        }
    }
}

/// Waits (bounded) for the helper's outcome and the fd.
fn receive(sock: BorrowedFd<'_>, timeout: Duration) -> Result<Injected, Failed> {
    let lost = |errno| Failed {
        step: Step::Send,
        errno,
    };
    let mut fds = [PollFd::new(&sock, PollFlags::IN)];
    let timeout = Timespec::try_from(timeout).unwrap_or_default();
    loop {
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(0) => return Err(lost(Errno::TIMEDOUT)),
            Ok(_) => break,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(lost(e)),
        }
    }
    let mut bytes = [0u8; OUTCOME_LEN];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        sock,
        &mut [IoSliceMut::new(&mut bytes)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(lost)?;
    let fd = control.drain().find_map(|m| match m {
        RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
        _ => None,
    });
    if got.bytes != OUTCOME_LEN {
        return Err(lost(Errno::PIPE));
    }
    let o = Outcome::from_bytes(&bytes);
    if o.errno != 0 {
        return Err(Failed {
            step: Step::from_raw(o.step).unwrap_or(Step::Userfaultfd),
            errno: Errno::from_raw_os_error(o.errno),
        });
    }
    let origin = match o.origin {
        0 => UffdOrigin::Syscall,
        1 => UffdOrigin::UserModeOnly,
        _ => UffdOrigin::DevUserfaultfd,
    };
    Ok(Injected {
        fd,
        origin,
        target_fd: (o.target_fd >= 0).then_some(o.target_fd),
    })
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
fn helper(plan: &Plan<'_>, sock: BorrowedFd<'_>) -> i32 {
    // The fork copied every fd of the parent (other userfaultfds among
    // them, which would stay alive, protections and all, while this runs):
    // keep only what the helper uses.
    ptrace::close_all_but(&[
        std::os::fd::AsRawFd::as_raw_fd(&sock),
        std::os::fd::AsRawFd::as_raw_fd(&plan.pidfd),
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
    plan: &Plan<'_>,
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
    let injected = inject(t, plan, &saved, out, ours);
    // A never-restarted call the interrupt cut short is issued again.
    let back = super::restart::reissue(t.tgid, tid, &saved, t.npending > 0).unwrap_or(saved);
    let restored = t.restore(&back).map_err(|e| (Step::Restore, e));
    let detached = t.detach().map_err(|e| (Step::Detach, e));
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
    plan: &Plan<'_>,
    saved: &Regs,
    out: &mut Outcome,
    ours: &mut Option<OwnedFd>,
) -> StepResult<()> {
    let keep = match plan.job {
        Job::Close { fd } => return close_in_target(t, plan, saved, i64::from(fd)),
        Job::CreateUffd { keep_in_target } => keep_in_target,
    };
    let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
    let mut fd = inject_call(t, Step::Userfaultfd, |t| {
        t.call(saved, plan.insn, NR_USERFAULTFD, [flags, 0, 0, 0, 0, 0])
    })?;
    if fd < 0 {
        out.first_errno = (-fd) as i32;
    }
    if fd == -i64::from(libc::EPERM) {
        out.origin = 1;
        let umo = flags | u64::from(UFFD_USER_MODE_ONLY);
        fd = inject_call(t, Step::UserModeOnly, |t| {
            t.call(saved, plan.insn, NR_USERFAULTFD, [umo, 0, 0, 0, 0, 0])
        })?;
    }
    if fd < 0 {
        out.origin = 2;
        fd = inject_call(t, Step::DevUserfaultfd, |t| {
            dev_userfaultfd(t, plan, saved, flags)
        })?;
    }
    if fd < 0 {
        let s = if out.origin == 2 {
            Step::DevUserfaultfd
        } else {
            Step::Userfaultfd
        };
        return Err((s, Errno::from_raw_os_error((-fd) as i32)));
    }
    let theirs = fd as i32;
    let got = step(t, Step::GetFd, || {
        rustix::process::pidfd_getfd(plan.pidfd, theirs, PidfdGetfdFlags::empty())
    });
    if keep && got.is_ok() {
        out.target_fd = theirs;
        *ours = Some(got?);
        return Ok(());
    }
    let closed = close_in_target(t, plan, saved, fd);
    *ours = Some(got?);
    closed
}

/// `close(fd)` in the target; the target must not keep a copy it was not
/// meant to: a failed close is retried (the failpoint fails only the first
/// attempt).
fn close_in_target(t: &mut Thread, plan: &Plan<'_>, saved: &Regs, fd: i64) -> StepResult<()> {
    let mut closed = inject_call(t, Step::CloseInTarget, |t| {
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
            .map_err(|e| (Step::CloseInTarget, e));
    }
    match closed? {
        0 => Ok(()),
        e => Err((Step::CloseInTarget, Errno::from_raw_os_error((-e) as i32))),
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

/// `open("/dev/userfaultfd")` + `ioctl(USERFAULTFD_IOC_NEW)` + `close()`
/// inside the target. The path goes below the red zone of the stopped
/// thread's stack; the words it covers are restored afterwards.
fn dev_userfaultfd(
    t: &mut Thread,
    plan: &Plan<'_>,
    saved: &Regs,
    flags: u64,
) -> Result<i64, Errno> {
    const PATH: &[u8; 24] = b"/dev/userfaultfd\0\0\0\0\0\0\0\0";
    let scratch = (saved.stack_pointer().wrapping_sub(512)) & !15;
    let mut old = [0u64; 3];
    for (i, w) in old.iter_mut().enumerate() {
        *w = ptrace::peek(t.tid, scratch + 8 * i as u64)?;
    }
    let mut written = Ok(());
    for i in 0..3 {
        let mut word = [0u8; 8];
        word.copy_from_slice(&PATH[i * 8..i * 8 + 8]);
        written = written
            .and_then(|()| ptrace::poke(t.tid, scratch + 8 * i as u64, u64::from_ne_bytes(word)));
    }
    let open = (libc::O_RDWR | libc::O_CLOEXEC) as u64;
    let dev = written.and_then(|()| {
        t.call(
            saved,
            plan.insn,
            NR_OPENAT,
            [
                i64::from(libc::AT_FDCWD).cast_unsigned(),
                scratch,
                open,
                0,
                0,
                0,
            ],
        )
    });
    for (i, w) in old.iter().enumerate() {
        ptrace::poke(t.tid, scratch + 8 * i as u64, *w)?;
    }
    let dev = dev?;
    if dev < 0 {
        return Ok(dev);
    }
    let uffd = t.call(
        saved,
        plan.insn,
        NR_IOCTL,
        [dev.unsigned_abs(), USERFAULTFD_IOC_NEW, flags, 0, 0, 0],
    );
    let closed = t.call(
        saved,
        plan.insn,
        NR_CLOSE,
        [dev.unsigned_abs(), 0, 0, 0, 0, 0],
    );
    closed?;
    uffd
}

fn send(sock: BorrowedFd<'_>, out: &Outcome, fd: Option<&OwnedFd>) {
    let bytes = out.to_bytes();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds;
    if let Some(fd) = fd {
        fds = [fd.as_fd()];
        control.push(SendAncillaryMessage::ScmRights(&fds));
    }
    let _ = rustix::net::sendmsg(
        sock,
        &[IoSlice::new(&bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    );
}
