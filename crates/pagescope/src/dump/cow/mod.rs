//! `--snapshot cow`: a point-in-time image of a running process, copied
//! while it runs, copy-before-write.
//!
//! 1. A userfaultfd is created inside the target (syscall injection; the
//!    target keeps no copy of it) and set up for *synchronous*
//!    write-protect (`UFFDIO_API` without `WP_ASYNC`, with
//!    `WP_UNPOPULATED` and shmem support).
//! 2. Every thread is stopped (ptrace interrupt); every writable mapping
//!    that can be is registered and write-protected (`UFFDIO_REGISTER`
//!    `MODE_WP`, `UFFDIO_WRITEPROTECT`); the pages of writable mappings
//!    the kernel refuses (private file mappings: sync write-protect covers
//!    anonymous, shmem and hugetlb memory only) are captured right there.
//!    Then the target runs again. That stop is the snapshot's moment.
//! 3. A handler thread reads the write faults: it captures the page (its
//!    bytes are still those of the snapshot), then lifts that page's
//!    protection, which lets the write proceed. Meanwhile the copy goes
//!    through every page, using the handler's capture where there is one,
//!    and lifts the protection of what it copied.
//! 4. At the end every range is unregistered (which lifts what is left and
//!    wakes any waiter) and the userfaultfd is closed.
//!
//! The fd lives only in pagescope: if pagescope dies at any point, the
//! kernel releases the userfaultfd, unregisters the ranges and wakes every
//! blocked thread, so the target is never left write-protected.
//! Not covered: writes by *other* processes to shared memory the target
//! maps, and pages the target discards or unmaps during the copy
//! (`MADV_DONTNEED`, `munmap`): they are copied as they are then.

mod copy;
mod handler;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::Serialize;

use self::copy::SnapshotCopy;
use self::handler::{Handler, capture_range, protectable, regions_of};
use super::copy::{Copied, Out, Progress};
use super::passes::Dump;
use super::remote::RemoteMem;
use super::sink::PassStart;
use super::stop::Stopped;
use super::{DumpError, DumpEvent, Iteration};
use crate::addr::{VirtAddr, VirtRange};
use crate::proc::Target;
use crate::sys::inject::UffdOrigin;
use crate::uffd::SyncUserfaultfd;

/// What the snapshot cost the target.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CowStats {
    /// The stop that write-protected everything, seconds.
    pub stop_s: f64,
    /// Writes that waited for their page to be copied.
    pub faults: u64,
    /// The longest such wait, seconds (handler side: from reading the
    /// fault to lifting the protection).
    pub longest_stall_s: f64,
    /// All waits together, seconds.
    pub total_stall_s: f64,
    /// Mappings write-protected.
    pub protected_mappings: usize,
    /// Writable mappings the kernel would not write-protect (private file
    /// mappings), captured during the stop.
    pub captured_while_stopped: usize,
}

/// Unregisters every range on drop (lifts all protection, wakes waiters).
struct Registration<'u> {
    uffd: &'u SyncUserfaultfd,
    ranges: Vec<VirtRange>,
}

