//! The post-copy receiver's helper threads and its failure line: the
//! fault thread (reads the destination's userfaultfd: `UFFD_EVENT_PAGEFAULT`
//! messages, `sys/uffd.rs`; resolves a fault or asks the sender) and the
//! filler (installs every final page nobody waits for).

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::dest::Destination;
use super::receiver::Shared;
use super::state::{Pages, show_ranges};
use crate::sys::uffd::{UFFD_EVENT_PAGEFAULT, read_msgs};

/// A random id for this transfer (`RESUMABLE`).
pub(super) fn transfer_id() -> u64 {
    let mut b = [0u8; 8];
    let _ = rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty());
    u64::from_le_bytes(b)
}

/// The error's line, with the pages that never arrived and what happens
/// to the destination's threads.
pub(super) fn lost(state: &Pages, dest: &Destination, what: &str) -> String {
    let fd = dest
        .target_fd()
        .map_or(String::new(), |fd| format!(" (its fd {fd})"));
    let which = if state.started() {
        let m = state.missing();
        let n: u64 = m.iter().map(|(a, b)| b - a + 1).sum();
        format!("{n} pages never arrived: {}", show_ranges(&m))
    } else {
        format!(
            "post-copy had not begun: none of the {} pages is final",
            state.pages()
        )
    };
    format!(
        "{what}; {which}; process {} keeps the userfaultfd{fd}: its threads that touch those pages block until it is killed",
        dest.pid()
    )
}

/// The fault thread: reads fault messages, resolves or asks.
pub(super) fn serve_faults(sh: &Shared) {
    let mut msgs = Vec::new();
    let timeout = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 50_000_000,
    };
    let uffd = sh.dest.uffd();
    while !sh.stop.load(Ordering::Relaxed) {
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
        for m in msgs.iter().filter(|m| m.event == UFFD_EVENT_PAGEFAULT) {
            let asked = sh.state().fault(&sh.dest, m.address);
            match asked {
                Ok(asks) => sh.ask(&asks),
                Err(e) => sh.fail(e),
            }
        }
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
