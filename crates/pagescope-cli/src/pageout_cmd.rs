//! `pagescope pageout`: options in, library call, rendering out.

use std::io::Write;

use anyhow::{Context, Result};
use pagescope::pageout::{ClassCounts, PageoutOptions, PageoutReport, pageout};
use pagescope::{KernelCaps, PageState, Target, VirtRange};

use crate::exit::OK;

pub fn run(pid: u32, range: Option<VirtRange>, states: &[PageState], json: bool) -> Result<u8> {
    let caps = KernelCaps::probe();
    let target = Target::open(pid)?;
    let opts = PageoutOptions {
        range,
        states: states.to_vec(),
    };
    let report =
        pageout(&target, &caps, &opts).with_context(|| format!("pageout of process {pid}"))?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        render(&mut out, &report, caps.page_size.get())?;
    }
    Ok(OK)
}

fn render(out: &mut impl Write, r: &PageoutReport, page: u64) -> std::io::Result<()> {
    let kib = |pages: u64| pages * page / 1024;
    writeln!(
        out,
        "process {}: {} pages ({} kB) asked to leave RAM, {} left, {} stayed ({:.1} ms)",
        r.pid,
        r.total.requested,
        kib(r.total.requested),
        r.total.left_ram,
        r.total.stayed,
        r.seconds * 1e3
    )?;
    for (name, c) in [
        ("anonymous", &r.anon),
        ("shmem mapped", &r.shmem_mapped),
        ("shmem unmapped", &r.shmem_unmapped),
        ("file", &r.file),
    ] {
        class_line(out, name, c)?;
    }
    for (reason, n) in &r.reasons {
        writeln!(out, "  stayed: {n:>8} pages  {}", reason.describe())?;
    }
    const SHOWN: usize = 20;
    if r.stayed.len() > SHOWN {
        writeln!(
            out,
            "  first {SHOWN} of {} runs that stayed (--json lists all):",
            r.stayed.len()
        )?;
    }
    for s in r.stayed.iter().take(SHOWN) {
        writeln!(
            out,
            "    {}  {:>7} pages  {} -> {}  {}",
            s.start,
            s.pages,
            s.before.name(),
            s.after.name(),
            s.reason.describe()
        )?;
    }
    for n in &r.notes {
        writeln!(out, "note: {n}")?;
    }
    Ok(())
}

fn class_line(out: &mut impl Write, name: &str, c: &ClassCounts) -> std::io::Result<()> {
    if c.requested == 0 {
        return Ok(());
    }
    writeln!(
        out,
        "  {name:<15} {:>8} asked  {:>8} left RAM  {:>8} stayed",
        c.requested, c.left_ram, c.stayed
    )
}
