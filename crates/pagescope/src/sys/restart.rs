//! Re-issuing a system call that a ptrace stop interrupted for good
//! (x86_64).
//!
//! `PTRACE_INTERRUPT` wakes a thread blocked in a system call as a signal
//! would. Most calls then return `-ERESTART*`, and the kernel restarts them
//! after the stop when no handler runs. The calls signal(7) lists as "never
//! restarted" return `-EINTR` instead, even without a handler: `epoll_wait`,
//! `epoll_pwait`, `epoll_pwait2`, `semop`, `semtimedop`, `sigtimedwait`,
//! `sigwaitinfo`, `io_getevents` and socket calls on a socket with
//! `SO_RCVTIMEO`/`SO_SNDTIMEO` (measured on 6.18: `recvmmsg` with a
//! timeout, `msgrcv`, `msgsnd`, `futex`, `nanosleep`, `clock_nanosleep`,
//! `poll`, `ppoll`, `select`, `pselect6`, `pause`, inotify `read()` all
//! return `-ERESTART*` and are restarted by the kernel).
//!
//! At the interrupt stop such a thread has `orig_rax` = the call and
//! `rax = -EINTR` already; the tracer rewinds it (`rip` back over the
//! `syscall` instruction, `rax = orig_rax`; the arguments are still in their
//! registers) so that it issues the call again on resume. Only when no
//! signal that would have interrupted the call anyway is pending: the
//! thread's pending and shared-pending sets, minus blocked and ignored
//! signals (`/proc/PID/task/TID/status`). A finite timeout starts again
//! whole (none of these calls writes the remaining time back), so such a
//! wait can last up to the time already waited longer.
//!
//! Everything here is plain system calls on stack memory, so the injection
//! helper (a child forked from a multi-threaded process) may call it.
//!
//! # References
//! - `signal(7)`, "Interruption of system calls and library functions by
//!   stop signals"; `arch/x86/kernel/signal.c` (`arch_do_signal_or_restart`)
//! - `proc_pid_status(5)`: `SigPnd`, `ShdPnd`, `SigBlk`, `SigIgn`, `SigCgt`

use super::ptrace::{self, Regs, SYSCALL_INSN};

/// The x86_64 system calls that return `-EINTR` after a ptrace stop and
/// are not restarted by the kernel (signal(7)); `msgrcv`/`msgsnd` only on
/// old kernels, harmless here.
pub const NEVER_RESTARTED: [i64; 19] = [
    232, // epoll_wait
    281, // epoll_pwait
    441, // epoll_pwait2
    65,  // semop
    220, // semtimedop
    128, // rt_sigtimedwait (sigtimedwait, sigwaitinfo)
    208, // io_getevents
    333, // io_pgetevents
    42,  // connect (SO_SNDTIMEO)
    43,  // accept (SO_RCVTIMEO)
    288, // accept4
    44,  // sendto
    45,  // recvfrom
    46,  // sendmsg
    47,  // recvmsg
    299, // recvmmsg
    307, // sendmmsg
    69,  // msgsnd
    70,  // msgrcv
];

/// Signals whose default action is to ignore them (`sig_kernel_ignore`):
/// without a handler they interrupt nothing.
const DEFAULT_IGNORED: u64 =
    bit(libc::SIGCHLD) | bit(libc::SIGCONT) | bit(libc::SIGWINCH) | bit(libc::SIGURG);

const fn bit(sig: i32) -> u64 {
    1 << (sig - 1)
}

/// The registers to resume thread `tid` of `tgid` with so that it issues
/// again a never-restarted system call the stop interrupted; `None` to
/// resume it as it is (not in such a call, not interrupted by us, or a
/// signal is there that would have interrupted it anyway).
/// `signal_seen`: a signal-delivery stop was reported for the thread.
pub fn reissue(tgid: i32, tid: i32, regs: &Regs, signal_seen: bool) -> Option<Regs> {
    if signal_seen {
        return None;
    }
    let nr = regs.syscall_nr()?;
    if regs.return_value() != -i64::from(libc::EINTR) || !NEVER_RESTARTED.contains(&nr) {
        return None;
    }
    let at = regs
        .instruction_pointer()
        .wrapping_sub(SYSCALL_INSN.len() as u64);
    let word = ptrace::peek(tid, at).ok()?.to_le_bytes();
    if word[..2] != SYSCALL_INSN || signal_pending(tgid, tid) {
        return None;
    }
    Some(regs.reissued())
}

