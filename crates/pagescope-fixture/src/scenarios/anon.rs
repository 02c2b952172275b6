//! Private anonymous layouts: present, zero, swapped, THP, guard pages,
//! uffd-wp markers, fork-shared pages, and the dense mixed layout.

use super::*;

impl Fixture {
    pub(super) fn fork_shared(&mut self) -> Result<(), String> {
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

    pub(super) fn anon(&mut self) -> Result<(), String> {
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

    pub(super) fn thp(&mut self) -> Result<(), String> {
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

    pub(super) fn guard(&mut self) -> Result<(), String> {
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
    pub(super) fn dense_mixed(&mut self) -> Result<(), String> {
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

    pub(super) fn uffd_wp(&mut self) -> Result<(), String> {
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

    /// MADV_PAGEOUT of anonymous pages, verified: every page must end up
    /// as a swap entry.
    pub(super) fn pageout_anon(
        &self,
        m: &OwnedMapping,
        first: u64,
        count: u64,
    ) -> Result<(), String> {
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
}
