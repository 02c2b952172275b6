//! Stopping a process for the final pass without a signal anyone can see:
//! every thread is seized and interrupted with ptrace (`PTRACE_SEIZE` +
//! `PTRACE_INTERRUPT`, no `SIGSTOP`, nothing its parent's `waitpid` would
//! report), threads created meanwhile too, until the set is stable.
//! Signals that arrive while stopped are handed back at resume.
//!
//! If pagescope dies while the threads are stopped, the kernel detaches
//! them and they simply run on: nothing was changed in them.
//!
//! A thread the stop pulled out of a call the kernel never restarts
//! (`epoll_wait` and the others of `crate::sys::restart`) is rewound at
//! resume to issue it again, unless a signal is pending that would have
//! interrupted it anyway: the stop causes no `EINTR`.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::proc::Target;
use crate::sys::ptrace::{self, Regs, Stop};
use crate::sys::restart;

/// The threads of one process, stopped.
#[derive(Debug)]
pub struct Stopped {
    /// The process (to send the `SIGSTOP` of `leave_stopped`).
    pidfd: std::os::fd::OwnedFd,
    /// The process's PID (for `/proc/PID/task/TID/status`).
    tgid: i32,
    /// Thread → signal that arrived while it was stopped (0: none).
    threads: BTreeMap<i32, i32>,
    since: Instant,
    /// Deliver SIGSTOP at resume (`--leave-stopped`).
    leave_stopped: bool,
}

impl Stopped {
    /// Seizes and interrupts every thread of `target`, repeating until no
    /// new thread appears.
    pub fn stop(target: &Target) -> std::io::Result<Self> {
        let mut s = Self {
            pidfd: target.pidfd().try_clone_to_owned()?,
            tgid: i32::try_from(target.pid()).unwrap_or(0),
            threads: BTreeMap::new(),
            since: Instant::now(),
            leave_stopped: false,
        };
        for _ in 0..100 {
            let tasks = target.tasks().map_err(std::io::Error::other)?;
            let new: Vec<i32> = tasks
                .into_iter()
                .filter_map(|t| i32::try_from(t).ok())
                .filter(|t| !s.threads.contains_key(t))
                .collect();
            if new.is_empty() {
                return Ok(s);
            }
            for tid in new {
                if s.stop_thread(tid).is_ok() {
                    s.threads.insert(tid, 0);
                }
            }
        }
        Ok(s)
    }

    fn stop_thread(&mut self, tid: i32) -> Result<(), rustix::io::Errno> {
        ptrace::seize(tid)?;
        if let Err(e) = ptrace::interrupt(tid) {
            let _ = ptrace::detach(tid, 0);
            return Err(e);
        }
        match ptrace::wait_stop(tid) {
            Ok(Stop::Signal(sig)) => {
                self.threads.insert(tid, sig);
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The rseq area of every stopped thread
    /// (`PTRACE_GET_RSEQ_CONFIGURATION`, Linux 5.13+); address 0 for a
    /// thread that registered none (or an older kernel).
    pub fn rseq_areas(&self) -> Vec<crate::image::format::RseqRec> {
        self.threads
            .keys()
            .filter_map(|&tid| {
                let c = ptrace::rseq_configuration(tid).ok().flatten();
                Some(crate::image::format::RseqRec {
                    tid: u32::try_from(tid).ok()?,
                    address: c.map_or(0, |c| c.address),
                    length: c.map_or(0, |c| c.length),
                    signature: c.map_or(0, |c| c.signature),
                })
            })
            .collect()
    }

    /// Leave the process stopped (a `SIGSTOP` sent at resume) instead of
    /// letting it run.
    pub fn leave_stopped(&mut self) {
        self.leave_stopped = true;
    }

    /// How long it has been stopped.
    pub fn elapsed(&self) -> std::time::Duration {
        self.since.elapsed()
    }

    /// Lets every thread run again (signals that arrived are delivered).
    pub fn resume(mut self) -> std::time::Duration {
        self.detach_all();
        self.since.elapsed()
    }

    fn detach_all(&mut self) {
        // Before a `leave_stopped` SIGSTOP, which would count as pending.
        self.reissue_interrupted();
        if self.leave_stopped && !self.threads.is_empty() {
            // Queued now, acted on as the threads are let go: a plain
            // group stop, as if the process had been sent SIGSTOP.
            let _ = rustix::process::pidfd_send_signal(&self.pidfd, rustix::process::Signal::STOP);
        }
        let threads = std::mem::take(&mut self.threads);
        for (tid, sig) in threads {
            let _ = ptrace::detach(tid, sig);
        }
    }
}

impl Stopped {
    /// Rewinds the threads the stop interrupted in a never-restarted
    /// system call (no signal of their own seen or pending).
    fn reissue_interrupted(&self) {
        for (&tid, &sig) in &self.threads {
            let Ok(regs) = Regs::get(tid) else { continue };
            if let Some(again) = restart::reissue(self.tgid, tid, &regs, sig != 0) {
                let _ = again.set(tid);
            }
        }
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        self.detach_all();
    }
}
