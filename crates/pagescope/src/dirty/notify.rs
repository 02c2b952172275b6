//! Writes to an object that no page table records, found through the
//! object itself.
//!
//! * **fsnotify** (inotify `IN_MODIFY`, Linux 2.6.13): `write`, `pwrite`,
//!   `fallocate`, `truncate`, `copy_file_range` and `splice` into a file
//!   raise it; page faults never do. pagescope watches each mapped object
//!   through its own fd of it (`/proc/self/fd/N`), so every path and
//!   every process's descriptor is covered, with one exception below.
//!   A change reports the whole object ([`WriteSource::ObjectSyscall`](super::WriteSource::ObjectSyscall)).
//! * **Data extents**: a hole punched into shmem (`fallocate(PUNCH_HOLE)`,
//!   `MADV_REMOVE`) zeroes pages while the write-protected PTEs become
//!   markers, so uffd-wp reports nothing. Comparing the object's data
//!   extents (`SEEK_DATA`) with the previous collect's finds exactly the
//!   pages that became holes ([`WriteSource::ObjectPunched`](super::WriteSource::ObjectPunched)), and the
//!   holes that became data without a tracked write: written by a process
//!   that came and went between two collects, or read-faulted (which
//!   allocates a zero page: an over-report) ([`WriteSource::ObjectFilled`](super::WriteSource::ObjectFilled)).
//! * **memfd descriptors**: since Linux 6.14 the file a `memfd_create()`
//!   returns is a pseudo file that raises no fsnotify event at all (a
//!   re-opened `/proc/PID/fd/N` does). For memfds, pagescope finds every
//!   process holding a descriptor of the object (`/proc/*/fd`) and counts
//!   their write-family system calls on exactly those fds with a BPF
//!   program ([`DescriptorHolders`]); a counted write reports the whole
//!   object ([`WriteSource::ObjectDescriptorWrite`](super::WriteSource::ObjectDescriptorWrite)). Without BPF (not
//!   root) it falls back to: the memfd's mtime moved and a holder made
//!   write system calls at all (`syscw`). mtime alone cannot tell: every
//!   write fault into a shared mapping moves it too.
//!
//! Not seen: writes through io_uring into a memfd descriptor (no
//! system call of the holder names it); a hole punched then refilled by a
//! *read* fault within one collect interval; and a process that maps the
//! object, overwrites pages that already held data and exits, all between
//! two collects (strict mode closes that one).
//!
//! # References
//! - `inotify(7)`, `lseek(2)` (`SEEK_DATA`), `proc_pid_io(5)`

use std::collections::{HashMap, HashSet};
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use rustix::fs::inotify;
use rustix::io::Errno;

use crate::addr::{PageSize, PageSpan};
use crate::object::extents::data_extents;
use crate::rangeset::RangeSet;
use crate::sys::bpf::WriteCounter;
use crate::vma::ObjectId;

/// inotify `IN_MODIFY` watches on the objects a tracker looks at.
#[derive(Debug)]
pub struct FsNotify {
    fd: Option<OwnedFd>,
    watches: HashMap<i32, ObjectId>,
    by_object: HashMap<ObjectId, i32>,
}

impl Default for FsNotify {
    fn default() -> Self {
        Self {
            fd: inotify::init(inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC).ok(),
            watches: HashMap::new(),
            by_object: HashMap::new(),
        }
    }
}

impl FsNotify {
    /// Watches `object` through our fd `fd` of it. Returns false if the
    /// watch could not be added (then its syscall writes are unseen).
    pub fn watch(&mut self, object: ObjectId, fd: BorrowedFd<'_>) -> bool {
        if self.by_object.contains_key(&object) {
            return true;
        }
        let Some(ino) = &self.fd else {
            return false;
        };
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        match inotify::add_watch(ino, path, inotify::WatchFlags::MODIFY) {
            Ok(wd) => {
                self.watches.insert(wd, object);
                self.by_object.insert(object, wd);
                true
            }
            Err(_) => false,
        }
    }

