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
use crate::addr::PageSpan;
use crate::page::PageState;
use crate::rangeset::RangeSet;
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
}

/// What one process holds: counted pages (class, key or None when
/// unshared), and the shmem pages it maps, as page spans per object (kept
/// as spans: a VM's mapped guest RAM is millions of pages).
#[derive(Default)]
struct Held {
    pages: Vec<(Class, Option<PageKey>)>,
    mapped: HashMap<ObjectId, RangeSet<PageSpan>>,
}

fn held_by(r: &ProcessReport) -> Held {
    let page = r.page_size.get();
    let mut held = Held::default();
    for v in &r.vmas {
        let vma = &v.vma;
        let shared_object =
            vma.backing == Backing::Shmem || (vma.backing == Backing::File && vma.perms.shared);
        for run in &v.runs {
            let swapped = matches!(run.state, PageState::Swapped | PageState::SwapCache);
            let first = vma.offset / page + (run.start.get() - vma.range.start().get()) / page;
            let class = match (swapped, run.state, vma.backing) {
                (true, _, Backing::Shmem) => Class::ShmemSwap,
                (true, _, _) => Class::Swap,
                (false, PageState::Resident, Backing::Shmem) => Class::Unmapped,
                (false, PageState::Present | PageState::Zero, Backing::Shmem) => {
                    if let Some(id) = v.object {
                        let span = PageSpan::from_start_count(first, run.pages);
                        held.mapped.entry(id).or_default().insert(span);
                    }
                    continue;
                }
                _ => continue,
            };
            for i in 0..run.pages {
                let key = match (class, run.swap, v.object) {
                    (Class::Swap, Some(s), _) if !shared_object => {
                        Some(PageKey::Slot(s.ty, s.offset + i))
                    }
                    (Class::ShmemSwap | Class::Unmapped, _, Some(id)) => {
                        Some(PageKey::Object(id, first + i))
                    }
                    _ => None,
                };
                held.pages.push((class, key));
            }
        }
    }
    held
}

/// The summaries of `reports`, dividing shared pages among the reports
/// that hold them.
pub fn summarize(reports: &[ProcessReport]) -> Vec<ProcessSummary> {
    let held: Vec<Held> = reports.iter().map(held_by).collect();
    let mut holders: HashMap<PageKey, u32> = HashMap::new();
    let mut mapped: HashMap<ObjectId, RangeSet<PageSpan>> = HashMap::new();
    for h in &held {
        let mut seen = HashSet::new();
        for key in h.pages.iter().filter_map(|p| p.1) {
            if seen.insert(key) {
                *holders.entry(key).or_default() += 1;
            }
        }
        for (id, spans) in &h.mapped {
            mapped
                .entry(*id)
                .or_default()
                .extend(spans.ranges().iter().copied());
        }
    }
    let mapped_by_someone = |key: Option<PageKey>| match key {
        Some(PageKey::Object(id, p)) => mapped.get(&id).is_some_and(|m| m.contains(p)),
        _ => false,
    };
    reports
        .iter()
        .zip(&held)
        .map(|(r, h)| {
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
            let page = r.page_size.get() as f64;
            for &(class, key) in &h.pages {
                if class == Class::Unmapped && mapped_by_someone(key) {
                    // In the Pss of whoever maps it.
                    continue;
                }
                let share = page / f64::from(key.map_or(1, |k| holders[&k]));
                match class {
                    Class::Swap => s.swap += share,
                    Class::ShmemSwap => s.shmem_swap += share,
                    Class::Unmapped => s.unmapped += share,
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

/// A column of `top`, as `--sort` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopColumn {
    /// The process id (ascending).
    Pid,
    /// The command name (ascending).
    Comm,
    /// smaps Rss.
    Rss,
    /// smaps Pss.
    Pss,
    /// Divided swap.
    Swap,
    /// Divided shmem swap.
    ShmemSwap,
    /// Divided shmem in RAM that no process maps.
    Unmapped,
}

impl TopColumn {
    /// Every column, in the table's order of names.
    pub const ALL: [Self; 7] = [
        Self::Pid,
        Self::Comm,
        Self::Rss,
        Self::Pss,
        Self::Swap,
        Self::ShmemSwap,
        Self::Unmapped,
    ];

    /// The name `--sort` takes (the header, lower-case).
    pub fn name(self) -> &'static str {
        match self {
            Self::Pid => "pid",
            Self::Comm => "comm",
            Self::Rss => "rss",
            Self::Pss => "pss",
            Self::Swap => "swap",
            Self::ShmemSwap => "shmem_swap",
            Self::Unmapped => "unmapped",
        }
    }

    /// The column named `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    /// Sorts `sums` by this column: numbers largest first, PID and name
    /// ascending, ties by Pss (largest first).
    pub fn sort(self, sums: &mut [ProcessSummary]) {
        sums.sort_by_key(|s| std::cmp::Reverse(s.pss));
        let key = |s: &ProcessSummary| match self {
            Self::Rss => s.rss as f64,
            Self::Pss => s.pss as f64,
            Self::Swap => s.swap,
            Self::ShmemSwap => s.shmem_swap,
            Self::Unmapped => s.unmapped,
            Self::Pid | Self::Comm => 0.0,
        };
        match self {
            Self::Pid => sums.sort_by_key(|s| s.pid),
            Self::Comm => sums.sort_by(|a, b| a.comm.cmp(&b.comm)),
            _ => sums.sort_by(|a, b| key(b).total_cmp(&key(a))),
        }
    }
}

/// Writes the table, sorted by `sort`, with a total line.
pub fn write_top(
    sums: &[ProcessSummary],
    unit: SizeUnit,
    sort: TopColumn,
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
    if let Some(i) = t.column(sort.name()) {
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
