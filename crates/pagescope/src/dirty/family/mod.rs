//! Shared mappings tracked synchronously, across fork: no write by a
//! short-lived child is ever missed.
//!
//! In write-protect *async* mode a write leaves its trace only in the
//! writer's page tables, which die with it: a pre-fork server's child that
//! writes the shared segment and exits between two collects leaves
//! nothing. So the shared (shmem, hugetlbfs) mappings of a tracked process
//! are registered with a second userfaultfd, created inside it, in
//! *synchronous* write-protect mode with `UFFD_FEATURE_EVENT_FORK`:
//!
//! * every first write to a protected page is a fault message; a thread
//!   of pagescope reads it, records the object page (and the writer, from
//!   `UFFD_FEATURE_THREAD_ID`), and lifts the protection of that page,
//!   which wakes the writer. A write cannot complete, so a writer cannot
//!   exit, before pagescope has recorded the page.
//! * at fork the kernel copies the registration (and the protected page
//!   table entries) into the child and hands pagescope the child's own
//!   userfaultfd in a `UFFD_EVENT_FORK` message (the fork waits until the
//!   message is read); the child is then tracked exactly like its parent,
//!   from birth, and so are its own children.
//! * a collect re-protects every page unprotected since the last one
//!   (`UFFDIO_WRITEPROTECT`), in every mm of the family, and returns the
//!   object pages written, per writer.
//!
//! Only safe without `UFFD_USER_MODE_ONLY`: with it, a kernel-mode write
//! (`read()` into a protected page) would fail with `EFAULT` instead of
//! waiting. Unprivileged targets keep the async mode (see `process.rs`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use rustix::event::epoll;
use rustix::io::Errno;

use super::{TrackError, WriteSource, Written};
use crate::addr::{PageSize, PageSpan, VirtAddr, VirtRange};
use crate::rangeset::RangeSet;
use crate::uffd::{SyncUserfaultfd, UffdError};
use crate::vma::{ObjectId, Vma};

mod serve;

/// The epoll key of the wake-up eventfd.
const WAKE: u64 = u64::MAX;

/// A registered range of one mm and the object pages behind it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Mapped {
    range: VirtRange,
    object: ObjectId,
    /// Object page of `range.start()`.
    first: u64,
}

impl Mapped {
    fn of(v: &Vma, page: PageSize) -> Option<Self> {
        Some(Self {
            range: v.range,
            object: v.object_id()?,
            first: v.object_page(v.range.start(), page),
        })
    }

    fn span(&self, part: VirtRange, page: PageSize) -> PageSpan {
        let into = part
            .start()
            .checked_offset_from(self.range.start())
            .unwrap_or(0);
        PageSpan::from_start_count(self.first + into / page.get(), part.pages(page))
    }
}

/// One mm of the family: the target's, or a descendant's.
#[derive(Debug)]
struct Ctx {
    uffd: Arc<SyncUserfaultfd>,
    /// The process, once known (the target's at once; a child's from the
    /// thread id of its first fault).
    pid: Option<u32>,
    /// The process it was forked from, if a child.
    parent: Option<u32>,
    map: Vec<Mapped>,
    /// Pages whose protection was lifted since they were last protected.
    unprotected: RangeSet,
    /// Pages a collect could not protect again: reported again next time.
    retained: RangeSet,
    /// Faults pagescope could not resolve yet (`EAGAIN` while a fork or
    /// mremap of this mm is in flight): retried until they are.
    pending: Vec<VirtRange>,
    /// A process pagescope injected the uffd into (the target, a sharer),
    /// not a child received at fork.
    root: bool,
    /// Its mm is gone (exit or exec).
    dead: bool,
}

impl Ctx {
    fn new(uffd: SyncUserfaultfd, pid: Option<u32>, parent: Option<u32>, root: bool) -> Self {
        Self {
            uffd: Arc::new(uffd),
            pid,
            parent,
            map: Vec::new(),
            unprotected: RangeSet::new(),
            retained: RangeSet::new(),
            pending: Vec::new(),
            root,
            dead: false,
        }
    }

    /// The object pages behind the retained ranges, for `who`.
    fn carried(&self, page: PageSize) -> Vec<(ObjectId, u32, PageSpan)> {
        let who = self.pid.or(self.parent).unwrap_or(0);
        let mut out = Vec::new();
        for r in self.retained.ranges() {
            for m in &self.map {
                if let Some(part) = r.intersect(&m.range) {
                    out.push((m.object, who, m.span(part, page)));
                }
            }
        }
        out
    }
}

