//! `pagescope watch`: sample a dirty tracker until Ctrl-C, `q`,
//! `--count`, or the target's exit, and show each interval ([`View`]: a
//! live screen on a terminal, lines otherwise, or NDJSON).

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use pagescope::dirty::Watcher;
use pagescope::dirty::{TrackError, TrackOptions, TrackerBackend, attach};
use pagescope::{KernelCaps, Target};

use crate::cli::WatchArgs;
use crate::exit::{self, CliError};
use crate::watch_view::View;

/// How often the loop wakes to check keys, signals and the terminal size.
const TICK: Duration = Duration::from_millis(20);

pub fn run(args: &WatchArgs) -> Result<u8> {
    let caps = KernelCaps::probe();
    let target = Target::open(args.pid)?;
    target.require_address_space()?;
    let stop = Arc::new(AtomicBool::new(false));
    crate::signals::stop_on_termination(&stop)?;
    let opts = TrackOptions {
        backend: args.tracker.map(Into::into),
        strict_shared: args.strict_shared,
        no_sharers: args.no_sharers,
        report_exit: true,
        ..TrackOptions::default()
    };
    let tracker = attach(&target, &caps, &opts)?;
    let mut watcher = Watcher::new(tracker, &target, args.bandwidth);
    if args.follow_forks {
        watcher.follow_forks(&caps, &opts);
    }
    refuse_silent_fallback(args, &watcher)?;
    let mut out = std::io::stdout().lock();
    let header = header(args, &watcher);
    let mut view = View::choose(
        args.json,
        args.lines,
        args.pid,
        header.clone(),
        args.units.unit(),
    )?;
    view.start(&mut out)?;
    let result = sample_loop(args, &mut watcher, &mut view, &mut out, &stop);
    view.finish();
    drop(watcher); // closes the userfaultfds: the targets are unprotected again
    let (why, totals) = result?;
    summary(
        &mut out,
        args.json,
        args.pid,
        why,
        totals,
        args.units.unit(),
    )?;
    if why == End::ExitedBeforeFirst {
        return Err(CliError::new(
            exit::TARGET_EXITED,
            format!(
                "process {} exited before the first interval ended",
                args.pid
            ),
        )
        .into());
    }
    Ok(exit::OK)
}

/// Without `--allow-fallback`, a tracker that would report everything
/// written is an error, not a silent answer.
fn refuse_silent_fallback(args: &WatchArgs, watcher: &Watcher<'_>) -> Result<()> {
    let asked_for_all = args
        .tracker
        .is_some_and(|t| TrackerBackend::from(t) == TrackerBackend::AllDirty);
    match watcher.degraded() {
        Some(why) if !args.allow_fallback && !asked_for_all => Err(CliError::new(
            exit::DEGRADED,
            format!(
                "process {}: cannot track writes ({why}); pass --allow-fallback to watch anyway",
                args.pid
            ),
        )
        .into()),
        _ => Ok(()),
    }
}

fn header(args: &WatchArgs, watcher: &Watcher<'_>) -> Vec<String> {
    let mut h = vec![format!(
        "tracking with {} every {:?}{}",
        watcher.backend().name(),
        args.interval,
        if args.no_sharers {
            " (other processes not tracked: --no-sharers)"
        } else {
            ""
        }
    )];
    if let Some(why) = watcher.degraded() {
        h.push(format!("DEGRADED: {why}"));
    }
    h.extend(watcher.notes().iter().map(|n| format!("note: {n}")));
    h
}

/// Why watching ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Detached,
    Exited,
    ExitedBeforeFirst,
}

impl End {
    fn text(self) -> &'static str {
        match self {
            End::Detached => "detached",
            End::Exited | End::ExitedBeforeFirst => "the process exited",
        }
    }
}

/// Bytes and seconds over the complete intervals.
#[derive(Clone, Copy, Debug, Default)]
struct Totals {
    bytes: u64,
    secs: f64,
    intervals: u64,
}

fn sample_loop(
    args: &WatchArgs,
    watcher: &mut Watcher<'_>,
    view: &mut View,
    out: &mut dyn Write,
    stop: &AtomicBool,
) -> Result<(End, Totals)> {
    let mut totals = Totals::default();
    while args.count.is_none_or(|c| totals.intervals < c) {
        let deadline = Instant::now() + args.interval;
        let mut quit = false;
        while Instant::now() < deadline && !quit {
            quit = view.tick()? || stop.load(Ordering::SeqCst);
            std::thread::sleep(TICK.min(args.interval));
        }
        if quit {
            // The writes since the last interval are shown, flagged
            // partial: they would distort the peak and the mean.
            if let Ok(mut last) = watcher.sample() {
                last.mark_partial();
                view.show(out, &last)?;
            }
            return Ok((End::Detached, totals));
        }
        let sample = match watcher.sample() {
            Ok(s) if s.partial => {
                // The target exited: what its shared memory received.
                view.show(out, &s)?;
                let end = if totals.intervals == 0 {
                    End::ExitedBeforeFirst
                } else {
                    End::Exited
                };
                return Ok((end, totals));
            }
            Ok(s) => s,
            Err(TrackError::TargetExited { .. })
            | Err(TrackError::Proc(pagescope::ProcError::Exited { .. })) => {
                let end = if totals.intervals == 0 {
                    End::ExitedBeforeFirst
                } else {
                    End::Exited
                };
                return Ok((end, totals));
            }
            Err(e) => return Err(e.into()),
        };
        totals.bytes += sample.written_bytes;
        totals.secs += sample.interval_s;
        totals.intervals += 1;
        view.show(out, &sample)?;
    }
    Ok((End::Detached, totals))
}

fn summary(
    out: &mut dyn Write,
    json: bool,
    pid: u32,
    why: End,
    t: Totals,
    unit: pagescope::render::SizeUnit,
) -> Result<()> {
    let bytes_s = if t.secs > 0.0 {
        t.bytes as f64 / t.secs
    } else {
        0.0
    };
    let rate = bytes_s / (1024.0 * 1024.0);
    if json {
        serde_json::to_writer(
            &mut *out,
            &serde_json::json!({"end": why.text(), "pid": pid, "mean_dirty_rate_mib_s": rate, "seconds": t.secs, "intervals": t.intervals}),
        )?;
        writeln!(out)?;
    } else {
        writeln!(
            out,
            "{}: process {pid}, mean dirty rate {} over {:.1} s ({} complete intervals)",
            why.text(),
            unit.format_rate(bytes_s),
            t.secs,
            t.intervals
        )?;
    }
    out.flush()?;
    Ok(())
}
