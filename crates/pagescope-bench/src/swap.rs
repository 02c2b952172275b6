//! "Swap policies, pageout and the copy-before-write snapshot" (issue:
//! swap-aware copy): one child holds N GiB of written anonymous memory, of
//! which M GiB are paged out before each measurement (everything else
//! swapped back in first: the host's DAMON scheme pages idle memory out
//! on its own). Measured in one run, against baselines on the same
//! process:
//!
//! * `dump --swap read|skip|keep-cold|direct`: time and pages swapped in
//!   (`pswpin`) against `read`;
//! * `dump --snapshot cow` with the child writing 1% of its pages per
//!   second: the child's longest and total stall against the stopped final
//!   pass of a pre-copy dump and against CRIU's frozen time;
//! * `pageout` of the paged-in GiB (scan, advise, re-scan, reasons)
//!   against a bare `process_madvise(MADV_PAGEOUT)` of the same range.

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use pagescope::dump::SwapPolicy;
use pagescope::pageout::{PageoutOptions, pageout};
use pagescope::{KernelCaps, Target, VirtAddr, VirtRange};

use crate::dump::{
    Child, Control, IDLE, RATE, criu_dump, criu_path, pagescope_dump, scratch, spawn,
};
use crate::util::arg;

const PAGE: u64 = 4096;
const MADV_PAGEOUT: i32 = 21;

