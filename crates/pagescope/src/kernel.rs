//! Run-time probing of what the running kernel and our privileges offer.
//!
//! Every probe works on pagescope's *own* memory or files (a scratch
//! mapping, its own pagemap), never on a target. [`KernelCaps::probe`] takes
//! a few hundred microseconds.

use std::os::fd::{AsFd, OwnedFd};

use serde::Serialize;

use crate::addr::{PageSize, VirtAddr, VirtRange};
use crate::pagemap::{PagemapEntry, PagemapFlags};
use crate::proc::swaps::SwapTable;
use crate::sys;
use crate::sys::mm::{Advice, OwnedMapping};
use crate::sys::pagemap_scan::{RegionBuf, ScanCategories, ScanRequest};

/// userfaultfd support as seen by this caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct UffdSupport {
    /// Features `UFFDIO_API` reported (all supported ones).
    pub features: u64,
    /// Whether `UFFD_USER_MODE_ONLY` was needed to create the fd.
    pub user_mode_only: bool,
    /// `UFFD_FEATURE_WP_ASYNC` (6.7+).
    pub wp_async: bool,
    /// `UFFD_FEATURE_WP_UNPOPULATED` (6.4+).
    pub wp_unpopulated: bool,
    /// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM` (5.19+).
    pub wp_shmem: bool,
}

/// What the running kernel supports and what this caller may use.
#[derive(Clone, Debug, Serialize)]
pub struct KernelCaps {
    /// `uname -r`.
    pub release: String,
    /// Base page size (read at run time).
    pub page_size: PageSize,
    /// pagemap shows PFNs and swap type/offset to us (CAP_SYS_ADMIN).
    pub privileged_pagemap: bool,
    /// `PAGEMAP_SCAN` categories the kernel accepts (`None`: no ioctl).
    #[serde(serialize_with = "ser_categories")]
    pub pagemap_scan: Option<ScanCategories>,
    /// `MADV_GUARD_INSTALL` works (6.13+).
    pub guard_regions: bool,
    /// pagemap reports guard regions with bit 58 (6.15+).
    pub pagemap_guard_bit: bool,
    /// Soft-dirty tracking exists (`CONFIG_MEM_SOFT_DIRTY`).
    pub soft_dirty: bool,
    /// userfaultfd, if we may create one.
    pub uffd: Option<UffdSupport>,
    /// `cachestat(2)` exists (6.5+).
    pub cachestat: bool,
    /// We may open `/proc/PID/map_files/*` (CAP_SYS_ADMIN or
    /// CAP_CHECKPOINT_RESTORE).
    pub map_files: bool,
    /// PFN of the shared zero page (root only).
    pub zero_pfn: Option<u64>,
    /// PFN of the huge zero page at probe time (root, THP only; the kernel
    /// may free and reallocate it).
    pub huge_zero_pfn: Option<u64>,
    /// `/sys/kernel/mm/transparent_hugepage/enabled` (the bracketed mode).
    pub thp_mode: Option<String>,
    /// Active swap devices.
    #[serde(skip)]
    pub swaps: SwapTable,
}

fn ser_categories<S: serde::Serializer>(
    c: &Option<ScanCategories>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match c {
        Some(c) => s.collect_seq(c.iter_names().map(|(n, _)| n.to_ascii_lowercase())),
        None => s.serialize_none(),
    }
}