/// Whether a signal that would interrupt a system call is pending for the
/// thread: pending (its own or the process's), not blocked, not ignored.
/// `true` when the status cannot be read (then nothing is rewound).
pub fn signal_pending(tgid: i32, tid: i32) -> bool {
    let mut path = [0u8; 64];
    let mut n = 0;
    for part in [&b"/proc/"[..], &dec(tgid).0[..dec(tgid).1]] {
        path[n..n + part.len()].copy_from_slice(part);
        n += part.len();
    }
    for part in [&b"/task/"[..], &dec(tid).0[..dec(tid).1], &b"/status"[..]] {
        path[n..n + part.len()].copy_from_slice(part);
        n += part.len();
    }
    let mut buf = [0u8; 8192];
    let Some(len) = read_file(&path[..=n], &mut buf) else {
        return true;
    };
    let text = &buf[..len];
    let field = |key: &[u8]| mask(text, key);
    let (Some(pnd), Some(shd), Some(blk), Some(ign), Some(cgt)) = (
        field(b"SigPnd:"),
        field(b"ShdPnd:"),
        field(b"SigBlk:"),
        field(b"SigIgn:"),
        field(b"SigCgt:"),
    ) else {
        return true;
    };
    (pnd | shd) & !blk & !ign & !(DEFAULT_IGNORED & !cgt) != 0
}

/// `n` in decimal (digits, length), without allocating (used between
/// `fork` and the helper's exit).
pub(super) fn dec(n: i32) -> ([u8; 12], usize) {
    let mut out = [0u8; 12];
    let mut digits = [0u8; 12];
    let mut v = n.unsigned_abs();
    let mut k = 0;
    loop {
        digits[k] = b'0' + (v % 10) as u8;
        k += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for i in 0..k {
        out[i] = digits[k - 1 - i];
    }
    (out, k)
}

/// Reads the file at NUL-terminated `path` into `buf`; its length.
fn read_file(path: &[u8], buf: &mut [u8]) -> Option<usize> {
    // SAFETY: `path` is NUL-terminated (the caller leaves a zero byte).
    let fd = unsafe { libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    let mut len = 0;
    while len < buf.len() {
        // SAFETY: writes at most `buf.len() - len` bytes into `buf[len..]`.
        let r = unsafe { libc::read(fd, buf[len..].as_mut_ptr().cast(), buf.len() - len) };
        if r <= 0 {
            break;
        }
        len += r.cast_unsigned();
    }
    // SAFETY: `fd` was opened above and is closed once.
    unsafe { libc::close(fd) };
    Some(len)
}

/// The hex mask after `key` at the start of a line of `text`.
fn mask(text: &[u8], key: &[u8]) -> Option<u64> {
    let at = text
        .windows(key.len() + 1)
        .position(|w| w[0] == b'\n' && &w[1..] == key)?;
    let mut v: u64 = 0;
    let mut seen = false;
    for &c in text[at + 1 + key.len()..]
        .iter()
        .skip_while(|c| c.is_ascii_whitespace())
    {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => break,
        };
        v = (v << 4) | u64::from(d);
        seen = true;
    }
    seen.then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_are_read_from_status_text() {
        let text = b"Name:\tx\nSigQ:\t0/1\nSigPnd:\t0000000000000200\nShdPnd:\t0000000000000000\nSigBlk:\t0000000000010000\n";
        assert_eq!(mask(text, b"SigPnd:"), Some(0x200));
        assert_eq!(mask(text, b"SigBlk:"), Some(0x10000));
        assert_eq!(mask(text, b"SigIgn:"), None);
        assert_eq!(dec(40213).0[..5], *b"40213");
    }

    #[test]
    fn our_own_thread_has_no_signal_pending() {
        let pid = i32::try_from(std::process::id()).unwrap();
        // SAFETY: gettid takes no arguments.
        let tid = unsafe { libc::gettid() };
        assert!(!signal_pending(pid, tid));
    }
}