fn pswpin() -> u64 {
    std::fs::read_to_string("/proc/vmstat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("pswpin ")?.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Reads all of the child's memory through `/proc/PID/mem` (swapping in
/// whatever DAMON or an earlier measurement paged out).
fn swap_all_in(c: &Child, len: u64) -> anyhow::Result<()> {
    let mem = std::fs::File::open(format!("/proc/{}/mem", c.pid))?;
    let mut buf = vec![0u8; 4 << 20];
    for off in (0..len).step_by(buf.len()) {
        mem.read_exact_at(&mut buf, c.base + off)?;
    }
    Ok(())
}

/// The bare baseline: `process_madvise(MADV_PAGEOUT)` of `len` bytes from
/// the child's base, in one call.
fn bare_pageout(c: &Child, len: u64) -> anyhow::Result<Duration> {
    let pidfd = rustix::process::pidfd_open(
        rustix::process::Pid::from_raw(c.pid.cast_signed())
            .ok_or_else(|| anyhow::anyhow!("pid 0"))?,
        rustix::process::PidfdFlags::empty(),
    )?;
    let iov = libc::iovec {
        iov_base: c.base as *mut libc::c_void,
        iov_len: usize::try_from(len)?,
    };
    let t = Instant::now();
    // SAFETY: the iovec names the child's memory; the kernel only reads
    // the iovec array here.
    let n = unsafe {
        libc::syscall(
            libc::SYS_process_madvise,
            std::os::fd::AsRawFd::as_raw_fd(&pidfd),
            &raw const iov,
            1usize,
            MADV_PAGEOUT,
            0u32,
        )
    };
    anyhow::ensure!(
        n >= 0,
        "process_madvise: {}",
        std::io::Error::last_os_error()
    );
    Ok(t.elapsed())
}

/// Swapped pages of the child's first `len` bytes (pagemap bit 62).
fn swapped_pages(c: &Child, len: u64) -> anyhow::Result<u64> {
    let pm = std::fs::File::open(format!("/proc/{}/pagemap", c.pid))?;
    let mut buf = vec![0u8; 8 * 4096];
    let mut n = 0;
    for first in (0..len / PAGE).step_by(4096) {
        let want = ((len / PAGE - first).min(4096) * 8) as usize;
        pm.read_exact_at(&mut buf[..want], (c.base / PAGE + first) * 8)?;
        n += buf[..want]
            .chunks_exact(8)
            .filter(|e| {
                u64::from_ne_bytes((*e).try_into().unwrap_or_default()) & (3 << 62) == 1 << 62
            })
            .count() as u64;
    }
    Ok(n)
}

/// Everything swapped in, then exactly `swapped` bytes paged out.
fn prepare(c: &Child, len: u64, swapped: u64) -> anyhow::Result<u64> {
    swap_all_in(c, len)?;
    bare_pageout(c, swapped)?;
    swapped_pages(c, swapped)
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let gib = arg(args, "--gib", 4);
    let swapped_gib = arg(args, "--swapped-gib", 1);
    anyhow::ensure!(
        rustix::process::geteuid().is_root(),
        "needs root (swap offsets, ptrace, userfaultfd)"
    );
    anyhow::ensure!(
        std::fs::read_to_string("/proc/swaps")?.lines().count() > 1,
        "needs an active swap device (scripts/bench sets up zram)"
    );
    let (len, swapped) = (gib << 30, swapped_gib << 30);
    let ctl = Control::new()?;
    let c = spawn(&ctl, usize::try_from(len)?)?;
    println!(
        "Target: a child holding {gib} GiB of written anonymous memory; before each dump everything is swapped in and then exactly {swapped_gib} GiB paged out.\n"
    );
    println!(
        "| dump `--swap` policy | paged out before | dump time (s) | vs `read` | pages swapped in (pswpin) | read from the swap device | paged back out |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut read_time = None;
    for policy in [
        SwapPolicy::Read,
        SwapPolicy::Skip,
        SwapPolicy::KeepCold,
        SwapPolicy::Direct,
    ] {
        let before = prepare(&c, len, swapped)?;
        let out = scratch(&format!("swap-{}", policy.name()));
        let in0 = pswpin();
        let (r, t) = pagescope_dump(c.pid, &out, |o| {
            o.max_iterations = 0;
            o.swap = policy;
        })?;
        let swapins = pswpin() - in0;
        let _ = std::fs::remove_dir_all(&out);
        let base = *read_time.get_or_insert(t);
        println!(
            "| {} | {before} | {:.2} | {:.2}x | {swapins} | {} | {} |",
            policy.name(),
            t.as_secs_f64(),
            t.as_secs_f64() / base.as_secs_f64(),
            r.swap.anon.direct,
            r.swap.anon.paged_out,
        );
    }

    // pageout vs the bare call, same range, same state.
    prepare(&c, len, 0)?;
    let bare = bare_pageout(&c, swapped)?;
    let bare_out = swapped_pages(&c, swapped)?;
    prepare(&c, len, 0)?;
    let caps = KernelCaps::probe();
    let target = Target::open(c.pid)?;
    let range = VirtRange::from_start_len(VirtAddr::new(c.base), swapped)
        .ok_or_else(|| anyhow::anyhow!("bad range"))?;
    let t = Instant::now();
    let r = pageout(
        &target,
        &caps,
        &PageoutOptions {
            range: Some(range),
            ..PageoutOptions::default()
        },
    )?;
    let ps = t.elapsed();
    println!(
        "\n| pageout of {swapped_gib} GiB of present pages | pagescope `pageout` (scan, advise, re-scan, reasons) | bare `process_madvise(MADV_PAGEOUT)` | ratio |"
    );
    println!("|---|---:|---:|---:|");
    println!(
        "| time (ms) | {:.1} | {:.1} | {:.2}x |",
        ps.as_secs_f64() * 1e3,
        bare.as_secs_f64() * 1e3,
        ps.as_secs_f64() / bare.as_secs_f64()
    );
    println!(
        "| pages that left RAM | {} (of {} asked; {} stayed) | {bare_out} (by pagemap) | |",
        r.total.left_ram, r.total.requested, r.total.stayed
    );

    // Copy-before-write snapshot vs stopped final pass vs CRIU, writer at 1%/s.
    swap_all_in(&c, len)?;
    let rate = len / PAGE / 100;
    ctl.set(RATE, rate, 1);
    std::thread::sleep(Duration::from_millis(500));
    let (cow, cow_t) = pagescope_dump(c.pid, &scratch("cow"), |o| o.cow = true)?;
    let _ = std::fs::remove_dir_all(scratch("cow"));
    let (stop, _) = pagescope_dump(c.pid, &scratch("stop"), |_| {})?;
    let _ = std::fs::remove_dir_all(scratch("stop"));
    let criu = match criu_path() {
        Some(criu) => {
            let r = criu_dump(&criu, c.pid, &scratch("criu"))?;
            let _ = std::fs::remove_dir_all(scratch("criu"));
            Some(r.1)
        }
        None => None,
    };
    ctl.set(IDLE, 0, 0);
    let s = cow.snapshot.clone().unwrap_or_default();
    println!(
        "\n| writer at 1%/s, {gib} GiB | `--snapshot cow` | stopped final pass (pre-copy dump) | CRIU frozen time |"
    );
    println!("|---|---:|---:|---:|");
    let criu_ms = criu.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
    println!(
        "| longest stall of the target (ms) | {:.2} (the stop that write-protects: {:.2}; longest fault wait: {:.3}) | {:.2} | {:.1} |",
        s.stop_s.max(s.longest_stall_s) * 1e3,
        s.stop_s * 1e3,
        s.longest_stall_s * 1e3,
        stop.stopped_s * 1e3,
        criu_ms
    );
    println!(
        "| total stall of the target (ms) | {:.2} ({} faults) | {:.2} | {:.1} |",
        (s.stop_s + s.total_stall_s) * 1e3,
        s.faults,
        stop.stopped_s * 1e3,
        criu_ms
    );
    println!(
        "| longest stall vs CRIU frozen time | {:.2}% | {:.2}% | 100% |",
        s.stop_s.max(s.longest_stall_s) * 1e3 / criu_ms * 100.0,
        stop.stopped_s * 1e3 / criu_ms * 100.0
    );
    println!(
        "| dump time (s) | {:.2} | {:.2} (with pre-copy) | |",
        cow_t.as_secs_f64(),
        stop.iterations.iter().map(|i| i.seconds).sum::<f64>()
    );
    Ok(())
}
