//! Writes no page-table bit records: to a mapped object through a system
//! call, or through another process's mapping of it.
//!
//! * `write()`, `pwrite()`, `fallocate()` and truncation update the object's
//!   mtime/ctime (writes through a mapping of shmem do not), and a write
//!   into a hole through any mapping changes its allocated page count
//!   (`cachestat`), so a changed stamp since the last collect means "some
//!   page changed": every mapped page of the object is reported
//!   ([`WriteSource::ObjectSyscall`]).
//! * uffd-wp only sees writes through the tracked process's own page
//!   tables. If any other process maps the object shared and writable, its
//!   writes are invisible: the object's mapped pages are reported every
//!   collect ([`WriteSource::ObjectForeignWriter`]).
//! * Not seen: a process that maps the object, overwrites pages that were
//!   already allocated and exits, all between two collects, changing
//!   neither mtime nor the allocated count. Callers that cannot accept
//!   that set [`TrackOptions::strict_shared`](super::TrackOptions), which
//!   reports every shared object whole on every collect.
//! * Several mappings of one object in the tracked process: a write seen
//!   through a shared one is also reported at the other addresses of the
//!   same object pages (see [`alias_writes`]).

use std::collections::HashMap;
use std::os::fd::OwnedFd;

use super::{WriteSource, Written};
use crate::addr::{PageSize, VirtRange};
use crate::object::open_object;
use crate::proc::Target;
use crate::proc::maps::DevId;
use crate::vma::{Backing, Vma};

type Key = (DevId, u64);

/// Object stamps: mtime and ctime (ns), and the number of allocated pages
/// (`cachestat` `nr_cache + nr_evicted`, which reclaim and swap-in leave
/// unchanged but a write into a hole or a punch changes).
type Stamp = (i64, u64, i64, u64, u64);

fn stamp(fd: &OwnedFd) -> Option<Stamp> {
    use std::os::fd::AsFd;
    let st = rustix::fs::fstat(fd).ok()?;
    let allocated =
        crate::sys::cachestat::cachestat(fd.as_fd(), 0, 0).map_or(0, |c| c.nr_cache + c.nr_evicted);
    Some((
        st.st_mtime,
        st.st_mtime_nsec,
        st.st_ctime,
        st.st_ctime_nsec,
        allocated,
    ))
}

/// What is known about one mapped object.
#[derive(Debug)]
struct Watched {
    fd: Option<OwnedFd>,
    stamp: Option<Stamp>,
    shared: bool,
}

/// The mapped objects of a tracked process and their last-seen stamps.
#[derive(Debug, Default)]
pub struct ObjectWatch {
    objects: HashMap<Key, Watched>,
}

fn watched(v: &Vma) -> bool {
    matches!(v.backing, Backing::Shmem | Backing::File | Backing::Hugetlb) && v.inode != 0
}

impl ObjectWatch {
    /// Opens objects of `vmas` not seen before (stamps taken now).
    pub fn refresh(&mut self, target: &Target, vmas: &[Vma], map_files: bool) {
        for v in vmas.iter().filter(|v| watched(v)) {
            let key = (v.dev, v.inode);
            let w = self.objects.entry(key).or_insert_with(|| {
                let fd = open_object(target, v, map_files).ok().map(|o| o.fd);
                let stamp = fd.as_ref().and_then(stamp);
                Watched {
                    fd,
                    stamp,
                    shared: false,
                }
            });
            w.shared |= v.is_shared() || v.backing == Backing::Shmem;
        }
        self.objects
            .retain(|k, _| vmas.iter().any(|v| (v.dev, v.inode) == *k));
    }

    /// Reports the mapped ranges of objects changed by system calls since
    /// the last check, and of objects that could not be opened (shmem and
    /// shared objects only: a private file's content rarely changes and is
    /// noted instead).
    pub fn syscall_writes(&mut self, vmas: &[Vma], out: &mut Vec<Written>) {
        for (key, w) in &mut self.objects {
            let changed = match &w.fd {
                Some(fd) => {
                    let now = stamp(fd);
                    let changed = now != w.stamp;
                    w.stamp = now;
                    changed
                }
                None => w.shared,
            };
            if changed {
                push_object(vmas, *key, WriteSource::ObjectSyscall, out);
            }
        }
    }

