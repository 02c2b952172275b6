//! `pagescope watch`: sample a dirty tracker until Ctrl-C, `--count`, or
//! the target's exit, and print each interval (text or NDJSON).

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use pagescope::dirty::stats::{Interval, Watcher};
use pagescope::dirty::{TrackError, TrackOptions, TrackerBackend, attach};
use pagescope::{KernelCaps, Target};

pub fn run(
    pid: u32,
    interval: Duration,
    count: Option<u64>,
    json: bool,
    bandwidth: f64,
    backend: Option<TrackerBackend>,
    strict_shared: bool,
) -> Result<u8> {
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
    if !json {
        writeln!(
            out,
            "watching process {pid} with {} every {:?} (Ctrl-C to stop)",
            watcher.backend().name(),
            interval
        )?;
        for n in watcher.notes() {
            writeln!(out, "note: {n}")?;
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
        print_sample(&mut out, json, &sample)?;
        n += 1;
        if stop.load(Ordering::SeqCst) {
            break;
        }
    }
    drop(watcher); // closes the userfaultfd: the target is unprotected again
    summary(&mut out, json, pid, "detached", total_bytes, total_s)?;
    Ok(0)
}

fn print_sample(out: &mut dyn Write, json: bool, s: &Interval) -> Result<()> {
    if json {
        serde_json::to_writer(&mut *out, s)?;
        writeln!(out)?;
    } else {
        let mib = s.written_bytes as f64 / (1024.0 * 1024.0);
        write!(
            out,
            "t={:7.2}s  {:>9} pages {:>9.2} MiB  {:>9.2} MiB/s  pre-copy@{}MiB/s: {}",
            s.t,
            s.written_pages,
            mib,
            s.dirty_rate_mib_s,
            s.precopy_bandwidth_mib_s,
            if s.precopy_converges {
                "converges"
            } else {
                "DOES NOT CONVERGE"
            }
        )?;
        let top: Vec<String> = s
            .vmas
            .iter()
            .take(3)
            .map(|v| format!("{} {}", short(&v.path, v.start), v.written_pages))
            .collect();
        writeln!(out, "  | {}", top.join(", "))?;
    }
    out.flush()?;
    Ok(())
}

fn short(path: &str, start: pagescope::VirtAddr) -> String {
    if path.is_empty() {
        format!("anon@{start}")
    } else {
        path.rsplit('/').next().unwrap_or(path).to_owned()
    }
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
