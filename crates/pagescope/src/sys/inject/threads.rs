//! Stopping every other thread of the target while the helper puts fds
//! into its fd table, so no thread of it can observe them (an `open()`
//! that would get another number, a walk of `/proc/self/fd`, a
//! `close_range`): `PTRACE_SEIZE` + `PTRACE_INTERRUPT` of each thread
//! listed in `/proc/PID/task`, repeated until no new one appears (a
//! stopped thread cannot create one). Allocation-free (the helper runs in
//! a forked child of a multi-threaded process).
//!
//! # References
//! - `ptrace(2)` (`PTRACE_SEIZE`, `PTRACE_INTERRUPT`), `proc_pid_task(5)`

use std::mem::MaybeUninit;

use rustix::fs::{Mode, OFlags, RawDir};
use rustix::io::Errno;

use crate::sys::ptrace::{self, Regs, Stop};
use crate::sys::restart;

/// Threads stopped at most (more: the step fails with `E2BIG`, and the
/// device is not handed over).
const MAX_THREADS: usize = 1024;

/// The other threads of a target, stopped.
pub(super) struct Others {
    tgid: i32,
    tids: [i32; MAX_THREADS],
    /// The signal each reported while stopping (0: none), handed back.
    signals: [i32; MAX_THREADS],
    n: usize,
}

impl Others {
    /// Nothing stopped yet.
    pub(super) fn none(tgid: i32) -> Self {
        Self {
            tgid,
            tids: [0; MAX_THREADS],
            signals: [0; MAX_THREADS],
            n: 0,
        }
    }

    /// Stops every thread of the target but `seized` (stopped already),
    /// until a pass over `/proc/PID/task` finds no new one. On failure the
    /// threads stopped so far stay recorded: [`Self::resume`] lets them go.
    pub(super) fn stop_all(&mut self, seized: i32) -> Result<(), Errno> {
        for _ in 0..100 {
            let mut fresh = 0;
            let mut list = [0i32; 256];
            let mut complete = false;
            while !complete {
                let (n, done) = self.unseen(seized, &mut list)?;
                complete = done;
                for &tid in &list[..n] {
                    if self.stop_one(tid)? {
                        fresh += 1;
                    }
                }
            }
            if fresh == 0 {
                return Ok(());
            }
        }
        Err(Errno::AGAIN)
    }

    /// Up to `out.len()` threads not stopped yet; `true` when the listing
    /// was complete.
    fn unseen(&self, seized: i32, out: &mut [i32]) -> Result<(usize, bool), Errno> {
        let mut path = [0u8; 40];
        let n = task_dir_path(self.tgid, &mut path);
        let dir = rustix::fs::open(
            std::ffi::CStr::from_bytes_with_nul(&path[..=n]).map_err(|_| Errno::INVAL)?,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let mut buf = [MaybeUninit::<u8>::uninit(); 4096];
        let mut entries = RawDir::new(&dir, &mut buf);
        let mut k = 0;
        while let Some(entry) = entries.next() {
            let Some(tid) = parse_tid(entry?.file_name().to_bytes()) else {
                continue;
            };
            if tid == seized || self.tids[..self.n].contains(&tid) || out[..k].contains(&tid) {
                continue;
            }
            if k == out.len() {
                return Ok((k, false));
            }
            out[k] = tid;
            k += 1;
        }
        Ok((k, true))
    }

    /// Seizes and interrupts `tid`; `false` if it exited meanwhile.
    fn stop_one(&mut self, tid: i32) -> Result<bool, Errno> {
        if self.n == MAX_THREADS {
            return Err(Errno::TOOBIG);
        }
        match ptrace::seize(tid) {
            Ok(()) => {}
            Err(Errno::SRCH) => return Ok(false),
            Err(e) => return Err(e),
        }
        self.tids[self.n] = tid;
        self.signals[self.n] = 0;
        self.n += 1;
        ptrace::interrupt(tid)?;
        match ptrace::wait_stop(tid) {
            Ok(Stop::Signal(sig)) => self.signals[self.n - 1] = sig,
            Ok(_) => {}
            // It exited between the seize and the stop: nothing to resume.
            Err(Errno::SRCH) => self.n -= 1,
            Err(e) => return Err(e),
        }
        Ok(true)
    }

    /// Lets every stopped thread run again: one the stop pulled out of a
    /// never-restarted call is rewound to issue it again; signals that
    /// arrived meanwhile are handed back.
    pub(super) fn resume(&mut self) {
        for i in 0..self.n {
            let (tid, sig) = (self.tids[i], self.signals[i]);
            if let Ok(regs) = Regs::get(tid) {
                if let Some(again) = restart::reissue(self.tgid, tid, &regs, sig != 0) {
                    let _ = again.set(tid);
                }
            }
            let _ = ptrace::detach(tid, sig);
        }
        self.n = 0;
    }
}

/// `/proc/TGID/task` NUL-terminated into `out`; its length without NUL.
fn task_dir_path(tgid: i32, out: &mut [u8; 40]) -> usize {
    let mut n = 0;
    for &b in b"/proc/" {
        out[n] = b;
        n += 1;
    }
    let (digits, k) = restart::dec(tgid);
    for &d in &digits[..k] {
        out[n] = d;
        n += 1;
    }
    for &b in b"/task" {
        out[n] = b;
        n += 1;
    }
    out[n] = 0;
    n
}

fn parse_tid(name: &[u8]) -> Option<i32> {
    if name.is_empty() || !name.iter().all(u8::is_ascii_digit) {
        return None;
    }
    name.iter().try_fold(0i32, |v, &d| {
        v.checked_mul(10)?.checked_add(i32::from(d - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_paths_and_names() {
        let mut p = [0u8; 40];
        let n = task_dir_path(40213, &mut p);
        assert_eq!(&p[..=n], b"/proc/40213/task\0");
        assert_eq!(parse_tid(b"123"), Some(123));
        assert_eq!(parse_tid(b"."), None);
        assert_eq!(parse_tid(b""), None);
    }
}
