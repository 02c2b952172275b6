//! ptrace requests for running system calls inside another process
//! (x86_64).
//!
//! Used to create a userfaultfd *inside* a target (a uffd only tracks the
//! mm of its creator) and to close the target's copy afterwards. The
//! target's thread is seized (`PTRACE_SEIZE`, no signal sent), interrupted
//! (`PTRACE_INTERRUPT`), pointed at a `syscall` instruction with the
//! arguments in registers, single-stepped once, and restored exactly.
//!
//! A thread stopped inside a system call has `rax = -ERESTART*` and the
//! original number in `orig_rax`; the injected state uses `orig_rax = -1`
//! so the kernel's restart logic leaves it alone, and restoring the saved
//! registers afterwards lets the interrupted call restart as if nothing
//! happened (the technique CRIU's compel uses).
//!
//! Every function here is a bare system call on caller-provided memory:
//! none allocates or takes a lock, so all of them may run in a child
//! forked from a multi-threaded process (see [`fork_quiet_helper`]).
//!
//! Other architectures need their own register layout and syscall
//! instruction (`svc #0` on arm64, `ecall` on riscv64); see KERNEL.md.
//!
//! # References
//! - `ptrace(2)`: `PTRACE_SEIZE`, `PTRACE_INTERRUPT`, `PTRACE_GETREGS`,
//!   `PTRACE_SETREGS`, `PTRACE_SINGLESTEP`, `PTRACE_PEEKDATA`,
//!   `PTRACE_POKEDATA`, `PTRACE_DETACH`, `PTRACE_GET_RSEQ_CONFIGURATION`
//!   (5.13+)
//! - `fork(2)`, `signal-safety(7)`

use rustix::io::Errno;

/// The `syscall` instruction's bytes on x86_64 (`0f 05`).
pub const SYSCALL_INSN: [u8; 2] = [0x0f, 0x05];
/// `__NR_userfaultfd` on x86_64.
pub const NR_USERFAULTFD: i64 = 323;
/// `__NR_close` on x86_64.
pub const NR_CLOSE: i64 = 3;
/// `__NR_openat` on x86_64.
pub const NR_OPENAT: i64 = 257;
/// `__NR_ioctl` on x86_64.
pub const NR_IOCTL: i64 = 16;
/// `__NR_socketpair` on x86_64.
pub const NR_SOCKETPAIR: i64 = 53;
/// `__NR_recvmsg` on x86_64.
pub const NR_RECVMSG: i64 = 47;

/// `PTRACE_EVENT_STOP`: the stop `PTRACE_INTERRUPT` (or a group stop)
/// reports on a seized thread.
const PTRACE_EVENT_STOP: i32 = 128;

fn check(rc: libc::c_long) -> Result<libc::c_long, Errno> {
    if rc < 0 {
        Err(super::last_errno())
    } else {
        Ok(rc)
    }
}

/// A thread's general-purpose registers.
#[derive(Clone, Copy)]
pub struct Regs(#[cfg(target_arch = "x86_64")] libc::user_regs_struct);

impl std::fmt::Debug for Regs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Regs { .. }")
    }
}

/// What a `waitpid` on a traced thread reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// A `PTRACE_SINGLESTEP` completed (`SIGTRAP`, no event).
    Trap,
    /// `PTRACE_EVENT_STOP`: the interrupt we asked for, or a group stop.
    Event,
    /// Signal-delivery stop: the thread was about to receive this signal;
    /// it is suppressed unless handed back at detach.
    Signal(i32),
}

/// `ptrace(PTRACE_SEIZE, tid, 0, 0)`: attach without stopping or
/// signalling the thread.
pub fn seize(tid: i32) -> Result<(), Errno> {
    // SAFETY: integer arguments only.
    check(unsafe { libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0) }).map(drop)
}

/// `ptrace(PTRACE_INTERRUPT, tid, 0, 0)`: stop a seized thread.
pub fn interrupt(tid: i32) -> Result<(), Errno> {
    // SAFETY: integer arguments only.
    check(unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0) }).map(drop)
}

