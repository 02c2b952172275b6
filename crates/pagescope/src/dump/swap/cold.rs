//! Paging back out what a dump swapped in (`--swap keep-cold`, and the
//! pages `--swap direct` had to read normally), and checking that it left
//! RAM: `MADV_PAGEOUT` returns success even for pages it skips.

use std::os::fd::AsFd;

use super::{SwapClassReport, SwapIo, SwapPolicy, SwapReport};
use crate::addr::PageSize;
use crate::dump::attach::Proc;
use crate::dump::objects::Objects;
use crate::dump::remote::RemoteMem;
use crate::proc::Target;
use crate::sys::mm::Advice;

use crate::pageout::object::{Outcome, object};

/// What the swap policy did: `keep-cold` (and `direct`'s fallbacks) pages
/// every swapped page the dump read back out, and counts what really left
/// RAM.
pub(in crate::dump) fn page_back_out(
    swap: &SwapIo,
    procs: &[Proc<'_>],
    objects: &mut Objects,
    page: PageSize,
) -> SwapReport {
    let mut report = SwapReport {
        policy: swap.policy(),
        anon: swap.anon.report(),
        shmem: swap.shmem.report(),
        notes: swap.notes(),
    };
    if matches!(report.policy, SwapPolicy::Read | SwapPolicy::Skip) {
        return report;
    }
    for p in procs {
        let cold = p.mem.take_cold();
        let result = anon(p.target, &p.mem, &cold, page);
        let what = || format!("process {}", p.pid);
        tally(
            &mut report.anon,
            &mut report.notes,
            result,
            cold.len(),
            what,
        );
    }
    for o in objects.map.values_mut() {
        let cold = std::mem::take(&mut o.cold);
        let result = object(o.fd.as_fd(), &cold, page);
        let what = || format!("object inode {}", o.id.inode);
        tally(
            &mut report.shmem,
            &mut report.notes,
            result,
            cold.len(),
            what,
        );
    }
    if report.anon.still_in_ram + report.shmem.still_in_ram > 0 {
        report.notes.push(
            "pages still in RAM after MADV_PAGEOUT: on an asynchronous swap device (a swap file) a page stays in the swap cache until its write completes, and the next reclaim frees it; a page mapped by several processes or locked is not paged out".into(),
        );
    }
    report
}

/// Counts the outcome of paging `cold` pages of one process or object
/// (`what`) back out; on an error, all of them stayed, and a note says
/// why.
fn tally(
    class: &mut SwapClassReport,
    notes: &mut Vec<String>,
    result: std::io::Result<Outcome>,
    cold: usize,
    what: impl FnOnce() -> String,
) {
    match result {
        Ok(o) => {
            class.paged_out += o.out;
            class.still_in_ram += o.still;
            notes.extend(o.notes(&what()));
        }
        Err(e) => {
            class.still_in_ram += cold as u64;
            notes.push(format!(
                "{}: cannot page {cold} pages back out: {e}",
                what()
            ));
        }
    }
}

/// `process_madvise(MADV_PAGEOUT)` on the target's pages `addrs` (sorted),
/// then their pagemap entries: a swap entry means the page left the
/// process (on an asynchronous device it may sit in the swap cache until
/// its write completes).
fn anon(
    target: &Target,
    mem: &RemoteMem,
    addrs: &[u64],
    page: PageSize,
) -> std::io::Result<Outcome> {
    if addrs.is_empty() {
        return Ok(Outcome::default());
    }
    let p = page.as_usize();
    let ranges = merge(addrs, p);
    crate::sys::lru_drain::drain_all_cpus()?;
    crate::sys::process_madvise::advise(target.pidfd(), &ranges, Advice::PageOut.raw())?;
    let entries = mem
        .entries_at(addrs)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let out = entries.iter().filter(|e| e.is_swap()).count() as u64;
    Ok(Outcome {
        out,
        still: addrs.len() as u64 - out,
        ..Outcome::default()
    })
}

/// Sorted page addresses as (address, length) ranges.
fn merge(addrs: &[u64], p: usize) -> Vec<(u64, usize)> {
    let mut out: Vec<(u64, usize)> = Vec::new();
    for &a in addrs {
        match out.last_mut() {
            Some((s, len)) if *s + *len as u64 == a => *len += p,
            _ => out.push((a, p)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_adjacent_pages() {
        assert_eq!(
            merge(&[0x1000, 0x2000, 0x4000], 0x1000),
            vec![(0x1000, 0x2000), (0x4000, 0x1000)]
        );
    }
}