    /// Stops watching `object`.
    pub fn unwatch(&mut self, object: ObjectId) {
        if let (Some(wd), Some(ino)) = (self.by_object.remove(&object), &self.fd) {
            self.watches.remove(&wd);
            let _ = inotify::remove_watch(ino, wd);
        }
    }

    /// The objects modified since the last call.
    pub fn modified(&mut self) -> HashSet<ObjectId> {
        let mut out = HashSet::new();
        let Some(ino) = &self.fd else {
            return out;
        };
        let mut buf = [MaybeUninit::<u8>::uninit(); 4096];
        let mut reader = inotify::Reader::new(ino, &mut buf);
        while let Ok(ev) = reader.next() {
            if let Some(id) = self.watches.get(&ev.wd()) {
                out.insert(*id);
            }
        }
        out
    }
}

/// Pages that changed between data and hole since the last collect.
#[derive(Debug, Default)]
pub struct ExtentChanges {
    /// Data before, hole now: punched or truncated (content now zeros).
    pub punched: Vec<PageSpan>,
    /// Hole before, data now: written (or read-faulted) through some
    /// mapping or system call.
    pub filled: Vec<PageSpan>,
}

/// The data extents of shmem objects at the last collect, and their
/// allocated page count (`st_blocks`, which counts swapped and fallocated
/// pages too).
///
/// The `SEEK_DATA` walk costs about 11 ms per fully written GiB, so it
/// runs only when the allocation count moved by more than the tracked
/// writes into holes explain; otherwise the extents are updated from
/// those writes. (A punch and an untracked fill of as many pages within
/// one interval would cancel out; it needs a hole punched while another
/// process that is gone by the next collect writes a hole.)
#[derive(Debug, Default)]
pub struct ExtentWatch {
    last: HashMap<ObjectId, Extents>,
}

#[derive(Debug)]
struct Extents {
    data: RangeSet<PageSpan>,
    allocated: u64,
}

impl ExtentWatch {
    /// Pages of `span` that turned from data to hole or back since the
    /// last call; `tracked` are the object pages tracked writers wrote
    /// meanwhile. The first call for an object only records.
    pub fn changes(
        &mut self,
        object: ObjectId,
        fd: BorrowedFd<'_>,
        span: PageSpan,
        page: PageSize,
        tracked: &RangeSet<PageSpan>,
    ) -> ExtentChanges {
        let mut out = ExtentChanges::default();
        let Some(allocated) = allocated_pages(fd, page) else {
            self.last.remove(&object);
            return out;
        };
        if let Some(last) = self.last.get_mut(&object) {
            let fills: Vec<PageSpan> = tracked
                .ranges()
                .iter()
                .filter_map(|t| t.intersect(&span))
                .flat_map(|t| last.data.subtract_from(t))
                .collect();
            let explained: u64 = fills.iter().map(PageSpan::count).sum();
            if allocated == last.allocated + explained {
                last.data.extend(fills);
                last.allocated = allocated;
                return out;
            }
        }
        let Ok(now) = data_extents(fd, span, page) else {
            // Unknown: drop the baseline rather than compare with a stale one.
            self.last.remove(&object);
            return out;
        };
        if let Some(before) = self.last.get(&object) {
            for r in before.data.ranges() {
                out.punched.extend(now.subtract_from(*r));
            }
            for r in now.ranges() {
                out.filled.extend(before.data.subtract_from(*r));
            }
        }
        self.last.insert(
            object,
            Extents {
                data: now,
                allocated,
            },
        );
        out
    }

    /// Forgets objects no longer watched.
    pub fn retain(&mut self, keep: impl Fn(&ObjectId) -> bool) {
        self.last.retain(|k, _| keep(k));
    }
}

/// Pages the object has allocated (`st_blocks` is in 512-byte units).
fn allocated_pages(fd: BorrowedFd<'_>, page: PageSize) -> Option<u64> {
    let st = rustix::fs::fstat(fd).ok()?;
    Some(u64::try_from(st.st_blocks).ok()? * 512 / page.get())
}