/// `ptrace(PTRACE_DETACH, tid, 0, sig)`: resume the thread, delivering
/// `sig` (0 for none).
pub fn detach(tid: i32, sig: i32) -> Result<(), Errno> {
    // SAFETY: integer arguments only; detaching resumes the thread.
    check(unsafe { libc::ptrace(libc::PTRACE_DETACH, tid, 0, sig as libc::c_long) }).map(drop)
}

/// `ptrace(PTRACE_SINGLESTEP, tid, 0, 0)`.
pub fn single_step(tid: i32) -> Result<(), Errno> {
    // SAFETY: integer arguments only.
    check(unsafe { libc::ptrace(libc::PTRACE_SINGLESTEP, tid, 0, 0) }).map(drop)
}

/// `waitpid(tid, &status, __WALL)` until `tid` reports a stop.
pub fn wait_stop(tid: i32) -> Result<Stop, Errno> {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes one int to `status`, a live local.
        let rc = unsafe { libc::waitpid(tid, &raw mut status, libc::__WALL) };
        if rc < 0 {
            let e = super::last_errno();
            if e == Errno::INTR {
                continue;
            }
            return Err(e);
        }
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            return Err(Errno::SRCH);
        }
        if !libc::WIFSTOPPED(status) {
            continue;
        }
        let sig = libc::WSTOPSIG(status);
        return Ok(match status >> 16 {
            PTRACE_EVENT_STOP => Stop::Event,
            0 if sig == libc::SIGTRAP => Stop::Trap,
            0 => Stop::Signal(sig),
            _ => Stop::Event,
        });
    }
}

/// `ptrace(PTRACE_PEEKDATA, tid, addr)`: one word of the target's memory.
pub fn peek(tid: i32, addr: u64) -> Result<u64, Errno> {
    // PEEKDATA returns the word itself, so -1 is ambiguous: clear errno
    // first and check it after (ptrace(2), "RETURN VALUE").
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() = 0 };
    // SAFETY: integer arguments only; the kernel reads the target's memory.
    let word = unsafe { libc::ptrace(libc::PTRACE_PEEKDATA, tid, addr, 0) };
    // SAFETY: as above.
    if word == -1 && unsafe { *libc::__errno_location() } != 0 {
        return Err(super::last_errno());
    }
    Ok(word.cast_unsigned())
}

/// `ptrace(PTRACE_POKEDATA, tid, addr, word)`: writes one word of the
/// target's memory.
pub fn poke(tid: i32, addr: u64, word: u64) -> Result<(), Errno> {
    // SAFETY: integer arguments only; the kernel writes the target's memory.
    check(unsafe { libc::ptrace(libc::PTRACE_POKEDATA, tid, addr, word) }).map(drop)
}

#[cfg(target_arch = "x86_64")]
impl Regs {
    /// `PTRACE_GETREGS`.
    pub fn get(tid: i32) -> Result<Self, Errno> {
        // SAFETY: user_regs_struct is plain integers; all-zero is valid.
        let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
        // SAFETY: PTRACE_GETREGS writes one user_regs_struct to `regs`.
        check(unsafe { libc::ptrace(libc::PTRACE_GETREGS, tid, 0, &raw mut regs) })?;
        Ok(Self(regs))
    }

    /// `PTRACE_SETREGS`.
    pub fn set(&self, tid: i32) -> Result<(), Errno> {
        // SAFETY: PTRACE_SETREGS reads one user_regs_struct from `self.0`.
        check(unsafe { libc::ptrace(libc::PTRACE_SETREGS, tid, 0, &raw const self.0) }).map(drop)
    }

    /// These registers, changed to execute `syscall(nr, args...)` at the
    /// `syscall` instruction at `insn` (`orig_rax = -1`: no restart
    /// fix-ups).
    pub fn calling(&self, insn: u64, nr: i64, args: [u64; 6]) -> Self {
        let mut r = self.0;
        r.rax = nr.cast_unsigned();
        r.orig_rax = u64::MAX;
        r.rdi = args[0];
        r.rsi = args[1];
        r.rdx = args[2];
        r.r10 = args[3];
        r.r8 = args[4];
        r.r9 = args[5];
        r.rip = insn;
        Self(r)
    }

