//! `send --pageout-sent`: once the receiver has acknowledged the commit,
//! the pages the stream carried as data that are still in the source's
//! RAM are paged out of it, with the one pageout pagescope has
//! (`pageout::pageout_within`: `process_madvise(MADV_PAGEOUT)` on the
//! process's mappings, shmem pages it does not map through pagescope's
//! own mapping of the object, the LRU batches of every CPU drained first),
//! then a re-scan says which left RAM and why each other one stayed.
//!
//! Which pages: every page whose last record in the stream was data (zero
//! pages, holes and pages recorded as swapped are not), as addresses of
//! the sent process: its own pages by mapping, an object's pages where the
//! process maps the object shared (object pages no mapping covers are
//! counted in a note). Pages the swap policy kept out of RAM (`direct`,
//! `keep-cold`) are not present any more and are not asked again.
//!
//! The source left stopped (`--leave-stopped`: a migration's fallback,
//! resumable until the destination runs): nothing touches its memory, so
//! every sent page either leaves RAM or stays for a reason the kernel's
//! state shows, and the stopped copy costs swap, not RAM. The source
//! running on (a live copy): its sent pages are paged out all the same
//! (`MADV_PAGEOUT` is a hint; what the process uses comes back at its
//! next access, as after `pagescope pageout`), and the report says it
//! was running: a page it touched between the pageout and the re-scan
//! counts as still in RAM.
//!
//! Kernel interfaces: those of `pageout/` (`process_madvise`, `mmap` +
//! `madvise`, pagemap, `mincore` and `cachestat`), `/proc/PID/maps`.

use std::sync::Mutex;

use serde::Serialize;

use super::SendOptions;
use crate::addr::{PageSize, PageSpan, VirtAddr, VirtRange};
use crate::dump::sink::StoreOwner;
use crate::kernel::KernelCaps;
use crate::pageout::{PageoutOptions, PageoutReport, pageout_within};
use crate::proc::Target;
use crate::proc::maps::MapsEntry;
use crate::rangeset::RangeSet;

/// The pages one store of the stream carried as data at the commit.
#[derive(Clone, Debug)]
pub(super) struct SentStore {
    /// Whose pages.
    pub owner: StoreOwner,
    /// One bit per page of the store (page `i`: bit `i % 64` of word
    /// `i / 64`).
    pub bits: Vec<u64>,
}

impl SentStore {
    /// The pages of `owner`'s store marked in `bits`.
    pub fn new(owner: StoreOwner, bits: &Mutex<Vec<u64>>) -> Self {
        let bits = bits.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Self { owner, bits }
    }
}

/// What `--pageout-sent` did.
#[derive(Clone, Debug, Serialize)]
pub struct PageoutSentReport {
    /// The source was left stopped (`--leave-stopped`); otherwise it ran
    /// on during the pageout.
    pub source_stopped: bool,
    /// Pages the receiver holds as data from this send.
    pub sent_pages: u64,
    /// Of them, in the source's RAM when the pageout began (the others
    /// were swapped out: `--swap direct`, `keep-cold`).
    pub in_ram: u64,
    /// Paged out, and out of RAM at the re-scan.
    pub paged_out: u64,
    /// Still in RAM at the re-scan (why: `pageout.reasons`).
    pub still_in_ram: u64,
    /// The pageout of the sent pages and its re-scan (per class, the
    /// reasons pages stayed, their runs); `None` if it failed (a note).
    pub pageout: Option<PageoutReport>,
    /// What limited it.
    pub notes: Vec<String>,
}

/// With `opts.pageout_sent`, pages out of `target` the pages of `sent` it
/// still holds in RAM, then re-scans (see the module doc); the source was
/// left stopped if `opts.dump.leave_stopped`.
pub(super) fn page_out_sent(
    target: &Target,
    caps: &KernelCaps,
    sent: &Mutex<Vec<SentStore>>,
    opts: &SendOptions,
) -> Option<PageoutSentReport> {
    if !opts.pageout_sent {
        return None;
    }
    let stopped = opts.dump.leave_stopped;
    let sent = std::mem::take(&mut *sent.lock().unwrap_or_else(|p| p.into_inner()));
    let sent = &sent[..];
    let mut report = PageoutSentReport {
        source_stopped: stopped,
        sent_pages: sent.iter().map(|s| count(&s.bits)).sum(),
        in_ram: 0,
        paged_out: 0,
        still_in_ram: 0,
        pageout: None,
        notes: Vec::new(),
    };
    if !stopped {
        report.notes.push(format!(
            "process {} runs on: a sent page it touched again after the pageout is back in RAM and counted as still there",
            target.pid()
        ));
    }
    let maps = match target.maps() {
        Ok(m) => m,
        Err(e) => {
            report
                .notes
                .push(format!("the sent pages were not paged out: {e}"));
            return Some(report);
        }
    };
    let page = caps.page_size;
    let ranges = addresses(sent, &maps, target.pid(), page, &mut report.notes);
    let (Some(first), Some(last)) = (ranges.ranges().first(), ranges.ranges().last()) else {
        return Some(report);
    };
    let opts = PageoutOptions {
        range: VirtRange::new(first.start(), last.end()),
        ..PageoutOptions::default()
    };
    match pageout_within(target, caps, &opts, Some(&ranges)) {
        Ok(mut p) => {
            report.in_ram = p.total.requested;
            report.paged_out = p.total.left_ram;
            report.still_in_ram = p.total.stayed;
            report.notes.append(&mut p.notes);
            report.pageout = Some(p);
        }
        Err(e) => report
            .notes
            .push(format!("the sent pages were not paged out: {e}")),
    }
    Some(report)
}

