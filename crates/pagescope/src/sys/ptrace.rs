//! Running one system call inside another process with ptrace (x86_64).
//!
//! Used to create a userfaultfd *inside* a target (a uffd only tracks the
//! mm of its creator) and to close the target's copy afterwards. The
//! target is seized (`PTRACE_SEIZE`, no signal sent), interrupted
//! (`PTRACE_INTERRUPT`), pointed at a `syscall` instruction with the
//! arguments in registers, single-stepped once, and restored exactly.
//!
//! A thread stopped inside a system call has `rax = -ERESTART*` and the
//! original number in `orig_rax`; the injected state uses `orig_rax = -1`
//! so the kernel's restart logic leaves it alone, and restoring the saved
//! registers afterwards lets the interrupted call restart as if nothing
//! happened (the technique CRIU's compel uses).
//!
//! Other architectures need their own register layout and syscall
//! instruction (`svc #0` on arm64, `ecall` on riscv64); see KERNEL.md.
//!
//! # References
//! - `ptrace(2)`: `PTRACE_SEIZE`, `PTRACE_INTERRUPT`, `PTRACE_GETREGS`,
//!   `PTRACE_SETREGS`, `PTRACE_SINGLESTEP`, `PTRACE_DETACH`

use rustix::io::Errno;

/// A seized, stopped thread; detached (registers restored) on drop.
#[derive(Debug)]
pub struct Seized {
    tid: i32,
    #[cfg(target_arch = "x86_64")]
    saved: libc::user_regs_struct,
}

fn check(rc: libc::c_long) -> Result<libc::c_long, Errno> {
    if rc < 0 {
        Err(super::last_errno())
    } else {
        Ok(rc)
    }
}

/// `waitpid(tid, &status, __WALL)` until `tid` reports a stop.
fn wait_stop(tid: i32) -> Result<i32, Errno> {
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
        if libc::WIFSTOPPED(status) {
            return Ok(status);
        }
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            return Err(Errno::SRCH);
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl Seized {
    /// `PTRACE_SEIZE` + `PTRACE_INTERRUPT` of thread `tid`, waiting for
    /// the stop and saving its registers.
    pub fn seize(tid: i32) -> Result<Self, Errno> {
        // SAFETY: plain ptrace requests with integer arguments; no pointers.
        check(unsafe { libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0) })?;
        // SAFETY: as above.
        if let Err(e) = check(unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0) }) {
            // SAFETY: undo the seize; integer arguments only.
            unsafe { libc::ptrace(libc::PTRACE_DETACH, tid, 0, 0) };
            return Err(e);
        }
        let stopped = wait_stop(tid);
        let mut me = Self {
            tid,
            saved: zeroed_regs(),
        };
        stopped?;
        me.saved = me.regs()?;
        Ok(me)
    }

    fn regs(&self) -> Result<libc::user_regs_struct, Errno> {
        let mut regs = zeroed_regs();
        // SAFETY: PTRACE_GETREGS writes one user_regs_struct to `regs`.
        check(unsafe { libc::ptrace(libc::PTRACE_GETREGS, self.tid, 0, &raw mut regs) })?;
        Ok(regs)
    }

    fn set_regs(&self, regs: &libc::user_regs_struct) -> Result<(), Errno> {
        // SAFETY: PTRACE_SETREGS reads one user_regs_struct from `regs`.
        check(unsafe {
            libc::ptrace(libc::PTRACE_SETREGS, self.tid, 0, std::ptr::from_ref(regs))
        })?;
        Ok(())
    }

    /// Executes `syscall(nr, args...)` in the stopped thread, using the
    /// `syscall` instruction at `insn`, and returns its raw result (a
    /// negative errno on failure). Registers are restored afterwards.
    pub fn syscall(&mut self, insn: u64, nr: i64, args: [u64; 6]) -> Result<i64, Errno> {
        let mut r = self.saved;
        r.rax = nr.cast_unsigned();
        r.orig_rax = u64::MAX; // -1: not in a syscall, no restart fixups
        r.rdi = args[0];
        r.rsi = args[1];
        r.rdx = args[2];
        r.r10 = args[3];
        r.r8 = args[4];
        r.r9 = args[5];
        r.rip = insn;
        self.set_regs(&r)?;
        let result = self.step().and_then(|()| self.regs());
        self.set_regs(&self.saved)?;
        Ok(result?.rax.cast_signed())
    }

    fn step(&self) -> Result<(), Errno> {
        // SAFETY: integer arguments only.
        check(unsafe { libc::ptrace(libc::PTRACE_SINGLESTEP, self.tid, 0, 0) })?;
        wait_stop(self.tid).map(drop)
    }
}

#[cfg(target_arch = "x86_64")]
fn zeroed_regs() -> libc::user_regs_struct {
    // SAFETY: user_regs_struct is plain integers; all-zero is valid.
    unsafe { std::mem::zeroed() }
}

#[cfg(not(target_arch = "x86_64"))]
impl Seized {
    /// Syscall injection is implemented for x86_64 only.
    pub fn seize(_tid: i32) -> Result<Self, Errno> {
        Err(Errno::NOSYS)
    }

    /// Syscall injection is implemented for x86_64 only.
    pub fn syscall(&mut self, _insn: u64, _nr: i64, _args: [u64; 6]) -> Result<i64, Errno> {
        Err(Errno::NOSYS)
    }
}

impl Drop for Seized {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        let _ = self.set_regs(&self.saved);
        // SAFETY: integer arguments only; detaching resumes the thread.
        unsafe { libc::ptrace(libc::PTRACE_DETACH, self.tid, 0, 0) };
    }
}

/// The `syscall` instruction's bytes on x86_64 (`0f 05`).
pub const SYSCALL_INSN: [u8; 2] = [0x0f, 0x05];
/// `__NR_userfaultfd` on x86_64.
pub const NR_USERFAULTFD: i64 = 323;
/// `__NR_close` on x86_64.
pub const NR_CLOSE: i64 = 3;