    /// The system call's return value (a negative errno on failure).
    pub fn return_value(&self) -> i64 {
        self.0.rax.cast_signed()
    }

    /// The stack pointer.
    pub fn stack_pointer(&self) -> u64 {
        self.0.rsp
    }

    /// The instruction pointer.
    pub fn instruction_pointer(&self) -> u64 {
        self.0.rip
    }

    /// The system call the thread was stopped in or just returned from
    /// (`orig_rax`), if any; only for 64-bit code (`cs` = `__USER_CS`).
    pub fn syscall_nr(&self) -> Option<i64> {
        let nr = self.0.orig_rax.cast_signed();
        (nr >= 0 && self.0.cs == 0x33).then_some(nr)
    }

    /// These registers rewound to issue the interrupted system call again:
    /// `rip` back over the 2-byte `syscall` instruction and `rax` = the
    /// number (`orig_rax`); the argument registers are unchanged. What the
    /// kernel's own restart does for `-ERESTARTSYS`.
    pub fn reissued(&self) -> Self {
        let mut r = self.0;
        r.rax = r.orig_rax;
        r.rip = r.rip.wrapping_sub(SYSCALL_INSN.len() as u64);
        Self(r)
    }
}

#[cfg(not(target_arch = "x86_64"))]
impl Regs {
    /// Syscall injection is implemented for x86_64 only.
    pub fn get(_tid: i32) -> Result<Self, Errno> {
        Err(Errno::NOSYS)
    }
    /// Syscall injection is implemented for x86_64 only.
    pub fn set(&self, _tid: i32) -> Result<(), Errno> {
        Err(Errno::NOSYS)
    }
    /// Syscall injection is implemented for x86_64 only.
    pub fn calling(&self, _insn: u64, _nr: i64, _args: [u64; 6]) -> Self {
        *self
    }
    /// Syscall injection is implemented for x86_64 only.
    pub fn return_value(&self) -> i64 {
        -i64::from(libc::ENOSYS)
    }
    /// Syscall injection is implemented for x86_64 only.
    pub fn stack_pointer(&self) -> u64 {
        0
    }
    /// Syscall injection is implemented for x86_64 only.
    pub fn instruction_pointer(&self) -> u64 {
        0
    }
    /// Syscall injection is implemented for x86_64 only.
    pub fn syscall_nr(&self) -> Option<i64> {
        None
    }
    /// Syscall injection is implemented for x86_64 only.
    pub fn reissued(&self) -> Self {
        *self
    }
}

/// `PTRACE_GET_RSEQ_CONFIGURATION` (`linux/ptrace.h`, Linux 5.13+).
const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;

/// `struct ptrace_rseq_configuration` (`linux/ptrace.h`).
#[repr(C)]
#[derive(Default)]
struct RawRseqConfiguration {
    rseq_abi_pointer: u64,
    rseq_abi_size: u32,
    signature: u32,
    flags: u32,
    pad: u32,
}

/// A thread's registered rseq area (`rseq(2)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RseqConfiguration {
    /// Address of its `struct rseq`.
    pub address: u64,
    /// Registered length in bytes (32 with glibc 2.35+).
    pub length: u32,
    /// The abort signature.
    pub signature: u32,
}

