//! The layouts the fixture can build, and what each page must then be.
//!
//! Every scenario verifies that the kernel did what was asked (a pageout
//! really swapped, a THP really got allocated) using the fixture's *own*
//! view of itself, and marks the region `skip` with a reason if not, so a
//! test can never pass against a layout that did not happen.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use pagescope::raw::{Advice, OwnedMapping, PagemapEntry, PagemapFlags};
use pagescope::raw::{Userfaultfd, wp_arm};
use pagescope::{VirtAddr, VirtRange};

use crate::sys;
use crate::truth::{Expect, ObjectTruth, Region, SkippedScenario, Truth};

mod anon;
mod bench;
mod commands;
mod file;
mod shmem;

pub use commands::start_churn;

/// Scenario names and what they build.
pub const SCENARIOS: &[(&str, &str)] = &[
    (
        "fork_shared",
        "anonymous pages COW-shared with a live forked child (not exclusive)",
    ),
    (
        "anon",
        "private anonymous: present, zero page, untouched, swapped out (MADV_PAGEOUT)",
    ),
    (
        "thp",
        "2 MiB-aligned MADV_HUGEPAGE memory: a written THP and the huge zero page",
    ),
    (
        "guard",
        "a guard region (MADV_GUARD_INSTALL) between present and untouched pages",
    ),
    (
        "uffd_wp",
        "uffd-wp async armed region: protected pages, markers, written pages",
    ),
    (
        "file",
        "private and shared mappings of a sparse regular file, and a file with cached, evicted and hole pages",
    ),
    (
        "memfd",
        "memfd: mapped, paged out, resident unmapped (DONTNEED and pwrite), fallocated, hole, mapped by a helper only",
    ),
    ("tmpfs", "a /dev/shm file, same layout as memfd"),
    (
        "shared_anon",
        "MAP_SHARED|MAP_ANONYMOUS, same layout (no fallocate: no fd)",
    ),
    (
        "sysv",
        "a SysV shared memory segment, same layout (no fallocate: no fd)",
    ),
    (
        "memfd_private",
        "a MAP_PRIVATE view of a memfd: copied-on-write pages, one swapped, shared pages, resident, hole",
    ),
    (
        "dense_mixed",
        "a 96 MiB anonymous mapping: 32 MiB dense, then a THP (MADV_COLLAPSE), present/zero/swapped/hole and guard pages in one block each, then sparse pages",
    ),
    (
        "bench",
        "benchmark layout: a sparse reservation (1% touched) and dense anonymous memory",
    ),
    (
        "bench_shmem",
        "benchmark layout: a memfd, half paged out, a quarter resident unmapped, a quarter mapped, holes scattered",
    ),
];

/// Scenarios `all` and `demo` expand to (everything but `bench`).
const DEFAULT_SET: &[&str] = &[
    "fork_shared",
    "anon",
    "thp",
    "guard",
    "uffd_wp",
    "file",
    "memfd",
    "tmpfs",
    "shared_anon",
    "sysv",
    "memfd_private",
    "dense_mixed",
];

/// Alignment of file and shmem mappings: fault-around maps the cached
/// neighbours of a read page within a window aligned on the *virtual*
/// address (`fault_around_bytes`, 64 KiB by default), so the layouts are
/// reproducible only at aligned addresses.
const ALIGN: usize = 2 << 20;

/// A mapping the fixture keeps, with the regions carved from it.
struct Live {
    map: Arc<OwnedMapping>,
    /// Name of the command-made region using it (mmap/mremap/munmap).
    name: Option<String>,
}

/// The fixture's state.
pub struct Fixture {
    page: u64,
    truth: Truth,
    live: Vec<Live>,
    keep_fds: Vec<OwnedFd>,
    keep_uffd: Vec<Userfaultfd>,
    dir: PathBuf,
    files: Vec<PathBuf>,
    pagemap: Option<File>,
    sparse_gib: u64,
    dense_gib: u64,
    shmem_gib: u64,
    sharers: u64,
    /// Parts of shared mappings a helper process must map and write.
    helper_parts: Vec<(Arc<OwnedMapping>, usize, usize)>,
    /// Object fds of regions (for `pwrite`).
    region_fds: HashMap<String, usize>,
    /// Bumped on every write command, so every write changes content.
    generation: u8,
    /// The sharer child's command socket, once `sharer start` ran.
    sharer: Option<(u32, std::io::BufReader<std::os::unix::net::UnixStream>)>,
    /// In a sharer child: the start addresses of the mappings it has (the
    /// others were not inherited and must not be touched).
    inherited: Option<Vec<u64>>,
}

