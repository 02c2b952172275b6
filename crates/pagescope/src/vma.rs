//! VMAs and what backs them.
//!
//! [`Vma::classify`] decides the [`Backing`] from the maps line (path, dev,
//! inode, perms), the mount table (tmpfs and hugetlbfs devices) and, when
//! pagescope read smaps, the `VmFlags` (`ht`, `io`, `pf`). An opened backing
//! object refines it further ([`Vma::refine_with_fstype`]): a hugetlb memfd
//! looks like any memfd in maps.

use std::fmt;

use serde::Serialize;

use crate::addr::{PageSize, PageSpan, VirtAddr, VirtRange};
use crate::proc::maps::{DevId, MapsEntry};
use crate::proc::mountinfo::Mount;
use crate::proc::smaps::VmFlags;

/// What kind of memory backs a VMA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backing {
    /// Private anonymous memory (heap, stack, `MAP_PRIVATE|MAP_ANONYMOUS`).
    Anon,
    /// Shared memory: memfd, tmpfs and `/dev/shm` files,
    /// `MAP_SHARED|MAP_ANONYMOUS`, SysV shm.
    Shmem,
    /// A regular file (private or shared mapping).
    File,
    /// hugetlbfs pages.
    Hugetlb,
    /// Kernel-provided or device mappings (`[vdso]`, `[vvar]`, MMIO).
    Special,
}

impl Backing {
    /// The JSON / CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Anon => "anon",
            Self::Shmem => "shmem",
            Self::File => "file",
            Self::Hugetlb => "hugetlb",
            Self::Special => "special",
        }
    }
}

impl fmt::Display for Backing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How the object behind a VMA is classified ([`Vma::object_class`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ObjectClass {
    /// tmpfs/shmem (memfd, /dev/shm, SysV, shared anonymous).
    Shmem,
    /// A regular file on a disk filesystem.
    File,
}

/// A finer description of the VMA, for reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VmaKind {
    /// `[heap]`.
    Heap,
    /// `[stack]`.
    Stack,
    /// Other private anonymous memory (including `[anon:name]`).
    Anon,
    /// `memfd_create` object.
    Memfd,
    /// A file on a tmpfs mount (`/dev/shm`, ...).
    Tmpfs,
    /// `MAP_SHARED|MAP_ANONYMOUS` (`/dev/zero (deleted)`, `[anon_shmem:name]`).
    SharedAnon,
    /// SysV shared memory segment (`/SYSV<key>`).
    Sysv,
    /// A regular file.
    File,
    /// hugetlbfs.
    Hugetlb,
    /// `[vdso]`.
    Vdso,
    /// `[vvar]`, `[vvar_vclock]`.
    Vvar,
    /// `[vsyscall]`.
    Vsyscall,
    /// Other kernel or device mappings.
    Special,
}

/// Device numbers of the mounts that matter for classification.
#[derive(Clone, Debug, Default)]
pub struct MountTable {
    tmpfs: Vec<DevId>,
    hugetlbfs: Vec<DevId>,
    devtmpfs: Vec<DevId>,
}

impl MountTable {
    /// From the target's parsed mountinfo.
    pub fn new(mounts: &[Mount]) -> Self {
        let devs = |fs: &str| {
            mounts
                .iter()
                .filter(|m| m.fstype == fs)
                .map(|m| m.dev)
                .collect()
        };
        Self {
            tmpfs: devs("tmpfs"),
            hugetlbfs: devs("hugetlbfs"),
            devtmpfs: devs("devtmpfs"),
        }
    }
}

/// A shared or file object, identified by device and inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ObjectId {
    /// `st_dev`, as `major:minor`.
    #[serde(serialize_with = "crate::report::ser_display")]
    pub dev: crate::proc::maps::DevId,
    /// `st_ino`.
    pub inode: u64,
}

impl ObjectId {
    /// The device and inode a maps line names, whatever backs it (see
    /// [`Vma::object_id`] for the VMAs that have an object).
    pub(crate) fn of_entry(e: &MapsEntry) -> Self {
        Self {
            dev: e.dev,
            inode: e.inode,
        }
    }

    /// The identity of the file `st` describes (from `stat`/`fstat`).
    pub(crate) fn of_stat(st: &rustix::fs::Stat) -> Self {
        Self {
            dev: DevId::from_st_dev(st.st_dev),
            inode: st.st_ino,
        }
    }
}