    /// Reports every shared object whole (strict mode: nothing another
    /// process could do through a mapping goes unseen).
    pub fn strict_writes(&self, vmas: &[Vma], out: &mut Vec<Written>) {
        for (key, w) in &self.objects {
            if w.shared {
                push_object(vmas, *key, WriteSource::ObjectForeignWriter, out);
            }
        }
    }

    /// Objects that could not be opened (for notes).
    pub fn unopened(&self) -> usize {
        self.objects.values().filter(|w| w.fd.is_none()).count()
    }

    /// Reports the mapped ranges of objects that another process maps
    /// shared and writable (it scans `/proc/*/maps`).
    pub fn foreign_writes(&self, pid: u32, vmas: &[Vma], out: &mut Vec<Written>) {
        if self.objects.is_empty() {
            return;
        }
        for key in foreign_writable(pid, |k| self.objects.contains_key(k)) {
            push_object(vmas, key, WriteSource::ObjectForeignWriter, out);
        }
    }
}

fn push_object(vmas: &[Vma], key: Key, source: WriteSource, out: &mut Vec<Written>) {
    for v in vmas.iter().filter(|v| (v.dev, v.inode) == key) {
        out.push(Written {
            range: v.range,
            source,
        });
    }
}

/// Keys (among those `wanted`) that some process other than `pid` maps
/// shared and writable.
fn foreign_writable(pid: u32, wanted: impl Fn(&Key) -> bool) -> Vec<Key> {
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in dir.flatten() {
        let Some(other) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if other == pid {
            continue;
        }
        let Ok(buf) = std::fs::read(format!("/proc/{other}/maps")) else {
            continue;
        };
        for line in buf.split(|&b| b == b'\n') {
            let Some(e) = crate::proc::maps::parse_line(line) else {
                continue;
            };
            let key = (e.dev, e.inode);
            if e.perms.write && e.perms.shared && wanted(&key) && !found.contains(&key) {
                found.push(key);
            }
        }
    }
    found
}

/// Writes seen through a shared mapping change the object, so they also
/// show at every other address of the process mapping the same object
/// pages. Returns those aliased ranges.
pub fn alias_writes(vmas: &[Vma], tracked: &[Written], page: PageSize) -> Vec<Written> {
    let mut out = Vec::new();
    let aliased = |v: &Vma| {
        vmas.iter()
            .any(|o| (o.dev, o.inode) == (v.dev, v.inode) && o.range != v.range)
    };
    if !vmas
        .iter()
        .any(|v| v.is_shared() && watched(v) && aliased(v))
    {
        return out;
    }
    let p = page.get();
    for w in tracked.iter().filter(|w| w.source == WriteSource::Tracked) {
        let Some(src) = vmas.iter().find(|v| v.range.contains(w.range.start())) else {
            continue;
        };
        if !src.is_shared() || !watched(src) {
            continue;
        }
        let first = src.offset / p
            + w.range
                .start()
                .checked_offset_from(src.range.start())
                .unwrap_or(0)
                / p;
        let last = first + w.range.pages(page);
        for dst in vmas
            .iter()
            .filter(|v| (v.dev, v.inode) == (src.dev, src.inode) && v.range != src.range)
        {
            let (d0, dn) = (dst.offset / p, dst.range.pages(page));
            let (a, b) = (first.max(d0), last.min(d0 + dn));
            if a < b {
                let start = dst.range.start().saturating_add((a - d0) * p);
                if let Some(range) = VirtRange::from_start_len(start, (b - a) * p) {
                    out.push(Written {
                        range,
                        source: WriteSource::Tracked,
                    });
                }
            }
        }
    }
    out
}
