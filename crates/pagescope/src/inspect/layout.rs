//! The target's layout: read once before the scan, checked again after.
//!
//! A VMA that changed while it was scanned (no longer the same mapping:
//! [`MapsEntry::same_mapping`](crate::proc::maps::MapsEntry::same_mapping))
//! or appeared is dropped from the report and listed as skipped; the
//! report then says `complete: false`.
//! It never passes off a partial result as whole.

use crate::addr::{PageSize, VirtRange};
use crate::proc::{ProcError, Target};
use crate::report::{ProcessReport, SkipReason, Skipped};
use crate::scan::ScanError;
use crate::vma::{MountTable, Vma};

/// Reads the target's VMAs, classified. With `smaps`, VmFlags and the
/// `Swap:` field are filled in (this walks the target's page tables).
pub fn read(target: &Target, smaps: bool) -> Result<Vec<Vma>, ProcError> {
    let mounts = target
        .mountinfo()
        .map(|m| MountTable::new(&m))
        .unwrap_or_default();
    if smaps {
        let entries = target.smaps()?;
        Ok(entries
            .iter()
            .map(|s| {
                let mut v = Vma::classify(&s.vma, &mounts, Some(s.vm_flags));
                v.smaps_swap_kb = s.field_kb("Swap");
                v.smaps_rss_pss_kb = s.field_kb("Rss").zip(s.field_kb("Pss"));
                v
            })
            .collect())
    } else {
        Ok(target
            .maps()?
            .iter()
            .map(|e| Vma::classify(e, &mounts, None))
            .collect())
    }
}

/// The VMAs overlapping `range` (all without one), each with the part of
/// it to scan.
pub fn select(
    pid: u32,
    vmas: &[Vma],
    range: Option<VirtRange>,
    page: PageSize,
) -> Result<Vec<(Vma, VirtRange)>, ScanError> {
    let Some(range) = range else {
        return Ok(vmas.iter().map(|v| (v.clone(), v.range)).collect());
    };
    if !range.is_page_aligned(page) || range.is_empty() {
        return Err(ScanError::BadRange {
            pid,
            range,
            what: "not page aligned or empty",
        });
    }
    let out: Vec<_> = vmas
        .iter()
        .filter_map(|v| v.range.intersect(&range).map(|r| (v.clone(), r)))
        .collect();
    if out.is_empty() {
        return Err(ScanError::BadRange {
            pid,
            range,
            what: "not mapped",
        });
    }
    Ok(out)
}

/// Drops VMAs that changed while they were scanned and lists VMAs that
/// appeared, both as skipped.
pub fn verify(
    target: &Target,
    before: &[Vma],
    range: Option<VirtRange>,
    report: &mut ProcessReport,
) {
    let after = match target.maps() {
        Ok(a) => a,
        Err(_) if !target.is_alive() => {
            report.notes.push(
                "the process exited right after the scan; the layout could not be re-checked"
                    .into(),
            );
            return;
        }
        Err(e) => {
            report
                .notes
                .push(format!("the layout could not be re-checked: {e}"));
            return;
        }
    };
    let same = |v: &Vma| after.iter().any(|e| e.same_mapping(v));
    let (kept, changed): (Vec<_>, Vec<_>) = std::mem::take(&mut report.vmas)
        .into_iter()
        .partition(|v| same(&v.vma));
    report.vmas = kept;
    for v in changed {
        report.skipped.push(Skipped {
            range: v.scanned,
            reason: SkipReason::MappingChanged,
        });
    }
    let wanted = |r: &VirtRange| range.is_none_or(|want| want.overlaps(r));
    for e in after.iter().filter(|e| wanted(&e.range)) {
        if !before.iter().any(|v| v.range == e.range) {
            let r = range
                .and_then(|want| want.intersect(&e.range))
                .unwrap_or(e.range);
            report.skipped.push(Skipped {
                range: r,
                reason: SkipReason::MappingAppeared,
            });
        }
    }
    report.skipped.sort_by_key(|s| s.range);
}