/// A VMA of the target: its maps line and what pagescope made of it.
///
/// It dereferences to its `MapsEntry`, so `vma.range`, `vma.perms`,
/// `vma.offset`, `vma.dev`, `vma.inode` and `vma.path` read the maps line
/// itself: a VMA *is* that line plus a classification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vma {
    /// The maps line.
    pub entry: MapsEntry,
    /// Backing class.
    pub backing: Backing,
    /// Finer kind.
    pub kind: VmaKind,
    /// `VmFlags` from smaps, when pagescope read smaps.
    pub vm_flags: Option<VmFlags>,
    /// smaps `Swap:` in kB, when pagescope read smaps.
    pub smaps_swap_kb: Option<u64>,
    /// smaps `Rss:` and `Pss:` in kB, when pagescope read smaps (the
    /// kernel's accounting, as `pmap -X` shows it).
    pub smaps_rss_pss_kb: Option<(u64, u64)>,
}

impl std::ops::Deref for Vma {
    type Target = MapsEntry;

    fn deref(&self) -> &MapsEntry {
        &self.entry
    }
}

/// `statfs` magic numbers of the filesystems that change the backing.
pub const TMPFS_MAGIC: u64 = 0x0102_1994;
/// `HUGETLBFS_MAGIC`.
pub const HUGETLBFS_MAGIC: u64 = 0x9584_58f6;

impl Vma {
    /// Classifies one maps line.
    pub(crate) fn classify(e: &MapsEntry, mounts: &MountTable, vm_flags: Option<VmFlags>) -> Self {
        let (backing, kind) = classify_entry(e, mounts, vm_flags.unwrap_or_default());
        Self {
            entry: e.clone(),
            backing,
            kind,
            vm_flags,
            smaps_swap_kb: None,
            smaps_rss_pss_kb: None,
        }
    }

    /// Refines the backing once the object is open: `f_type` from
    /// `fstatfs` tells hugetlbfs and tmpfs apart from what maps suggests.
    pub(crate) fn refine_with_fstype(&mut self, f_type: u64) {
        match f_type {
            HUGETLBFS_MAGIC => {
                self.backing = Backing::Hugetlb;
                self.kind = VmaKind::Hugetlb;
            }
            TMPFS_MAGIC if self.backing == Backing::File => {
                self.backing = Backing::Shmem;
                self.kind = VmaKind::Tmpfs;
            }
            _ => {}
        }
    }

    /// Whether the VMA is a `MAP_SHARED` mapping.
    pub fn is_shared(&self) -> bool {
        self.perms.shared
    }

    /// Whether pages of the VMA may be anonymous (private anon, or
    /// copied-on-write pages of a private file/shmem mapping).
    pub(crate) fn may_hold_anon(&self) -> bool {
        !self.perms.shared && matches!(self.backing, Backing::Anon | Backing::File | Backing::Shmem)
    }

    /// Whether the VMA is one of the kernel's own mappings (`[vdso]`,
    /// `[vvar]`, ...: `is_kernel_mapping`).
    pub fn is_kernel_mapping(&self) -> bool {
        is_kernel_mapping(&self.entry)
    }

    /// Whether the VMA is above the user address space (`[vsyscall]`),
    /// where pagemap reports nothing.
    pub(crate) fn outside_pagemap(&self) -> bool {
        self.kind == VmaKind::Vsyscall
    }

    /// The object behind the VMA (a shmem object, regular file or
    /// hugetlbfs file with an inode), if any.
    pub fn object_id(&self) -> Option<ObjectId> {
        (matches!(
            self.backing,
            Backing::Shmem | Backing::File | Backing::Hugetlb
        ) && (self.inode != 0 || self.kind == VmaKind::Sysv))
            .then(|| ObjectId::of_entry(&self.entry))
    }

    /// How the object behind the VMA is classified, if it has one that can
    /// be (shmem and regular files; not hugetlbfs, anonymous or special
    /// memory).
    pub fn object_class(&self) -> Option<ObjectClass> {
        match (self.backing, self.inode) {
            (_, 0) => None,
            (Backing::Shmem, _) => Some(ObjectClass::Shmem),
            (Backing::File, _) => Some(ObjectClass::File),
            _ => None,
        }
    }

    /// The object page mapped at `addr` (which must lie in the VMA).
    pub(crate) fn object_page(&self, addr: VirtAddr, page: PageSize) -> u64 {
        let into = addr.checked_offset_from(self.range.start()).unwrap_or(0);
        (self.offset + into) / page.get()
    }

    /// The object pages behind `part` of the VMA.
    pub(crate) fn object_span(&self, part: VirtRange, page: PageSize) -> PageSpan {
        PageSpan::from_start_count(self.object_page(part.start(), page), part.pages(page))
    }

