//! The shared-object layer of every tracker: writes to the objects a
//! process maps, joined in object space (object, page offset) whoever
//! made them, then shown at every address where the process maps those
//! object pages.
//!
//! Per object and collect, the written pages are the union of
//! * the tracked process's own writes through a shared mapping
//!   ([`WriteSource::Tracked`]; also shown at its other mappings of the
//!   same pages),
//! * every other writer's, page by page ([`sharers`](super::sharers),
//!   [`WriteSource::SharedWriter`]),
//! * pages that turned from data to hole or, with no tracked write, back
//!   ([`notify`](super::notify), [`WriteSource::ObjectPunched`],
//!   [`WriteSource::ObjectFilled`]),
//! * and, where nothing exact exists, the whole object with a named cause:
//!   a system-call write (fsnotify), a memfd descriptor write, a sharer
//!   that came, went or cannot be tracked, `--no-sharers`, an object that
//!   could not be opened, or strict mode.
//!
//! A private mapping of an object shows object writes on the pages it has
//! not copied; pagescope reports them on all its pages (the copied ones
//! are an over-report it does not try to tell apart).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};

use super::family::{Family, FamilyReport};
use super::notify::{DescriptorHolders, DescriptorWrite, ExtentWatch, FsNotify};
use super::sharers::{MapsSnapshot, Sharers};
use super::{ObjectWrites, TrackEvent, WriteSource, Written};
use crate::addr::{PageSize, PageSpan};
use crate::object::open_object;
use crate::proc::Target;
use crate::rangeset::RangeSet;
use crate::vma::{ObjectId, Vma, VmaKind};

/// Options of the object layer.
#[derive(Clone, Copy, Debug, Default)]
pub struct ObjectOptions {
    /// Do not track other processes: an object another process maps
    /// writable is reported whole every collect.
    pub no_sharers: bool,
    /// Report every shared object whole every collect.
    pub strict: bool,
    /// Whether a sharer may get pagescope's `/dev/userfaultfd`.
    pub device: super::target_uffd::Device,
}

/// What pagescope holds for one object the process maps.
#[derive(Debug)]
struct Watched {
    fd: Option<OwnedFd>,
    unopened: Option<String>,
    kind: VmaKind,
    path: String,
}

/// The object layer's result for one collect.
#[derive(Debug, Default)]
pub struct ObjectLayerReport {
    /// Ranges of the tracked process, with their source.
    pub written: Vec<Written>,
    /// Per object, in object space.
    pub objects: Vec<ObjectWrites>,
    /// Sharers that came and went.
    pub events: Vec<TrackEvent>,
    /// Forks in the family (see [`FamilyReport::forks`]).
    pub forks: u64,
    /// Children named by their first write.
    pub children: Vec<u32>,
}

/// The object layer of one tracker.
#[derive(Debug)]
pub struct ObjectLayer {
    opts: ObjectOptions,
    map_files: bool,
    page: PageSize,
    objects: HashMap<ObjectId, Watched>,
    fsnotify: FsNotify,
    extents: ExtentWatch,
    holders: DescriptorHolders,
    sharers: Sharers,
    collects: u64,
    /// Processes whose writes the target's family sees (forked children).
    in_family: HashSet<u32>,
    /// Children that ran and exited unseen since the last collect (no
    /// family to track them from birth): why their writes are unknown.
    unseen_children: Option<String>,
}

/// Object pages per source, writers and causes, for one object.
#[derive(Debug, Default)]
struct Acc {
    by_source: BTreeMap<WriteSource, RangeSet<PageSpan>>,
    writers: BTreeMap<u32, RangeSet<PageSpan>>,
    causes: Vec<String>,
}

impl Acc {
    /// Pages `w` wrote, page by page.
    fn add_writer(&mut self, source: WriteSource, w: u32, spans: &RangeSet<PageSpan>) {
        self.add(source, spans.ranges().iter().copied());
        self.writers
            .entry(w)
            .or_default()
            .extend(spans.ranges().iter().copied());
    }

    fn add(&mut self, source: WriteSource, spans: impl IntoIterator<Item = PageSpan>) {
        let mut spans = spans.into_iter().filter(|s| !s.is_empty()).peekable();
        if spans.peek().is_some() {
            self.by_source.entry(source).or_default().extend(spans);
        }
    }
}

