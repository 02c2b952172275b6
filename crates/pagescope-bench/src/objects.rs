//! "Shared-memory objects": a 4 GiB memfd, half paged out, a quarter
//! resident but unmapped, a quarter mapped, holes scattered; classified
//! truthfully by pagescope and compared with a plain (wrong) pagemap scan
//! of the same VMA and with the bare baseline algorithm.

use std::os::fd::AsFd;
use std::time::Duration;

use anyhow::Context;
use pagescope::object::ObjectsOptions;
use pagescope::objects_view;
use pagescope::raw::pagemap_scan::RegionBuf;
use pagescope::{KernelCaps, PageState, ScanOptions, Target, VirtAddr, VirtRange, scan_process};
use pagescope_fixture::FixtureProcess;

use crate::baseline;
use crate::util::{arg, ms, time_median};

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let gib = arg(args, "--shmem-gib", 4);
    let sharers = arg(args, "--sharers", 3);
    let reps = arg(args, "--reps", 5);
    let caps = KernelCaps::probe();
    anyhow::ensure!(
        !caps.swaps.is_empty(),
        "needs an active swap device (run scripts/bench as root)"
    );
    let exe = std::env::current_exe()?;
    eprintln!("starting the fixture: {gib} GiB memfd, paging half of it out ...");
    let (g, n) = (gib.to_string(), sharers.to_string());
    let fx = FixtureProcess::spawn(
        &exe,
        &["fixture", "bench_shmem", "--shmem-gib", &g, "--sharers", &n],
    )
    .context("fixture")?;
    let region = fx
        .truth()
        .region("bench_shmem")
        .context("no bench_shmem region")?
        .clone();
    let range =
        VirtRange::from_start_len(VirtAddr::new(region.start), region.pages * 4096).unwrap();
    let target = Target::open(fx.pid())?;
    let pagemap = target.pagemap()?;
    let fd = pagemap.as_fd();
    let object = target.map_file(range)?;
    let opts = ScanOptions {
        range: Some(range),
        objects: true,
        ..ScanOptions::default()
    };

    let truthful = time_median(reps, || {
        scan_process(&target, &caps, &opts).expect("scan");
    });
    let mut buf = vec![0u64; 64 * 1024];
    let pread = time_median(reps, || {
        baseline::pread_loop(fd, &[range], &mut buf);
    });
    let mut vec = RegionBuf::new(16 * 1024);
    let ioctl = time_median(reps, || {
        baseline::pagemap_scan_loop(fd, &[range], &mut vec);
    });
    let bare = time_median(reps, || {
        baseline::bare_shmem_classify(object.as_fd(), region.pages).expect("bare");
    });
    if std::env::var_os("PAGESCOPE_BENCH_PARTS").is_some() {
        let ofd = object.as_fd();
        let mut v = vec![0u8; region.pages as usize];
        let mc = time_median(reps, || {
            pagescope::raw::mincore::mincore_file(ofd, 0, 4096, &mut v).unwrap()
        });
        let cs = time_median(reps, || {
            for c in (0..region.pages).step_by(65536) {
                pagescope::raw::cachestat::cachestat(ofd, c * 4096, 65536 * 4096).unwrap();
            }
        });
        let sk = time_median(reps, || {
            let mut pos = 0;
            while let Ok(d) = rustix::fs::seek(ofd, rustix::fs::SeekFrom::Data(pos)) {
                let Ok(h) = rustix::fs::seek(ofd, rustix::fs::SeekFrom::Hole(d)) else {
                    break;
                };
                pos = h;
            }
        });
        eprintln!(
            "parts: mincore {:?} cachestat(64K chunks) {:?} seek walk {:?}",
            mc, cs, sk
        );
    }
    let all: Vec<u32> = std::iter::once(fx.pid())
        .chain(fx.truth().children.iter().copied())
        .collect();
    let one = time_median(reps, || {
        objects_view(&[fx.pid()], &caps, &ObjectsOptions::default());
    });
    let many = time_median(reps, || {
        objects_view(&all, &caps, &ObjectsOptions::default());
    });

    // The truthful answer and the bare algorithm must agree.
    let report = scan_process(&target, &caps, &opts)?;
    let count = |s| {
        report
            .runs()
            .filter(|(_, r)| r.state == s)
            .map(|(_, r)| r.pages)
            .sum::<u64>()
    };
    let bare_counts = baseline::bare_shmem_classify(object.as_fd(), region.pages)?;
    let ours = [
        count(PageState::Hole),
        count(PageState::Resident) + count(PageState::Present),
        count(PageState::SwapCache),
        count(PageState::Swapped),
        count(PageState::Fallocated),
    ];
    anyhow::ensure!(
        ours == bare_counts,
        "pagescope {ours:?} vs bare algorithm {bare_counts:?}"
    );

    println!(
        "| measurement ({gib} GiB memfd VMA) | ms (median of {reps}) | / plain pagemap pread |"
    );
    println!("|---|---:|---:|");
    let row =
        |name: &str, d: Duration| println!("| {name} | {:.1} | {:.2}x |", ms(d), ms(d) / ms(pread));
    row("plain pagemap pread of the VMA (wrong for shmem)", pread);
    row("bare PAGEMAP_SCAN of the VMA (wrong for shmem)", ioctl);
    row("pagescope truthful classification of the VMA", truthful);
    row(
        "bare baseline algorithm (SEEK + mincore + cachestat), object only",
        bare,
    );
    row("pagescope objects view, 1 process", one);
    row(
        &format!("pagescope objects view, {} processes sharing it", all.len()),
        many,
    );
    println!();
    println!(
        "pages: hole {} resident+mapped {} swapcache {} swapped {} fallocated {}; objects view with {} sharers costs {:.2}x one",
        ours[0],
        ours[1],
        ours[2],
        ours[3],
        ours[4],
        all.len(),
        ms(many) / ms(one)
    );
    Ok(())
}
