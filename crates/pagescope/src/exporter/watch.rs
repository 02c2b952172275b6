//! `--watch PID|GLOB`: a dirty tracker ([`crate::dirty::attach_owned`],
//! what `watch` uses) on each process named, collected at every refresh
//! of the snapshot, its written pages added to a counter.
//!
//! Attaching costs what it costs `watch` (README: a stop of one thread
//! for the injection, then a write-protect fault on the first write to
//! each page after every collect). A process is attached once: when it
//! exits its tracker and series go; when attaching fails or would only
//! report everything (degraded), it is not retried and is counted as
//! failed.

use std::collections::BTreeMap;

use crate::dirty::{DirtyTracker, TrackError, TrackOptions, attach_owned};
use crate::kernel::KernelCaps;
use crate::proc::Target;
use crate::render::Glob;

/// What `--watch` names.
#[derive(Clone, Debug)]
pub enum WatchSpec {
    /// One process.
    Pid(u32),
    /// Every process whose comm matches, now or later.
    Name(String),
}

/// One tracked process.
struct Tracked {
    comm: String,
    tracker: Box<dyn DirtyTracker>,
    written_bytes: u64,
}

impl std::fmt::Debug for Tracked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracked")
            .field("comm", &self.comm)
            .field("written_bytes", &self.written_bytes)
            .finish()
    }
}

/// A written-bytes counter of one tracked process.
#[derive(Clone, Debug)]
pub struct WrittenCounter {
    /// PID.
    pub pid: u32,
    /// Command name.
    pub comm: String,
    /// Bytes of distinct pages written per collect, summed since attach.
    pub written_bytes: u64,
    /// The tracker's mechanism (`uffd_wp_async`, ...).
    pub backend: &'static str,
}

/// The trackers of `--watch`.
#[derive(Debug, Default)]
pub struct Watches {
    specs: Vec<WatchSpec>,
    tracked: BTreeMap<u32, Tracked>,
    /// PIDs that could not be tracked, with why.
    failed: BTreeMap<u32, String>,
}

impl Watches {
    /// Trackers for `specs` (attached at the first refresh).
    pub fn new(specs: Vec<WatchSpec>) -> Self {
        Self {
            specs,
            ..Self::default()
        }
    }

    /// Attaches to newly named processes among `procs` (PID, comm),
    /// collects every tracker, drops those whose process exited.
    pub fn refresh(&mut self, caps: &KernelCaps, procs: &[(u32, String)]) {
        if self.specs.is_empty() {
            return;
        }
        let globs: Vec<Glob> = self
            .specs
            .iter()
            .filter_map(|s| match s {
                WatchSpec::Name(n) => Some(Glob::new(n)),
                WatchSpec::Pid(_) => None,
            })
            .collect();
        for (pid, comm) in procs {
            let named = self
                .specs
                .iter()
                .any(|s| matches!(s, WatchSpec::Pid(p) if p == pid))
                || globs.iter().any(|g| g.matches(comm));
            if named && !self.tracked.contains_key(pid) && !self.failed.contains_key(pid) {
                self.attach(*pid, comm, caps);
            }
        }
        let page = caps.page_size.get();
        let mut gone = Vec::new();
        for (pid, t) in &mut self.tracked {
            match t.tracker.collect() {
                Ok(r) => t.written_bytes += r.pages() * page,
                Err(TrackError::TargetExited { .. }) => gone.push(*pid),
                Err(e) if e.kind() == crate::ErrorKind::TargetExited => gone.push(*pid),
                Err(e) => {
                    self.failed.insert(*pid, e.to_string());
                    gone.push(*pid);
                }
            }
        }
        for pid in gone {
            self.tracked.remove(&pid);
        }
        // Forget failures of processes that are gone (their PIDs may be
        // reused by a process worth trying).
        self.failed
            .retain(|pid, _| procs.iter().any(|p| p.0 == *pid));
    }

    fn attach(&mut self, pid: u32, comm: &str, caps: &KernelCaps) {
        let tracked = Target::open(pid).map_err(|e| e.to_string()).and_then(|t| {
            attach_owned(t, caps, &TrackOptions::default()).map_err(|e| e.to_string())
        });
        match tracked {
            Ok(tracker) => match tracker.degraded() {
                Some(why) => {
                    self.failed.insert(pid, format!("degraded: {why}"));
                }
                None => {
                    self.tracked.insert(
                        pid,
                        Tracked {
                            comm: comm.to_owned(),
                            tracker,
                            written_bytes: 0,
                        },
                    );
                }
            },
            Err(why) => {
                self.failed.insert(pid, why);
            }
        }
    }

    /// The counters of the processes tracked now.
    pub fn counters(&self) -> Vec<WrittenCounter> {
        self.tracked
            .iter()
            .map(|(pid, t)| WrittenCounter {
                pid: *pid,
                comm: t.comm.clone(),
                written_bytes: t.written_bytes,
                backend: t.tracker.backend().name(),
            })
            .collect()
    }

    /// How many processes named could not be tracked.
    pub fn failed(&self) -> usize {
        self.failed.len()
    }
}