impl ObjectLayer {
    /// A layer for a tracker; `map_files`: whether we may open
    /// `/proc/PID/map_files/` (CAP_SYS_ADMIN).
    pub fn new(opts: ObjectOptions, map_files: bool, page: PageSize) -> Self {
        Self {
            opts,
            map_files,
            page,
            objects: HashMap::new(),
            fsnotify: FsNotify::default(),
            extents: ExtentWatch::default(),
            holders: DescriptorHolders::default(),
            sharers: Sharers::new(page, opts.device),
            collects: 0,
            in_family: HashSet::new(),
            unseen_children: None,
        }
    }

    /// Children of the process ran and exited since the last collect
    /// without being tracked: the next collect reports the objects it
    /// maps shared and writable whole, with `why`.
    pub fn children_unseen(&mut self, why: String) {
        self.unseen_children = Some(why);
    }

    /// Objects that could not be opened (for notes).
    pub fn unopened(&self) -> Vec<String> {
        self.objects
            .values()
            .filter_map(|w| w.unopened.as_ref().map(|why| format!("{}: {why}", w.path)))
            .collect()
    }

    /// Writes to the objects behind `vmas` (the tracked process's layout)
    /// since the last collect; `own` is what its page tables recorded,
    /// `family` what its synchronously tracked shared mappings and its
    /// children's recorded ([`super::family`]).
    pub fn collect(
        &mut self,
        target: &Target,
        vmas: &[Vma],
        own: &[Written],
        family: Option<&Family>,
    ) -> ObjectLayerReport {
        let first = self.collects == 0;
        self.collects += 1;
        let by_object = group(vmas);
        self.refresh(target, &by_object);
        let mut acc: HashMap<ObjectId, Acc> = HashMap::new();
        self.own_writes(target.pid(), vmas, own, &mut acc);
        let events = self.sharer_writes(target.pid(), first, &by_object, &mut acc, family);
        if let Some(why) = self.unseen_children.take() {
            for (id, mapped) in &by_object {
                if mapped.iter().any(|v| v.is_shared() && v.perms.write) {
                    let a = acc.entry(*id).or_default();
                    a.add(WriteSource::ObjectSharerGone, whole(mapped, self.page));
                    a.causes.push(why.clone());
                }
            }
        }
        let mut report = ObjectLayerReport {
            events,
            ..ObjectLayerReport::default()
        };
        if let Some(f) = family {
            // After every sharer's registration is up to date.
            let r = f.collect();
            report.forks = r.forks;
            report.children.clone_from(&r.children);
            let kids = f.children_tracked() as u64 + r.forks;
            family_writes(target.pid(), r, &by_object, self.page, &mut acc);
            if kids > 0 {
                for id in unsyncable_writable(&by_object) {
                    let a = acc.entry(id).or_default();
                    a.add(
                        WriteSource::ObjectSharerUntracked,
                        whole(&by_object[&id], self.page),
                    );
                    a.causes.push(format!("{kids} processes forked in the family map this SysV segment, which cannot be write-protected synchronously: their writes to it are unknown"));
                }
            }
        }
        if !first {
            self.object_writes(&by_object, &mut acc);
        }
        self.finish(&by_object, acc, &mut report);
        report
    }

    /// Opens objects seen for the first time, forgets the gone ones.
    fn refresh(&mut self, target: &Target, by_object: &BTreeMap<ObjectId, Vec<&Vma>>) {
        for (id, mapped) in by_object {
            if self.objects.contains_key(id) {
                continue;
            }
            let v = mapped[0];
            let (fd, unopened) = match open_object(target, v, self.map_files) {
                Ok(o) => (Some(o.fd), None),
                Err(why) => (None, Some(why.describe())),
            };
            if let Some(fd) = &fd {
                self.fsnotify.watch(*id, fd.as_fd());
            }
            self.objects.insert(
                *id,
                Watched {
                    fd,
                    unopened,
                    kind: v.kind,
                    path: shared_label(&v.path.display(), v.is_shared(), id.inode)
                        .unwrap_or_else(|| v.path.display()),
                },
            );
        }
        let gone: Vec<ObjectId> = self
            .objects
            .keys()
            .filter(|k| !by_object.contains_key(k))
            .copied()
            .collect();
        for id in gone {
            self.objects.remove(&id);
            self.fsnotify.unwatch(id);
        }
        self.extents.retain(|k| by_object.contains_key(k));
    }

