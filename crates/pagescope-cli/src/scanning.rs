//! Scanning one process for a command and printing the report: shared by
//! `map`, `pages` and `demo` (commands.rs) and the multi-process listings
//! (listing.rs).

use std::io::Write;

use anyhow::Result;
use pagescope::{KernelCaps, ProcessReport, ScanOptions, Target, VirtRange, scan_process};

use crate::cli::ScanArgs;
use crate::exit::{INCOMPLETE, OK};

pub fn options(scan: &ScanArgs, range: Option<VirtRange>, swap_detail: bool) -> ScanOptions {
    ScanOptions {
        backend: scan.backend.into(),
        range,
        swap_detail,
        smaps: scan.smaps,
        objects: !scan.no_objects,
        threads: scan.threads,
        skip_exclusive: scan.no_exclusive,
        strategy: scan.strategy.into(),
    }
}

pub fn scan_pid(pid: u32, opts: ScanOptions) -> Result<ProcessReport> {
    let caps = KernelCaps::probe();
    let target = Target::open(pid)?;
    Ok(scan_process(&target, &caps, &opts)?)
}

#[derive(Clone, Copy)]
pub enum Render<'a> {
    Map(&'a pagescope::render::MapView),
    Pages(pagescope::render::SizeUnit),
}

pub fn render(report: &ProcessReport, json: bool, how: Render) -> Result<u8> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    match (json, how) {
        (true, Render::Map(_)) => serde_json::to_writer(&mut out, &report.map_json())?,
        (true, Render::Pages(_)) => serde_json::to_writer(&mut out, &report.pages_json())?,
        (false, Render::Map(view)) => view.write(report, &mut out)?,
        (false, Render::Pages(unit)) => {
            report.write_pages_with(unit, &pagescope::render::Filter::default(), &mut out)?
        }
    }
    if json {
        writeln!(out)?;
    }
    out.flush()?;
    if !json {
        // Notes qualify the answer; they go to stderr, so the listing on
        // stdout stays the listing.
        for n in &report.notes {
            eprintln!("note: {n}");
        }
    }
    if !report.complete() {
        eprintln!(
            "pagescope: process {}: result incomplete, {} range(s) skipped (listed in the output)",
            report.pid,
            report.skipped.len()
        );
        return Ok(INCOMPLETE);
    }
    Ok(OK)
}
