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

use pagescope::uffd::{Userfaultfd, wp_arm};
use pagescope::{Advice, OwnedMapping, PagemapEntry, PagemapFlags, VirtAddr, VirtRange};

use crate::sys;
use crate::truth::{Expect, ObjectTruth, Region, SkippedScenario, Truth};

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

    /// Handles a command line from the test (beyond exit/truth/ping).
    pub fn command(&mut self, cmd: &str) -> Result<String, String> {
        let words: Vec<&str> = cmd.split_whitespace().collect();
        match words.as_slice() {
            ["selfview"] => Ok(self.selfview()),
            ["pageout", region, first, count] => self.pageout_command(region, first, count),
            [
                op @ ("write" | "read" | "readinto" | "dontneed" | "remove" | "pwrite" | "punch"
                | "ro" | "rw"),
                region,
                first,
                count,
            ] => self.page_command(op, region, first, count),
            ["mmap", name, pages] => self.mmap_command(name, pages),
            ["mremap", name, pages] => self.mremap_command(name, pages),
            ["munmap", name] => self.munmap_command(name),
            ["fork"] => sys::fork_helper(|| {})
                .map(|p| {
                    self.truth.children.push(p);
                    p.to_string()
                })
                .map_err(|e| e.to_string()),
            ["writers", region, threads, millis] => self.writers_command(region, threads, millis),
            ["sharer", "start"] => self.start_sharer(),
            ["sharer", "stop"] => self.stop_sharer(),
            ["sharer", rest @ ..] => self.sharer_command(&rest.join(" ")),
            [
                "helper_write",
                region,
                first,
                count,
                mode @ ("stay" | "exit"),
            ] => self.helper_write(region, first, count, *mode == "stay"),
            _ => Err(format!("unknown command {cmd:?}")),
        }
    }

    /// A command's `REGION A B` arguments: the region and two numbers.
    fn region_args(&self, region: &str, a: &str, b: &str) -> Result<(Region, u64, u64), String> {
        let r = self
            .truth
            .region(region)
            .ok_or_else(|| format!("no region {region}"))?
            .clone();
        let a: u64 = a.parse().map_err(|_| format!("not a number: {a}"))?;
        let b: u64 = b.parse().map_err(|_| format!("not a number: {b}"))?;
        Ok((r, a, b))
    }

    /// `pageout REGION FIRST COUNT`: MADV_PAGEOUT of those pages; replies
    /// with the resulting state of each page (as the fixture sees it).
    fn pageout_command(&self, region: &str, first: &str, count: &str) -> Result<String, String> {
        let r = self
            .truth
            .region(region)
            .ok_or_else(|| format!("no region {region}"))?;
        let first: u64 = first.parse().map_err(|_| "bad FIRST")?;
        let count: u64 = count.parse().map_err(|_| "bad COUNT")?;
        let (m, base) = self
            .mapping_of(r.start)
            .ok_or("region has no live mapping")?;
        let at = base + first;
        let states = if r.backing == "shmem" {
            self.pageout_shmem(&m, at, count)?
        } else {
            self.pageout_anon(&m, at, count)?;
            vec!["swapped"; count as usize]
        };
        serde_json::to_string(&states).map_err(|e| e.to_string())
    }

    /// `write|read|readinto|dontneed|remove|pwrite|punch|ro|rw REGION FIRST
    /// COUNT`
    /// (`remove`: `MADV_REMOVE` through the mapping; `pwrite`/`punch`:
    /// `pwrite`/`fallocate(PUNCH_HOLE)` through the region's object fd).
    fn page_command(
        &mut self,
        op: &str,
        region: &str,
        first: &str,
        count: &str,
    ) -> Result<String, String> {
        let (r, first, count) = self.region_args(region, first, count)?;
        if first + count > r.pages {
            return Err(format!(
                "pages {first}..{} outside region {region}",
                first + count
            ));
        }
        let (m, base) = self
            .mapping_of(r.start)
            .ok_or("region has no live mapping")?;
        let at = base + first;
        self.generation = self.generation.wrapping_add(1).max(1);
        let (off, len) = (self.bytes(at), self.bytes(count));
        match op {
            "write" => self.write_pages(&m, at, count, self.generation)?,
            "read" => self.read_pages(&m, at, count)?,
            // The kernel writes the pages (read() from /dev/urandom): a
            // kernel-mode write, which user-mode-only userfaultfds must
            // still see in write-protect async mode.
            "readinto" => sys::read_urandom_into(m.addr() + off as u64, len)
                .map_err(|e| format!("read: {e}"))?,
            "dontneed" => m
                .madvise(off, len, Advice::DontNeed)
                .map_err(|e| e.to_string())?,
            "remove" => m
                .madvise(off, len, Advice::Remove)
                .map_err(|e| e.to_string())?,
            "ro" | "rw" => m
                .mprotect(off, len, op == "rw")
                .map_err(|e| e.to_string())?,
            _ => {
                let i = *self
                    .region_fds
                    .get(region)
                    .ok_or("region has no fd for pwrite or punch")?;
                let obj_off = (r.object.as_ref().map_or(0, |o| o.first_page) + first) * self.page;
                let fd = &self.keep_fds[i];
                if op == "punch" {
                    let how = rustix::fs::FallocateFlags::PUNCH_HOLE
                        | rustix::fs::FallocateFlags::KEEP_SIZE;
                    rustix::fs::fallocate(fd, how, obj_off, len as u64)
                        .map_err(|e| e.to_string())?;
                } else {
                    let data = vec![self.generation; len];
                    rustix::io::pwrite(fd, &data, obj_off).map_err(|e| e.to_string())?;
                }
            }
        }
        Ok("ok".into())
    }

    /// `helper_write REGION FIRST COUNT stay|exit`: another process, which
    /// inherits only those pages of the (shared) region, writes them and
    /// then stays alive or exits. Replies with its PID.
    fn helper_write(
        &mut self,
        region: &str,
        first: &str,
        count: &str,
        stay: bool,
    ) -> Result<String, String> {
        let (r, first, count) = self.region_args(region, first, count)?;
        let (m, base) = self
            .mapping_of(r.start)
            .ok_or("region has no live mapping")?;
        let (off, len) = (self.bytes(base + first), self.bytes(count));
        self.dont_fork_anything()?;
        m.madvise(off, len, Advice::DoFork)
            .map_err(|e| e.to_string())?;
        let (addr, page) = (m.addr() + off as u64, self.page as usize);
        let value = self.generation.wrapping_add(0x40);
        // A region with an object fd: the helper maps the object shared
        // itself (a private view would only give it copies).
        let object_fd = self
            .region_fds
            .get(region)
            .map(|&i| self.keep_fds[i].as_fd());
        let obj_off = (r.object.as_ref().map_or(0, |o| o.first_page) + first) * self.page;
        let pid = sys::fork_child(
            move || match object_fd {
                Some(fd) => {
                    if let Ok(own) = OwnedMapping::file(fd, obj_off, len, true, true) {
                        let _ = own.write(0, &vec![value; len]);
                    }
                }
                None => {
                    for p in (0..len).step_by(page) {
                        sys::poke(addr + p as u64, value);
                    }
                }
            },
            stay,
        )
        .map_err(|e| format!("fork: {e}"))?;
        for l in &self.live {
            let _ = l.map.madvise(0, l.map.len(), Advice::DoFork);
        }
        if stay {
            self.truth.children.push(pid);
        } else {
            let _ = rustix::process::waitpid(
                rustix::process::Pid::from_raw(pid.cast_signed()),
                rustix::process::WaitOptions::empty(),
            );
        }
        Ok(pid.to_string())
    }

    /// `mmap NAME PAGES`: a new anonymous region, every page written.
    fn mmap_command(&mut self, name: &str, pages: &str) -> Result<String, String> {
        let pages: u64 = pages.parse().map_err(|_| "bad PAGES")?;
        let m = self.anon_map(pages, 0)?;
        self.write_pages(&m, 0, pages, 0x99)?;
        let addr = m.addr();
        self.live.push(Live {
            map: Arc::new(m),
            name: Some(name.to_owned()),
        });
        self.truth.regions.retain(|r| r.name != name);
        self.region(
            name,
            "command",
            addr,
            pages,
            "anon",
            vec![Expect::new(0, pages, "present", &["exclusive"])],
            None,
        );
        Ok(format!("{addr:#x}"))
    }

    /// `mremap NAME PAGES`: moves (and resizes) a command-made region.
    fn mremap_command(&mut self, name: &str, pages: &str) -> Result<String, String> {
        let pages: u64 = pages.parse().map_err(|_| "bad PAGES")?;
        let i = self
            .live
            .iter()
            .position(|l| l.name.as_deref() == Some(name))
            .ok_or("no such mmap region")?;
        let live = self.live.remove(i);
        let m = Arc::try_unwrap(live.map).map_err(|_| "mapping still shared")?;
        let m = m
            .mremap_move(self.bytes(pages))
            .map_err(|e| format!("mremap: {e}"))?;
        let addr = m.addr();
        self.live.push(Live {
            map: Arc::new(m),
            name: Some(name.to_owned()),
        });
        if let Some(r) = self.truth.regions.iter_mut().find(|r| r.name == name) {
            r.start = addr;
            r.pages = pages;
            r.expect = vec![Expect::new(0, pages, "present", &["exclusive"])];
        }
        Ok(format!("{addr:#x}"))
    }

    /// `munmap NAME`.
    fn munmap_command(&mut self, name: &str) -> Result<String, String> {
        let i = self
            .live
            .iter()
            .position(|l| l.name.as_deref() == Some(name))
            .ok_or("no such mmap region")?;
        self.live.remove(i);
        self.truth.regions.retain(|r| r.name != name);
        Ok("ok".into())
    }

    /// `writers REGION THREADS MILLIS`: threads write random pages of the
    /// region for MILLIS ms (each write a new value); replies with the
    /// number of writes.
    fn writers_command(
        &mut self,
        region: &str,
        threads: &str,
        millis: &str,
    ) -> Result<String, String> {
        let (r, threads, millis) = self.region_args(region, threads, millis)?;
        let (m, base) = self
            .mapping_of(r.start)
            .ok_or("region has no live mapping")?;
        let page = self.page as usize;
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(millis);
        let total = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            for t in 0..threads {
                let (m, total) = (&m, &total);
                s.spawn(move || {
                    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (t + 1);
                    let mut n = 0u64;
                    while std::time::Instant::now() < deadline {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let p = base as usize + (x % r.pages) as usize;
                        let _ = m.write(p * page + 8 * t as usize, &n.to_ne_bytes());
                        n += 1;
                    }
                    total.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                });
            }
        });
        Ok(total.into_inner().to_string())
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

    /// `sharer start`: forks a second process that maps every shared
    /// region of the fixture (the same objects, at the same addresses) and
    /// runs the fixture's commands on them when told (`sharer CMD...`):
    /// another writer of the same shared memory. Replies with its PID.
    fn start_sharer(&mut self) -> Result<String, String> {
        if self.sharer.is_some() {
            return Err("a sharer is already running".into());
        }
        let (ours, theirs) =
            std::os::unix::net::UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
        self.dont_fork_anything()?;
        let shared: Vec<u64> = self
            .truth
            .regions
            .iter()
            .filter(|r| r.backing == "shmem")
            .filter_map(|r| self.mapping_of(r.start))
            .map(|(m, _)| m.addr())
            .collect();
        for l in self.live.iter().filter(|l| shared.contains(&l.map.addr())) {
            l.map
                .madvise(0, l.map.len(), Advice::DoFork)
                .map_err(|e| format!("MADV_DOFORK: {e}"))?;
        }
        let parent_end = std::os::fd::AsRawFd::as_raw_fd(&ours);
        let pid = sys::fork_server(|| {
            // The parent's end must close here, or the socket never reads
            // end-of-file when the parent drops its copy.
            sys::close_inherited(parent_end);
            serve_sharer(self, theirs, shared)
        })
        .map_err(|e| format!("fork: {e}"))?;
        for l in &self.live {
            let _ = l.map.madvise(0, l.map.len(), Advice::DoFork);
        }
        self.truth.children.push(pid);
        self.sharer = Some((pid, std::io::BufReader::new(ours)));
        Ok(pid.to_string())
    }

    /// `sharer CMD...`: runs a fixture command in the sharer process.
    fn sharer_command(&mut self, cmd: &str) -> Result<String, String> {
        use std::io::{BufRead, Write};
        let (_, sock) = self
            .sharer
            .as_mut()
            .ok_or("no sharer: run `sharer start`")?;
        writeln!(sock.get_mut(), "{cmd}").map_err(|e| format!("to sharer: {e}"))?;
        let mut line = String::new();
        sock.read_line(&mut line)
            .map_err(|e| format!("from sharer: {e}"))?;
        let reply = line.trim_end().to_owned();
        match reply.strip_prefix("error: ") {
            Some(e) => Err(format!("sharer: {e}")),
            None => Ok(reply),
        }
    }

    /// `sharer stop`: the sharer exits (and is reaped).
    fn stop_sharer(&mut self) -> Result<String, String> {
        let (pid, sock) = self.sharer.take().ok_or("no sharer")?;
        drop(sock);
        let _ = rustix::process::waitpid(
            rustix::process::Pid::from_raw(pid.cast_signed()),
            rustix::process::WaitOptions::empty(),
        );
        self.truth.children.retain(|&c| c != pid);
        Ok("ok".into())
    }

    /// The fixture's own view of its regions: per page, `mincore` residency
    /// and the present/swap/exclusive bits of its own pagemap. Tests compare
    /// it before and after a scan to prove the scan changed nothing.
    fn selfview(&self) -> String {
        let mut out = String::new();
        for r in &self.truth.regions {
            let len = self.bytes(r.pages);
            let mut vec = vec![0u8; r.pages as usize];
            let live = self
                .live
                .iter()
                .find(|l| l.map.addr() <= r.start && r.start < l.map.addr() + l.map.len() as u64);
            if let Some(l) = live {
                let _ = l
                    .map
                    .mincore((r.start - l.map.addr()) as usize, len, &mut vec);
            }
            let entries = self.own_entries(r.start, r.pages);
            out.push_str(&r.name);
            out.push(':');
            for (i, e) in entries.iter().enumerate() {
                let bits = (e.0 >> 56) & 0xff;
                out.push_str(&format!(
                    "{}{:02x}",
                    vec.get(i).copied().unwrap_or(9) & 1,
                    bits
                ));
            }
            out.push(';');
        }
        out
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

    /// MADV_PAGEOUT of anonymous pages, verified: every page must end up
    /// as a swap entry.
    fn pageout_anon(&self, m: &OwnedMapping, first: u64, count: u64) -> Result<(), String> {
        if self.truth.swap == "none" {
            return Err("no active swap device".into());
        }
        for _ in 0..5 {
            m.madvise(self.bytes(first), self.bytes(count), Advice::PageOut)
                .map_err(|e| format!("MADV_PAGEOUT: {e}"))?;
            let e = self.own_entries(m.addr() + self.bytes(first) as u64, count);
            if e.len() as u64 == count && e.iter().all(|e| e.is_swap()) {
                return Ok(());
            }
        }
        Err("MADV_PAGEOUT did not swap every page out".into())
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

    fn fork_shared(&mut self) -> Result<(), String> {
        self.dont_fork_anything()?;
        let m = self.anon_map(16, 0)?;
        self.write_pages(&m, 0, 16, 0xF5)?;
        let child = sys::fork_helper(|| {}).map_err(|e| format!("fork: {e}"))?;
        self.truth.children.push(child);
        let m = self.keep(m);
        self.region(
            "fork_shared",
            "fork_shared",
            m.addr(),
            16,
            "anon",
            vec![Expect::new(0, 16, "present", &[])],
            None,
        );
        Ok(())
    }

    fn anon(&mut self) -> Result<(), String> {
        let m = self.anon_map(64, 0)?;
        self.write_pages(&m, 0, 16, 0xA1)?;
        self.read_pages(&m, 16, 16)?;
        self.write_pages(&m, 48, 16, 0xA2)?;
        let swapped = self.pageout_anon(&m, 48, 16).err();
        let m = self.keep(m);
        let (base, page) = (m.addr(), self.page);
        let at = |i: u64| base + i * page;
        self.region(
            "anon_present",
            "anon",
            at(0),
            16,
            "anon",
            vec![Expect::new(0, 16, "present", &["exclusive"])],
            None,
        );
        self.region(
            "anon_zero",
            "anon",
            at(16),
            16,
            "anon",
            vec![Expect::new(0, 16, "zero", &[])],
            None,
        );
        self.region(
            "anon_untouched",
            "anon",
            at(32),
            16,
            "anon",
            vec![Expect::new(0, 16, "hole", &[])],
            None,
        );
        self.region(
            "anon_swapped",
            "anon",
            at(48),
            16,
            "anon",
            vec![Expect::new(0, 16, "swapped", &[])],
            swapped,
        );
        Ok(())
    }

    fn thp(&mut self) -> Result<(), String> {
        const HUGE: usize = 2 << 20;
        let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        if mode.is_empty() || mode.contains("[never]") {
            return Err("transparent huge pages are disabled".into());
        }
        let pages = 2 * HUGE as u64 / self.page;
        let m = OwnedMapping::anonymous(2 * HUGE, HUGE).map_err(|e| format!("mmap: {e}"))?;
        m.madvise(0, m.len(), Advice::HugePage)
            .map_err(|e| format!("MADV_HUGEPAGE: {e}"))?;
        self.write_pages(&m, 0, pages, 0x7B)?;
        let thp_kb = own_smaps_field(m.addr(), "AnonHugePages").unwrap_or(0);
        let skip =
            (thp_kb < (2 * HUGE / 1024) as u64).then(|| format!("only {thp_kb} kB became THP"));
        let m = self.keep(m);
        let expect = vec![Expect::new(0, pages, "present", &["exclusive", "huge"])];
        self.region("thp_present", "thp", m.addr(), pages, "anon", expect, skip);

        let z = OwnedMapping::anonymous(HUGE, HUGE).map_err(|e| format!("mmap: {e}"))?;
        z.madvise(0, HUGE, Advice::HugePage)
            .map_err(|e| format!("MADV_HUGEPAGE: {e}"))?;
        z.read_byte(0).map_err(|e| format!("read: {e}"))?;
        let zpages = HUGE as u64 / self.page;
        let huge_zero = self
            .own_entries(z.addr(), zpages)
            .iter()
            .all(|e| e.is_present() && e.flags().contains(PagemapFlags::FILE));
        let skip = (!huge_zero).then(|| "no huge zero page (use_zero_page is off)".to_owned());
        let z = self.keep(z);
        self.region(
            "thp_zero",
            "thp",
            z.addr(),
            zpages,
            "anon",
            vec![Expect::new(0, zpages, "zero", &["huge"])],
            skip,
        );
        Ok(())
    }

    fn guard(&mut self) -> Result<(), String> {
        let m = self.anon_map(16, 0)?;
        self.write_pages(&m, 0, 4, 0x6A)?;
        m.madvise(self.bytes(4), self.bytes(8), Advice::GuardInstall)
            .map_err(|e| format!("MADV_GUARD_INSTALL unsupported ({e}); needs Linux 6.13"))?;
        let m = self.keep(m);
        let expect = vec![
            Expect::new(0, 4, "present", &["exclusive"]),
            Expect::new(4, 8, "guard", &[]),
            Expect::new(12, 4, "hole", &[]),
        ];
        self.region("guard_region", "guard", m.addr(), 16, "anon", expect, None);
        Ok(())
    }

    /// Large enough for the adaptive scan to switch ways: 16 densely
    /// written 2 MiB blocks (the scan then reads directly), a block
    /// collapsed into a THP, a block of present, zero, swapped and
    /// untouched pages, a block with a guard region, then blocks with only
    /// a few pages (the scan walks again). No `MADV_NOHUGEPAGE`: collapse
    /// needs it off; with THP mode `madvise` faults still give 4 KiB pages,
    /// which the fixture checks.
    fn dense_mixed(&mut self) -> Result<(), String> {
        const BLOCK: u64 = 512;
        let m = OwnedMapping::anonymous(self.bytes(48 * BLOCK), ALIGN)
            .map_err(|e| format!("mmap: {e}"))?;
        self.write_pages(&m, 0, 17 * BLOCK, 0xD1)?;
        let collapse = m
            .madvise(self.bytes(16 * BLOCK), self.bytes(BLOCK), Advice::Collapse)
            .map_err(|e| format!("MADV_COLLAPSE: {e}"))
            .err();
        let b = 17 * BLOCK;
        self.write_pages(&m, b, 256, 0xD2)?;
        self.read_pages(&m, b + 256, 128)?;
        self.write_pages(&m, b + 384, 64, 0xD3)?;
        let swapped = self.pageout_anon(&m, b + 384, 64).err();
        let g = 18 * BLOCK;
        self.write_pages(&m, g + 16, 16, 0xD4)?;
        let guard = m
            .madvise(self.bytes(g), self.bytes(16), Advice::GuardInstall)
            .map_err(|e| format!("MADV_GUARD_INSTALL unsupported ({e}); needs Linux 6.13"))
            .err();
        self.write_pages(&m, 40 * BLOCK, 2, 0xD5)?;
        let thp_kb = own_smaps_field(m.addr(), "AnonHugePages").unwrap_or(0);
        let huge_kb = self.bytes(BLOCK) as u64 / 1024;
        let thp = collapse.or_else(|| {
            (thp_kb != huge_kb).then(|| format!("{thp_kb} kB of THP, wanted exactly {huge_kb}"))
        });
        let m = self.keep(m);
        let (base, page) = (m.addr(), self.page);
        let at = |i: u64| base + i * page;
        let excl = &["exclusive"][..];
        let regions = [
            (
                "dense_present",
                0,
                16 * BLOCK,
                vec![Expect::new(0, 16 * BLOCK, "present", excl)],
                thp.clone(),
            ),
            (
                "dense_thp",
                16 * BLOCK,
                BLOCK,
                vec![Expect::new(0, BLOCK, "present", &["exclusive", "huge"])],
                thp,
            ),
            (
                "dense_present_zero",
                b,
                384,
                vec![
                    Expect::new(0, 256, "present", excl),
                    Expect::new(256, 128, "zero", &[]),
                ],
                None,
            ),
            (
                "dense_swapped",
                b + 384,
                64,
                vec![Expect::new(0, 64, "swapped", &[])],
                swapped,
            ),
            (
                "dense_hole",
                b + 448,
                64,
                vec![Expect::new(0, 64, "hole", &[])],
                None,
            ),
            (
                "dense_guard",
                g,
                BLOCK,
                vec![
                    Expect::new(0, 16, "guard", &[]),
                    Expect::new(16, 16, "present", excl),
                    Expect::new(32, BLOCK - 32, "hole", &[]),
                ],
                guard,
            ),
            (
                "dense_sparse",
                19 * BLOCK,
                29 * BLOCK,
                vec![
                    Expect::new(0, 21 * BLOCK, "hole", &[]),
                    Expect::new(21 * BLOCK, 2, "present", excl),
                    Expect::new(21 * BLOCK + 2, 8 * BLOCK - 2, "hole", &[]),
                ],
                None,
            ),
        ];
        // With THP mode `always`, page faults made THPs of whole blocks.
        let always = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .is_ok_and(|m| m.contains("[always]"));
        for (name, first, pages, expect, skip) in regions {
            let skip = skip.or_else(|| {
                always.then(|| "THP mode is always: faults made THPs of 4 KiB layouts".to_owned())
            });
            self.region(name, "dense_mixed", at(first), pages, "anon", expect, skip);
        }
        Ok(())
    }

    fn uffd_wp(&mut self) -> Result<(), String> {
        let m = self.anon_map(32, 0)?;
        self.write_pages(&m, 0, 8, 0xC1)?;
        let uffd = Userfaultfd::new_wp_async().map_err(|e| format!("{e}"))?;
        let range =
            VirtRange::from_start_len(VirtAddr::new(m.addr()), m.len() as u64).ok_or("range")?;
        uffd.register_wp(range).map_err(|e| e.to_string())?;
        let pm = self.pagemap.as_ref().ok_or("no own pagemap")?;
        wp_arm(pm.as_fd(), range).map_err(|e| e.to_string())?;
        self.write_pages(&m, 4, 4, 0xC2)?;
        self.read_pages(&m, 8, 4)?;
        self.keep_uffd.push(uffd);
        let m = self.keep(m);
        let expect = vec![
            Expect::new(0, 4, "present", &["exclusive", "uffd_wp"]),
            Expect::new(4, 4, "present", &["exclusive"]),
            Expect::new(8, 4, "zero", &["uffd_wp"]),
            Expect::new(12, 20, "hole", &["uffd_wp"]),
        ];
        self.region("uffd_wp", "uffd_wp", m.addr(), 32, "anon", expect, None);
        Ok(())
    }

    /// A 128-page file with data in pages 0..32 and 64..96, mapped twice;
    /// and a 64-page file with cached-mapped, cached, evicted and hole
    /// pages.
    fn file(&mut self) -> Result<(), String> {
        let f = self.create_file("sparse")?;
        f.set_len(128 * self.page)
            .map_err(|e| format!("truncate: {e}"))?;
        self.write_file(&f, 0, 32, 0x5F)?;
        self.write_file(&f, 64, 32, 0x5F)?;
        let len = self.bytes(128);
        let private = OwnedMapping::file_aligned(f.as_fd(), 0, len, true, false, ALIGN)
            .map_err(|e| format!("mmap: {e}"))?;
        self.read_pages(&private, 0, 16)?;
        self.write_pages(&private, 16, 16, 0x11)?;
        let shared = OwnedMapping::file_aligned(f.as_fd(), 0, len, true, true, ALIGN)
            .map_err(|e| format!("mmap: {e}"))?;
        self.read_pages(&shared, 64, 16)?;
        self.write_pages(&shared, 80, 16, 0x22)?;
        let object = self.object_of(private.addr(), 0);
        self.keep_fds.push(f.into());
        let private = self.keep(private);
        let shared = self.keep(shared);
        let expect = vec![
            Expect::new(0, 16, "present", &["file", "exclusive"]),
            Expect::new(16, 16, "present", &["exclusive"]),
            Expect::new(32, 32, "hole", &[]),
            Expect::new(64, 32, "resident", &[]),
            Expect::new(96, 32, "hole", &[]),
        ];
        self.region(
            "file_private",
            "file",
            private.addr(),
            128,
            "file",
            expect,
            None,
        );
        self.set_object(object.clone());
        let expect = vec![
            Expect::new(0, 32, "resident", &[]),
            Expect::new(32, 32, "hole", &[]),
            Expect::new(64, 32, "present", &["file", "exclusive"]),
            Expect::new(96, 32, "hole", &[]),
        ];
        self.region(
            "file_shared",
            "file",
            shared.addr(),
            128,
            "file",
            expect,
            None,
        );
        self.set_object(object);
        self.file_cache()
    }

    /// 64 pages: 0..16 cached and mapped, 16..32 cached, 32..48 evicted
    /// (written back, then `POSIX_FADV_DONTNEED`), 48..64 a hole.
    fn file_cache(&mut self) -> Result<(), String> {
        let f = self.create_file("cache")?;
        f.set_len(64 * self.page)
            .map_err(|e| format!("truncate: {e}"))?;
        self.write_file(&f, 0, 48, 0x3C)?;
        f.sync_all().map_err(|e| format!("fsync: {e}"))?;
        let m = OwnedMapping::file_aligned(f.as_fd(), 0, self.bytes(64), false, true, ALIGN)
            .map_err(|e| format!("mmap: {e}"))?;
        self.read_pages(&m, 0, 16)?;
        let evict = std::num::NonZeroU64::new(16 * self.page);
        rustix::fs::fadvise(&f, 32 * self.page, evict, rustix::fs::Advice::DontNeed)
            .map_err(|e| format!("fadvise: {e}"))?;
        let mut incore = vec![0u8; 64];
        m.mincore(0, self.bytes(64), &mut incore)
            .map_err(|e| format!("mincore: {e}"))?;
        let ok =
            incore[16..32].iter().all(|b| b & 1 == 1) && incore[32..48].iter().all(|b| b & 1 == 0);
        let skip = (!ok).then(|| "the page cache did not keep/evict the pages as asked".to_owned());
        let object = self.object_of(m.addr(), 0);
        self.keep_fds.push(f.into());
        let m = self.keep(m);
        let expect = vec![
            Expect::new(0, 16, "present", &["file", "exclusive"]),
            Expect::new(16, 16, "resident", &[]),
            Expect::new(32, 16, "not_resident", &[]),
            Expect::new(48, 16, "hole", &[]),
        ];
        self.region("file_cache", "file", m.addr(), 64, "file", expect, skip);
        self.set_object(object);
        Ok(())
    }

    /// `pwrite`s pages `first..first+count` in 16-page (64 KiB) pieces.
    /// The page cache sizes large folios after the writes, and a read fault
    /// maps a whole folio: pieces keep folios from straddling the layout's
    /// 16-page parts.
    fn write_file(&self, f: &File, first: u64, count: u64, byte: u8) -> Result<(), String> {
        let piece = vec![byte; self.bytes(16)];
        for p in (first..first + count).step_by(16) {
            let n = (first + count - p).min(16);
            f.write_all_at(&piece[..self.bytes(n)], p * self.page)
                .map_err(|e| format!("pwrite: {e}"))?;
        }
        Ok(())
    }

    fn create_file(&mut self, what: &str) -> Result<File, String> {
        let path = self
            .dir
            .join(format!("pagescope-fixture-{}-{what}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| format!("create {}: {e}", path.display()))?;
        self.files.push(path);
        Ok(f)
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

    /// MADV_PAGEOUT of shmem pages mapped only by us, verified: each page
    /// must be unmapped afterwards; our own mincore then tells whether it
    /// is still in the swap cache (`swapcache`) or gone (`swapped`).
    fn pageout_shmem(
        &self,
        m: &OwnedMapping,
        first: u64,
        count: u64,
    ) -> Result<Vec<&'static str>, String> {
        if self.truth.swap == "none" {
            return Err("no active swap device".into());
        }
        let (off, len) = (self.bytes(first), self.bytes(count));
        for _ in 0..5 {
            m.madvise(off, len, Advice::PageOut)
                .map_err(|e| format!("MADV_PAGEOUT: {e}"))?;
            let e = self.own_entries(m.addr() + off as u64, count);
            if e.len() as u64 == count && e.iter().all(|e| e.is_none()) {
                let mut incore = vec![0u8; count as usize];
                m.mincore(off, len, &mut incore)
                    .map_err(|e| format!("mincore: {e}"))?;
                return Ok(incore
                    .iter()
                    .map(|b| if b & 1 == 1 { "swapcache" } else { "swapped" })
                    .collect());
            }
        }
        Err("MADV_PAGEOUT did not page every shmem page out".into())
    }

    /// One shmem object of 64 pages, the same layout for every kind:
    /// 0..8 mapped, 8..16 paged out, 16..24 resident but unmapped,
    /// 24..32 fallocated (memfd, tmpfs) or hole, 32..48 hole, 48..56 mapped
    /// by the helper process only, 56..64 hole.
    fn shmem(&mut self, kind: &str) -> Result<(), String> {
        let len = self.bytes(64);
        let (m, fd) = self.shmem_object(kind, len)?;
        self.write_pages(&m, 0, 8, 0x51)?;
        self.write_pages(&m, 8, 8, 0x52)?;
        let paged = self.pageout_shmem(&m, 8, 8);
        match &fd {
            Some(fd) => {
                self.write_pages(&m, 16, 4, 0x53)?;
                let data = vec![0x54u8; self.bytes(4)];
                rustix::io::pwrite(fd, &data, 20 * self.page)
                    .map_err(|e| format!("pwrite: {e}"))?;
                rustix::fs::fallocate(
                    fd,
                    rustix::fs::FallocateFlags::empty(),
                    24 * self.page,
                    8 * self.page,
                )
                .map_err(|e| format!("fallocate: {e}"))?;
            }
            None => self.write_pages(&m, 16, 8, 0x53)?,
        }
        m.madvise(self.bytes(16), self.bytes(4), Advice::DontNeed)
            .map_err(|e| format!("MADV_DONTNEED: {e}"))?;
        if fd.is_none() {
            m.madvise(self.bytes(20), self.bytes(4), Advice::DontNeed)
                .map_err(|e| format!("MADV_DONTNEED: {e}"))?;
        }
        let object = self.object_of(m.addr(), 0);
        let mut expect = vec![Expect::new(0, 8, "present", &["file", "exclusive"])];
        let skip = match &paged {
            Ok(states) => {
                for (i, st) in states.iter().enumerate() {
                    expect.push(Expect::new(8 + i as u64, 1, st, &[]));
                }
                None
            }
            Err(e) => {
                expect.push(Expect::new(8, 8, "swapped", &[]));
                Some(e.clone())
            }
        };
        expect.push(Expect::new(16, 8, "resident", &[]));
        expect.push(Expect::new(
            24,
            8,
            if fd.is_some() { "fallocated" } else { "hole" },
            &[],
        ));
        expect.push(Expect::new(32, 16, "hole", &[]));
        expect.push(Expect::new(48, 8, "resident", &[]));
        expect.push(Expect::new(56, 8, "hole", &[]));
        if let Some(fd) = fd {
            self.region_fds.insert(kind.to_owned(), self.keep_fds.len());
            self.keep_fds.push(fd);
        }
        let m = self.keep(m);
        self.helper_parts
            .push((Arc::clone(&m), self.bytes(48), self.bytes(8)));
        self.region(kind, kind, m.addr(), 64, "shmem", expect, skip);
        self.set_object(object);
        Ok(())
    }

    fn shmem_object(
        &mut self,
        kind: &str,
        len: usize,
    ) -> Result<(OwnedMapping, Option<OwnedFd>), String> {
        let fd = match kind {
            "memfd" => {
                rustix::fs::memfd_create("pagescope-fixture", rustix::fs::MemfdFlags::CLOEXEC)
                    .map_err(|e| format!("memfd_create: {e}"))?
            }
            "tmpfs" => {
                let path = PathBuf::from(format!(
                    "/dev/shm/pagescope-fixture-{}-tmpfs",
                    std::process::id()
                ));
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&path)
                    .map_err(|e| format!("create {}: {e}", path.display()))?;
                self.files.push(path);
                f.into()
            }
            "shared_anon" => {
                let m =
                    OwnedMapping::shared_anonymous(len, ALIGN).map_err(|e| format!("mmap: {e}"))?;
                return Ok((m, None));
            }
            _ => {
                return Ok((
                    sys::sysv_segment(len).map_err(|e| format!("shmget: {e}"))?,
                    None,
                ));
            }
        };
        rustix::fs::ftruncate(&fd, len as u64).map_err(|e| format!("ftruncate: {e}"))?;
        let m = OwnedMapping::file_aligned(fd.as_fd(), 0, len, true, true, ALIGN)
            .map_err(|e| format!("mmap: {e}"))?;
        Ok((m, Some(fd)))
    }

    /// A MAP_PRIVATE view of a 32-page memfd whose pages 0..24 hold data:
    /// 0..2 copied-on-write, 2..4 copied-on-write then swapped (anonymous
    /// swap), 4..16 read (shared with the object), 16..24 resident, 24..32
    /// hole.
    fn memfd_private(&mut self) -> Result<(), String> {
        let fd = rustix::fs::memfd_create("pagescope-private", rustix::fs::MemfdFlags::CLOEXEC)
            .map_err(|e| format!("memfd_create: {e}"))?;
        rustix::fs::ftruncate(&fd, 32 * self.page).map_err(|e| format!("ftruncate: {e}"))?;
        let data = vec![0x61u8; self.bytes(24)];
        rustix::io::pwrite(&fd, &data, 0).map_err(|e| format!("pwrite: {e}"))?;
        let m = OwnedMapping::file_aligned(fd.as_fd(), 0, self.bytes(32), true, false, ALIGN)
            .map_err(|e| format!("mmap: {e}"))?;
        self.write_pages(&m, 0, 4, 0x62)?;
        let swapped = self.pageout_anon(&m, 2, 2).err();
        self.read_pages(&m, 4, 12)?;
        let object = self.object_of(m.addr(), 0);
        self.region_fds
            .insert("memfd_private".to_owned(), self.keep_fds.len());
        self.keep_fds.push(fd);
        let m = self.keep(m);
        let expect = vec![
            Expect::new(0, 2, "present", &["exclusive"]),
            Expect::new(2, 2, "swapped", &[]),
            Expect::new(4, 12, "present", &["file", "exclusive"]),
            Expect::new(16, 8, "resident", &[]),
            Expect::new(24, 8, "hole", &[]),
        ];
        self.region(
            "memfd_private",
            "memfd_private",
            m.addr(),
            32,
            "shmem",
            expect,
            swapped,
        );
        self.set_object(object);
        Ok(())
    }

    /// The benchmark layout: a `sparse_gib` reservation with 1% of its
    /// pages touched at scattered places, plus `dense_gib` of fully
    /// written anonymous memory.
    fn bench(&mut self) -> Result<(), String> {
        let sparse_pages = self.sparse_gib << 30 >> self.page.trailing_zeros();
        let s = self.anon_map(sparse_pages, 0)?;
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..sparse_pages / 100 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            s.write_byte(self.bytes(x % sparse_pages), 1)
                .map_err(|e| e.to_string())?;
        }
        let s = self.keep(s);
        let skip = Some("benchmark layout (no per-page expectation)".to_owned());
        self.region(
            "bench_sparse",
            "bench",
            s.addr(),
            sparse_pages,
            "anon",
            Vec::new(),
            skip.clone(),
        );
        let dense_pages = self.dense_gib << 30 >> self.page.trailing_zeros();
        if dense_pages > 0 {
            let d = self.anon_map(dense_pages, 0)?;
            self.write_pages(&d, 0, dense_pages, 1)?;
            let d = self.keep(d);
            self.region(
                "bench_dense",
                "bench",
                d.addr(),
                dense_pages,
                "anon",
                Vec::new(),
                skip,
            );
        }
        Ok(())
    }
}

impl Fixture {
    /// The object benchmark: a `shmem_gib` memfd in 2 MiB blocks, half of
    /// them paged out, a quarter written then dropped from the mapping
    /// (resident, unmapped), a quarter mapped; a quarter of the blocks have
    /// a 16-page hole at a random place. `sharers` helper processes map the
    /// whole memfd too (without touching it).
    fn bench_shmem(&mut self) -> Result<(), String> {
        const BLOCK: u64 = 512;
        let pages = self.shmem_gib << 30 >> self.page.trailing_zeros();
        let (m, fd) = self.shmem_object("memfd", self.bytes(pages))?;
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut out_blocks = Vec::new();
        let mut drop_blocks = Vec::new();
        for b in 0..pages / BLOCK {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let first = b * BLOCK;
            let hole = (x >> 8).is_multiple_of(4);
            let hole_at = first + (x >> 16) % (BLOCK / 16) * 16;
            for p in first..first + BLOCK {
                if !(hole && (hole_at..hole_at + 16).contains(&p)) {
                    m.write_byte(self.bytes(p), 0x77)
                        .map_err(|e| e.to_string())?;
                }
            }
            match x % 4 {
                0 | 1 => out_blocks.push(first),
                2 => drop_blocks.push(first),
                _ => {}
            }
        }
        for &b in &drop_blocks {
            m.madvise(self.bytes(b), self.bytes(BLOCK), Advice::DontNeed)
                .map_err(|e| e.to_string())?;
        }
        for &b in &out_blocks {
            m.madvise(self.bytes(b), self.bytes(BLOCK), Advice::PageOut)
                .map_err(|e| e.to_string())?;
        }
        if let Some(fd) = fd {
            self.keep_fds.push(fd);
        }
        let m = self.keep(m);
        for _ in 0..self.sharers {
            self.helper_parts.push((Arc::clone(&m), 0, m.len()));
        }
        let skip = Some("benchmark layout (no per-page expectation)".to_owned());
        self.region(
            "bench_shmem",
            "bench_shmem",
            m.addr(),
            pages,
            "shmem",
            Vec::new(),
            skip,
        );
        Ok(())
    }
}

/// Which kind of swap device receives paged-out pages (highest priority).
fn swap_kind() -> String {
    let Ok(table) = pagescope::proc::read_swaps() else {
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

/// Starts a thread that maps, touches, splits and unmaps memory forever,
/// so scans race real layout changes.
pub fn start_churn() {
    std::thread::spawn(|| {
        let page = rustix::param::page_size();
        let mut x: u64 = 12345;
        loop {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let pages = 1 + (x % 64) as usize;
            if let Ok(m) = OwnedMapping::anonymous(pages * page, 0) {
                for i in 0..pages {
                    let _ = m.write_byte(i * page, 1);
                }
                if pages > 2 {
                    let _ = m.mprotect(page, page, false);
                }
                std::thread::sleep(std::time::Duration::from_micros(200 + x % 800));
            }
        }
    });
}

/// The sharer child's loop: one fixture command per line on `sock`, until
/// it closes.
fn serve_sharer(fx: &mut Fixture, sock: std::os::unix::net::UnixStream, inherited: Vec<u64>) {
    use std::io::{BufRead, Write};
    fx.inherited = Some(inherited);
    let mut reader = std::io::BufReader::new(&sock);
    let mut writer = &sock;
    let mut line = String::new();
    while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
        let reply = fx
            .command(line.trim())
            .unwrap_or_else(|e| format!("error: {e}"));
        if writeln!(writer, "{reply}").is_err() {
            break;
        }
        line.clear();
    }
}