impl Ctx {
    fn find(&self, addr: VirtAddr) -> Option<&Mapped> {
        self.map.iter().find(|m| m.range.contains(addr))
    }
}

/// What the family wrote since the last collect.
#[derive(Debug, Default)]
pub struct FamilyReport {
    /// Object pages written, per object and writer (the target's own
    /// writes under its PID).
    pub pages: HashMap<ObjectId, BTreeMap<u32, RangeSet<PageSpan>>>,
    /// Objects to report whole, and why (a write pagescope could not place).
    pub whole: Vec<(ObjectId, String)>,
    /// Forks by processes of the family (`UFFD_EVENT_FORK` messages).
    pub forks: u64,
    /// Children whose PID became known (first write), in order.
    pub children: Vec<u32>,
    /// Children's mms that ended (exit or exec) since the last collect.
    pub ended: u64,
}

#[derive(Debug, Default)]
struct State {
    ctxs: HashMap<u64, Ctx>,
    next: u64,
    report: FamilyReport,
    /// Every PID bound to a live mm of the family.
    known: HashSet<u32>,
    stop: bool,
}

impl State {
    fn add(&mut self, ctx: Ctx) -> u64 {
        let id = self.next;
        self.next += 1;
        if let (Some(p), false) = (ctx.pid, ctx.root) {
            self.known.insert(p);
        }
        self.ctxs.insert(id, ctx);
        id
    }

