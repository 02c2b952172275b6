//! "Whole-process scan": the fixture's `bench` layout (a sparse reservation
//! with 1% of pages touched at scattered places, plus dense anonymous
//! memory), scanned by pagescope and by the bare interfaces.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use anyhow::Context;
use pagescope::raw::pagemap_scan::RegionBuf;
use pagescope::{KernelCaps, ScanOptions, ScanStrategy, Target, VirtRange, scan_process};
use pagescope_fixture::FixtureProcess;

use crate::baseline;
use crate::util::{arg, ms, time_median};

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let sparse = arg(args, "--sparse-gib", 64);
    let dense = arg(args, "--dense-gib", 4);
    let reps = arg(args, "--reps", 7);
    let exe = std::env::current_exe()?;
    let (s, d) = (sparse.to_string(), dense.to_string());
    eprintln!("starting the fixture: {sparse} GiB sparse (1% touched), {dense} GiB dense ...");
    let fx = FixtureProcess::spawn(
        &exe,
        &["fixture", "bench", "--sparse-gib", &s, "--dense-gib", &d],
    )
    .context("fixture")?;
    let caps = KernelCaps::probe();
    let target = Target::open(fx.pid())?;
    let ranges: Vec<VirtRange> = target
        .maps()?
        .iter()
        .map(|e| e.range)
        .filter(|r| r.end().get() < 1 << 47)
        .collect();
    let pagemap = target.pagemap()?;
    let fd = pagemap.as_fd();
    let mut vec = RegionBuf::new(16 * 1024);
    let mut buf = vec![0u64; 64 * 1024];

    let (target, caps) = (&target, &caps);
    let scan = |threads, objects| {
        let opts = ScanOptions {
            threads,
            objects,
            ..ScanOptions::default()
        };
        move || {
            let r = scan_process(target, caps, &opts).expect("scan");
            assert!(r.complete());
        }
    };
    let fast = |threads| {
        let opts = ScanOptions {
            threads,
            skip_exclusive: true,
            ..ScanOptions::default()
        };
        move || {
            let r = scan_process(target, caps, &opts).expect("scan");
            assert!(r.complete());
        }
    };
    if std::env::var_os("PAGESCOPE_BENCH_PARTS").is_some() {
        parts(target, caps, &ranges, fd, &mut vec, &mut buf);
    }
    let ioctl = time_median(reps, || {
        baseline::pagemap_scan_loop(fd, &ranges, &mut vec);
    });
    let pread = time_median(reps, || {
        baseline::pread_loop(fd, &ranges, &mut buf);
    });
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pieces = baseline::gib_pieces(&ranges);
    let ioctl_n = time_median(reps, || {
        baseline::on_threads(
            cpus,
            &pieces,
            || RegionBuf::new(16 * 1024),
            |v, p| {
                baseline::pagemap_scan_loop(fd, std::slice::from_ref(p), v);
            },
        );
    });
    let pread_n = time_median(reps, || {
        baseline::on_threads(
            cpus,
            &pieces,
            || vec![0u64; 64 * 1024],
            |b, p| {
                baseline::pread_loop(fd, std::slice::from_ref(p), b);
            },
        );
    });
    let lib1 = time_median(reps, scan(1, false));
    let libn = time_median(reps, scan(0, false));
    let lib_objects = time_median(reps, scan(0, true));
    let fast1 = time_median(reps, fast(1));
    let fastn = time_median(reps, fast(0));
    let json = time_median(reps, || {
        let r = scan_process(
            target,
            caps,
            &ScanOptions {
                objects: true,
                ..ScanOptions::default()
            },
        )
        .expect("scan");
        serde_json::to_writer(std::io::sink(), &r.pages_json()).expect("json");
    });
    eprintln!("procfs crate (one run; it reads 8 bytes per call) ...");
    let t = Instant::now();
    let procfs_present = baseline::procfs_loop(fx.pid(), &ranges)?;
    let procfs = t.elapsed();
    let present = baseline::pread_loop(fd, &ranges, &mut buf);
    anyhow::ensure!(
        procfs_present == present,
        "procfs saw {procfs_present} present pages, pread {present}"
    );

    let ratio = |d: Duration| ms(d) / ms(ioctl);
    println!(
        "| measurement | ms (median of {reps}) | / bare PAGEMAP_SCAN | / bare PAGEMAP_SCAN, same threads | / bare pread |"
    );
    println!("|---|---:|---:|---:|---:|");
    let row = |name: &str, d: Duration, threads: usize| {
        let same = if threads > 1 { ioctl_n } else { ioctl };
        println!(
            "| {name} | {:.1} | {:.2}x | {:.2}x | {:.2}x |",
            ms(d),
            ratio(d),
            ms(d) / ms(same),
            ms(d) / ms(pread)
        )
    };
    row("bare PAGEMAP_SCAN loop (baseline a)", ioctl, 1);
    row(
        &format!("bare PAGEMAP_SCAN loop, {cpus} threads"),
        ioctl_n,
        cpus,
    );
    row("bare 64K-entry pagemap pread loop (baseline b)", pread, 1);
    row(
        &format!("bare pagemap pread loop, {cpus} threads"),
        pread_n,
        cpus,
    );
    row("pagescope library scan, 1 thread", lib1, 1);
    row(
        &format!("pagescope library scan, {cpus} threads"),
        libn,
        cpus,
    );
    row(
        &format!("pagescope library scan + objects, {cpus} threads"),
        lib_objects,
        cpus,
    );
    row(
        "pagescope library scan without exclusive bit, 1 thread",
        fast1,
        1,
    );
    row(
        &format!("pagescope library scan without exclusive bit, {cpus} threads"),
        fastn,
        cpus,
    );
    row(
        &format!("pagescope scan + objects + pages JSON, {cpus} threads"),
        json,
        cpus,
    );
    row("procfs crate pagemap API (baseline c, 1 run)", procfs, 1);
    println!();
    println!(
        "procfs / pagescope ({cpus} threads): {:.1}x slower; layout: {sparse} GiB sparse (1% touched) + {dense} GiB dense, {present} present pages",
        ms(procfs) / ms(libn)
    );
    Ok(())
}

