//! `pagescope top`: one line per process, with swap and shared memory
//! divided among the processes that hold it, so the column sums are the
//! machine's totals (smem's question, answered for shared memory too).
//!
//! A swapped anonymous page is identified by its swap slot (root: the
//! slot is in pagemap), so a page a fork shares counts half in each
//! process; a shmem page by its object and page offset, divided among the
//! processes whose mappings cover it. Shmem pages in RAM that no process
//! maps (in no one's Rss or Pss) are divided the same way. Rss and Pss are
//! smaps'.

use std::collections::{HashMap, HashSet};
use std::io::{self, Write};

use super::table::{Cell, Column, Table};
use super::units::SizeUnit;
use crate::page::PageState;
use crate::report::ProcessReport;
use crate::vma::{Backing, ObjectId};

/// One process's line.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessSummary {
    /// The process.
    pub pid: u32,
    /// Its command name.
    pub comm: String,
    /// smaps Rss, bytes.
    pub rss: u64,
    /// smaps Pss, bytes.
    pub pss: u64,
    /// Its anonymous (and private file) pages in swap, shared slots
    /// divided among their holders, bytes.
    pub swap: f64,
    /// Shmem pages in swap within its mappings, divided among the
    /// processes that map them, bytes.
    pub shmem_swap: f64,
    /// Shmem pages in RAM within its mappings that no process maps (so
    /// no one's Rss or Pss has them), divided the same way, bytes.
    pub unmapped: f64,
}

/// Identity of one page for sharing purposes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum PageKey {
    Slot(u8, u64),
    Object(ObjectId, u64),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Swap,
    ShmemSwap,
    Unmapped,
    /// A shmem page this process maps (only its key matters: it makes the
    /// page mapped for everyone).
    Mapped,
}

/// Every counted page of one process: (class, key or None when unshared).
fn pages_of(r: &ProcessReport) -> Vec<(Class, Option<PageKey>, u64)> {
    let page = r.page_size.get();
    let mut out = Vec::new();
    for v in &r.vmas {
        let vma = &v.vma;
        let shared_object = matches!(vma.backing, Backing::Shmem | Backing::File)
            && vma.perms.shared
            || vma.backing == Backing::Shmem;
        for run in &v.runs {
            let swapped = matches!(run.state, PageState::Swapped | PageState::SwapCache);
            let class = match (swapped, run.state, vma.backing) {
                (true, _, Backing::Shmem) => Class::ShmemSwap,
                (true, _, _) => Class::Swap,
                (false, PageState::Resident, Backing::Shmem) => Class::Unmapped,
                (false, PageState::Present | PageState::Zero, Backing::Shmem) => Class::Mapped,
                _ => continue,
            };
            let first_obj_page =
                vma.offset / page + (run.start.get() - vma.range.start().get()) / page;
            for i in 0..run.pages {
                let key = match (class, run.swap, v.object) {
                    (Class::Swap, Some(s), _) if !shared_object => {
                        Some(PageKey::Slot(s.ty, s.offset + i))
                    }
                    (Class::ShmemSwap | Class::Unmapped | Class::Mapped, _, Some(id)) => {
                        Some(PageKey::Object(id, first_obj_page + i))
                    }
                    _ => None,
                };
                out.push((class, key, page));
            }
        }
    }
    out
}

/// The summaries of `reports`, dividing shared pages among the reports
/// that hold them.
pub fn summarize(reports: &[ProcessReport]) -> Vec<ProcessSummary> {
    let per_process: Vec<_> = reports.iter().map(pages_of).collect();
    let mut holders: HashMap<PageKey, u32> = HashMap::new();
    let mut mapped: HashSet<PageKey> = HashSet::new();
    for pages in &per_process {
        let mut seen = HashSet::new();
        for (class, key) in pages.iter().filter_map(|p| Some((p.0, p.1?))) {
            if class == Class::Mapped {
                mapped.insert(key);
            } else if seen.insert(key) {
                *holders.entry(key).or_default() += 1;
            }
        }
    }
    reports
        .iter()
        .zip(&per_process)
        .map(|(r, pages)| {
            let mut s = ProcessSummary {
                pid: r.pid,
                comm: r.comm.clone(),
                ..ProcessSummary::default()
            };
            for v in r.vmas.iter().filter(|v| v.vma.backing != Backing::Special) {
                if let Some((rss, pss)) = v.vma.smaps_rss_pss_kb {
                    s.rss += rss * 1024;
                    s.pss += pss * 1024;
                }
            }
            for &(class, key, bytes) in pages {
                let mapped_by_someone = key.is_some_and(|k| mapped.contains(&k));
                if class == Class::Mapped || (class == Class::Unmapped && mapped_by_someone) {
                    continue;
                }
                let share = bytes as f64 / key.map_or(1, |k| holders[&k]) as f64;
                match class {
                    Class::Swap => s.swap += share,
                    Class::ShmemSwap => s.shmem_swap += share,
                    Class::Unmapped => s.unmapped += share,
                    Class::Mapped => {}
                }
            }
            s
        })
        .collect()
}

/// A divided byte count rounded to whole bytes.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub fn whole_bytes(b: f64) -> u64 {
    // Non-negative and far below 2^64 (sums of page sizes).
    b.max(0.0).round() as u64
}

/// The columns `--sort` takes.
pub const SORT_COLUMNS: [&str; 7] = [
    "pid",
    "comm",
    "rss",
    "pss",
    "swap",
    "shmem_swap",
    "unmapped",
];

/// Writes the table, sorted by `sort` (one of [`SORT_COLUMNS`]), with a
/// total line.
pub fn write_top(
    sums: &[ProcessSummary],
    unit: SizeUnit,
    sort: &str,
    w: &mut dyn Write,
) -> io::Result<()> {
    let mut t = Table::new(vec![
        Column::num("PID"),
        Column::num("RSS"),
        Column::num("PSS"),
        Column::num("SWAP"),
        Column::num("SHMEM_SWAP"),
        Column::num("UNMAPPED"),
        Column::text("COMM"),
    ]);
    let size = |b: f64| Cell::num(whole_bytes(b), unit.format(whole_bytes(b)));
    let mut total = ProcessSummary::default();
    for s in sums {
        total.rss += s.rss;
        total.pss += s.pss;
        total.swap += s.swap;
        total.shmem_swap += s.shmem_swap;
        total.unmapped += s.unmapped;
        t.rows.push(vec![
            Cell {
                text: s.pid.to_string(),
                key: super::table::Key::Text(format!("{:010}", s.pid)),
            },
            size(s.rss as f64),
            size(s.pss as f64),
            size(s.swap),
            size(s.shmem_swap),
            size(s.unmapped),
            Cell::text(&s.comm),
        ]);
    }
    // Largest Pss first among equals, then the chosen column.
    t.sort_by(2);
    if let Some(i) = t.column(sort) {
        t.sort_by(i);
    }
    t.footer.push(vec![
        Cell::text(""),
        size(total.rss as f64),
        size(total.pss as f64),
        size(total.swap),
        size(total.shmem_swap),
        size(total.unmapped),
        Cell::text(match sums.len() {
            1 => "total of 1 process".to_owned(),
            n => format!("total of {n} processes"),
        }),
    ]);
    writeln!(
        w,
        "sizes in {}; swap and shared memory divided among the processes that hold it",
        unit.name()
    )?;
    t.write(w, Some(120))
}
