//! The large layouts the benchmarks scan.

use super::*;

impl Fixture {
    /// The benchmark layout: a `sparse_gib` reservation with 1% of its
    /// pages touched at scattered places, plus `dense_gib` of fully
    /// written anonymous memory.
    pub(super) fn bench(&mut self) -> Result<(), String> {
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

    /// The object benchmark: a `shmem_gib` memfd in 2 MiB blocks, half of
    /// them paged out, a quarter written then dropped from the mapping
    /// (resident, unmapped), a quarter mapped; a quarter of the blocks have
    /// a 16-page hole at a random place. `sharers` helper processes map the
    /// whole memfd too (without touching it).
    pub(super) fn bench_shmem(&mut self) -> Result<(), String> {
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
