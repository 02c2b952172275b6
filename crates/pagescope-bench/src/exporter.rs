//! "Exporter": one full scrape of `pagescope exporter` with N extra
//! processes on the machine (python3, each with 8 MiB of private memory,
//! half of it paged out; every fourth one forked after its pageout, so the
//! pair shares swap slots), against the floor any smaps-based exporter
//! pays (reading every process's `smaps_rollup`, the same processes, in
//! the same run) and against `pagescope top` (the binary, which scans
//! every process fully). Then the resident memory of a serving exporter
//! after some scrapes.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use pagescope::exporter::{Exporter, ExporterOptions, Format};

use crate::util::{arg, median, ms};

/// The python program each process runs: write, page half out, maybe
/// fork, say ready, sleep.
const PROGRAM: &str = r#"
import mmap, os, sys, time
m = mmap.mmap(-1, 8 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(0, 8 << 20, 4096):
    m[i] = 1
m.madvise(21, 0, 4 << 20)
if sys.argv[1] == "fork" and os.fork() == 0:
    time.sleep(3600)
    os._exit(0)
print("ready", flush=True)
time.sleep(3600)
"#;

/// The spawned processes, killed by PID (with their forked children, by
/// process group) on drop.
struct Crowd(Vec<Child>);

impl Drop for Crowd {
    fn drop(&mut self) {
        for c in &mut self.0 {
            // Each python is its own process group: its forked child too.
            if let Some(pgid) = rustix::process::Pid::from_raw(c.id().cast_signed()) {
                let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
            }
            let _ = c.wait();
        }
    }
}

fn spawn(n: u64) -> anyhow::Result<Crowd> {
    use std::os::unix::process::CommandExt;
    let mut crowd = Crowd(Vec::new());
    for i in 0..n {
        let how = if i % 8 == 0 { "fork" } else { "alone" };
        let child = Command::new("python3")
            .args(["-c", PROGRAM, how])
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .context("python3")?;
        crowd.0.push(child);
    }
    for c in &mut crowd.0 {
        let mut line = String::new();
        BufReader::new(c.stdout.as_mut().context("stdout")?).read_line(&mut line)?;
        anyhow::ensure!(line.trim() == "ready", "a python process said {line:?}");
    }
    Ok(crowd)
}

/// Reads every process's smaps_rollup: the floor.
fn rollup_floor() -> usize {
    let mut buf = Vec::with_capacity(4096);
    let mut n = 0;
    for pid in pagescope::pids() {
        buf.clear();
        if let Ok(mut f) = std::fs::File::open(format!("/proc/{pid}/smaps_rollup")) {
            if f.read_to_end(&mut buf).is_ok() {
                n += 1;
            }
        }
    }
    n
}

fn timed<T>(reps: u64, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..reps {
        let t = Instant::now();
        last = Some(f());
        times.push(t.elapsed());
    }
    (median(times), last.expect("reps > 0"))
}

/// The RSS (and peak) in KiB of a serving exporter after `scrapes`.
fn serving_rss(exe: &std::path::Path, scrapes: u32) -> anyhow::Result<(u64, u64)> {
    let mut child = Command::new(exe)
        .args([
            "exporter",
            "--listen",
            "127.0.0.1:0",
            "--min-interval",
            "10ms",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .context("pagescope exporter")?;
    let mut line = String::new();
    BufReader::new(child.stderr.as_mut().context("stderr")?).read_line(&mut line)?;
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|s| s.strip_suffix("/metrics\n"))
        .context("no address")?
        .to_owned();
    for _ in 0..scrapes {
        let mut s = std::net::TcpStream::connect(&addr)?;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
        std::io::copy(&mut s, &mut std::io::sink())?;
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id()))?;
    let kib = |f: &str| pagescope::raw::field_bytes(status.as_bytes(), f).unwrap_or(0) / 1024;
    let out = (kib("VmRSS"), kib("VmHWM"));
    let _ = child.kill();
    let _ = child.wait();
    Ok(out)
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let reps = arg(args, "--reps", 5);
    let sizes = [arg(args, "--small", 50), arg(args, "--large", 200)];
    let exe = std::env::current_exe()?.with_file_name("pagescope");
    anyhow::ensure!(
        exe.exists(),
        "build the pagescope binary first (cargo build --release --workspace)"
    );
    println!(
        "| extra processes | processes read | smaps_rollup floor ms | exporter scrape ms | / floor | pagescope top ms | / floor | scrape / top |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut rss = None;
    for n in sizes {
        let crowd = spawn(n)?;
        let mut exporter = Exporter::new(ExporterOptions {
            min_interval: Duration::ZERO,
            ..ExporterOptions::default()
        });
        // Warm both (dentries, the first scrape's allocations).
        rollup_floor();
        exporter.scrape(Format::Prometheus);
        let (floor, read) = timed(reps, rollup_floor);
        let (scrape, text) = timed(reps, || exporter.scrape(Format::Prometheus));
        let (top, _) = timed(reps, || {
            Command::new(&exe)
                .args(["top", "-n", "1", "--json"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
        });
        anyhow::ensure!(
            text.contains("pagescope_process_swap_bytes"),
            "no exposition"
        );
        println!(
            "| {n} | {read} | {:.1} | {:.1} | {:.2}x | {:.1} | {:.2}x | {:.2}x |",
            ms(floor),
            ms(scrape),
            ms(scrape) / ms(floor),
            ms(top),
            ms(top) / ms(floor),
            ms(scrape) / ms(top)
        );
        if n == sizes[1] {
            rss = Some(serving_rss(&exe, 10)?);
        }
        drop(crowd);
    }
    if let Some((now, peak)) = rss {
        println!(
            "\nexporter serving with {} extra processes, after 10 scrapes: VmRSS {now} KiB, VmHWM {peak} KiB",
            sizes[1]
        );
    }
    Ok(())
}