    fn record(&mut self, object: ObjectId, pid: u32, span: PageSpan) {
        self.report
            .pages
            .entry(object)
            .or_default()
            .entry(pid)
            .or_default()
            .insert(span);
    }
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    epoll: OwnedFd,
    wake: OwnedFd,
    page: PageSize,
    /// Rounds of the fault-handling thread's loop: a round ends only once
    /// every message it read has been handled (see [`Family::settle`]).
    rounds: std::sync::atomic::AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A process pagescope injected a synchronous uffd into (the target or a
/// sharer): the root of a tree of tracked processes.
pub type RootId = u64;

/// The synchronous tracker of processes' shared mappings and of every
/// process forked from them: one fault-handling thread for all.
#[derive(Debug)]
pub struct Family {
    shared: Arc<Shared>,
    root: RootId,
    pid: u32,
    thread: Option<JoinHandle<()>>,
}

impl Family {
    /// Starts with `uffd` (created inside process `pid`, the tracked
    /// process, handshaken with [`SyncUserfaultfd::from_fd_sync_family`]);
    /// nothing is registered yet.
    pub fn start(uffd: SyncUserfaultfd, pid: u32, page: PageSize) -> Result<Self, TrackError> {
        let io = |what: &'static str| {
            move |e: Errno| TrackError::Io {
                pid,
                what,
                source: e.into(),
            }
        };
        raise_fd_limit();
        let ep = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(io("create an epoll"))?;
        let wake = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )
        .map_err(io("create an eventfd"))?;
        epoll::add(
            &ep,
            &wake,
            epoll::EventData::new_u64(WAKE),
            epoll::EventFlags::IN,
        )
        .map_err(io("watch the eventfd"))?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            epoll: ep,
            wake,
            page,
            rounds: std::sync::atomic::AtomicU64::new(0),
        });
        let root = add_ctx(&shared, Ctx::new(uffd, Some(pid), None, true))
            .map_err(io("watch the userfaultfd"))?;
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("pagescope-uffd".into())
            .spawn(move || serve::serve(&s))
            .map_err(|e| TrackError::Io {
                pid,
                what: "start the fault-handling thread",
                source: e,
            })?;
        Ok(Self {
            shared,
            root,
            pid,
            thread: Some(thread),
        })
    }

    /// Registers the target's shared mappings `vmas` not registered yet
    /// (write-protecting all of their pages) and forgets those that went
    /// away. Returns the ranges new this time (to report whole: their
    /// earlier contents are unknown) and the mappings that could not be
    /// registered (left to the caller).
    pub fn sync_target<'v>(&self, vmas: &[&'v Vma]) -> (Vec<Written>, Vec<&'v Vma>) {
        self.sync_root(self.root, vmas)
    }

    /// Adds another process (a sharer) whose uffd `uffd` pagescope
    /// created inside it.
    pub fn add_root(&self, uffd: SyncUserfaultfd, pid: u32) -> Result<RootId, TrackError> {
        add_ctx(&self.shared, Ctx::new(uffd, Some(pid), None, true)).map_err(|e| TrackError::Io {
            pid,
            what: "watch the userfaultfd",
            source: e.into(),
        })
    }

    /// Stops tracking a sharer (gone, or no longer mapping a watched
    /// object). Its writes were recorded as they happened; pages a collect
    /// could not protect again are reported once more.
    pub fn remove_root(&self, root: RootId) {
        let page = self.shared.page;
        let mut st = self.shared.lock();
        if let Some(c) = st.ctxs.remove(&root) {
            for (o, who, span) in c.carried(page) {
                st.record(o, who, span);
            }
        }
    }

    /// Whether a root's mm is gone (exit or exec), as of the last collect.
    pub fn is_dead(&self, root: RootId) -> bool {
        self.shared.lock().ctxs.get(&root).is_none_or(|c| c.dead)
    }

    /// [`Self::sync_target`] for any root.
    pub fn sync_root<'v>(&self, root: RootId, vmas: &[&'v Vma]) -> (Vec<Written>, Vec<&'v Vma>) {
        let page = self.shared.page;
        let mut st = self.shared.lock();
        let Some(root) = st.ctxs.get_mut(&root) else {
            return (Vec::new(), vmas.to_vec());
        };
        let mut fresh = Vec::new();
        let mut refused = Vec::new();
        let mut now = Vec::with_capacity(vmas.len());
        for v in vmas {
            let Some(m) = Mapped::of(v, page) else {
                refused.push(*v);
                continue;
            };
            if covered(&root.map, &m, page) {
                // Registered already (VMAs split or merged by mprotect or
                // madvise keep their registration).
                now.push(m);
                continue;
            }
            let armed = root
                .uffd
                .register_wp(m.range)
                .and_then(|()| protect(&root.uffd, m.range));
            match armed {
                Ok(()) => {
                    fresh.push(Written {
                        range: m.range,
                        source: WriteSource::NewMapping,
                    });
                    now.push(m);
                }
                Err(_) => {
                    let _ = root.uffd.unregister(m.range);
                    refused.push(*v);
                }
            }
        }
        root.map = now;
        (fresh, refused)
    }

    /// Re-protects every page unprotected since the last collect, in every
    /// mm of the family, and returns what was written.
    pub fn collect(&self) -> FamilyReport {
        self.settle();
        let page = self.shared.page;
        let mut st = self.shared.lock();
        let mut ended = Vec::new();
        let mut carried = Vec::new();
        for (&id, c) in st.ctxs.iter_mut() {
            if c.dead {
                continue;
            }
            // Pages a previous collect left unprotected may have been
            // written since without a fault: report them again.
            carried.extend(c.carried(page));
            let mut retained = RangeSet::new();
            let mut gone = false;
            for r in c.unprotected.ranges() {
                match protect(&c.uffd, *r).map_err(|e| e.errno()) {
                    Ok(()) => {}
                    Err(Some(Errno::AGAIN)) => retained.insert(*r),
                    Err(Some(Errno::SRCH)) => gone = true,
                    Err(_) => {} // unmapped since: nothing left to protect
                }
            }
            if c.unprotected.is_empty() {
                gone = !alive(c);
            }
            c.unprotected = retained.clone();
            c.retained = retained;
            if gone {
                c.dead = true;
                if !c.root {
                    ended.push(id);
                }
            }
        }
        for (o, who, span) in carried {
            st.record(o, who, span);
        }
        for id in ended {
            if let Some(c) = st.ctxs.remove(&id) {
                if let Some(p) = c.pid {
                    st.known.remove(&p);
                }
                st.report.ended += 1;
            }
        }
        std::mem::take(&mut st.report)
    }

    /// Waits until the fault-handling thread has handled every message it
    /// had read when this was called: a fork the kernel let return once
    /// its event was read is then counted in this interval, not the next.
    /// Bounded (100 ms): a thread that is gone cannot hold a collect.
    fn settle(&self) {
        use std::sync::atomic::Ordering;
        let before = self.shared.rounds.load(Ordering::Acquire);
        let _ = rustix::io::write(&self.shared.wake, &1u64.to_ne_bytes());
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(100);
        while self.shared.rounds.load(Ordering::Acquire) == before
            && std::time::Instant::now() < deadline
            && self.thread.as_ref().is_some_and(|t| !t.is_finished())
        {
            std::thread::sleep(std::time::Duration::from_micros(20));
        }
    }

    /// The processes pagescope injected into (the target, the sharers):
    /// their descendants born since are tracked from birth.
    pub fn root_pids(&self) -> HashSet<u32> {
        self.shared
            .lock()
            .ctxs
            .values()
            .filter(|c| c.root)
            .filter_map(|c| c.pid)
            .collect()
    }

    /// Whether `pid` is a process of the family (a child whose writes the
    /// family sees).
    pub fn knows(&self, pid: u32) -> bool {
        pid != self.pid && self.shared.lock().known.contains(&pid)
    }

    /// Live mms of the family besides the target's.
    pub fn children_tracked(&self) -> usize {
        self.shared.lock().ctxs.values().filter(|c| !c.root).count()
    }
}

