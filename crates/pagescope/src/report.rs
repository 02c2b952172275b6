//! What a scan found: [`ProcessReport`], and its JSON and text forms.
//!
//! The JSON shapes are a stable contract documented in `docs/json.md` and
//! `docs/*.schema.json`; field names only ever get added.

use std::collections::BTreeMap;
use std::io::{self, Write};

use serde::Serialize;
use serde::ser::{SerializeMap, SerializeStruct, Serializer};

use crate::addr::{PageSize, VirtAddr, VirtRange};
use crate::page::{PageRun, PageState};
use crate::proc::swaps::SwapTable;
use crate::vma::Vma;

/// The state of every page of (part of) a process.
#[derive(Clone, Debug)]
pub struct ProcessReport {
    /// The target.
    pub pid: u32,
    /// Its command name (`/proc/PID/comm`), empty if unreadable.
    pub comm: String,
    /// Base page size.
    pub page_size: PageSize,
    /// Whether pagemap showed PFNs and swap entries (CAP_SYS_ADMIN).
    pub privileged: bool,
    /// Scan backend used.
    pub backend: &'static str,
    /// Whether present pages carry `exclusive` wherever it applies (false
    /// after a scan with `skip_exclusive`).
    pub exclusive_known: bool,
    /// Kernel release.
    pub kernel: String,
    /// The scanned VMAs, in address order.
    pub vmas: Vec<VmaReport>,
    /// Ranges not reported, and why (the target changed or exited).
    pub skipped: Vec<Skipped>,
    /// Limitations that applied to this scan (privileges, kernel).
    pub notes: Vec<String>,
    /// Active swap devices at scan time (to name swap slots' devices).
    pub swaps: SwapTable,
}

/// One VMA and the runs covering every one of its (scanned) pages.
#[derive(Clone, Debug)]
pub struct VmaReport {
    /// The VMA.
    pub vma: Vma,
    /// The part of the VMA that was scanned (all of it unless a range was
    /// requested).
    pub scanned: VirtRange,
    /// Runs, in address order, covering `scanned` exactly.
    pub runs: Vec<PageRun>,
    /// Identity of the backing object, when it was examined.
    pub object: Option<ObjectId>,
    /// Why the backing object could not be examined, if it could not.
    pub object_error: Option<String>,
}

pub use crate::vma::ObjectId;

pub(crate) fn ser_display<T: std::fmt::Display, S: Serializer>(
    v: &T,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// A range pagescope did not report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// Addresses.
    pub range: VirtRange,
    /// Why.
    pub reason: SkipReason,
}

/// Why a range was not reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SkipReason {
    /// The process exited while it was scanned.
    ProcessExited,
    /// The mapping changed (moved, resized, protection) while it was
    /// scanned.
    MappingChanged,
    /// The mapping appeared while the process was scanned.
    MappingAppeared,
}

impl SkipReason {
    /// The text reports and JSON use.
    pub fn describe(self) -> &'static str {
        match self {
            Self::ProcessExited => "the process exited during the scan",
            Self::MappingChanged => "the mapping changed during the scan",
            Self::MappingAppeared => "the mapping appeared during the scan",
        }
    }
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

/// Page counts per state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts(pub BTreeMap<PageState, u64>);

impl Counts {
    /// Adds `pages` pages of `state`.
    pub(crate) fn add(&mut self, state: PageState, pages: u64) {
        *self.0.entry(state).or_default() += pages;
    }

    /// Pages of `state`.
    pub fn get(&self, state: PageState) -> u64 {
        self.0.get(&state).copied().unwrap_or(0)
    }

    /// All pages.
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    /// Adds every count of `other`.
    pub(crate) fn merge(&mut self, other: &Counts) {
        for (&s, &n) in &other.0 {
            self.add(s, n);
        }
    }
}

impl Serialize for Counts {
    /// Every state, zeros included, so the object's keys are stable.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(PageState::ALL.len()))?;
        for st in PageState::ALL {
            m.serialize_entry(st.name(), &self.get(st))?;
        }
        m.end()
    }
}

impl VmaReport {
    /// Page counts per state.
    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for r in &self.runs {
            c.add(r.state, r.pages);
        }
        c
    }
}

impl ProcessReport {
    /// Whether every page of every VMA is reported.
    pub fn complete(&self) -> bool {
        self.skipped.is_empty()
    }

