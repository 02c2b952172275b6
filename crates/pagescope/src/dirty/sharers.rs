//! Other processes that map a watched object shared: each is tracked
//! with its own userfaultfd, registered only over its shared mappings of
//! watched objects, and its writes are turned into object pages.
//!
//! uffd-wp sees only the page tables of the mm that created the uffd, so a
//! write by a PostgreSQL backend into the shared buffers, or by a
//! vhost-user back end into a VM's memfd RAM, is invisible to a tracker of
//! the postmaster or the VMM. Tracking every process that maps the object
//! writable and joining by offset gives the object's written pages exactly.
//!
//! A process becomes a sharer when it maps a watched object shared and
//! writable, and stays one while it maps any watched object shared. One
//! that appears reports its objects whole once (its earlier writes are
//! unknown); one that goes away (exit, exec, munmap) reports them whole
//! once (its last writes are unknown); one that cannot be tracked (no
//! privilege, another userfaultfd) reports them whole every time.
//!
//! Tracking a sharer costs it what it costs the target: one minor fault on
//! the first write to each page after every collect.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::family::{Family, RootId};
use super::pagetable::{PageTableTracker, UffdWp};
use super::{TrackError, TrackEvent, WriteSource, target_uffd};
use crate::addr::{PageSize, PageSpan};
use crate::proc::Target;
use crate::proc::maps::MapsEntry;
use crate::rangeset::RangeSet;
use crate::uffd::{SyncUserfaultfd, Userfaultfd};
use crate::vma::{MountTable, ObjectId, Vma};

/// Every other process's shared mappings of the watched objects, read from
/// `/proc/*/maps` once per collect.
#[derive(Debug, Default)]
pub struct MapsSnapshot {
    /// PID → its shared mappings of watched objects.
    pub by_pid: BTreeMap<u32, Vec<MapsEntry>>,
}

impl MapsSnapshot {
    /// Reads the maps of every process but `target` (and processes that
    /// share its mm), keeping shared mappings of `watched` objects.
    pub fn take(target: u32, watched: &HashSet<ObjectId>) -> Self {
        let mut by_pid = BTreeMap::new();
        if watched.is_empty() {
            return Self { by_pid };
        }
        let me = std::process::id();
        let inodes: HashSet<u64> = watched.iter().map(|o| o.inode).collect();
        for pid in crate::proc::pids() {
            // pagescope never injects into itself (nor the target twice).
            if pid == target || pid == me {
                continue;
            }
            let Ok(buf) = std::fs::read(format!("/proc/{pid}/maps")) else {
                continue;
            };
            let entries: Vec<MapsEntry> = buf
                .split(|&b| b == b'\n')
                .filter(|l| inode_field(l).is_some_and(|i| inodes.contains(&i)))
                .filter_map(crate::proc::maps::parse_line)
                .filter(|e| {
                    e.perms.shared
                        && watched.contains(&ObjectId {
                            dev: e.dev,
                            inode: e.inode,
                        })
                })
                .collect();
            if !entries.is_empty() && !shares_mm(target, pid) {
                by_pid.insert(pid, entries);
            }
        }
        Self { by_pid }
    }

    /// Objects some other process maps shared and writable.
    pub fn writable_objects(&self) -> HashSet<ObjectId> {
        self.by_pid
            .values()
            .flatten()
            .filter(|e| e.perms.write)
            .map(|e| ObjectId {
                dev: e.dev,
                inode: e.inode,
            })
            .collect()
    }
}

/// The inode column of a maps line (the fifth field), parsed without
/// building the whole entry: most lines of most processes are skipped on
/// it.
fn inode_field(line: &[u8]) -> Option<u64> {
    let field = line
        .split(|&b| b == b' ')
        .filter(|f| !f.is_empty())
        .nth(4)?;
    std::str::from_utf8(field).ok()?.parse().ok()
}

fn shares_mm(a: u32, b: u32) -> bool {
    match (i32::try_from(a), i32::try_from(b)) {
        (Ok(a), Ok(b)) => crate::sys::kcmp::same_mm(a, b).unwrap_or(false),
        _ => false,
    }
}

/// What the sharers did since the last collect.
#[derive(Debug, Default)]
pub struct SharerWrites {
    /// Object pages written, per object and writer PID.
    pub pages: HashMap<ObjectId, BTreeMap<u32, RangeSet<PageSpan>>>,
    /// Objects to report whole, with the source and a one-line cause.
    pub whole: HashMap<ObjectId, Vec<(WriteSource, String)>>,
    /// Sharers that came and went.
    pub events: Vec<TrackEvent>,
}

impl SharerWrites {
    fn whole(
        &mut self,
        objects: impl IntoIterator<Item = ObjectId>,
        source: WriteSource,
        why: &str,
    ) {
        for o in objects {
            self.whole
                .entry(o)
                .or_default()
                .push((source, why.to_owned()));
        }
    }
}