fn arg_value(args: &[String], key: &str) -> Option<String> {
    args.iter()
        .position(|a| a == key)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

impl Fixture {
    /// A fixture with options from `args` (`--dir`, `--sparse-gib`,
    /// `--dense-gib`).
    pub fn new(args: &[String]) -> Self {
        let page = rustix::param::page_size() as u64;
        let dir = arg_value(args, "--dir")
            .or_else(|| std::env::var("PAGESCOPE_FIXTURE_DIR").ok())
            .unwrap_or_else(|| "/var/tmp".to_owned());
        let truth = Truth {
            pid: std::process::id(),
            page_size: page,
            swap: swap_kind(),
            ..Truth::default()
        };
        Self {
            page,
            truth,
            live: Vec::new(),
            keep_fds: Vec::new(),
            keep_uffd: Vec::new(),
            dir: PathBuf::from(dir),
            files: Vec::new(),
            pagemap: File::open("/proc/self/pagemap").ok(),
            sparse_gib: arg_value(args, "--sparse-gib")
                .and_then(|v| v.parse().ok())
                .unwrap_or(64),
            dense_gib: arg_value(args, "--dense-gib")
                .and_then(|v| v.parse().ok())
                .unwrap_or(4),
            helper_parts: Vec::new(),
            region_fds: HashMap::new(),
            generation: 0,
            sharer: None,
            inherited: None,
            shmem_gib: arg_value(args, "--shmem-gib")
                .and_then(|v| v.parse().ok())
                .unwrap_or(4),
            sharers: arg_value(args, "--sharers")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        }
    }

    /// The scenarios named in `args`, in build order (`fork_shared` first:
    /// the forked child must share nothing else).
    pub fn scenario_names(&self, args: &[String]) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        let mut skip_value = false;
        for a in args {
            if std::mem::take(&mut skip_value) {
                continue;
            }
            match a.as_str() {
                "--dir" | "--sparse-gib" | "--dense-gib" | "--shmem-gib" | "--sharers"
                | "--deny-uffd" => skip_value = true,
                "all" | "demo" => names.extend(DEFAULT_SET.iter().map(|s| (*s).to_owned())),
                s if s.starts_with("--") => {}
                s => names.push(s.to_owned()),
            }
        }
        names.sort_by_key(|n| n != "fork_shared");
        names.dedup();
        names
    }

    /// The ground truth so far.
    pub fn truth(&self) -> &Truth {
        &self.truth
    }

    /// Builds scenario `name`, recording it as skipped if it cannot be.
    pub fn build(&mut self, name: &str) {
        let result = match name {
            "fork_shared" => self.fork_shared(),
            "anon" => self.anon(),
            "thp" => self.thp(),
            "guard" => self.guard(),
            "uffd_wp" => self.uffd_wp(),
            "file" => self.file(),
            "dense_mixed" => self.dense_mixed(),
            "bench" => self.bench(),
            "bench_shmem" => self.bench_shmem(),
            "memfd" | "tmpfs" | "shared_anon" | "sysv" => self.shmem(name),
            "memfd_private" => self.memfd_private(),
            other => Err(format!("unknown scenario {other:?}")),
        };
        if let Err(reason) = result {
            self.truth.skipped.push(SkippedScenario {
                scenario: name.to_owned(),
                reason,
            });
        }
    }

    /// The live mapping holding `addr`, and the page index of `addr` in it.
    fn mapping_of(&self, addr: u64) -> Option<(Arc<OwnedMapping>, u64)> {
        let l = self
            .live
            .iter()
            .find(|l| l.map.addr() <= addr && addr < l.map.addr() + l.map.len() as u64)?;
        if let Some(have) = &self.inherited {
            have.contains(&l.map.addr()).then_some(())?;
        }
        Some((Arc::clone(&l.map), (addr - l.map.addr()) / self.page))
    }

    /// Forks the helper that maps and writes the parts of shared objects
    /// only it maps (after every scenario is built).
    pub fn finish(&mut self) {
        if self.helper_parts.is_empty() {
            return;
        }
        let result = self.dont_fork_anything().and_then(|()| {
            for (m, off, len) in &self.helper_parts {
                m.madvise(*off, *len, Advice::DoFork)
                    .map_err(|e| format!("MADV_DOFORK: {e}"))?;
            }
            if self.sharers > 0 {
                // Benchmark sharers map everything and touch nothing.
                return (0..self.sharers)
                    .map(|_| sys::fork_helper(|| {}).map_err(|e| format!("fork: {e}")))
                    .collect();
            }
            let parts: Vec<(u64, usize)> = self
                .helper_parts
                .iter()
                .map(|(m, off, len)| (m.addr() + *off as u64, *len))
                .collect();
            let page = self.page as usize;
            sys::fork_helper(move || {
                for &(addr, len) in &parts {
                    for p in (0..len).step_by(page) {
                        sys::poke(addr + p as u64, 0x4E);
                    }
                }
            })
            .map(|pid| vec![pid])
            .map_err(|e| format!("fork: {e}"))
        });
        match result {
            Ok(pids) => self.truth.children.extend(pids),
            Err(e) => {
                for r in self
                    .truth
                    .regions
                    .iter_mut()
                    .filter(|r| r.expect.iter().any(|x| x.state == "resident"))
                {
                    r.skip.get_or_insert_with(|| format!("helper process: {e}"));
                }
            }
        }
    }

    /// Removes the files the fixture created.
    pub fn cleanup(&mut self) {
        for f in self.files.drain(..) {
            let _ = std::fs::remove_file(f);
        }
    }

    fn bytes(&self, pages: u64) -> usize {
        (pages * self.page) as usize
    }

    fn anon_map(&self, pages: u64, align: usize) -> Result<OwnedMapping, String> {
        let m =
            OwnedMapping::anonymous(self.bytes(pages), align).map_err(|e| format!("mmap: {e}"))?;
        m.madvise(0, m.len(), Advice::NoHugePage)
            .map_err(|e| format!("MADV_NOHUGEPAGE: {e}"))?;
        Ok(m)
    }

    fn write_pages(
        &self,
        m: &OwnedMapping,
        first: u64,
        count: u64,
        byte: u8,
    ) -> Result<(), String> {
        (first..first + count)
            .try_for_each(|i| m.write_byte(self.bytes(i), byte))
            .map_err(|e| format!("write: {e}"))
    }

    fn read_pages(&self, m: &OwnedMapping, first: u64, count: u64) -> Result<(), String> {
        (first..first + count)
            .try_for_each(|i| m.read_byte(self.bytes(i)).map(drop))
            .map_err(|e| format!("read: {e}"))
    }

    /// The fixture's own pagemap entries for `count` pages at `addr`.
    fn own_entries(&self, addr: u64, count: u64) -> Vec<PagemapEntry> {
        let Some(pm) = &self.pagemap else {
            return Vec::new();
        };
        let mut buf = vec![0u8; (count * 8) as usize];
        if pm.read_exact_at(&mut buf, addr / self.page * 8).is_err() {
            return Vec::new();
        }
        buf.chunks_exact(8)
            .map(|c| PagemapEntry(u64::from_ne_bytes(c.try_into().unwrap_or_default())))
            .collect()
    }

    fn keep(&mut self, map: OwnedMapping) -> Arc<OwnedMapping> {
        let map = Arc::new(map);
        self.live.push(Live {
            map: Arc::clone(&map),
            name: None,
        });
        map
    }

    #[allow(clippy::too_many_arguments)]
    fn region(
        &mut self,
        name: &str,
        scenario: &str,
        start: u64,
        pages: u64,
        backing: &str,
        expect: Vec<Expect>,
        skip: Option<String>,
    ) {
        self.truth.regions.push(Region {
            name: name.to_owned(),
            scenario: scenario.to_owned(),
            start,
            pages,
            backing: backing.to_owned(),
            expect,
            skip,
            object: None,
        });
    }

    /// Marks every kept mapping MADV_DONTFORK so a helper child shares
    /// nothing it should not (a shared page is never exclusive, and
    /// MADV_PAGEOUT skips it).
    fn dont_fork_anything(&self) -> Result<(), String> {
        for l in &self.live {
            l.map
                .madvise(0, l.map.len(), Advice::DontFork)
                .map_err(|e| format!("MADV_DONTFORK: {e}"))?;
        }
        Ok(())
    }

    /// Device and inode of the mapping at `addr` (from our own maps), and
    /// the object page of `addr`.
    fn object_of(&self, addr: u64, first_page: u64) -> Option<ObjectTruth> {
        let me = pagescope::Target::current().ok()?;
        let e = me
            .maps()
            .ok()?
            .into_iter()
            .find(|e| e.range.contains(VirtAddr::new(addr)))?;
        Some(ObjectTruth {
            dev: e.dev.to_string(),
            inode: e.inode,
            first_page,
        })
    }

    fn set_object(&mut self, object: Option<ObjectTruth>) {
        if let Some(r) = self.truth.regions.last_mut() {
            r.object = object;
        }
    }
}

/// Which kind of swap device receives paged-out pages (highest priority).
fn swap_kind() -> String {
    let Ok(table) = pagescope::raw::read_swaps() else {
        return "none".into();
    };
    let best = table.devices().iter().max_by_key(|d| d.priority);
    match best {
        None => "none".into(),
        Some(d) if d.display_path().contains("/zram") => "zram".into(),
        Some(d) if d.kind == "file" => "file".into(),
        Some(_) => "other".into(),
    }
}

/// A kB field of the fixture's own smaps entry containing `addr`.
fn own_smaps_field(addr: u64, field: &str) -> Option<u64> {
    let me = pagescope::Target::current().ok()?;
    let smaps = me.smaps().ok()?;
    smaps
        .iter()
        .find(|s| s.vma.range.contains(VirtAddr::new(addr)))?
        .field_kb(field)
}