/// The addresses of `pid`'s memory that `sent` covers; pages of other
/// processes and object pages no shared mapping covers go to `notes`.
fn addresses(
    sent: &[SentStore],
    maps: &[MapsEntry],
    pid: u32,
    page: PageSize,
    notes: &mut Vec<String>,
) -> RangeSet {
    let p = page.get();
    let mut set = RangeSet::new();
    for s in sent {
        match s.owner {
            StoreOwner::Mapping { pid: owner, start } if owner == pid => {
                for (first, n) in runs(&s.bits) {
                    let lo = start.get() + first * p;
                    set.extend(VirtRange::new(VirtAddr::new(lo), VirtAddr::new(lo + n * p)));
                }
            }
            StoreOwner::Mapping { pid: owner, .. } => notes.push(format!(
                "process {owner}: {} sent pages not paged out (only process {pid} is)",
                count(&s.bits)
            )),
            StoreOwner::Object(id) => {
                let shared = maps
                    .iter()
                    .filter(|m| m.perms.shared && m.dev == id.dev && m.inode == id.inode);
                let mut covered: RangeSet<PageSpan> = RangeSet::new();
                for m in shared {
                    let span = PageSpan::from_start_count(m.offset / p, m.range.pages(page));
                    covered.insert(span);
                    for (first, n) in runs(&s.bits) {
                        let (lo, hi) = (first.max(span.start()), (first + n).min(span.end()));
                        if lo < hi {
                            let at = m.range.start().get() + (lo - span.start()) * p;
                            let end = at + (hi - lo) * p;
                            set.extend(VirtRange::new(VirtAddr::new(at), VirtAddr::new(end)));
                        }
                    }
                }
                let outside: u64 = runs(&s.bits)
                    .iter()
                    .filter_map(|&(f, n)| PageSpan::new(f, f + n))
                    .map(|r| {
                        r.count() - covered.intersect(r).iter().map(|x| x.count()).sum::<u64>()
                    })
                    .sum();
                if outside > 0 {
                    notes.push(format!(
                        "object {}:{}: {outside} sent pages no mapping of process {pid} covers were not paged out",
                        id.dev, id.inode
                    ));
                }
            }
        }
    }
    set
}

/// The set bits of `bits` as (first, count) runs.
fn runs(bits: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (w, &word) in bits.iter().enumerate() {
        let mut rest = word;
        while rest != 0 {
            let b = u64::from(rest.trailing_zeros());
            rest &= rest - 1;
            let i = w as u64 * 64 + b;
            match out.last_mut() {
                Some((f, n)) if *f + *n == i => *n += 1,
                _ => out.push((i, 1)),
            }
        }
    }
    out
}

fn count(bits: &[u64]) -> u64 {
    bits.iter().map(|w| u64::from(w.count_ones())).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_set_bits_across_words() {
        let bits = [0b1110_0001, 1 << 63, 0b1];
        assert_eq!(runs(&bits), vec![(0, 1), (5, 3), (127, 2)]);
        assert_eq!(count(&bits), 6);
    }

    #[test]
    fn object_pages_map_to_the_shared_mappings_addresses() {
        let maps = crate::proc::maps::parse_maps(
            b"7f0000000000-7f0000004000 rw-s 00002000 00:01 42 /memfd:ram (deleted)\n",
        )
        .unwrap();
        let id = crate::vma::ObjectId {
            dev: maps[0].dev,
            inode: 42,
        };
        // Object pages 1..4: page 1 is before the mapping (offset 2 pages).
        let sent = [SentStore {
            owner: StoreOwner::Object(id),
            bits: vec![0b11110],
        }];
        let mut notes = Vec::new();
        let page = PageSize::new(4096).unwrap();
        let set = addresses(&sent, &maps, 1, page, &mut notes);
        let want = VirtRange::new(
            VirtAddr::new(0x7f00_0000_0000),
            VirtAddr::new(0x7f00_0000_3000),
        );
        assert_eq!(set.ranges(), &[want.unwrap()]);
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("1 sent pages"), "{notes:?}");
    }
}