impl KernelCaps {
    /// Probes the running kernel.
    pub fn probe() -> Self {
        let page_size = PageSize::current();
        let pagemap = rustix::fs::open(
            "/proc/self/pagemap",
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .ok();
        let entry = |addr: u64| {
            pagemap
                .as_ref()
                .and_then(|fd| self_entry(fd, addr, page_size.get()))
        };
        let privileged_pagemap = probe_privileged(&entry);
        let (guard_regions, pagemap_guard_bit) = probe_guard(&entry);
        let zero_pfn = privileged_pagemap.then(|| probe_zero_pfn(&entry)).flatten();
        let huge_zero_pfn = privileged_pagemap
            .then(|| probe_huge_zero_pfn(&entry, zero_pfn))
            .flatten();
        Self {
            release: rustix::system::uname()
                .release()
                .to_string_lossy()
                .into_owned(),
            page_size,
            privileged_pagemap,
            pagemap_scan: pagemap.as_ref().and_then(probe_scan_categories),
            guard_regions,
            pagemap_guard_bit,
            soft_dirty: probe_soft_dirty(&entry),
            uffd: probe_uffd(),
            cachestat: probe_cachestat(),
            map_files: probe_map_files(),
            zero_pfn,
            huge_zero_pfn,
            thp_mode: read_thp_mode(),
            swaps: crate::proc::read_swaps().unwrap_or_default(),
        }
    }

    /// Whether `PAGEMAP_SCAN` exists.
    pub fn has_pagemap_scan(&self) -> bool {
        self.pagemap_scan.is_some()
    }

    /// Whether `PAGEMAP_SCAN` accepts `cat`.
    pub fn scan_supports(&self, cat: ScanCategories) -> bool {
        self.pagemap_scan.is_some_and(|c| c.contains(cat))
    }

    /// Whether uffd-wp async dirty tracking is available to us.
    pub fn has_uffd_wp_async(&self) -> bool {
        self.uffd.is_some_and(|u| u.wp_async) && self.has_pagemap_scan()
    }
}

fn self_entry(fd: &OwnedFd, addr: u64, page_size: u64) -> Option<PagemapEntry> {
    let mut buf = [0u64; 1];
    let n = sys::pagemap::pread_u64s(fd.as_fd(), &mut buf, addr / page_size).ok()?;
    (n == 1).then_some(PagemapEntry(buf[0]))
}

/// One base page, in bytes, for our own scratch mappings.
fn one_page() -> usize {
    PageSize::current().as_usize()
}

fn probe_privileged(entry: &impl Fn(u64) -> Option<PagemapEntry>) -> bool {
    let Ok(m) = OwnedMapping::anonymous(one_page(), one_page()) else {
        return false;
    };
    m.write_byte(0, 1).is_ok() && entry(m.addr()).and_then(PagemapEntry::pfn).is_some()
}

fn probe_guard(entry: &impl Fn(u64) -> Option<PagemapEntry>) -> (bool, bool) {
    let Ok(m) = OwnedMapping::anonymous(2 * one_page(), one_page()) else {
        return (false, false);
    };
    if m.madvise(0, one_page(), Advice::GuardInstall).is_err() {
        return (false, false);
    }
    let bit = entry(m.addr()).is_some_and(|e| e.flags().contains(PagemapFlags::GUARD));
    (true, bit)
}

fn probe_soft_dirty(entry: &impl Fn(u64) -> Option<PagemapEntry>) -> bool {
    let Ok(m) = OwnedMapping::anonymous(one_page(), one_page()) else {
        return false;
    };
    m.write_byte(0, 1).is_ok()
        && entry(m.addr()).is_some_and(|e| e.flags().contains(PagemapFlags::SOFT_DIRTY))
}

fn probe_zero_pfn(entry: &impl Fn(u64) -> Option<PagemapEntry>) -> Option<u64> {
    let m = OwnedMapping::anonymous(one_page(), one_page()).ok()?;
    m.madvise(0, one_page(), Advice::NoHugePage).ok()?;
    m.read_byte(0).ok()?;
    entry(m.addr())?.pfn()
}

fn probe_huge_zero_pfn(
    entry: &impl Fn(u64) -> Option<PagemapEntry>,
    zero: Option<u64>,
) -> Option<u64> {
    let huge = usize::try_from(PageSize::current().pmd().get()).ok()?;
    let m = OwnedMapping::anonymous(huge, huge).ok()?;
    m.madvise(0, huge, Advice::HugePage).ok()?;
    m.read_byte(0).ok()?;
    let e = entry(m.addr())?;
    let pfn = e.pfn()?;
    (e.flags().contains(PagemapFlags::FILE) && Some(pfn) != zero).then_some(pfn)
}

/// Tries each category bit alone; the kernel rejects unknown bits with
/// `EINVAL`, which is the only way to learn which exist.
fn probe_scan_categories(fd: &OwnedFd) -> Option<ScanCategories> {
    let page = PageSize::current();
    let len = usize::try_from(page.get()).ok()?;
    let m = OwnedMapping::anonymous(len, len).ok()?;
    let range = VirtRange::from_start_len(VirtAddr::new(m.addr()), page.get())?;
    let mut buf = RegionBuf::new(1);
    let mut supported = ScanCategories::empty();
    for bit in 0..16 {
        let req = ScanRequest::new(range).returning(ScanCategories::from_bits_retain(1 << bit));
        match sys::pagemap_scan::pagemap_scan(fd.as_fd(), &req, Some(&mut buf)) {
            Ok(_) => supported |= ScanCategories::from_bits_retain(1 << bit),
            Err(_) if bit == 0 => return None,
            Err(_) => break,
        }
    }
    Some(supported)
}

fn probe_uffd() -> Option<UffdSupport> {
    let (fd, user_mode_only) = match sys::uffd::userfaultfd(false) {
        Ok(fd) => (fd, false),
        Err(_) => (sys::uffd::userfaultfd(true).ok()?, true),
    };
    let features = sys::uffd::uffdio_api(fd.as_fd(), 0).ok()?;
    Some(UffdSupport {
        features,
        user_mode_only,
        wp_async: features & sys::uffd::UFFD_FEATURE_WP_ASYNC != 0,
        wp_unpopulated: features & sys::uffd::UFFD_FEATURE_WP_UNPOPULATED != 0,
        wp_shmem: features & sys::uffd::UFFD_FEATURE_WP_HUGETLBFS_SHMEM != 0,
    })
}

fn probe_cachestat() -> bool {
    let Ok(f) = std::fs::File::open("/proc/self/exe") else {
        return false;
    };
    sys::cachestat::cachestat(f.as_fd(), 0, PageSize::current().get()).is_ok()
}

fn probe_map_files() -> bool {
    let Ok(maps) = std::fs::read("/proc/self/maps") else {
        return false;
    };
    let Ok(entries) = crate::proc::maps::parse_maps(&maps) else {
        return false;
    };
    let Some(e) = entries.iter().find(|e| e.inode != 0) else {
        return false;
    };
    let path = format!(
        "/proc/self/map_files/{:x}-{:x}",
        e.range.start().get(),
        e.range.end().get()
    );
    std::fs::File::open(path).is_ok()
}

fn read_thp_mode() -> Option<String> {
    let s = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").ok()?;
    let open = s.find('[')?;
    let close = s[open..].find(']')? + open;
    Some(s[open + 1..close].to_owned())
}

/// One line of `pagescope kernel`: a feature, whether it is available, and
/// what its absence costs.
#[derive(Clone, Debug, Serialize)]
pub struct Feature {
    /// Short name.
    pub name: &'static str,
    /// Whether it is available to this caller now.
    pub available: bool,
    /// Minimum kernel, config and privilege.
    pub requires: &'static str,
    /// What pagescope does without it.
    pub without: &'static str,
}

impl KernelCaps {
    /// The feature table `pagescope kernel` prints.
    pub fn features(&self) -> Vec<Feature> {
        vec![
            Feature {
                name: "pagemap PFNs and swap entries",
                available: self.privileged_pagemap,
                requires: "CAP_SYS_ADMIN (checked at open of /proc/PID/pagemap)",
                without: "no swap type/offset/device; uffd-wp markers vs. write-protected swap settled by smaps Swap: counts or reported unknown; zero page vs. COW-shared page needs PAGEMAP_SCAN",
            },
            Feature {
                name: "PAGEMAP_SCAN ioctl",
                available: self.has_pagemap_scan(),
                requires: "Linux 6.7",
                without: "plain pagemap reads (about 2.5x slower on dense memory, much slower on sparse); huge flag from kpageflags (root only); dirty tracking falls back to soft-dirty or copy-everything",
            },
            Feature {
                name: "PAGE_IS_GUARD category",
                available: self.scan_supports(ScanCategories::GUARD),
                requires: "Linux 6.15",
                without: "guard regions found through pagemap bit 58 or the PTE-marker swap type",
            },
            Feature {
                name: "pagemap guard bit (58)",
                available: self.pagemap_guard_bit,
                requires: "Linux 6.15",
                without: "guard regions found only through the PTE-marker swap type (root) or VmFlags gu",
            },
            Feature {
                name: "guard regions (MADV_GUARD_INSTALL)",
                available: self.guard_regions,
                requires: "Linux 6.13",
                without: "nothing to report: no process can have them",
            },
            Feature {
                name: "soft-dirty",
                available: self.soft_dirty,
                requires: "CONFIG_MEM_SOFT_DIRTY (x86_64, arm64 since 6.x, ppc64, s390)",
                without: "soft_dirty flag never set; dirty tracking uses uffd-wp async",
            },
            Feature {
                name: "userfaultfd write-protect async",
                available: self.has_uffd_wp_async(),
                requires: "Linux 6.7, CONFIG_USERFAULTFD; root, CAP_SYS_PTRACE, or UFFD_USER_MODE_ONLY (5.11) for own memory",
                without: "dirty tracking uses soft-dirty, else reports every page as written",
            },
            Feature {
                name: "cachestat",
                available: self.cachestat,
                requires: "Linux 6.5; owner of the file or root (6.14+)",
                without: "shmem swap cache not told from page cache; fallocated pages not detected",
            },
            Feature {
                name: "map_files access",
                available: self.map_files,
                requires: "CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE",
                without: "shared objects opened through /proc/PID/fd/N when the target holds an fd; otherwise their non-mapped pages are unknown",
            },
        ]
    }
}