/// How a sharer's writes are seen.
#[derive(Debug)]
enum Tracking {
    /// Write-protect async: its page tables, read at every collect (its
    /// last writes die with it).
    Async(UffdWp),
    /// Synchronous write-protect in the tracker's family: every write
    /// recorded as it happens, its children tracked from birth.
    Sync(RootId),
}

/// One other process mapping watched objects.
#[derive(Debug)]
struct Sharer {
    target: Target,
    tracker: Result<Tracking, String>,
    objects: HashSet<ObjectId>,
}

/// The tracked sharers of a tracker's objects.
#[derive(Debug)]
pub struct Sharers {
    procs: BTreeMap<u32, Sharer>,
    page: PageSize,
    device: target_uffd::Device,
}

impl Sharers {
    /// No sharers yet.
    pub fn new(page: PageSize, device: target_uffd::Device) -> Self {
        Self {
            procs: BTreeMap::new(),
            page,
            device,
        }
    }

    /// Whether `pid` is tracked as a sharer.
    pub fn tracks(&self, pid: u32) -> bool {
        self.procs.contains_key(&pid)
    }

    /// Collects every sharer's writes into watched objects. `first`: the
    /// tracker's first collect, which reports everything anyway (no
    /// sharer is reported whole for appearing).
    pub fn collect(
        &mut self,
        snapshot: &MapsSnapshot,
        first: bool,
        family: Option<&Family>,
    ) -> SharerWrites {
        let mut out = SharerWrites::default();
        let gone: Vec<u32> = self
            .procs
            .keys()
            .filter(|p| !snapshot.by_pid.contains_key(p))
            .copied()
            .collect();
        for pid in gone {
            self.drop_sharer(pid, &mut out, "stopped mapping the object", family);
        }
        for (&pid, entries) in &snapshot.by_pid {
            let known = self.procs.contains_key(&pid);
            if !known && !entries.iter().any(|e| e.perms.write) {
                continue; // read-only mappers cannot write
            }
            if !known {
                // The family only where every writable mapping can be
                // tracked synchronously (SysV segments cannot).
                let sync = entries.iter().filter(|e| e.perms.write).all(|e| {
                    super::process::syncable(&Vma::classify(e, &MountTable::default(), None))
                });
                self.attach(pid, first, &mut out, family.filter(|_| sync));
            }
            self.collect_one(pid, entries, first, &mut out, family);
        }
        out
    }

    fn attach(&mut self, pid: u32, first: bool, out: &mut SharerWrites, family: Option<&Family>) {
        let target = match Target::open(pid) {
            Ok(t) => t,
            Err(_) => return, // exited between the maps walk and now
        };
        let tracker = start(&target, family, self.device).map_err(|e| e.to_string());
        if tracker.is_ok() && !first {
            out.events.push(TrackEvent::SharerAttached { pid });
        }
        self.procs.insert(
            pid,
            Sharer {
                target,
                tracker,
                objects: HashSet::new(),
            },
        );
    }

    fn drop_sharer(
        &mut self,
        pid: u32,
        out: &mut SharerWrites,
        what: &str,
        family: Option<&Family>,
    ) {
        if let Some(s) = self.procs.remove(&pid) {
            if let (Ok(Tracking::Sync(root)), Some(f)) = (&s.tracker, family) {
                // Every write was recorded as it happened: nothing unknown.
                f.remove_root(*root);
                out.events.push(TrackEvent::SharerGone { pid });
            } else if s.tracker.is_ok() {
                let why =
                    format!("process {pid} {what}; its writes since the last collect are unknown");
                out.whole(s.objects, WriteSource::ObjectSharerGone, &why);
                out.events.push(TrackEvent::SharerGone { pid });
            }
        }
    }

