//! Shared memory: memfd, tmpfs, SysV, `MAP_SHARED|MAP_ANONYMOUS` objects
//! with every page state, and a private view of a memfd.

use super::*;

impl Fixture {
    /// MADV_PAGEOUT of shmem pages mapped only by us, verified: each page
    /// must be unmapped afterwards; our own mincore then tells whether it
    /// is still in the swap cache (`swapcache`) or gone (`swapped`).
    pub(super) fn pageout_shmem(
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
    pub(super) fn shmem(&mut self, kind: &str) -> Result<(), String> {
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
            // Without any swap device nothing could leave: those pages
            // stay mapped, and the rest of the region (fallocated,
            // resident, holes) is still checked.
            Err(_) if self.truth.swap == "none" => {
                expect.push(Expect::new(8, 8, "present", &["file", "exclusive"]));
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

    pub(super) fn shmem_object(
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
    pub(super) fn memfd_private(&mut self) -> Result<(), String> {
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
}