    /// The addresses where the VMA maps object pages `span`, if it maps
    /// any of them.
    pub(crate) fn range_of(&self, span: PageSpan, page: PageSize) -> Option<VirtRange> {
        let mine = self.object_span(self.range, page);
        let both = mine.intersect(&span)?;
        let start = self
            .range
            .start()
            .checked_add(page.bytes(both.start() - mine.start()))?;
        VirtRange::from_start_len(start, page.bytes(both.count()))
    }
}

fn classify_entry(e: &MapsEntry, mounts: &MountTable, vmf: VmFlags) -> (Backing, VmaKind) {
    let p = e.path.as_bytes();
    if vmf.contains(VmFlags::HUGETLB) || mounts.hugetlbfs.contains(&e.dev) || p == b"/anon_hugepage"
    {
        return (Backing::Hugetlb, VmaKind::Hugetlb);
    }
    if e.path.is_pseudo() {
        return classify_pseudo(p);
    }
    if vmf.intersects(VmFlags::IO | VmFlags::PFNMAP) || mounts.devtmpfs.contains(&e.dev) {
        return (Backing::Special, VmaKind::Special);
    }
    if p.is_empty() {
        return (Backing::Anon, VmaKind::Anon);
    }
    if e.path.is_deleted() && p.starts_with(b"/memfd:") {
        return (Backing::Shmem, VmaKind::Memfd);
    }
    // The inode number of a SysV segment is its shm id, and the first
    // segment created after boot has id 0.
    if p.starts_with(b"/SYSV") && e.dev.major == 0 && e.perms.shared {
        return (Backing::Shmem, VmaKind::Sysv);
    }
    if p == b"/dev/zero" {
        return if e.path.is_deleted() && e.perms.shared {
            (Backing::Shmem, VmaKind::SharedAnon)
        } else {
            (Backing::Anon, VmaKind::Anon)
        };
    }
    if mounts.tmpfs.contains(&e.dev) {
        return (Backing::Shmem, VmaKind::Tmpfs);
    }
    if e.inode != 0 {
        return (Backing::File, VmaKind::File);
    }
    (Backing::Special, VmaKind::Special)
}

/// Whether `e` is one of the kernel's own mappings: `[vdso]`, `[vvar]`
/// (`[vvar_vclock]`), `[vsyscall]`, `[uprobes]` (the uprobes XOL area),
/// `[sigpage]` and `[vectors]` (arm). Their pages are the kernel's, the
/// same in every process: a dump copies nothing of them and a
/// userfaultfd cannot register them.
pub fn is_kernel_mapping(e: &MapsEntry) -> bool {
    e.path.is_pseudo() && kernel_mapping_kind(e.path.as_bytes()).is_some()
}

/// The kind of a kernel mapping's pseudo-path (see [`is_kernel_mapping`]).
fn kernel_mapping_kind(p: &[u8]) -> Option<VmaKind> {
    match p {
        b"[vdso]" => Some(VmaKind::Vdso),
        b"[vsyscall]" => Some(VmaKind::Vsyscall),
        b"[uprobes]" | b"[sigpage]" | b"[vectors]" => Some(VmaKind::Special),
        _ if p.starts_with(b"[vvar") => Some(VmaKind::Vvar),
        _ => None,
    }
}

