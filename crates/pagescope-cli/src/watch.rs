//! `pagescope watch`: sample a dirty tracker until Ctrl-C, `--count`, or
//! the target's exit, and show each interval ([`View`]: a live screen on
//! a terminal, lines otherwise, or NDJSON).

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use pagescope::dirty::stats::Watcher;
use pagescope::dirty::{TrackError, TrackOptions, TrackerBackend, attach};
use pagescope::{KernelCaps, Target};

use crate::cli::WatchArgs;
use crate::watch_view::View;

pub fn run(args: &WatchArgs) -> Result<u8> {
    let WatchArgs {
        pid,
        interval,
        count,
        json,
        lines,
        bandwidth,
        tracker,
        strict_shared,
    } = *args;
    let backend: Option<TrackerBackend> = tracker.map(Into::into);
    let caps = KernelCaps::probe();
    let target = Target::open(pid)?;
    target.require_address_space()?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))?;
    let tracker = attach(
        target,
        &caps,
        &TrackOptions {
            backend,
            strict_shared,
        },
    )?;
    let mut watcher = Watcher::new(tracker, Target::open(pid)?, bandwidth);
    let mut out = std::io::stdout().lock();
    let mut header = vec![format!(
        "tracking with {} every {:?}",
        watcher.backend().name(),
        interval
    )];
    header.extend(watcher.notes().iter().map(|n| format!("note: {n}")));
    let mut view = View::choose(json, lines, pid, header.clone());
    if matches!(view, View::Lines) {
        writeln!(out, "watching process {pid} (Ctrl-C to stop)")?;
        for h in &header {
            writeln!(out, "{h}")?;
        }
    }
    let mut n = 0;
    let (mut total_bytes, mut total_s) = (0u64, 0f64);
    while count.is_none_or(|c| n < c) {
        let deadline = Instant::now() + interval;
        while Instant::now() < deadline && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20).min(interval));
        }
        let sample = match watcher.sample() {
            Ok(s) => s,
            Err(TrackError::TargetExited { .. })
            | Err(TrackError::Proc(pagescope::ProcError::Exited { .. })) => {
                summary(
                    &mut out,
                    json,
                    pid,
                    "the process exited",
                    total_bytes,
                    total_s,
                )?;
                return Ok(0);
            }
            Err(e) => return Err(e.into()),
        };
        total_bytes += sample.written_bytes;
        total_s += sample.interval_s;
        view.show(&mut out, &sample)?;
        n += 1;
        if stop.load(Ordering::SeqCst) {
            break;
        }
    }
    drop(watcher); // closes the userfaultfd: the target is unprotected again
    summary(&mut out, json, pid, "detached", total_bytes, total_s)?;
    Ok(0)
}

fn summary(
    out: &mut dyn Write,
    json: bool,
    pid: u32,
    why: &str,
    bytes: u64,
    secs: f64,
) -> Result<()> {
    let rate = if secs > 0.0 {
        bytes as f64 / secs / (1024.0 * 1024.0)
    } else {
        0.0
    };
    if json {
        serde_json::to_writer(
            &mut *out,
            &serde_json::json!({"end": why, "pid": pid, "mean_dirty_rate_mib_s": rate, "seconds": secs}),
        )?;
        writeln!(out)?;
    } else {
        writeln!(
            out,
            "{why}: process {pid}, mean dirty rate {rate:.2} MiB/s over {secs:.1} s"
        )?;
    }
    Ok(())
}