/// `ptrace(PTRACE_GET_RSEQ_CONFIGURATION, tid, sizeof conf, &conf)`: the
/// rseq area `tid` registered, `None` if it registered none. The thread
/// must be in a ptrace stop (`EINVAL` before Linux 5.13, `ESRCH` when it
/// is not stopped).
pub fn rseq_configuration(tid: i32) -> Result<Option<RseqConfiguration>, Errno> {
    let mut conf = RawRseqConfiguration::default();
    // SAFETY: the kernel writes at most `size_of::<RawRseqConfiguration>()`
    // bytes (the size passed as `addr`) into `conf`, a live local.
    check(unsafe {
        libc::ptrace(
            PTRACE_GET_RSEQ_CONFIGURATION,
            tid,
            std::mem::size_of::<RawRseqConfiguration>(),
            &raw mut conf,
        )
    })?;
    Ok((conf.rseq_abi_pointer != 0).then_some(RseqConfiguration {
        address: conf.rseq_abi_pointer,
        length: conf.rseq_abi_size,
        signature: conf.signature,
    }))
}

/// `tgkill(tgid, tid, sig)`: re-raises a signal pagescope intercepted.
pub fn tgkill(tgid: i32, tid: i32, sig: i32) -> Result<(), Errno> {
    // SAFETY: integer arguments only.
    check(unsafe { libc::syscall(libc::SYS_tgkill, tgid, tid, sig) }).map(drop)
}

/// `kill(getppid(), sig)` (test failpoints only).
pub fn signal_parent(sig: i32) {
    // SAFETY: integer arguments only.
    unsafe { libc::kill(libc::getppid(), sig) };
}

/// Forks a helper process that runs `child` with every catchable signal
/// blocked, then `_exit`s with its result. Returns the helper's PID.
///
/// The helper is not killed when its parent dies (no `PR_SET_PDEATHSIG`)
/// and ignores `SIGINT`, `SIGTERM`, `SIGHUP`, `SIGQUIT` and `SIGPIPE`
/// (they stay blocked), so work it has begun on another process (a stopped
/// thread with injected registers) is always finished. The calling
/// thread's signal mask is restored before this returns.
///
/// # Safety
///
/// The caller may be multi-threaded, so `child` runs in a copy of the
/// process where other threads' locks may be held forever: it must only
/// make async-signal-safe calls (`signal-safety(7)`): no allocation, no
/// locks, no stdio, no panics.
pub unsafe fn fork_quiet_helper(child: impl FnOnce() -> i32) -> Result<i32, Errno> {
    // SAFETY: sigset_t is plain data; sigfillset initialises it.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to live locals.
    unsafe {
        libc::sigfillset(&raw mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &raw const all, &raw mut old);
    }
    // SAFETY: see the function's contract; the child only runs `child`
    // and `_exit`.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let code = child();
        // SAFETY: _exit is async-signal-safe and never returns.
        unsafe { libc::_exit(code) };
    }
    let err = super::last_errno();
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &raw const old, std::ptr::null_mut()) };
    if pid < 0 { Err(err) } else { Ok(pid) }
}

/// Closes every fd above stderr except `keep` (`close_range(2)`, Linux
/// 5.9+; async-signal-safe). Errors are ignored: it only hastens the
/// release of what the process would close at exit anyway.
pub fn close_all_but(keep: &[i32]) {
    let mut keep_sorted = [i32::MAX; 8];
    let n = keep.len().min(keep_sorted.len());
    keep_sorted[..n].copy_from_slice(&keep[..n]);
    keep_sorted[..n].sort_unstable();
    let mut from: u32 = 3;
    for &k in &keep_sorted[..n] {
        let Ok(k) = u32::try_from(k) else { continue };
        if k > from {
            // SAFETY: close_range takes integers only; the closed fds are
            // copies the forked helper never uses.
            unsafe { libc::syscall(libc::SYS_close_range, from, k - 1, 0u32) };
        }
        from = from.max(k + 1);
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, from, u32::MAX, 0u32) };
}

/// `waitpid(pid, &status, 0)`, retrying on `EINTR`; returns the exit code
/// (128 + signal if it was killed).
pub fn reap(pid: i32) -> Result<i32, Errno> {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes one int to `status`, a live local.
        let rc = unsafe { libc::waitpid(pid, &raw mut status, 0) };
        if rc >= 0 {
            return Ok(if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            });
        }
        let e = super::last_errno();
        if e != Errno::INTR {
            return Err(e);
        }
    }
}
