//! `/proc/kpageflags` and `/proc/kpagecount` (root only): page flags and
//! map counts by PFN.
//!
//! # References
//! - <https://docs.kernel.org/admin-guide/mm/pagemap.html> ("kpageflags")

use std::os::fd::{AsFd, OwnedFd};

use crate::sys;

/// `KPF_COMPOUND_HEAD`.
const KPF_COMPOUND_HEAD: u64 = 1 << 15;
/// `KPF_THP`.
const KPF_THP: u64 = 1 << 22;
/// `KPF_DIRTY`.
pub const KPF_DIRTY: u64 = 1 << 4;
/// `KPF_LRU`.
pub const KPF_LRU: u64 = 1 << 5;
/// `KPF_UNEVICTABLE`.
pub const KPF_UNEVICTABLE: u64 = 1 << 18;
/// `KPF_THP` (also set on tail pages).
pub const KPF_THP_ANY: u64 = KPF_THP;

/// An open `/proc/kpageflags`.
#[derive(Debug)]
pub struct KpageFlags {
    fd: OwnedFd,
}

impl KpageFlags {
    /// Opens `/proc/kpageflags`; `None` without the privilege.
    pub fn open() -> Option<Self> {
        Self::open_file("/proc/kpageflags")
    }

    /// Opens `/proc/kpagecount` (read with [`Self::flags`]: the value is
    /// the number of times the page is mapped); `None` without the
    /// privilege.
    pub fn open_counts() -> Option<Self> {
        Self::open_file("/proc/kpagecount")
    }

    fn open_file(path: &str) -> Option<Self> {
        let fd = rustix::fs::open(
            path,
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .ok()?;
        Some(Self { fd })
    }

    /// The flags of `pfn`.
    pub fn flags(&self, pfn: u64) -> Option<u64> {
        let mut v = [0u64];
        let n = sys::pagemap::pread_u64s(self.fd.as_fd(), &mut v, pfn).ok()?;
        (n == 1).then_some(v[0])
    }

    /// Whether `pfn` is the head page of a transparent huge page.
    pub fn is_thp_head(&self, pfn: u64) -> bool {
        self.flags(pfn)
            .is_some_and(|f| f & (KPF_THP | KPF_COMPOUND_HEAD) == KPF_THP | KPF_COMPOUND_HEAD)
    }
}
