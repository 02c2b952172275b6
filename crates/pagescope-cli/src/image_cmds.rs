//! `dump`, `image show`, `verify`, `restore`: options in, library call,
//! rendering out.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize};

use anyhow::{Context, Result};
use pagescope::dump::{DumpEvent, DumpOptions, Iteration};
use pagescope::image::Run;
use pagescope::image::{Image, PageKind};
use pagescope::{KernelCaps, Target};

use crate::cli::{DumpArgs, ImageCommand};
use crate::exit::{OK, OTHER};
use crate::progress::Progress;

pub fn dump(args: &DumpArgs) -> Result<u8> {
    let caps = KernelCaps::probe();
    let target = Target::open(args.pid)?;
    let opts = DumpOptions {
        parent: args.parent.clone(),
        keep_tracking: args.keep_tracking,
        tree: args.tree,
        max_downtime: args.max_downtime,
        cow: args.snapshot == crate::cli::SnapshotArg::Cow,
        cancel: Some(cancel_on_signals()?),
        ..args.passes.apply(DumpOptions::new(&args.out))
    };
    let mut bar = Progress::passes(args.json);
    let report = match pagescope::dump::dump(&target, &caps, &opts, &mut |e| match e {
        DumpEvent::Progress { pass, done, total } => bar.show(pass, done, total, ""),
        DumpEvent::Iteration(it) => {
            bar.clear();
            let _ = writeln!(std::io::stderr(), "{}", iteration_line(it));
        }
    }) {
        Err(pagescope::dump::DumpError::Interrupted { signal, .. }) => {
            bar.clear();
            writeln!(
                std::io::stderr(),
                "pagescope: dump of process {} interrupted by {}: the process runs on as before, the incomplete image {} was removed",
                args.pid,
                signal_name(signal),
                args.out.display()
            )?;
            return Ok(u8::try_from(128 + signal).unwrap_or(OTHER));
        }
        r => {
            r.with_context(|| format!("dump of process {} into {}", args.pid, args.out.display()))?
        }
    };
    let mut err = std::io::stderr().lock();
    for n in report.notes.iter().chain(&report.swap.notes) {
        writeln!(err, "note: {n}")?;
    }
    shared_writer_lines(&mut err, &report.shared_writers)?;
    for (class, c) in [
        ("anonymous", &report.swap.anon),
        ("shmem", &report.swap.shmem),
    ] {
        if c.swapped > 0 {
            writeln!(err, "{}", swap_line(report.swap.policy.name(), class, c))?;
        }
    }
    writeln!(
        err,
        "image {} (generation {}, id {}): {} pages stored of {} covered; stopped {:.1} ms",
        report.dir.display(),
        report.generation,
        &report.image_id[..16.min(report.image_id.len())],
        report.stored_pages,
        report.covered_pages,
        report.stopped_s * 1e3
    )?;
    if let Some(c) = &report.snapshot {
        writeln!(
            err,
            "snapshot (cow): stopped {:.1} ms to write-protect {} mappings; {} writes waited for their page to be copied, longest {:.3} ms, {:.1} ms in all",
            c.stop_s * 1e3,
            c.protected_mappings,
            c.faults,
            c.longest_stall_s * 1e3,
            c.total_stall_s * 1e3
        )?;
    }
    if let Some(k) = &report.kept_tracking {
        writeln!(
            err,
            "tracking kept in process {} as fd {} for the next --parent dump",
            k.pid, k.fd
        )?;
    }
    if args.json {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    }
    Ok(OK)
}

/// SIGINT, SIGTERM and SIGHUP set the returned flag to their number
/// (the dump then stops at its next step and cleans up); a second one ends
/// pagescope at once (the kernel then detaches a stopped process as it is,
/// and releases every userfaultfd only pagescope held).
pub(crate) fn cancel_on_signals() -> Result<Arc<AtomicUsize>> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let flag = Arc::new(AtomicUsize::new(0));
    for sig in [SIGINT, SIGTERM, SIGHUP] {
        let seen = Arc::new(AtomicBool::new(false));
        signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, Arc::clone(&seen))?;
        signal_hook::flag::register(sig, seen)?;
        signal_hook::flag::register_usize(sig, Arc::clone(&flag), sig.unsigned_abs() as usize)?;
    }
    Ok(flag)
}

fn signal_name(sig: usize) -> String {
    match i32::try_from(sig).unwrap_or(0) {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGHUP => "SIGHUP".into(),
        n => format!("signal {n}"),
    }
}

/// The other writers of the dumped shared memory: how many were stopped,
/// and the objects that are not a consistent snapshot.
fn shared_writer_lines(
    err: &mut dyn Write,
    w: &pagescope::dump::SharedWriters,
) -> std::io::Result<()> {
    let stopped = w.writers.iter().filter(|s| s.stopped).count();
    if stopped > 0 {
        let pids: Vec<String> = w
            .writers
            .iter()
            .filter(|s| s.stopped)
            .map(|s| s.pid.to_string())
            .collect();
        writeln!(
            err,
            "stopped {stopped} other writer(s) of the shared memory for the final pass: {}",
            pids.join(" ")
        )?;
    }
    for o in &w.inconsistent {
        let pids: Vec<String> = o.writers.iter().map(u32::to_string).collect();
        writeln!(
            err,
            "warning: {} is not a consistent snapshot: process(es) {} could write it while it was copied{}",
            o.path,
            pids.join(" "),
            if w.stop_sharers {
                " (they could not be stopped)"
            } else {
                " (--no-stop-sharers)"
            }
        )?;
    }
    Ok(())
}