    /// The process's own page-table writes through shared mappings.
    fn own_writes(
        &self,
        pid: u32,
        vmas: &[Vma],
        own: &[Written],
        acc: &mut HashMap<ObjectId, Acc>,
    ) {
        for w in own.iter().filter(|w| w.source == WriteSource::Tracked) {
            for v in vmas
                .iter()
                .filter(|v| v.is_shared() && v.range.overlaps(&w.range))
            {
                let (Some(id), Some(part)) = (v.object_id(), v.range.intersect(&w.range)) else {
                    continue;
                };
                let span = v.object_span(part, self.page);
                let a = acc.entry(id).or_default();
                a.add(WriteSource::Tracked, [span]);
                a.writers.entry(pid).or_default().insert(span);
            }
        }
    }

    /// Other processes' writes, or the whole object where they cannot be
    /// tracked (or `no_sharers`).
    fn sharer_writes(
        &mut self,
        pid: u32,
        first: bool,
        by_object: &BTreeMap<ObjectId, Vec<&Vma>>,
        acc: &mut HashMap<ObjectId, Acc>,
        family: Option<&Family>,
    ) -> Vec<TrackEvent> {
        let watched: HashSet<ObjectId> = by_object.keys().copied().collect();
        let mut snapshot = MapsSnapshot::take(pid, &watched);
        if let Some(f) = family {
            // Children forked since tracking began carry the family's
            // registration: their writes arrive as faults, no injection.
            self.in_family.retain(|p| snapshot.by_pid.contains_key(p));
            let roots = f.root_pids();
            snapshot.by_pid.retain(|p, entries| {
                if roots.contains(p) || self.sharers.tracks(*p) {
                    return true; // a sharer, tracked as such
                }
                let covered = self.in_family.contains(p)
                    || f.knows(*p)
                    || (descends_from(*p, &roots)
                        && super::family::inherited(*p, &shared_writable(entries)));
                if covered {
                    self.in_family.insert(*p);
                }
                !covered
            });
        }
        if self.opts.no_sharers {
            for id in snapshot.writable_objects() {
                let a = acc.entry(id).or_default();
                a.add(
                    WriteSource::ObjectForeignWriter,
                    whole(&by_object[&id], self.page),
                );
                a.causes.push("another process maps the object writable and --no-sharers keeps pagescope out of it".into());
            }
            return Vec::new();
        }
        let got = self.sharers.collect(&snapshot, first, family);
        for (id, writers) in got.pages {
            let a = acc.entry(id).or_default();
            for (w, spans) in writers {
                a.add_writer(WriteSource::SharedWriter, w, &spans);
            }
        }
        for (id, causes) in got.whole {
            let Some(mapped) = by_object.get(&id) else {
                continue;
            };
            let a = acc.entry(id).or_default();
            for (source, why) in causes {
                a.add(source, whole(mapped, self.page));
                a.causes.push(why);
            }
        }
        got.events
    }

    /// Writes seen through the objects themselves.
    fn object_writes(
        &mut self,
        by_object: &BTreeMap<ObjectId, Vec<&Vma>>,
        acc: &mut HashMap<ObjectId, Acc>,
    ) {
        let modified = self.fsnotify.modified();
        let memfds: Vec<_> = self
            .objects
            .iter()
            .filter(|(_, w)| w.kind == VmaKind::Memfd)
            .filter_map(|(id, w)| Some((*id, w.fd.as_ref()?.as_fd())))
            .collect();
        let descriptor_writes = self.holders.written(&memfds);
        for (id, mapped) in by_object {
            let w = &self.objects[id];
            let a = acc.entry(*id).or_default();
            let all = whole(mapped, self.page);
            if modified.contains(id) {
                a.add(WriteSource::ObjectSyscall, all.clone());
                a.causes
                    .push("written by a system call (fsnotify IN_MODIFY)".into());
            }
            if let Some((_, why)) = descriptor_writes.iter().find(|(o, _)| o == id) {
                a.add(WriteSource::ObjectDescriptorWrite, all.clone());
                a.causes.push(describe(why));
            }
            if let (Some(fd), true) = (&w.fd, is_shmem_kind(w.kind)) {
                let explained: RangeSet<PageSpan> =
                    [WriteSource::Tracked, WriteSource::SharedWriter]
                        .iter()
                        .filter_map(|s| a.by_source.get(s))
                        .flat_map(|r| r.ranges().iter().copied())
                        .collect();
                let changes =
                    self.extents
                        .changes(*id, fd.as_fd(), hull(&all), self.page, &explained);
                a.add(WriteSource::ObjectPunched, changes.punched);
                let unexplained: Vec<PageSpan> = changes
                    .filled
                    .iter()
                    .flat_map(|f| explained.subtract_from(*f))
                    .collect();
                a.add(WriteSource::ObjectFilled, unexplained);
            }
            if w.fd.is_none() && needs_fd_to_be_safe(w.kind, mapped) {
                a.add(WriteSource::ObjectUnopened, all.clone());
                a.causes.push(format!("the object could not be opened, so system-call writes to it cannot be seen: {}", w.unopened.as_deref().unwrap_or("?")));
            }
            if self.opts.strict && (is_shmem_kind(w.kind) || mapped.iter().any(|v| v.is_shared())) {
                a.add(WriteSource::ObjectStrict, all);
            }
        }
    }