    fn collect_one(
        &mut self,
        pid: u32,
        entries: &[MapsEntry],
        first: bool,
        out: &mut SharerWrites,
        family: Option<&Family>,
    ) {
        let page = self.page;
        let Some(s) = self.procs.get_mut(&pid) else {
            return;
        };
        let vmas: Vec<Vma> = entries
            .iter()
            .map(|e| Vma::classify(e, &MountTable::default(), None))
            .collect();
        let now: HashSet<ObjectId> = vmas.iter().filter_map(Vma::object_id).collect();
        let writable: Vec<ObjectId> = vmas
            .iter()
            .filter(|v| v.perms.write)
            .filter_map(Vma::object_id)
            .collect();
        let tracker = match &mut s.tracker {
            Ok(Tracking::Async(t)) => t,
            Ok(Tracking::Sync(root)) => {
                let root = *root;
                let Some(f) = family else { return };
                if f.is_dead(root) {
                    // Exited or executed a new program: its writes up to
                    // then were recorded; a new image is a new sharer.
                    let what = mm_end(&s.target);
                    self.drop_sharer(pid, out, what, family);
                    return;
                }
                sync_one(f, root, pid, s, &vmas, first, out);
                return;
            }
            Err(why) => {
                let why =
                    format!("process {pid} maps the object writable but cannot be tracked: {why}");
                out.whole(writable, WriteSource::ObjectSharerUntracked, &why);
                return;
            }
        };
        let written = match tracker.collect(&s.target, &vmas) {
            Ok(w) => w,
            Err(TrackError::TargetExited { .. }) => {
                // Exited, or executed a new program (its mm is gone).
                let what = mm_end(&s.target);
                self.drop_sharer(pid, out, what, family);
                return;
            }
            Err(e) => {
                let why =
                    format!("process {pid} maps the object writable but cannot be tracked: {e}");
                s.tracker = Err(e.to_string());
                out.whole(writable, WriteSource::ObjectSharerUntracked, &why);
                return;
            }
        };
        let lost: Vec<ObjectId> = s.objects.difference(&now).copied().collect();
        s.objects = now;
        out.whole(
            lost,
            WriteSource::ObjectSharerGone,
            &format!(
                "process {pid} unmapped the object; its writes since the last collect are unknown"
            ),
        );
        for w in written {
            let Some(v) = vmas.iter().find(|v| v.range.contains(w.range.start())) else {
                continue;
            };
            let Some(id) = v.object_id() else { continue };
            match w.source {
                WriteSource::Tracked => {
                    let Some(part) = w.range.intersect(&v.range) else { continue };
                    out.pages
                        .entry(id)
                        .or_default()
                        .entry(pid)
                        .or_default()
                        .insert(v.object_span(part, page));
                }
                WriteSource::NewMapping if !first => out.whole(
                    [id],
                    WriteSource::ObjectNewSharer,
                    &format!("process {pid} started mapping the object; its writes before tracking began are unknown"),
                ),
                WriteSource::Untracked => out.whole(
                    [id],
                    WriteSource::ObjectSharerUntracked,
                    &format!("a mapping of the object in process {pid} cannot be write-protected"),
                ),
                _ => {}
            }
        }
    }
}

/// How a process's mm ended: it exited or executed a new program.
fn mm_end(t: &Target) -> &'static str {
    if t.is_alive() {
        "executed a new program"
    } else {
        "exited"
    }
}

/// A sharer in the family: its new mappings registered (reported whole
/// when it was already tracked: its writes to them before are unknown).
fn sync_one(
    f: &Family,
    root: RootId,
    pid: u32,
    s: &mut Sharer,
    vmas: &[Vma],
    first: bool,
    out: &mut SharerWrites,
) {
    let now: HashSet<ObjectId> = vmas.iter().filter_map(Vma::object_id).collect();
    let lost: Vec<ObjectId> = s.objects.difference(&now).copied().collect();
    let known_before = !s.objects.is_empty();
    s.objects = now;
    // Unmapped objects: its writes up to the munmap were recorded.
    drop(lost);
    let refs: Vec<&Vma> = vmas.iter().filter(|v| v.perms.write).collect();
    let (fresh, refused) = f.sync_root(root, &refs);
    for v in refused {
        if let Some(id) = v.object_id() {
            out.whole(
                [id],
                WriteSource::ObjectSharerUntracked,
                &format!("a mapping of the object in process {pid} cannot be write-protected"),
            );
        }
    }
    if first {
        return;
    }
    for w in fresh {
        let Some(id) = vmas
            .iter()
            .find(|v| v.range == w.range)
            .and_then(Vma::object_id)
        else {
            continue;
        };
        let why = if known_before {
            format!(
                "process {pid} mapped the object again; its writes before tracking began are unknown"
            )
        } else {
            format!(
                "process {pid} started mapping the object; its writes before tracking began are unknown"
            )
        };
        out.whole([id], WriteSource::ObjectNewSharer, &why);
    }
}

/// A userfaultfd injected into `target`: synchronous in `family` when
/// there is one and the uffd is not user-mode only, else async.
fn start(
    target: &Target,
    family: Option<&Family>,
    device: target_uffd::Device,
) -> Result<Tracking, TrackError> {
    let injected = target_uffd::userfaultfd_in_with(target, false, device)?;
    if let Some(f) = family {
        if !injected.origin.user_mode_only() {
            let uffd = SyncUserfaultfd::from_fd_sync_family(injected.fd)?;
            return Ok(Tracking::Sync(f.add_root(uffd, target.pid())?));
        }
    }
    let uffd = Userfaultfd::from_fd(injected.fd)?;
    Ok(Tracking::Async(UffdWp::new(target, uffd, injected.origin)?))
}
