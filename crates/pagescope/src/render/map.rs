//! The `pagescope map` table: one line per mapping with `pmap -X`'s Size,
//! Rss, Pss and Swap (the kernel's accounting, from smaps) next to
//! pagescope's own page states, totals last.

use std::io::{self, Write};

use super::filter::Filter;
use super::table::{Cell, Column, Table};
use super::units::SizeUnit;
use crate::page::PageState;
use crate::report::{Counts, ProcessReport, VmaReport};
use crate::vma::Backing;

/// A column of the map table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapColumn {
    /// Start address (always shown).
    Address,
    /// Permissions (always shown).
    Perm,
    /// anon, shmem, file, hugetlb, special (always shown).
    Backing,
    /// The mapping's size.
    Size,
    /// smaps `Rss:`: memory this process maps.
    Rss,
    /// smaps `Pss:`: Rss with each page divided by its number of mappers.
    Pss,
    /// smaps `Swap:`: swapped out (anonymous, and shmem in this range).
    Swap,
    /// Pages pagescope found in one state.
    State(PageState),
    /// The mapped file or `[heap]`/`[stack]` (always shown, last).
    Path,
}

impl MapColumn {
    /// The columns shown unless `--columns` says otherwise: pmap's four,
    /// then what pmap cannot show (swap cache, resident but not mapped
    /// here, file pages not in RAM).
    pub const DEFAULT: [MapColumn; 7] = [
        Self::Size,
        Self::Rss,
        Self::Pss,
        Self::Swap,
        Self::State(PageState::SwapCache),
        Self::State(PageState::Resident),
        Self::State(PageState::NotResident),
    ];

    /// Every selectable column (sizes and states), for `--columns all`.
    pub fn selectable() -> Vec<MapColumn> {
        [Self::Size, Self::Rss, Self::Pss, Self::Swap]
            .into_iter()
            .chain(PageState::ALL.into_iter().map(Self::State))
            .collect()
    }

    /// The header: upper case, state names as JSON spells them.
    pub fn name(self) -> String {
        match self {
            Self::Address => "ADDRESS".into(),
            Self::Perm => "PERM".into(),
            Self::Backing => "BACKING".into(),
            Self::Size => "SIZE".into(),
            Self::Rss => "RSS".into(),
            Self::Pss => "PSS".into(),
            Self::Swap => "SWAP".into(),
            Self::State(s) => s.name().to_ascii_uppercase(),
            Self::Path => "PATH".into(),
        }
    }

    /// The column named `s` (any case; state names as `--state` takes them).
    pub fn parse(s: &str) -> Option<Self> {
        let lower = s.trim().to_ascii_lowercase();
        [Self::Address, Self::Perm, Self::Backing, Self::Path]
            .into_iter()
            .chain(Self::selectable())
            .find(|c| c.name().eq_ignore_ascii_case(&lower))
    }

    fn is_fixed(self) -> bool {
        matches!(
            self,
            Self::Address | Self::Perm | Self::Backing | Self::Path
        )
    }
}

/// How `map` is drawn.
#[derive(Clone, Debug)]
pub struct MapView {
    /// Size unit.
    pub unit: SizeUnit,
    /// Size and state columns, in order.
    pub columns: Vec<MapColumn>,
    /// Sort the mappings by this column (default: address order).
    pub sort: Option<MapColumn>,
    /// Shorten paths so lines fit (default 120; `None`: never).
    pub max_width: Option<usize>,
    /// Which mappings to list.
    pub filter: Filter,
}

impl Default for MapView {
    fn default() -> Self {
        Self {
            unit: SizeUnit::Kib,
            columns: MapColumn::DEFAULT.to_vec(),
            sort: None,
            max_width: Some(120),
            filter: Filter::default(),
        }
    }
}

impl MapView {
    /// The columns drawn: the fixed ones around the chosen ones, plus the
    /// sort column if it was not chosen.
    pub fn all_columns(&self) -> Vec<MapColumn> {
        let mut cols = vec![MapColumn::Address, MapColumn::Perm, MapColumn::Backing];
        cols.extend(self.columns.iter().filter(|c| !c.is_fixed()));
        if let Some(s) = self.sort.filter(|s| !cols.contains(s) && !s.is_fixed()) {
            cols.push(s);
        }
        cols.push(MapColumn::Path);
        cols
    }