fn classify_pseudo(p: &[u8]) -> (Backing, VmaKind) {
    if let Some(kind) = kernel_mapping_kind(p) {
        return (Backing::Special, kind);
    }
    match p {
        b"[heap]" => (Backing::Anon, VmaKind::Heap),
        b"[stack]" => (Backing::Anon, VmaKind::Stack),
        _ if p.starts_with(b"[anon_shmem:") => (Backing::Shmem, VmaKind::SharedAnon),
        _ if p.starts_with(b"[anon:") || p.starts_with(b"[stack:") => {
            (Backing::Anon, VmaKind::Anon)
        }
        _ => (Backing::Special, VmaKind::Special),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proc::maps::parse_line;

    fn class(line: &[u8], mounts: &MountTable) -> (Backing, VmaKind) {
        let v = Vma::classify(&parse_line(line).unwrap(), mounts, None);
        (v.backing, v.kind)
    }

    #[test]
    fn classifies_every_backing() {
        let shm = DevId {
            major: 0,
            minor: 22,
        };
        let mounts = MountTable {
            tmpfs: vec![shm],
            hugetlbfs: vec![],
            devtmpfs: vec![],
        };
        let m = &mounts;
        assert_eq!(
            class(b"1000-2000 rw-p 00000000 00:00 0 [heap]", m),
            (Backing::Anon, VmaKind::Heap)
        );
        assert_eq!(
            class(b"1000-2000 rw-p 00000000 00:00 0", m),
            (Backing::Anon, VmaKind::Anon)
        );
        assert_eq!(
            class(b"1000-2000 rw-s 00000000 00:01 7 /memfd:guest (deleted)", m),
            (Backing::Shmem, VmaKind::Memfd)
        );
        assert_eq!(
            class(b"1000-2000 r--p 00000000 00:01 7 /memfd:guest (deleted)", m),
            (Backing::Shmem, VmaKind::Memfd)
        );
        assert_eq!(
            class(b"1000-2000 rw-s 00000000 00:01 5 /dev/zero (deleted)", m),
            (Backing::Shmem, VmaKind::SharedAnon)
        );
        assert_eq!(
            class(b"1000-2000 rw-p 00000000 00:05 5 /dev/zero", m),
            (Backing::Anon, VmaKind::Anon)
        );
        assert_eq!(
            class(
                b"1000-2000 rw-s 00000000 00:01 32769 /SYSV00000000 (deleted)",
                m
            ),
            (Backing::Shmem, VmaKind::Sysv)
        );
        assert_eq!(
            class(
                b"1000-2000 rw-s 00000000 00:01 0 /SYSV00000000 (deleted)",
                m
            ),
            (Backing::Shmem, VmaKind::Sysv),
            "shm id 0, the first segment after boot"
        );
        assert_eq!(
            class(b"1000-2000 rw-s 00000000 00:16 9 /dev/shm/x", m),
            (Backing::Shmem, VmaKind::Tmpfs)
        );
        assert_eq!(
            class(b"1000-2000 r--p 00000000 fd:00 9 /usr/lib/libc.so.6", m),
            (Backing::File, VmaKind::File)
        );
        assert_eq!(
            class(b"1000-2000 r-xp 00000000 00:00 0 [vdso]", m),
            (Backing::Special, VmaKind::Vdso)
        );
        assert_eq!(
            class(b"1000-2000 r--p 00000000 00:00 0 [vvar_vclock]", m),
            (Backing::Special, VmaKind::Vvar)
        );
        assert_eq!(
            class(
                b"1000-2000 rw-s 00000000 00:0f 9 /anon_hugepage (deleted)",
                m
            ),
            (Backing::Hugetlb, VmaKind::Hugetlb)
        );
        assert_eq!(
            class(b"1000-2000 rw-s 00000000 00:01 9 [anon_shmem:guest]", m),
            (Backing::Shmem, VmaKind::SharedAnon)
        );
    }

    #[test]
    fn kernel_mappings_are_known_by_their_pseudo_path() {
        let kernel = |line: &[u8]| is_kernel_mapping(&parse_line(line).unwrap());
        for p in [
            "[vdso]",
            "[vvar]",
            "[vvar_vclock]",
            "[vsyscall]",
            "[uprobes]",
        ] {
            assert!(
                kernel(format!("1000-2000 r-xp 00000000 00:00 0 {p}").as_bytes()),
                "{p}"
            );
        }
        for p in ["[heap]", "[stack]", "[anon:vdso]", "/usr/lib/[vdso]", ""] {
            assert!(
                !kernel(format!("1000-2000 rw-p 00000000 00:00 0 {p}").as_bytes()),
                "{p}"
            );
        }
        let m = MountTable::default();
        let e = parse_line(b"1000-2000 r-xp 00000000 00:00 0 [uprobes]").unwrap();
        let v = Vma::classify(&e, &m, None);
        assert!(v.is_kernel_mapping());
        assert_eq!(v.backing, Backing::Special);
    }

    #[test]
    fn vm_flags_and_fstype_refine() {
        let m = MountTable::default();
        let e = parse_line(b"1000-2000 rw-s 00000000 00:01 7 /memfd:h (deleted)").unwrap();
        let v = Vma::classify(&e, &m, Some(VmFlags::HUGETLB));
        assert_eq!(v.backing, Backing::Hugetlb);
        let mut v = Vma::classify(&e, &m, None);
        v.refine_with_fstype(HUGETLBFS_MAGIC);
        assert_eq!(v.backing, Backing::Hugetlb);
        let f = parse_line(b"1000-2000 rw-s 00000000 00:30 7 /run/x").unwrap();
        let mut v = Vma::classify(&f, &m, None);
        assert_eq!(v.backing, Backing::File);
        v.refine_with_fstype(TMPFS_MAGIC);
        assert_eq!(v.backing, Backing::Shmem);
    }
}
