//! `verify`: the library's comparison, rendered. Exit 0 when every page
//! compared matched (pages not compared are counted and explained, not
//! failed), 1 only for a live difference.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use pagescope::dump::{Memory, VerifyOptions, VerifyReport};
use pagescope::image::Image;
use pagescope::{KernelCaps, Target};

use crate::exit::{OK, OTHER};

pub fn verify(dir: &Path, pid: u32, json: bool, limit: usize) -> Result<u8> {
    let caps = KernelCaps::probe();
    let image = Image::open(dir)?;
    let target = Target::open(pid)?;
    let report = pagescope::dump::verify_with(&target, &caps, &image, &VerifyOptions { limit })
        .with_context(|| format!("verify of {} against process {pid}", dir.display()))?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        render(&mut out, &report)?;
    }
    Ok(if report.matches() { OK } else { OTHER })
}

fn render(out: &mut impl Write, r: &VerifyReport) -> Result<()> {
    for m in &r.missing {
        writeln!(out, "missing mapping: {m}")?;
    }
    for m in &r.mismatches {
        let memory = match m.memory {
            Memory::Private => "private",
            Memory::Shared => "shared",
        };
        writeln!(out, "differs ({memory}): {} ({} pages)", m.what, m.pages)?;
    }
    if r.omitted_ranges > 0 {
        writeln!(
            out,
            "and {} more ranges ({} pages)",
            r.omitted_ranges, r.omitted_pages
        )?;
    }
    for k in &r.kernel_owned {
        writeln!(
            out,
            "kernel-owned, may differ: thread {} rseq area at {:#x} ({})",
            k.tid,
            k.address,
            k.fields.join(", ")
        )?;
    }
    let mut by_reason: BTreeMap<&str, u64> = BTreeMap::new();
    for n in &r.not_compared {
        *by_reason.entry(n.reason.as_str()).or_default() += n.pages;
    }
    for (reason, pages) in by_reason {
        writeln!(out, "not compared: {pages} pages: {reason}")?;
    }
    for w in &r.other_writers {
        let pids: Vec<String> = w.pids.iter().map(u32::to_string).collect();
        writeln!(
            out,
            "note: {} is also mapped writable by process {}: their writes show as differences",
            w.object,
            pids.join(", ")
        )?;
    }
    for n in &r.notes {
        writeln!(out, "note: {n}")?;
    }
    writeln!(
        out,
        "{}: {} pages compared, {} differ ({} private, {} shared) in {} ranges, {} mappings missing, {} not compared, {} not in the image (swapped, not copied)",
        if r.matches() { "match" } else { "MISMATCH" },
        r.compared,
        r.mismatched_pages,
        r.private_mismatched_pages,
        r.shared_mismatched_pages,
        r.mismatched_ranges,
        r.missing.len(),
        r.not_compared_pages,
        r.not_copied
    )?;
    Ok(())
}