    /// The table for one process (kept mappings, sorted, totals).
    pub(crate) fn table(&self, r: &ProcessReport) -> Table {
        let cols = self.all_columns();
        let mut t = Table::new(
            cols.iter()
                .map(|c| match c {
                    MapColumn::Perm | MapColumn::Backing | MapColumn::Path => {
                        Column::text(&c.name())
                    }
                    _ => Column::num(&c.name()),
                })
                .collect(),
        );
        let page = r.page_size.get();
        let mut totals = Sizes {
            page,
            ..Sizes::default()
        };
        for v in r.vmas.iter().filter(|v| self.filter.keeps_vma(v)) {
            let sizes = Sizes::of(v, page);
            if v.vma.backing != Backing::Special {
                totals.add(&sizes);
            }
            t.rows
                .push(cols.iter().map(|&c| self.cell(c, v, &sizes)).collect());
        }
        if let Some(i) = self.sort.and_then(|s| cols.iter().position(|&c| c == s)) {
            t.sort_by(i);
        }
        let total_row = cols
            .iter()
            .map(|&c| match c {
                MapColumn::Address => Cell::text("total"),
                MapColumn::Perm | MapColumn::Backing | MapColumn::Path => Cell::text(""),
                c => self.size_cell(totals.get(c)),
            })
            .collect();
        t.footer.push(total_row);
        t
    }

    fn cell(&self, c: MapColumn, v: &VmaReport, s: &Sizes) -> Cell {
        let vma = &v.vma;
        match c {
            MapColumn::Address => {
                let start = vma.range.start().get();
                // Text keyed by the zero-padded address: sorts ascending.
                Cell {
                    text: format!("{start:x}"),
                    key: super::table::Key::Text(format!("{start:016x}")),
                }
            }
            MapColumn::Perm => Cell::text(vma.perms.to_string()),
            MapColumn::Backing => Cell::text(vma.backing.name()),
            MapColumn::Path => Cell::text(vma.path.display()),
            c => self.size_cell(s.get(c)),
        }
    }

    fn size_cell(&self, bytes: Option<u64>) -> Cell {
        match bytes {
            Some(b) => Cell::num(b, self.unit.format(b)),
            None => Cell::num(0, "-".into()),
        }
    }

    /// Writes one process: a title line, then its table.
    pub fn write(&self, r: &ProcessReport, w: &mut dyn Write) -> io::Result<()> {
        let t = self.table(r);
        let shown = t.rows.len();
        write!(
            w,
            "process {} ({}): sizes in {}",
            r.pid,
            r.comm,
            self.unit.name()
        )?;
        if !self.filter.is_empty() {
            write!(w, "; {shown} mappings match the filter")?;
        }
        writeln!(w)?;
        t.write(w, self.max_width)?;
        r.write_footer(w)
    }
}

/// A mapping's sizes: bytes from smaps (None when smaps was not read),
/// pages per state.
#[derive(Clone, Debug, Default)]
struct Sizes {
    page: u64,
    size: u64,
    rss: Option<u64>,
    pss: Option<u64>,
    swap: Option<u64>,
    counts: Counts,
}

impl Sizes {
    fn of(v: &VmaReport, page: u64) -> Self {
        let rss_pss = v.vma.smaps_rss_pss_kb;
        Self {
            page,
            size: v.vma.range.len(),
            rss: rss_pss.map(|(r, _)| r * 1024),
            pss: rss_pss.map(|(_, p)| p * 1024),
            swap: v.vma.smaps_swap_kb.map(|s| s * 1024),
            counts: v.counts(),
        }
    }

    fn add(&mut self, o: &Sizes) {
        let sum = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        self.size += o.size;
        self.rss = sum(self.rss, o.rss);
        self.pss = sum(self.pss, o.pss);
        self.swap = sum(self.swap, o.swap);
        self.counts.merge(&o.counts);
    }

    /// Bytes in column `c` (None: smaps was not read).
    fn get(&self, c: MapColumn) -> Option<u64> {
        match c {
            MapColumn::Size => Some(self.size),
            MapColumn::Rss => self.rss,
            MapColumn::Pss => self.pss,
            MapColumn::Swap => self.swap,
            MapColumn::State(s) => Some(self.counts.get(s) * self.page),
            _ => None,
        }
    }
}
