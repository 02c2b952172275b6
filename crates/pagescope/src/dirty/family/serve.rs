//! The family's fault-handling thread: reads every mm's messages as they
//! come (forks, mremaps, write faults), records each write and lets the
//! writer go.

use std::sync::Arc;

use rustix::event::epoll;
use rustix::io::Errno;

use super::{Ctx, Mapped, Shared, State, WAKE, add_ctx};
use crate::addr::{PageSize, VirtAddr, VirtRange};
use crate::rangeset::RangeSet;
use crate::sys::uffd::{
    FaultMsg, UFFD_EVENT_FORK, UFFD_EVENT_PAGEFAULT, UFFD_EVENT_REMAP, UFFD_PAGEFAULT_FLAG_WP,
};
use crate::uffd::SyncUserfaultfd;
use crate::vma::ObjectId;

/// The fault-handling thread: reads every mm's messages as they come.
pub(super) fn serve(shared: &Shared) {
    let empty = epoll::Event {
        flags: epoll::EventFlags::empty(),
        data: epoll::EventData::new_u64(0),
    };
    let mut events = [empty; 64];
    loop {
        // Every message read in the last round has been handled.
        shared
            .rounds
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        let busy = shared.lock().ctxs.values().any(|c| !c.pending.is_empty());
        if busy {
            retry_pending(shared);
        }
        let timeout = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: if busy { 200_000 } else { 100_000_000 },
        };
        let n = match epoll::wait(&shared.epoll, &mut events[..], Some(&timeout)) {
            Ok(n) => n,
            Err(Errno::INTR) => 0,
            Err(_) => return,
        };
        if shared.lock().stop {
            return;
        }
        for e in &events[..n] {
            let key = e.data.u64();
            if key == WAKE {
                let mut b = [0u8; 8];
                let _ = rustix::io::read(&shared.wake, &mut b);
                continue;
            }
            drain(shared, key);
        }
    }
}

/// Reads and handles every pending message of mm `id`.
fn drain(shared: &Shared, id: u64) {
    loop {
        let Some(uffd) = shared.lock().ctxs.get(&id).map(|c| Arc::clone(&c.uffd)) else {
            return;
        };
        let mut msgs = Vec::new();
        if uffd.read_msgs(&mut msgs).is_err() || msgs.is_empty() {
            return;
        }
        // Forks first: a fault of the same batch may need them read.
        for m in msgs.iter().filter(|m| m.event == UFFD_EVENT_FORK) {
            forked(shared, id, &uffd, m);
        }
        let mut st = shared.lock();
        for m in &msgs {
            match m.event {
                UFFD_EVENT_REMAP => remapped(&mut st, id, m),
                UFFD_EVENT_PAGEFAULT if m.flags & UFFD_PAGEFAULT_FLAG_WP != 0 => {
                    fault(&mut st, shared.page, id, m);
                }
                _ => {}
            }
        }
    }
}

/// A process of the family forked: track the child from birth.
fn forked(shared: &Shared, parent: u64, parent_uffd: &SyncUserfaultfd, m: &FaultMsg) {
    let Some(fd) = m.take_fork_fd() else { return };
    let child = SyncUserfaultfd::forked(fd, parent_uffd.features());
    let ctx = {
        let mut st = shared.lock();
        st.report.forks += 1;
        let Some(p) = st.ctxs.get(&parent) else {
            return;
        };
        let mut c = Ctx::new(child, None, p.pid, false);
        c.map = p.map.clone();
        // The child's copies of pages the parent had unprotected are
        // unprotected too: protect them at the next collect.
        c.unprotected = p.unprotected.clone();
        c
    };
    // An epoll failure drops the child's uffd: the kernel then lifts its
    // registration, so its writes would be unseen; make that loud.
    if add_ctx(shared, ctx).is_err() {
        let mut st = shared.lock();
        let objects: Vec<ObjectId> = st
            .ctxs
            .get(&parent)
            .map(|p| p.map.iter().map(|m| m.object).collect())
            .unwrap_or_default();
        for o in objects {
            st.report.whole.push((
                o,
                "a forked child could not be tracked (epoll); its writes are unknown".into(),
            ));
        }
    }
}

