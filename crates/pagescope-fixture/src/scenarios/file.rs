//! Regular files mapped shared and private, cached and not.

use super::*;

impl Fixture {
    /// A 128-page file with data in pages 0..32 and 64..96, mapped twice;
    /// and a 64-page file with cached-mapped, cached, evicted and hole
    /// pages.
    pub(super) fn file(&mut self) -> Result<(), String> {
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
    pub(super) fn file_cache(&mut self) -> Result<(), String> {
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
    pub(super) fn write_file(
        &self,
        f: &File,
        first: u64,
        count: u64,
        byte: u8,
    ) -> Result<(), String> {
        let piece = vec![byte; self.bytes(16)];
        for p in (first..first + count).step_by(16) {
            let n = (first + count - p).min(16);
            f.write_all_at(&piece[..self.bytes(n)], p * self.page)
                .map_err(|e| format!("pwrite: {e}"))?;
        }
        Ok(())
    }

    pub(super) fn create_file(&mut self, what: &str) -> Result<File, String> {
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
}