/// Per-VMA costs of the bare interfaces and of pagescope, biggest VMAs first.
fn parts(
    target: &Target,
    caps: &KernelCaps,
    ranges: &[VirtRange],
    fd: std::os::fd::BorrowedFd<'_>,
    vec: &mut RegionBuf,
    buf: &mut [u64],
) {
    let mut big: Vec<VirtRange> = ranges.to_vec();
    big.sort_by_key(|r| std::cmp::Reverse(r.len()));
    for r in big.iter().take(2) {
        let one = std::slice::from_ref(r);
        let ioctl = time_median(5, || {
            baseline::pagemap_scan_loop(fd, one, vec);
        });
        let pread = time_median(5, || {
            baseline::pread_loop(fd, one, buf);
        });
        let lib = |strategy| {
            time_median(5, || {
                let opts = ScanOptions {
                    threads: 1,
                    range: Some(*r),
                    strategy,
                    ..ScanOptions::default()
                };
                scan_process(target, caps, &opts).expect("scan");
            })
        };
        let (adaptive, walk, read) = (
            lib(ScanStrategy::Adaptive),
            lib(ScanStrategy::Walk),
            lib(ScanStrategy::Read),
        );
        eprintln!(
            "{r}: {} MiB ioctl {:.1} ms pread {:.1} ms; pagescope, 1 thread: adaptive {:.1} ms walk {:.1} ms read {:.1} ms",
            r.len() >> 20,
            ms(ioctl),
            ms(pread),
            ms(adaptive),
            ms(walk),
            ms(read)
        );
    }
}