    /// Maps object pages back to the process's addresses and sums up.
    fn finish(
        &self,
        by_object: &BTreeMap<ObjectId, Vec<&Vma>>,
        acc: HashMap<ObjectId, Acc>,
        report: &mut ObjectLayerReport,
    ) {
        let mut ids: Vec<&ObjectId> = acc.keys().collect();
        ids.sort();
        for id in ids {
            let a = &acc[id];
            let Some(mapped) = by_object.get(id) else {
                continue;
            };
            let mut union: RangeSet<PageSpan> = RangeSet::new();
            let mut sources = Vec::new();
            for (source, spans) in &a.by_source {
                union.extend(spans.ranges().iter().copied());
                sources.push((*source, spans.count()));
                for v in mapped {
                    for s in spans.ranges() {
                        report
                            .written
                            .extend(v.range_of(*s, self.page).map(|range| Written {
                                range,
                                source: *source,
                            }));
                    }
                }
            }
            let visible: RangeSet<PageSpan> = whole(mapped, self.page).into_iter().collect();
            let written_pages: u64 = union
                .ranges()
                .iter()
                .flat_map(|s| visible.intersect(*s))
                .map(|s| s.count())
                .sum();
            if written_pages == 0 && a.causes.is_empty() {
                continue;
            }
            report.objects.push(ObjectWrites {
                object: *id,
                path: self
                    .objects
                    .get(id)
                    .map(|w| w.path.clone())
                    .unwrap_or_default(),
                written_pages,
                writers: a.writers.iter().map(|(p, s)| (*p, s.count())).collect(),
                sources,
                causes: a.causes.clone(),
            });
        }
    }
}

/// The family's writes: the target's own (tracked) and its children's
/// (shared writers), page by page.
fn family_writes(
    pid: u32,
    r: FamilyReport,
    by_object: &BTreeMap<ObjectId, Vec<&Vma>>,
    page: PageSize,
    acc: &mut HashMap<ObjectId, Acc>,
) {
    for (id, writers) in r.pages {
        let a = acc.entry(id).or_default();
        for (w, spans) in writers {
            let source = if w == pid {
                WriteSource::Tracked
            } else {
                WriteSource::SharedWriter
            };
            a.add_writer(source, w, &spans);
        }
    }
    for (id, why) in r.whole {
        let Some(mapped) = by_object.get(&id) else {
            continue;
        };
        let a = acc.entry(id).or_default();
        a.add(WriteSource::ObjectSharerUntracked, whole(mapped, page));
        a.causes.push(why);
    }
}

/// The shared writable mappings among `entries`.
fn shared_writable(entries: &[crate::proc::maps::MapsEntry]) -> Vec<crate::addr::VirtRange> {
    entries
        .iter()
        .filter(|e| e.perms.shared && e.perms.write && syncable_entry(e))
        .map(|e| e.range)
        .collect()
}

/// Whether a maps entry is shared memory the family tracks synchronously.
fn syncable_entry(e: &crate::proc::maps::MapsEntry) -> bool {
    super::process::syncable(&Vma::classify(e, &crate::vma::MountTable::default(), None))
}