impl Registration<'_> {
    /// Unregisters everything now.
    fn release(&mut self) {
        for r in self.ranges.drain(..) {
            let _ = self.uffd.unregister(r);
        }
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

impl Dump<'_, '_, '_> {
    /// Takes the snapshot of the (only) process: returns the pass and
    /// what it cost the target.
    pub(in crate::dump) fn cow_snapshot(&mut self) -> Result<(Iteration, CowStats), DumpError> {
        let target = self.procs[0].target;
        let t0 = Instant::now();
        let pid = target.pid();
        let injected = crate::dirty::target_uffd::userfaultfd_in(target, false)?;
        if injected.origin == UffdOrigin::UserModeOnly {
            return Err(DumpError::Refused {
                pid,
                what: "only a user-mode-only userfaultfd could be created in the process (vm.unprivileged_userfaultfd = 0): its kernel-mode writes would fail with EFAULT during a snapshot; run as root".into(),
            });
        }
        let uffd = SyncUserfaultfd::from_fd_sync_wp(injected.fd)
            .map_err(|source| DumpError::Protect { pid, source })?;
        let hmem = RemoteMem::open(target, self.page, std::sync::Arc::clone(&self.swap))?;
        let mut stats = CowStats::default();
        let handler = Handler::default();
        let mut registration = Registration {
            uffd: &uffd,
            ranges: Vec::new(),
        };
        let copied = std::thread::scope(|s| {
            let h = s.spawn(|| handler.run(&uffd, &hmem));
            let result = self
                .protect(
                    target,
                    &uffd,
                    &mut registration,
                    &hmem,
                    &handler,
                    &mut stats,
                )
                .and_then(|()| self.copy_all(&uffd, &registration.ranges, &handler.side));
            registration.release();
            handler.done.store(true, Ordering::Release);
            let _ = h.join();
            result
        })?;
        let f = handler
            .stats
            .into_inner()
            .unwrap_or_else(|p| p.into_inner());
        stats.faults = f.faults;
        stats.longest_stall_s = f.longest.as_secs_f64();
        stats.total_stall_s = f.total.as_secs_f64();
        let pass = PassStart {
            n: 0,
            stopped: false,
        };
        let it = self.iteration(pass, t0, copied, 0, Duration::ZERO);
        (self.progress)(DumpEvent::Iteration(&it));
        Ok((it, stats))
    }

    /// Scans (after the resume: every write since then was captured
    /// first), then copies every page with content, capture first.
    fn copy_all(
        &mut self,
        uffd: &SyncUserfaultfd,
        protected: &[VirtRange],
        side: &handler::Side,
    ) -> Result<Copied, DumpError> {
        let mut vmas = self.build_models(0)?;
        let mut copy = SnapshotCopy {
            mem: &self.procs[0].mem,
            pid: self.procs[0].pid,
            objects: &mut self.objects,
            out: Out {
                sink: &*self.sink,
                page: self.page,
                progress: Progress::new(&mut *self.progress, 0, 0),
            },
            cancel: &self.cancel,
            uffd,
            protected,
            side,
        };
        let copied = copy.copy(&mut vmas)?;
        self.procs[0].vmas = vmas;
        Ok(copied)
    }

    /// Write-protects every writable mapping in two phases, so the stop
    /// lasts only as long as the pages written meanwhile take:
    ///
    /// 1. while the process runs: register and protect everything (for a
    ///    large process this takes a while); a write meanwhile is let
    ///    through at once and its page remembered;
    /// 2. stopped (the snapshot's moment): protect again the pages let
    ///    through, register and protect mappings that appeared, capture
    ///    the writable mappings the kernel refuses; resume.
    fn protect(
        &mut self,
        target: &Target,
        uffd: &SyncUserfaultfd,
        registration: &mut Registration<'_>,
        hmem: &RemoteMem,
        handler: &Handler,
        stats: &mut CowStats,
    ) -> Result<(), DumpError> {
        let pid = target.pid();
        let protect_err = |source| DumpError::Protect { pid, source };
        let mut refused = Vec::new();
        for m in target.maps()?.iter().filter(|m| protectable(m)) {
            if uffd.register_wp(m.range).is_ok() {
                registration.ranges.push(m.range);
                uffd.write_protect(m.range, true).map_err(protect_err)?;
            } else {
                refused.push(m.range);
            }
        }
        let stopped = Stopped::stop(target).map_err(|source| DumpError::Stop { pid, source })?;
        self.rseq.insert(pid, stopped.rseq_areas());
        let maps = target.maps()?;
        let let_through = handler.moment(regions_of(&maps));
        for a in let_through {
            if let Some(r) = VirtRange::from_start_len(VirtAddr::new(a), self.page.get()) {
                // A page unmapped meanwhile has nothing to protect.
                let _ = uffd.write_protect(r, true);
            }
        }
        for m in maps.iter().filter(|m| protectable(m)) {
            let known = registration.ranges.contains(&m.range) || refused.contains(&m.range);
            if known {
                continue;
            }
            if uffd.register_wp(m.range).is_ok() {
                registration.ranges.push(m.range);
                uffd.write_protect(m.range, true).map_err(protect_err)?;
            } else {
                refused.push(m.range);
            }
        }
        for r in refused
            .iter()
            .filter(|r| maps.iter().any(|m| m.range == **r))
        {
            capture_range(hmem, *r, self.page, &handler.side)?;
        }
        stats.protected_mappings = registration.ranges.len();
        stats.captured_while_stopped = refused.len();
        stats.stop_s = stopped.resume().as_secs_f64();
        Ok(())
    }
}

/// Options that cannot be combined, and a snapshot the process could not
/// take part in: refused before anything is created.
pub(super) fn validate(target: &Target, opts: &super::DumpOptions) -> Result<(), DumpError> {
    let pid = target.pid();
    if !opts.cow {
        return Ok(());
    }
    if opts.tree || opts.parent.is_some() || opts.keep_tracking {
        return Err(DumpError::Snapshot {
            pid,
            what: "--snapshot cow takes one process and a full image: not with --tree, --parent or --keep-tracking".into(),
        });
    }
    // The snapshot's userfaultfd must handle kernel-mode faults: the
    // process needs CAP_SYS_PTRACE or vm.unprivileged_userfaultfd = 1.
    let sysctl =
        std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").unwrap_or_default();
    const CAP_SYS_PTRACE: u32 = 19;
    let has_ptrace_cap = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let hex = s
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))?
                .trim()
                .to_owned();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_PTRACE) != 0);
    if sysctl.trim() == "0" && !has_ptrace_cap {
        return Err(DumpError::Refused {
            pid,
            what: "--snapshot cow needs a userfaultfd that handles kernel-mode faults in the process: it lacks CAP_SYS_PTRACE and vm.unprivileged_userfaultfd = 0 (run the process with CAP_SYS_PTRACE, set the sysctl to 1, or use --snapshot stop)".into(),
        });
    }
    Ok(())
}