/// `mremap` of a registered range in mm `id`: the registration moved.
fn remapped(st: &mut State, id: u64, m: &FaultMsg) {
    let (from, to, len) = (m.flags, m.address, m.third);
    let Some(c) = st.ctxs.get_mut(&id) else {
        return;
    };
    let Some(old) = VirtRange::from_start_len(VirtAddr::new(from), len) else {
        return;
    };
    let mut moved = Vec::new();
    let mut kept = Vec::new();
    for e in &c.map {
        let Some(part) = e.range.intersect(&old) else {
            kept.push(*e);
            continue;
        };
        let cut: RangeSet = [part].into_iter().collect();
        for rest in cut.subtract_from(e.range) {
            let mut r = *e;
            r.first = e.span(rest, PageSize::current()).start();
            r.range = rest;
            kept.push(r);
        }
        let off = part.start().checked_offset_from(old.start()).unwrap_or(0);
        if let Some(dest) = VirtRange::from_start_len(VirtAddr::new(to + off), part.len()) {
            moved.push(Mapped {
                range: dest,
                object: e.object,
                first: e.span(part, PageSize::current()).start(),
            });
        }
    }
    kept.extend(moved);
    c.map = kept;
    // Unprotected entries moved with the page tables.
    let shifted: Vec<VirtRange> = c
        .unprotected
        .intersect(old)
        .into_iter()
        .filter_map(|r| {
            let off = r.start().checked_offset_from(old.start())?;
            VirtRange::from_start_len(VirtAddr::new(to + off), r.len())
        })
        .collect();
    c.unprotected.extend(shifted);
}

/// A write to a protected page: record it, then let the writer go.
fn fault(st: &mut State, page: PageSize, id: u64, m: &FaultMsg) {
    let addr = VirtAddr::new(m.address & !(page.get() - 1));
    let Some(r) = VirtRange::from_start_len(addr, page.get()) else {
        return;
    };
    let tid = u32::try_from(m.third & 0xffff_ffff).unwrap_or(0);
    let Some(c) = st.ctxs.get_mut(&id) else {
        return;
    };
    let mut learned = None;
    if c.pid.is_none() {
        let pid = tgid_of(tid).unwrap_or(tid);
        c.pid = Some(pid);
        learned = Some(pid);
    }
    let who = c.pid.unwrap_or(0);
    let placed = c.find(addr).map(|mp| (mp.object, mp.span(r, page)));
    let objects: Vec<ObjectId> = c.map.iter().map(|mp| mp.object).collect();
    c.unprotected.insert(r);
    if let Err(Some(Errno::AGAIN)) = c.uffd.write_protect(r, false).map_err(|e| e.errno()) {
        c.pending.push(r);
    }
    if let Some(p) = learned {
        st.known.insert(p);
        st.report.children.push(p);
    }
    match placed {
        Some((o, span)) => st.record(o, who, span),
        None => {
            for o in objects {
                st.report.whole.push((
                    o,
                    format!("process {who} wrote at {addr}, outside the mappings pagescope knows of; its writes are reported as whole objects"),
                ));
            }
        }
    }
}

/// Retries the faults that could not be resolved yet.
fn retry_pending(shared: &Shared) {
    let mut st = shared.lock();
    for c in st.ctxs.values_mut() {
        let pending = std::mem::take(&mut c.pending);
        for r in pending {
            if let Err(Some(Errno::AGAIN)) = c.uffd.write_protect(r, false).map_err(|e| e.errno()) {
                c.pending.push(r);
            }
        }
    }
}

/// The process a thread belongs to (`Tgid:` of `/proc/TID/status`).
fn tgid_of(tid: u32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}