/// Processes holding memfd descriptors fsnotify cannot see, and whether
/// they wrote through them.
///
/// Exact where a BPF counter can be loaded (root): write-family system
/// calls are counted per (process, fd) (`crate::sys::bpf`). A
/// descriptor that appeared since the last collect (a new holder, a
/// `dup`, an fd received over a socket) was not counted before, so its
/// object is reported once. Without BPF: the memfd's mtime moved and a
/// holder's `syscw` (`/proc/PID/io`) moved.
#[derive(Debug, Default)]
pub struct DescriptorHolders {
    counter: Option<Result<WriteCounter, Errno>>,
    last: HashMap<ObjectId, Seen>,
}

/// What was seen of one memfd at the last collect.
#[derive(Debug, Default)]
struct Seen {
    mtime: Option<(i64, u64)>,
    /// (PID, fd) → BPF count (or `syscw` of the PID without BPF).
    pairs: HashMap<(u32, u32), Option<u64>>,
}

/// Why a memfd is reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DescriptorWrite {
    /// These processes wrote through a memfd descriptor (counted).
    Wrote(Vec<u32>),
    /// These processes got a descriptor since the last collect.
    NewDescriptor(Vec<u32>),
    /// No counter: the mtime moved and these holders made write system
    /// calls (to some file).
    Heuristic(Vec<u32>),
}

impl DescriptorHolders {
    /// Whether writes are counted per descriptor (BPF) or guessed.
    pub fn exact(&mut self) -> bool {
        self.counter().is_some()
    }

    fn counter(&mut self) -> Option<&WriteCounter> {
        self.counter
            .get_or_insert_with(WriteCounter::new)
            .as_ref()
            .ok()
    }