/// Objects the family cannot track synchronously (SysV segments) that the
/// process maps shared and writable: a child of the family inherits them
/// untracked, so a fork makes them conservative.
fn unsyncable_writable(by_object: &BTreeMap<ObjectId, Vec<&Vma>>) -> Vec<ObjectId> {
    by_object
        .iter()
        .filter(|(_, m)| {
            m.iter()
                .any(|v| v.is_shared() && v.perms.write && !super::process::syncable(v))
                && m.iter().all(|v| v.kind == VmaKind::Sysv)
        })
        .map(|(id, _)| *id)
        .collect()
}

/// Whether `pid` is a descendant of one of `ancestors` (parent links in
/// `/proc/PID/stat`, a few generations up).
fn descends_from(pid: u32, ancestors: &HashSet<u32>) -> bool {
    let mut p = pid;
    for _ in 0..16 {
        let parent = std::fs::read(format!("/proc/{p}/stat"))
            .ok()
            .and_then(|b| crate::proc::stat::parse_stat(&b))
            .map(|s| s.ppid);
        match parent {
            Some(pp) if ancestors.contains(&pp) => return true,
            Some(pp) if pp > 1 => p = pp,
            _ => return false,
        }
    }
    false
}

/// A readable name for shared memory maps shows under a made-up path:
/// `shared anon` (`MAP_SHARED|MAP_ANONYMOUS`, shown as `/dev/zero
/// (deleted)`, with its inode) and `SysV key 0x… id N` (shown as
/// `/SYSVkkkkkkkk (deleted)`; the inode is the segment id). `None` for
/// anything else.
pub fn shared_label(path: &str, shared: bool, inode: u64) -> Option<String> {
    if shared && (path == "/dev/zero (deleted)" || path.starts_with("[anon_shmem:")) {
        return Some(format!("shared anon (inode {inode})"));
    }
    let key = path.strip_prefix("/SYSV")?.strip_suffix(" (deleted)")?;
    (key.len() == 8 && key.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| format!("SysV key 0x{key} id {inode}"))
}

/// The process's VMAs per object.
fn group(vmas: &[Vma]) -> BTreeMap<ObjectId, Vec<&Vma>> {
    let mut out: BTreeMap<ObjectId, Vec<&Vma>> = BTreeMap::new();
    for v in vmas {
        if let Some(id) = v.object_id() {
            out.entry(id).or_default().push(v);
        }
    }
    out
}

/// The object pages the process maps (all its mappings of the object).
fn whole(mapped: &[&Vma], page: PageSize) -> Vec<PageSpan> {
    let set: RangeSet<PageSpan> = mapped
        .iter()
        .map(|v| v.object_span(v.range, page))
        .collect();
    set.ranges().to_vec()
}

/// The smallest span covering `spans`.
fn hull(spans: &[PageSpan]) -> PageSpan {
    let lo = spans.iter().map(PageSpan::start).min().unwrap_or(0);
    let hi = spans.iter().map(PageSpan::end).max().unwrap_or(0);
    PageSpan::new(lo, hi).unwrap_or_default()
}

fn is_shmem_kind(kind: VmaKind) -> bool {
    matches!(
        kind,
        VmaKind::Memfd | VmaKind::Tmpfs | VmaKind::SharedAnon | VmaKind::Sysv
    )
}

/// Whether an object pagescope could not open must be reported whole: a
/// memfd or tmpfs file (someone holding an fd may write it), or a file
/// the process maps shared. SysV segments and shared anonymous memory
/// have no descriptor but the privileged `/proc/PID/map_files` one.
fn needs_fd_to_be_safe(kind: VmaKind, mapped: &[&Vma]) -> bool {
    matches!(kind, VmaKind::Memfd | VmaKind::Tmpfs)
        || (kind == VmaKind::File && mapped.iter().any(|v| v.is_shared()))
}

fn describe(w: &DescriptorWrite) -> String {
    match w {
        DescriptorWrite::Wrote(p) => format!(
            "process(es) {p:?} wrote to the memfd through a descriptor (counted by BPF; fsnotify cannot see memfd descriptors)"
        ),
        DescriptorWrite::NewDescriptor(p) => format!(
            "process(es) {p:?} got a descriptor of the memfd since the last collect; writes through it before counting began are unknown"
        ),
        DescriptorWrite::Heuristic(p) => format!(
            "process(es) {p:?} hold a descriptor of the memfd and made write system calls while its mtime moved (no BPF counter without root)"
        ),
    }
}
