//! A dump limited to one shared object ([`DumpOptions::only_object`]:
//! `send --object`, a VM's guest RAM): only the process's shared mappings
//! of that object are modelled, so the passes read nothing else (no
//! private page through `process_vm_readv`, no other object through
//! `pread`), the record lists only those mappings, and the writes the
//! tracker reports elsewhere (QEMU's own heap, TCG's code buffer) neither
//! count toward convergence nor get copied. Pure: decided from the
//! mappings alone.
//!
//! [`DumpOptions::only_object`]: super::DumpOptions::only_object

use super::model::VmaModel;
use crate::addr::PageSize;
use crate::proc::maps::MapsEntry;
use crate::rangeset::RangeSet;
use crate::vma::{ObjectId, Vma};

/// Whether the dump covers mapping `vma`: every mapping without a limit,
/// else only a shared mapping of object `only` (a private mapping of it
/// holds copied-on-write pages of the process's own, not the object's).
pub(super) fn in_scope(vma: &Vma, only: Option<ObjectId>) -> bool {
    only.is_none_or(|id| vma.is_shared() && vma.object_id() == Some(id))
}

/// Whether the `/proc/PID/maps` line `e` maps object `id` shared: what
/// [`in_scope`] decides for a scanned mapping, from the maps text alone.
pub(super) fn entry_in_scope(e: &MapsEntry, id: ObjectId) -> bool {
    e.perms.shared && ObjectId::of_entry(e) == id
}

/// Pages of `written` that fall in the mappings `vmas`.
pub(super) fn written_within(written: &RangeSet, vmas: &[VmaModel], page: PageSize) -> u64 {
    vmas.iter()
        .flat_map(|m| written.intersect(m.vma.range))
        .map(|r| r.pages(page))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::{VirtAddr, VirtRange};
    use crate::proc::maps::parse_line;
    use crate::vma::{Backing, VmaKind};

    const PAGE: u64 = 4096;

    fn vma(line: &str, backing: Backing, kind: VmaKind) -> Vma {
        Vma {
            entry: parse_line(line.as_bytes()).expect("a maps line"),
            backing,
            kind,
            vm_flags: None,
            smaps_swap_kb: None,
            smaps_rss_pss_kb: None,
        }
    }

    fn guest_ram() -> Vma {
        vma(
            "7f0000000000-7f0010000000 rw-s 00000000 00:01 77 /memfd:memory-backend-memfd (deleted)",
            Backing::Shmem,
            VmaKind::Memfd,
        )
    }

    #[test]
    fn a_maps_line_is_in_scope_exactly_when_its_scanned_mapping_is() {
        let ram = guest_ram();
        let id = ram.object_id().expect("an object");
        for (line, backing, kind) in [
            (
                "55d000000000-55d000100000 rw-p 00000000 00:00 0 [heap]",
                Backing::Anon,
                VmaKind::Heap,
            ),
            (
                "7f1000000000-7f1000010000 rw-p 00000000 00:01 77 /memfd:memory-backend-memfd (deleted)",
                Backing::Shmem,
                VmaKind::Memfd,
            ),
            (
                "7f2000000000-7f2000010000 rw-s 00000000 00:01 78 /memfd:other (deleted)",
                Backing::Shmem,
                VmaKind::Memfd,
            ),
        ] {
            let v = vma(line, backing, kind);
            assert!(!entry_in_scope(&v.entry, id), "{line}");
            assert!(!in_scope(&v, Some(id)), "{line}");
        }
        assert!(entry_in_scope(&ram.entry, id));
        assert!(in_scope(&ram, Some(id)));
    }

    #[test]
    fn only_shared_mappings_of_the_object_are_in_scope() {
        let ram = guest_ram();
        let id = ram.object_id().expect("an object");
        let heap = vma(
            "55d000000000-55d000100000 rw-p 00000000 00:00 0 [heap]",
            Backing::Anon,
            VmaKind::Heap,
        );
        let private_view = vma(
            "7f1000000000-7f1000010000 rw-p 00000000 00:01 77 /memfd:memory-backend-memfd (deleted)",
            Backing::Shmem,
            VmaKind::Memfd,
        );
        let other_memfd = vma(
            "7f2000000000-7f2000010000 rw-s 00000000 00:01 78 /memfd:other (deleted)",
            Backing::Shmem,
            VmaKind::Memfd,
        );
        assert!(in_scope(&ram, Some(id)));
        for v in [&heap, &private_view, &other_memfd] {
            assert!(!in_scope(v, Some(id)), "{:?}", v.entry);
            assert!(in_scope(v, None));
        }
    }

    #[test]
    fn only_writes_to_the_mappings_in_scope_count() {
        let page = PageSize::new(PAGE).expect("4 KiB");
        let ram = VmaModel::new(guest_ram(), Vec::new());
        let at = |start: u64, pages: u64| {
            VirtRange::from_start_len(VirtAddr::new(start), pages * PAGE).expect("a range")
        };
        let written: RangeSet = [
            at(0x55d0_0000_0000, 100), // QEMU's heap
            at(0x7eff_ffff_f000, 3),   // 1 page before the RAM, 2 in it
            at(0x7f00_0800_0000, 5),   // inside
            at(0x7f00_0fff_f000, 4),   // 1 page at its end, 3 after
        ]
        .into_iter()
        .collect();
        assert_eq!(written_within(&written, &[ram], page), 2 + 5 + 1);
        assert_eq!(written_within(&written, &[], page), 0);
    }
}