    /// Which of `memfds` (with our fd of each) were possibly written
    /// through a memfd descriptor since the last call. The first call for
    /// an object only records.
    pub fn written(
        &mut self,
        memfds: &[(ObjectId, BorrowedFd<'_>)],
    ) -> Vec<(ObjectId, DescriptorWrite)> {
        if memfds.is_empty() {
            self.forget(|_| false);
            return Vec::new();
        }
        let wanted: HashSet<ObjectId> = memfds.iter().map(|(id, _)| *id).collect();
        let holders = holders_of(memfds);
        let exact = self.exact();
        let mut out = Vec::new();
        for (id, fd) in memfds {
            let pairs = holders.get(id).cloned().unwrap_or_default();
            let now = Seen {
                mtime: mtime(*fd),
                pairs: pairs
                    .iter()
                    .map(|&(p, f)| ((p, f), self.count(p, f, exact)))
                    .collect(),
            };
            if let Some(before) = self.last.get(id) {
                out.extend(compare(before, &now, exact).map(|w| (*id, w)));
            }
            let old = self.last.insert(*id, now);
            self.unwatch_gone(old, id);
        }
        self.forget(|k| wanted.contains(k));
        out
    }

    fn count(&mut self, pid: u32, fd: u32, exact: bool) -> Option<u64> {
        if !exact {
            return syscw(pid);
        }
        let c = self.counter()?;
        c.watch(pid, fd).ok()?;
        c.count(pid, fd)
    }

    /// Stops counting pairs of `id` that are gone.
    fn unwatch_gone(&mut self, old: Option<Seen>, id: &ObjectId) {
        let (Some(old), Some(now)) = (old, self.last.get(id)) else {
            return;
        };
        let gone: Vec<(u32, u32)> = old
            .pairs
            .keys()
            .filter(|k| !now.pairs.contains_key(k))
            .copied()
            .collect();
        if let Some(c) = self.counter() {
            for (p, f) in gone {
                c.unwatch(p, f);
            }
        }
    }

    fn forget(&mut self, keep: impl Fn(&ObjectId) -> bool) {
        let gone: Vec<ObjectId> = self.last.keys().filter(|k| !keep(k)).copied().collect();
        for id in gone {
            let old = self.last.remove(&id);
            if let (Some(old), Some(c)) = (old, self.counter()) {
                for (p, f) in old.pairs.keys() {
                    c.unwatch(*p, *f);
                }
            }
        }
    }
}

/// Whether the memfd was (possibly) written between `before` and `now`.
fn compare(before: &Seen, now: &Seen, exact: bool) -> Option<DescriptorWrite> {
    let pids = |pairs: Vec<(u32, u32)>| {
        let mut v: Vec<u32> = pairs.into_iter().map(|(p, _)| p).collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    if exact {
        let wrote: Vec<(u32, u32)> = now
            .pairs
            .iter()
            .filter(|(k, n)| before.pairs.get(k).is_some_and(|b| n.is_none() || b != *n))
            .map(|(k, _)| *k)
            .collect();
        if !wrote.is_empty() {
            return Some(DescriptorWrite::Wrote(pids(wrote)));
        }
        let new: Vec<(u32, u32)> = now
            .pairs
            .keys()
            .filter(|k| !before.pairs.contains_key(k))
            .copied()
            .collect();
        return (!new.is_empty()).then(|| DescriptorWrite::NewDescriptor(pids(new)));
    }
    let moved = now
        .pairs
        .iter()
        .any(|(k, n)| before.pairs.get(k).is_none_or(|b| n.is_none() || b != n));
    (before.mtime != now.mtime && moved)
        .then(|| DescriptorWrite::Heuristic(pids(now.pairs.keys().copied().collect())))
}

fn mtime(fd: BorrowedFd<'_>) -> Option<(i64, u64)> {
    let st = rustix::fs::fstat(fd).ok()?;
    Some((st.st_mtime, st.st_mtime_nsec))
}

/// `syscw` of `/proc/PID/io` (write-family system calls ever made).
fn syscw(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("syscw:"))
        .and_then(|v| v.trim().parse().ok())
}

/// For each memfd in `memfds` (with pagescope's own fd of it), the (PID,
/// fd) pairs of other processes holding it: every `/proc/*/fd/*` whose
/// link names a memfd is `stat`ed. pagescope itself is left out, and so
/// are copies of its own descriptors (see [`is_ours`]).
fn holders_of(memfds: &[(ObjectId, BorrowedFd<'_>)]) -> HashMap<ObjectId, Vec<(u32, u32)>> {
    let mut out: HashMap<ObjectId, Vec<(u32, u32)>> = HashMap::new();
    let me = std::process::id();
    for pid in crate::proc::pids().into_iter().filter(|&p| p != me) {
        let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(link) = std::fs::read_link(e.path()) else {
                continue;
            };
            if !link.as_os_str().as_encoded_bytes().starts_with(b"/memfd:") {
                continue;
            }
            let (Ok(st), Some(fd)) = (
                rustix::fs::stat(e.path()),
                e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()),
            ) else {
                continue;
            };
            let id = ObjectId {
                dev: crate::proc::maps::DevId::from_st_dev(st.st_dev),
                inode: st.st_ino,
            };
            let Some((_, ours)) = memfds.iter().find(|(o, _)| *o == id) else {
                continue;
            };
            if !is_ours(me, pid, fd, *ours) {
                out.entry(id).or_default().push((pid, fd));
            }
        }
    }
    out
}

/// Whether `pid`'s fd `fd` is pagescope's own descriptor `ours` of the
/// object (`kcmp(KCMP_FILE)`), not one of the process's own: a fork of
/// pagescope (an injection helper, or a child of another thread not yet
/// `exec`ed) holds copies of its descriptors for a moment. pagescope
/// opens objects read-only (`/proc/PID/fd/N` or `map_files`, always a
/// new open file description), so nothing can be written through one;
/// a re-open of it for writing is a new descriptor, and raises fsnotify.
/// Not comparable (no ptrace access): a holder like any other.
fn is_ours(me: u32, pid: u32, fd: u32, ours: BorrowedFd<'_>) -> bool {
    let (Ok(me), Ok(pid), Ok(fd)) = (i32::try_from(me), i32::try_from(pid), i32::try_from(fd))
    else {
        return false;
    };
    crate::sys::kcmp::same_file(me, pid, ours.as_raw_fd(), fd).unwrap_or(false)
}