pub(crate) fn swap_line(policy: &str, class: &str, c: &pagescope::dump::SwapClassReport) -> String {
    let mut parts = Vec::new();
    for (n, what) in [
        (c.read, "read (swapped in)"),
        (c.skipped, "skipped (swapped, not copied)"),
        (c.direct, "read from the swap device"),
        (c.direct_fallback, "of them not readable from the device"),
        (c.paged_out, "paged back out"),
        (c.still_in_ram, "still in RAM after pageout"),
    ] {
        if n > 0 {
            parts.push(format!("{n} {what}"));
        }
    }
    format!(
        "swap ({policy}): {} swapped {class} pages: {}",
        c.swapped,
        parts.join(", ")
    )
}

fn iteration_line(it: &Iteration) -> String {
    let what = match (it.n, it.stopped) {
        (_, true) => "final (stopped)".to_owned(),
        (0, _) => "full pass".to_owned(),
        (n, _) => format!("pre-copy {n}"),
    };
    let mut s = format!(
        "{what}: {} pages read, {} stored, {:.1} MiB in {:.3} s",
        it.pages,
        it.stored,
        it.bytes as f64 / f64::from(1 << 20),
        it.seconds
    );
    if it.n > 0 {
        s += &format!(
            "; {} pages written since the last pass ({:.1} MiB/s), predicted downtime {:.1} ms",
            it.written_pages,
            it.dirty_rate_mib_s,
            it.predicted_downtime_s * 1e3
        );
    }
    s
}

pub fn image(cmd: ImageCommand) -> Result<u8> {
    let ImageCommand::Show {
        dir,
        json,
        check_data,
    } = cmd;
    let image = Image::open(&dir)?;
    let checked = if check_data {
        Some(image.verify_data()?)
    } else {
        None
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if json {
        let doc = serde_json::json!({
            "dir": dir,
            "header": image.header(),
            "chain": chain(&image),
            "meta": image.meta(),
            "pages_checked": checked,
        });
        serde_json::to_writer_pretty(&mut out, &doc)?;
        writeln!(out)?;
        return Ok(OK);
    }
    show_text(&mut out, &image, checked)?;
    Ok(OK)
}

fn chain(image: &Image) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut at = Some(image);
    while let Some(i) = at {
        out.push(serde_json::json!({
            "dir": i.dir(),
            "image_id": i.header().image_id,
            "generation": i.header().generation,
        }));
        at = i.parent();
    }
    out
}

fn show_text(out: &mut impl Write, image: &Image, checked: Option<u64>) -> Result<()> {
    let h = image.header();
    writeln!(out, "image {}", image.dir().display())?;
    writeln!(
        out,
        "  id {} generation {} page size {} format {}",
        h.image_id, h.generation, h.page_size, h.format_version
    )?;
    let mut parent = image.parent();
    while let Some(p) = parent {
        writeln!(
            out,
            "  parent {} generation {} at {}",
            p.header().image_id,
            p.header().generation,
            p.dir().display()
        )?;
        parent = p.parent();
    }
    let m = image.meta();
    for p in &m.processes {
        writeln!(
            out,
            "process {} ({}) ppid {}: {} mappings",
            p.pid,
            p.comm,
            p.ppid,
            p.vmas.len()
        )?;
        for v in &p.vmas {
            writeln!(
                out,
                "  {:x}-{:x} {} {:<7} {}  {}",
                v.start,
                v.end,
                v.perms,
                v.backing,
                kinds_summary(&v.runs),
                v.path
            )?;
        }
    }
    for (i, o) in m.objects.iter().enumerate() {
        writeln!(
            out,
            "object {i}: {} inode {} {} {} pages  {}  {}",
            o.dev,
            o.inode,
            o.kind,
            o.pages,
            kinds_summary(&o.runs),
            o.path
        )?;
    }
    let stored: u64 = m
        .processes
        .iter()
        .flat_map(|p| &p.vmas)
        .flat_map(|v| &v.runs)
        .chain(m.objects.iter().flat_map(|o| &o.runs))
        .filter(|r| r.kind == PageKind::Data)
        .map(|r| r.count)
        .sum();
    writeln!(
        out,
        "{} stores, {stored} pages stored in this generation",
        m.stores.len()
    )?;
    if let Some(k) = &m.kept_tracking {
        writeln!(out, "tracking kept in process {} as fd {}", k.pid, k.fd)?;
    }
    if let Some(n) = checked {
        writeln!(
            out,
            "{n} stored pages checked (this image and its parents): all checksums match"
        )?;
    }
    Ok(())
}

/// `data 3 zero 12 hole 100` for a list of runs.
fn kinds_summary(runs: &[Run]) -> String {
    let mut by: BTreeMap<String, u64> = BTreeMap::new();
    for r in runs {
        let name = serde_json::to_value(r.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        *by.entry(name).or_default() += r.count;
    }
    by.iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn restore(dir: &Path, to: &Path, json: bool) -> Result<u8> {
    let image = Image::open(dir)?;
    let sum = image.restore_to_dir(to)?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &sum)?;
        writeln!(out)?;
    } else {
        writeln!(
            out,
            "{} files in {}: {} data pages, {} holes, {} not in the image",
            sum.files.len(),
            to.display(),
            sum.pages,
            sum.holes,
            sum.not_copied
        )?;
    }
    Ok(OK)
}