    /// Totals over all VMAs.
    pub fn totals(&self) -> Counts {
        let mut c = Counts::default();
        // `[vsyscall]`, `[vvar]`, `[vdso]`: the kernel's pages, the same in
        // every process, not the process's memory.
        for v in self
            .vmas
            .iter()
            .filter(|v| v.vma.backing != crate::vma::Backing::Special)
        {
            c.merge(&v.counts());
        }
        c
    }

    /// The runs of all VMAs, in address order.
    pub fn runs(&self) -> impl Iterator<Item = (&VmaReport, &PageRun)> {
        self.vmas
            .iter()
            .flat_map(|v| v.runs.iter().map(move |r| (v, r)))
    }

    /// The run covering `addr`, if it was reported.
    pub fn run_at(&self, addr: VirtAddr) -> Option<&PageRun> {
        let v = self.vmas.iter().find(|v| v.scanned.contains(addr))?;
        let i = v.runs.partition_point(|r| r.start <= addr);
        v.runs.get(i.checked_sub(1)?)
    }

    /// The `pages --json` document.
    pub fn pages_json(&self) -> impl Serialize + '_ {
        Doc {
            report: self,
            mode: Mode::Pages,
        }
    }

    /// The `map --json` document.
    pub fn map_json(&self) -> impl Serialize + '_ {
        Doc {
            report: self,
            mode: Mode::Map,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Pages,
    Map,
}

struct Doc<'a> {
    report: &'a ProcessReport,
    mode: Mode,
}

impl Serialize for Doc<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let r = self.report;
        let mut st = s.serialize_struct("report", 13)?;
        st.serialize_field("pid", &r.pid)?;
        st.serialize_field("comm", &r.comm)?;
        st.serialize_field("page_size", &r.page_size.get())?;
        st.serialize_field("privileged", &r.privileged)?;
        st.serialize_field("complete", &r.complete())?;
        st.serialize_field("backend", r.backend)?;
        st.serialize_field("exclusive_known", &r.exclusive_known)?;
        st.serialize_field("kernel", &r.kernel)?;
        let vmas: Vec<_> = r
            .vmas
            .iter()
            .map(|v| VmaDoc {
                v,
                r,
                mode: self.mode,
            })
            .collect();
        st.serialize_field("vmas", &vmas)?;
        if self.mode == Mode::Map {
            st.serialize_field("totals", &r.totals())?;
        }
        let skipped: Vec<_> = r.skipped.iter().map(SkippedDoc).collect();
        st.serialize_field("skipped", &skipped)?;
        st.serialize_field("notes", &r.notes)?;
        st.end()
    }
}

struct VmaDoc<'a> {
    v: &'a VmaReport,
    r: &'a ProcessReport,
    mode: Mode,
}

impl Serialize for VmaDoc<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (v, vma) = (self.v, &self.v.vma);
        let mut st = s.serialize_struct("vma", 17)?;
        st.serialize_field("start", &vma.range.start())?;
        st.serialize_field("end", &vma.range.end())?;
        st.serialize_field("perms", &vma.perms.to_string())?;
        st.serialize_field("offset", &format!("{:#x}", vma.offset))?;
        st.serialize_field("path", &vma.path.display())?;
        st.serialize_field("backing", &vma.backing)?;
        st.serialize_field("kind", &vma.kind)?;
        st.serialize_field("dev", &vma.dev.to_string())?;
        st.serialize_field("inode", &vma.inode)?;
        if v.scanned != vma.range {
            st.serialize_field("scanned_start", &v.scanned.start())?;
            st.serialize_field("scanned_end", &v.scanned.end())?;
        }
        if let Some(e) = &v.object_error {
            st.serialize_field("object_error", e)?;
        }
        match self.mode {
            Mode::Pages => {
                let ranges: Vec<_> = v.runs.iter().map(|run| RunDoc { run, r: self.r }).collect();
                st.serialize_field("ranges", &ranges)?;
            }
            Mode::Map => {
                st.serialize_field("counts", &v.counts())?;
                if let Some((rss, pss)) = vma.smaps_rss_pss_kb {
                    st.serialize_field("rss_kb", &rss)?;
                    st.serialize_field("pss_kb", &pss)?;
                }
                if let Some(swap) = vma.smaps_swap_kb {
                    st.serialize_field("swap_kb", &swap)?;
                }
            }
        }
        st.end()
    }
}

