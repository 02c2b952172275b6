//! The post-copy receiver's helper threads: the fault thread (reads the
//! destination's userfaultfd: `UFFD_EVENT_PAGEFAULT` messages,
//! `sys/uffd.rs`; resolves a fault or asks the sender; registers mappings
//! of FILE the destination made later) and the filler (installs every
//! final page nobody waits for).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::receiver::Shared;
use crate::sys::uffd::{UFFD_EVENT_PAGEFAULT, read_msgs};

/// How often the destination's mappings of `FILE` are read again.
const RESCAN: Duration = Duration::from_millis(50);

/// The fault thread: reads fault messages, resolves or asks; finds the
/// destination's new mappings of `FILE` (every [`RESCAN`], and when a
/// fault is outside the known ones).
pub(super) fn serve_faults(sh: &Shared) {
    let mut msgs = Vec::new();
    let mut scanned = Instant::now();
    let timeout = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 50_000_000,
    };
    let uffd = sh.dest.uffd();
    while !sh.stop.load(Ordering::Relaxed) {
        if scanned.elapsed() >= RESCAN {
            rescan(sh);
            scanned = Instant::now();
        }
        let mut fds = [rustix::event::PollFd::new(
            &uffd,
            rustix::event::PollFlags::IN,
        )];
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(0) | Err(rustix::io::Errno::INTR) => continue,
            Ok(_) => {}
            Err(_) => return,
        }
        msgs.clear();
        if read_msgs(sh.dest.uffd(), &mut msgs).is_err() || msgs.is_empty() {
            // Readable with nothing to read: DEST's memory is gone.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        let faults = msgs.iter().filter(|m| m.event == UFFD_EVENT_PAGEFAULT);
        if faults.clone().any(|m| sh.dest.page_of(m.address).is_none()) {
            rescan(sh);
        }
        for m in faults {
            let asked = sh.state().fault(&sh.dest, m.address);
            match asked {
                Ok(asks) => sh.ask(&asks),
                Err(e) => sh.fail(e),
            }
        }
    }
}

fn rescan(sh: &Shared) {
    if let Err(e) = sh.dest.rescan() {
        sh.fail(format!("a new mapping of the file in the destination: {e}"));
    }
}

/// The filler: every final page nobody asked for, in order, a few at a
/// time so faults get the lock in between.
pub(super) fn fill(sh: &Shared) {
    let mut next = Some(0);
    while let Some(from) = next {
        if sh.stop.load(Ordering::Relaxed) {
            return;
        }
        let r = sh.state().fill(&sh.dest, from, 64);
        match r {
            Ok(n) => next = n,
            Err(e) => return sh.fail(e),
        }
    }
}
