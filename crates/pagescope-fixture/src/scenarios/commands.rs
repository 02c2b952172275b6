//! The commands a test sends the fixture once it runs: write, read,
//! page out, punch, remap pages of its regions, fork helpers and a sharer
//! process, report its own view of its memory.

use super::*;

impl Fixture {
    /// Handles a command line from the test (beyond exit/truth/ping).
    pub fn command(&mut self, cmd: &str) -> Result<String, String> {
        let words: Vec<&str> = cmd.split_whitespace().collect();
        match words.as_slice() {
            ["selfview"] => Ok(self.selfview()),
            ["pageout", region, first, count] => self.pageout_command(region, first, count),
            [
                op @ ("write" | "read" | "readinto" | "dontneed" | "remove" | "pwrite" | "punch"
                | "ro" | "rw" | "lock" | "unlock"),
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
            ["cowwriters", region, threads, millis] => {
                self.cow_writers_command(region, threads, millis)
            }
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
    pub(super) fn region_args(
        &self,
        region: &str,
        a: &str,
        b: &str,
    ) -> Result<(Region, u64, u64), String> {
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
    pub(super) fn pageout_command(
        &self,
        region: &str,
        first: &str,
        count: &str,
    ) -> Result<String, String> {
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

    /// `write|read|readinto|dontneed|remove|pwrite|punch|ro|rw|lock|unlock
    /// REGION FIRST COUNT`
    /// (`remove`: `MADV_REMOVE` through the mapping; `pwrite`/`punch`:
    /// `pwrite`/`fallocate(PUNCH_HOLE)` through the region's object fd).
    pub(super) fn page_command(
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
            "lock" | "unlock" => m
                .lock(off, len, op == "lock")
                .map_err(|e| format!("mlock: {e}"))?,
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
    pub(super) fn helper_write(
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
    pub(super) fn mmap_command(&mut self, name: &str, pages: &str) -> Result<String, String> {
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
    pub(super) fn mremap_command(&mut self, name: &str, pages: &str) -> Result<String, String> {
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
    pub(super) fn munmap_command(&mut self, name: &str) -> Result<String, String> {
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
    pub(super) fn writers_command(
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

    /// `cowwriters REGION THREADS MILLIS`: THREADS threads, each owning an
    /// equal slice of REGION, write for MILLIS ms. Iteration k (from 1) of
    /// a thread stores k in data page `1 + k % (slice - 1)` of its slice,
    /// then in its control page (page 0 of the slice), both at byte 8 in
    /// one store. Any point-in-time copy of the memory is then
    /// self-checking: with control value K, data page j holds the last
    /// k <= K that maps to j (or K+1 if the copy caught the thread between
    /// its two stores). Replies with the iterations done in all.
    pub(super) fn cow_writers_command(
        &mut self,
        region: &str,
        threads: &str,
        millis: &str,
    ) -> Result<String, String> {
        let (r, threads, millis) = self.region_args(region, threads, millis)?;
        let (m, base) = self
            .mapping_of(r.start)
            .ok_or("region has no live mapping")?;
        let per = r.pages / threads.max(1);
        if per < 2 {
            return Err("region too small for that many threads".into());
        }
        let page = self.page as usize;
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(millis);
        let total = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            for t in 0..threads {
                let (m, total) = (&m, &total);
                s.spawn(move || {
                    let slice = (base + t * per) as usize;
                    let mut k = 0u64;
                    while std::time::Instant::now() < deadline {
                        for _ in 0..64 {
                            k += 1;
                            let data = slice + 1 + (k % (per - 1)) as usize;
                            let _ = m.write_u64(data * page + 8, k);
                            let _ = m.write_u64(slice * page + 8, k);
                        }
                    }
                    total.fetch_add(k, std::sync::atomic::Ordering::Relaxed);
                });
            }
        });
        Ok(total.into_inner().to_string())
    }

    /// `sharer start`: forks a second process that maps every shared
    /// region of the fixture (the same objects, at the same addresses) and
    /// runs the fixture's commands on them when told (`sharer CMD...`):
    /// another writer of the same shared memory. Replies with its PID.
    pub(super) fn start_sharer(&mut self) -> Result<String, String> {
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
    pub(super) fn sharer_command(&mut self, cmd: &str) -> Result<String, String> {
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
    pub(super) fn stop_sharer(&mut self) -> Result<String, String> {
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
    pub(super) fn selfview(&self) -> String {
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
pub(super) fn serve_sharer(
    fx: &mut Fixture,
    sock: std::os::unix::net::UnixStream,
    inherited: Vec<u64>,
) {
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