struct RunDoc<'a> {
    run: &'a PageRun,
    r: &'a ProcessReport,
}

impl Serialize for RunDoc<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let run = self.run;
        let range = run.range(self.r.page_size);
        let mut st = s.serialize_struct("range", 7)?;
        st.serialize_field("start", &range.start())?;
        st.serialize_field("end", &range.end())?;
        st.serialize_field("pages", &run.pages)?;
        st.serialize_field("state", &run.state)?;
        st.serialize_field("flags", &run.flags)?;
        if let Some(reason) = run.reason {
            st.serialize_field("reason", reason.describe())?;
        }
        if let Some(slot) = run.swap {
            st.serialize_field("swap", &SwapDoc { slot, r: self.r })?;
        }
        st.end()
    }
}

struct SwapDoc<'a> {
    slot: crate::page::SwapSlot,
    r: &'a ProcessReport,
}

impl Serialize for SwapDoc<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let dev = self
            .r
            .swaps
            .device(self.slot.ty, self.slot.offset, self.r.page_size.get());
        let mut st = s.serialize_struct("swap", 3)?;
        st.serialize_field("device", &dev.map(|d| d.display_path()))?;
        st.serialize_field("type", &self.slot.ty)?;
        st.serialize_field("offset", &self.slot.offset)?;
        st.end()
    }
}

struct SkippedDoc<'a>(&'a Skipped);

impl Serialize for SkippedDoc<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("skipped", 3)?;
        st.serialize_field("start", &self.0.range.start())?;
        st.serialize_field("end", &self.0.range.end())?;
        st.serialize_field("reason", self.0.reason.describe())?;
        st.end()
    }
}

impl ProcessReport {
    /// Writes the `pagescope map` table with the default columns (see
    /// [`crate::render::MapView`] for the choices).
    pub fn write_map(&self, w: &mut dyn Write) -> io::Result<()> {
        crate::render::MapView::default().write(self, w)
    }

    /// Writes the `pagescope pages` listing: one line per run.
    pub fn write_pages(&self, w: &mut dyn Write) -> io::Result<()> {
        self.write_pages_with(
            crate::render::SizeUnit::Kib,
            &crate::render::Filter::default(),
            w,
        )
    }

    /// Writes the `pagescope pages` listing: one line per run of the kept
    /// mappings and states, with pages and size in `unit`.
    pub fn write_pages_with(
        &self,
        unit: crate::render::SizeUnit,
        filter: &crate::render::Filter,
        w: &mut dyn Write,
    ) -> io::Result<()> {
        writeln!(
            w,
            "process {} ({}): runs of pages, sizes in {}",
            self.pid,
            self.comm,
            unit.name()
        )?;
        for v in self.vmas.iter().filter(|v| filter.keeps_vma(v)) {
            let vma = &v.vma;
            writeln!(
                w,
                "{} {} {} {}",
                vma.range,
                vma.perms,
                vma.backing.name(),
                vma.path.display()
            )?;
            if let Some(e) = &v.object_error {
                writeln!(w, "    object: {e}")?;
            }
            for run in v.runs.iter().filter(|r| filter.keeps_run(r)) {
                write!(
                    w,
                    "    {} {:>9} pages {:>9} {:<12}",
                    run.range(self.page_size),
                    run.pages,
                    unit.format(run.pages * self.page_size.get()),
                    run.state.name()
                )?;
                let flags: Vec<_> = run.flags.names().collect();
                write!(w, " {}", flags.join(","))?;
                if let Some(s) = run.swap {
                    let dev = self.swaps.device(s.ty, s.offset, self.page_size.get());
                    let name = dev.map_or_else(|| format!("type {}", s.ty), |d| d.display_path());
                    write!(w, " swap={}:{:#x}", name, s.offset)?;
                }
                if let Some(reason) = run.reason {
                    write!(w, " ({})", reason.describe())?;
                }
                writeln!(w)?;
            }
        }
        self.write_footer(w)
    }

    pub(crate) fn write_footer(&self, w: &mut dyn Write) -> io::Result<()> {
        for s in &self.skipped {
            writeln!(w, "skipped {}: {}", s.range, s.reason)?;
        }
        if !self.complete() {
            writeln!(w, "INCOMPLETE: {} range(s) skipped", self.skipped.len())?;
        }
        Ok(())
    }
}