impl Drop for Family {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        let _ = rustix::io::write(&self.shared.wake, &1u64.to_ne_bytes());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Closing the uffds (when `shared` goes) lifts every protection
        // and wakes any writer still waiting.
        self.shared.lock().ctxs.clear();
    }
}

fn add_ctx(shared: &Shared, ctx: Ctx) -> Result<u64, Errno> {
    let fd = Arc::clone(&ctx.uffd);
    let id = shared.lock().add(ctx);
    epoll::add(
        &shared.epoll,
        fd.as_fd(),
        epoll::EventData::new_u64(id),
        epoll::EventFlags::IN,
    )
    .inspect_err(|_| {
        shared.lock().ctxs.remove(&id);
    })?;
    Ok(id)
}

/// Whether `m` lies entirely within registered entries of `map` for the
/// same object at the same offsets.
fn covered(map: &[Mapped], m: &Mapped, page: PageSize) -> bool {
    let linear = |e: &Mapped| (e.first as i128) - i128::from(e.range.start().get() / page.get());
    let mut left: RangeSet = [m.range].into_iter().collect();
    for e in map
        .iter()
        .filter(|e| e.object == m.object && linear(e) == linear(m))
    {
        let rest: Vec<VirtRange> = left
            .ranges()
            .iter()
            .flat_map(|r| {
                let cut: RangeSet = [e.range].into_iter().collect();
                cut.subtract_from(*r)
            })
            .collect();
        left = rest.into_iter().collect();
    }
    left.is_empty()
}

/// Every live child holds one of pagescope's fds until the collect after
/// its exit, and a fork whose event cannot get an fd would fail: raise the
/// soft limit on open files to the hard one.
fn raise_fd_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut l = getrlimit(Resource::Nofile);
    if l.current != l.maximum {
        l.current = l.maximum;
        let _ = setrlimit(Resource::Nofile, l);
    }
}

/// Write-protects `range`, retrying while a fork or mremap of the mm is
/// in flight (`EAGAIN` until its event is read).
fn protect(uffd: &SyncUserfaultfd, range: VirtRange) -> Result<(), UffdError> {
    let mut last = Ok(());
    for _ in 0..50 {
        last = uffd.write_protect(range, true);
        match last.as_ref().map_err(UffdError::errno) {
            Err(Some(Errno::AGAIN)) => std::thread::sleep(Duration::from_micros(20)),
            _ => return last,
        }
    }
    last
}

/// Whether a child's mm still exists: protecting a page it has
/// registered (a no-op: only pagescope lifts protections) fails with
/// `ESRCH` once the mm is gone.
fn alive(c: &Ctx) -> bool {
    let Some(m) = c.map.first() else {
        return false;
    };
    let Some(one) = VirtRange::from_start_len(m.range.start(), PageSize::current().get()) else {
        return false;
    };
    !matches!(
        c.uffd.write_protect(one, true).map_err(|e| e.errno()),
        Err(Some(Errno::SRCH))
    )
}

/// Whether process `pid` inherited the family's registration of every
/// shared writable mapping in `ranges` (its smaps `VmFlags` show `uw`):
/// a child forked from a process of the family, tracked from birth even
/// before its first write names it.
pub fn inherited(pid: u32, ranges: &[VirtRange]) -> bool {
    let Ok(smaps) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return false;
    };
    let mut current: Option<u64> = None;
    let mut registered = HashSet::new();
    for l in smaps.lines() {
        if let Some(v) = l.strip_prefix("VmFlags:") {
            if let Some(start) = current {
                if v.split_whitespace().any(|f| f == "uw") {
                    registered.insert(start);
                }
            }
            continue;
        }
        let head = l.split(' ').next().unwrap_or("");
        if let Some((a, b)) = head.split_once('-') {
            if !b.is_empty() && b.bytes().all(|c| c.is_ascii_hexdigit()) {
                current = u64::from_str_radix(a, 16).ok();
            }
        }
    }
    !ranges.is_empty() && ranges.iter().all(|r| registered.contains(&r.start().get()))
}
