//! "Dumping a live process" (issue: copy): a child holds N GiB of written
//! anonymous memory (every page non-zero) and, when told, writes 1% of
//! its pages per second. Everything is measured in one run against
//! baselines on the same process:
//!
//! * throughput: `pagescope dump` (full pass + stopped pass, no pre-copy)
//!   vs a bare `process_vm_readv` copy of the same buffer into a sparse
//!   file at fixed offsets (+ fsync), vs `criu dump --leave-running`;
//! * stop time with the writer at 1%/s: pagescope's pre-copy dump vs
//!   CRIU's frozen time (`--display-stats`);
//! * one incremental iteration at 1% written (kept tracking, `--parent`)
//!   vs the bare collect (`PAGEMAP_SCAN` get-and-reset) + copy of exactly
//!   those pages (`--incremental-only`: this row alone);
//! * image sizes: a forked pair sharing every page copy-on-write
//!   (`--tree`), and a target re-dirtying the same pages every iteration.

use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pagescope::dump::{DumpOptions, DumpReport, dump};
use pagescope::raw::pagemap_scan::RegionBuf;
use pagescope::raw::{OwnedMapping, wp_get_and_reset};
use pagescope::{KernelCaps, Target, VirtAddr, VirtRange};

use crate::util::{arg, median};

const PAGE: usize = 4096;

/// Shared with the child: command, argument, seed, acknowledgement, ready.
pub(crate) struct Control {
    map: OwnedMapping,
}

const CMD: usize = 0;
const ARG: usize = 1;
const SEED: usize = 2;
const ACK: usize = 3;
const READY: usize = 4;
const BASE: usize = 5;

pub(crate) const IDLE: u64 = 0;
/// Write ARG pages per second at pseudo-random places.
pub(crate) const RATE: u64 = 1;
/// Write ARG pages chosen by SEED once, then ACK.
const BURST: u64 = 2;
/// Write the first ARG pages again and again, 1000 per ms.
const HOT: u64 = 3;

impl Control {
    pub(crate) fn new() -> anyhow::Result<Self> {
        Ok(Self {
            map: OwnedMapping::shared_anonymous(PAGE, 0)?,
        })
    }

    fn slot(&self, i: usize) -> &AtomicU64 {
        // SAFETY: the mapping is PAGE bytes, page aligned, alive as long as
        // `self`; slot i < 8 is an aligned u64 inside it, and only atomics
        // access it (in both processes).
        unsafe { &*(self.map.addr() as *const AtomicU64).add(i) }
    }

    pub(crate) fn set(&self, cmd: u64, argument: u64, seed: u64) {
        self.slot(ARG).store(argument, Ordering::SeqCst);
        self.slot(SEED).store(seed, Ordering::SeqCst);
        self.slot(CMD).store(cmd, Ordering::SeqCst);
    }

    fn burst(&self, pages: u64, seed: u64) {
        let before = self.slot(ACK).load(Ordering::SeqCst);
        self.set(BURST, pages, seed);
        while self.slot(ACK).load(Ordering::SeqCst) == before {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Distinct pseudo-random page indices below `pages`.
fn pick(pages: u64, n: u64, seed: u64) -> Vec<u64> {
    let mut x = seed | 1;
    let mut set = std::collections::BTreeSet::new();
    while (set.len() as u64) < n.min(pages) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        set.insert(x % pages);
    }
    set.into_iter().collect()
}

/// The child: fills `len` bytes, reports where, serves commands forever.
fn child(ctl: &Control, len: usize) -> ! {
    let Ok(m) = OwnedMapping::anonymous(len, 2 << 20) else {
        std::process::exit(1)
    };
    let pages = (len / PAGE) as u64;
    for p in 0..pages as usize {
        // Every word non-zero, different per page.
        let mut page = [0u64; PAGE / 8];
        for (w, v) in page.iter_mut().enumerate() {
            *v = (p as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (w as u64 + 1);
        }
        // SAFETY: plain words reinterpreted as bytes.
        let bytes = unsafe { std::slice::from_raw_parts(page.as_ptr().cast::<u8>(), PAGE) };
        let _ = m.write(p * PAGE, bytes);
    }
    ctl.slot(BASE).store(m.addr(), Ordering::SeqCst);
    ctl.slot(READY).store(1, Ordering::SeqCst);
    let mut value = 1u64;
    let mut write = |p: u64| {
        value += 1;
        let _ = m.write(p as usize * PAGE + 8, &value.to_ne_bytes());
    };
    let mut x = 0x1234_5678_u64;
    let mut since = Instant::now();
    let mut done = 0u64;
    loop {
        match ctl.slot(CMD).load(Ordering::SeqCst) {
            RATE => {
                let rate = ctl.slot(ARG).load(Ordering::SeqCst);
                let due = u64::try_from(since.elapsed().as_micros() * u128::from(rate) / 1_000_000)
                    .unwrap_or(u64::MAX);
                while done < due {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    write(x % pages);
                    done += 1;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            BURST => {
                for p in pick(
                    pages,
                    ctl.slot(ARG).load(Ordering::SeqCst),
                    ctl.slot(SEED).load(Ordering::SeqCst),
                ) {
                    write(p);
                }
                ctl.slot(CMD).store(IDLE, Ordering::SeqCst);
                ctl.slot(ACK).fetch_add(1, Ordering::SeqCst);
            }
            HOT => {
                let hot = ctl.slot(ARG).load(Ordering::SeqCst).max(1);
                for k in 0..1000 {
                    write((done + k) % hot);
                }
                done += 1000;
                std::thread::sleep(Duration::from_millis(1));
            }
            _ => {
                since = Instant::now();
                done = 0;
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

pub(crate) struct Child {
    pub(crate) pid: u32,
    pub(crate) base: u64,
}

impl Drop for Child {
    fn drop(&mut self) {
        let pid = rustix::process::Pid::from_raw(self.pid.cast_signed());
        if let Some(pid) = pid {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            let _ = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty());
        }
    }
}

/// Forks the child (before this process starts any thread).
pub(crate) fn spawn(ctl: &Control, len: usize) -> anyhow::Result<Child> {
    // SAFETY: single-threaded here (first thing this subcommand does); the
    // child only runs `child`, which never returns.
    let pid = unsafe { libc::fork() };
    anyhow::ensure!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // CRIU dumps the child: give it no terminal or pipes of ours.
        if let Ok(null) = std::fs::File::options()
            .read(true)
            .write(true)
            .open("/dev/null")
        {
            for fd in 0..3 {
                // SAFETY: dup2 onto the standard descriptors.
                unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), fd) };
            }
        }
        // SAFETY: a new session, so CRIU needs no --shell-job.
        unsafe { libc::setsid() };
        child(ctl, len);
    }
    while ctl.slot(READY).load(Ordering::SeqCst) == 0 {
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(Child {
        pid: pid.cast_unsigned(),
        base: ctl.slot(BASE).load(Ordering::SeqCst),
    })
}

/// The baseline: `process_vm_readv` of `pages` (page indices from `base`)
/// in 4 MiB vectors, written at fixed offsets into a new sparse file,
/// fsynced. Returns the time.
fn bare_copy(pid: u32, base: u64, pages: &[u64], file: &Path) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let f = std::fs::File::create(file)?;
    let mut buf = vec![0u8; 4 << 20];
    for batch in pages.chunks(buf.len() / PAGE) {
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: batch.len() * PAGE,
        };
        // Consecutive pages as one range.
        let mut remote: Vec<libc::iovec> = Vec::new();
        for (k, &p) in batch.iter().enumerate() {
            match remote.last_mut() {
                Some(r) if k > 0 && batch[k - 1] + 1 == p => r.iov_len += PAGE,
                _ => remote.push(libc::iovec {
                    iov_base: (base + p * PAGE as u64) as *mut libc::c_void,
                    iov_len: PAGE,
                }),
            }
        }
        let mut done = 0;
        for chunk in remote.chunks(1024) {
            let l = libc::iovec {
                // SAFETY: inside `buf`.
                iov_base: unsafe { buf.as_mut_ptr().add(done) }.cast(),
                iov_len: chunk.iter().map(|r| r.iov_len).sum(),
            };
            // SAFETY: `l` covers part of `buf`; the remote side is checked
            // by the kernel.
            let n = unsafe {
                libc::process_vm_readv(
                    pid.cast_signed(),
                    &raw const l,
                    1,
                    chunk.as_ptr(),
                    chunk.len() as libc::c_ulong,
                    0,
                )
            };
            anyhow::ensure!(
                n >= 0,
                "process_vm_readv: {}",
                std::io::Error::last_os_error()
            );
            done += n.unsigned_abs();
        }
        let _ = local;
        // Consecutive pages go out in one write, at their fixed offsets.
        let mut k = 0;
        while k < batch.len() {
            let mut e = k + 1;
            while e < batch.len() && batch[e] == batch[e - 1] + 1 {
                e += 1;
            }
            f.write_all_at(&buf[k * PAGE..e * PAGE], batch[k] * PAGE as u64)?;
            k = e;
        }
    }
    f.sync_all()?;
    Ok(t.elapsed())
}

pub(crate) fn pagescope_dump(
    pid: u32,
    out: &Path,
    f: impl FnOnce(&mut DumpOptions),
) -> anyhow::Result<(DumpReport, Duration)> {
    let caps = KernelCaps::probe();
    let target = Target::open(pid)?;
    let mut opts = DumpOptions::new(out);
    f(&mut opts);
    let t = Instant::now();
    let r = dump(&target, &caps, &opts, &mut |_| {})?;
    Ok((r, t.elapsed()))
}

/// `criu dump --leave-running` of `pid`; its wall time and frozen time.
pub(crate) fn criu_dump(criu: &Path, pid: u32, dir: &Path) -> anyhow::Result<(Duration, Duration)> {
    std::fs::create_dir_all(dir)?;
    let t = Instant::now();
    let out = std::process::Command::new(criu)
        .args([
            "dump",
            "--leave-running",
            "--display-stats",
            "-t",
            &pid.to_string(),
            "-D",
        ])
        .arg(dir)
        .args(["-o", "dump.log", "-v2"])
        .output()?;
    let wall = t.elapsed();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(
        out.status.success(),
        "criu dump failed: {text}\n{}",
        std::fs::read_to_string(dir.join("dump.log")).unwrap_or_default()
    );
    let frozen = text
        .lines()
        .find(|l| l.contains("Frozen time"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_micros)
        .ok_or_else(|| anyhow::anyhow!("no frozen time in criu's stats: {text}"))?;
    Ok((wall, frozen))
}

/// Bytes allocated under `dir` (sparse files count what they hold).
fn allocated(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                n += allocated(&p);
            } else if let Ok(m) = p.metadata() {
                n += m.blocks() * 512;
            }
        }
    }
    n
}

/// Where images go: tmpfs, so neither side measures the disk (CRIU does
/// not fsync its images; pagescope does, which is free on tmpfs).
pub(crate) fn scratch(name: &str) -> PathBuf {
    PathBuf::from("/dev/shm").join(format!(
        "pagescope-bench-dump-{}-{name}",
        std::process::id()
    ))
}

/// Writes and frees `bytes` of tmpfs.
fn warm_up(bytes: usize) -> anyhow::Result<()> {
    let path = scratch("warm-up");
    let f = std::fs::File::create(&path)?;
    let buf = vec![1u8; 4 << 20];
    for off in (0..bytes).step_by(buf.len()) {
        f.write_all_at(&buf, off as u64)?;
    }
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(())
}

pub(crate) fn criu_path() -> Option<PathBuf> {
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/peers/build-criu.sh");
    let out = std::process::Command::new("bash").arg(here).output().ok()?;
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()?
        .trim()
        .to_owned();
    Some(PathBuf::from(path)).filter(|p| p.exists())
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let gib = arg(args, "--gib", 4);
    anyhow::ensure!(
        rustix::process::geteuid().is_root(),
        "needs root (ptrace, userfaultfd, PFNs)"
    );
    let len = (gib << 30) as usize;
    let pages = (len / PAGE) as u64;
    if args.iter().any(|a| a == "--incremental-only") {
        let ctl = Control::new()?;
        let c = spawn(&ctl, len)?;
        println!("| measurement | pagescope | baseline | ratio |");
        println!("|---|---:|---:|---:|");
        return incremental(&c, &ctl, pages, arg(args, "--reps", 5));
    }
    let ctl = Control::new()?;
    let tree_ctl = Control::new()?;
    let c = spawn(&ctl, len)?;
    let pair = spawn_pair(&tree_ctl, 256 << 20)?;
    let criu = criu_path();
    let all: Vec<u64> = (0..pages).collect();

    println!(
        "Target: a child process holding {gib} GiB of written anonymous memory (every page non-zero).\n"
    );
    println!("| measurement | pagescope | baseline | ratio |");
    println!("|---|---:|---:|---:|");
    // Throughput, writer idle.
    // Warm-up: this VM is slow the first time guest memory is touched;
    // without this, whichever side runs first pays for it.
    warm_up(2 * len)?;
    let reps = arg(args, "--reps", 3);
    let (mut bares, mut dumps, mut crius) = (Vec::new(), Vec::new(), Vec::new());
    let mut rep = None;
    let mut idle_frozen = Vec::new();
    for _ in 0..reps {
        bares.push(bare_copy(c.pid, c.base, &all, &scratch("bare.pages"))?);
        let _ = std::fs::remove_file(scratch("bare.pages"));
        let (r, t) = pagescope_dump(c.pid, &scratch("full"), |o| o.max_iterations = 0)?;
        let _ = std::fs::remove_dir_all(scratch("full"));
        dumps.push(t);
        rep = Some(r);
        if let Some(criu) = &criu {
            let (wall, frozen) = criu_dump(criu, c.pid, &scratch("criu-idle"))?;
            let _ = std::fs::remove_dir_all(scratch("criu-idle"));
            crius.push(wall);
            idle_frozen.push(frozen);
        }
    }
    let rep = rep.ok_or_else(|| anyhow::anyhow!("--reps 0"))?;
    eprintln!("bare {bares:?}\npagescope {dumps:?}\ncriu {crius:?}");
    let (bare, ps) = (median(bares), median(dumps));
    println!(
        "| full dump, writer idle: time (s) vs bare process_vm_readv copy into a file (median of {reps}) | {:.2} | {:.2} | {:.2}x |",
        ps.as_secs_f64(),
        bare.as_secs_f64(),
        ps.as_secs_f64() / bare.as_secs_f64()
    );
    println!(
        "| full dump throughput (GiB/s) vs bare copy | {:.2} | {:.2} | |",
        gib as f64 / ps.as_secs_f64(),
        gib as f64 / bare.as_secs_f64()
    );
    let mut criu_frozen = None;
    if let Some(criu) = &criu {
        let (wall, idle_frozen) = (median(crius), median(idle_frozen));
        println!(
            "| full dump, writer idle: pagescope time (s) vs `criu dump --leave-running` (median of {reps}) | {:.2} | {:.2} | {:.2}x faster |",
            ps.as_secs_f64(),
            wall.as_secs_f64(),
            wall.as_secs_f64() / ps.as_secs_f64()
        );
        println!(
            "| stop time (ms), writer idle: pagescope (one stopped pass after the full one) vs CRIU frozen time | {:.1} | {:.1} | {:.0}x shorter |",
            rep.stopped_s * 1e3,
            idle_frozen.as_secs_f64() * 1e3,
            idle_frozen.as_secs_f64() / rep.stopped_s
        );
        // CRIU's frozen time with the writer at 1%/s.
        ctl.set(RATE, pages / 100, 0);
        std::thread::sleep(Duration::from_secs(1));
        let (_, frozen) = criu_dump(criu, c.pid, &scratch("criu-busy"))?;
        let _ = std::fs::remove_dir_all(scratch("criu-busy"));
        ctl.set(IDLE, 0, 0);
        criu_frozen = Some(frozen);
        let _ = frozen;
    } else {
        println!(
            "| criu dump | not run: ../shared/peers/build-criu.sh did not give a binary | | |"
        );
    }
    // Stop time with the writer at 1%/s.
    ctl.set(RATE, pages / 100, 0);
    std::thread::sleep(Duration::from_secs(1));
    let (rep, _) = pagescope_dump(c.pid, &scratch("precopy"), |o| {
        o.max_iterations = 8;
        o.max_downtime = Some(Duration::from_millis(50));
    })?;
    ctl.set(IDLE, 0, 0);
    let precopy_alloc = allocated(&scratch("precopy"));
    let _ = std::fs::remove_dir_all(scratch("precopy"));
    let its = rep.iterations.len();
    match criu_frozen {
        Some(f) => println!(
            "| stop time (ms), writer at 1%/s: pagescope pre-copy dump ({its} passes) vs CRIU frozen time | {:.1} | {:.1} | {:.0}x shorter |",
            rep.stopped_s * 1e3,
            f.as_secs_f64() * 1e3,
            f.as_secs_f64() / rep.stopped_s
        ),
        None => println!(
            "| stop time (ms), writer at 1%/s, pre-copy ({its} passes) | {:.1} | | |",
            rep.stopped_s * 1e3
        ),
    }
    println!(
        "| image size with the writer at 1%/s (MiB allocated) vs memory covered | {:.0} | {:.0} | {:.2}x |",
        precopy_alloc as f64 / 1048576.0,
        len as f64 / 1048576.0,
        precopy_alloc as f64 / len as f64
    );
    incremental(&c, &ctl, pages, reps)?;
    // Re-dirtying the same pages in every iteration.
    ctl.set(HOT, pages / 10, 0);
    std::thread::sleep(Duration::from_millis(200));
    let (rep, _) = pagescope_dump(c.pid, &scratch("hot"), |o| {
        o.max_iterations = 8;
        o.max_time = Duration::from_secs(30);
    })?;
    ctl.set(IDLE, 0, 0);
    let copied: u64 = rep.iterations.iter().map(|i| i.bytes).sum();
    let hot_alloc = allocated(&scratch("hot"));
    let _ = std::fs::remove_dir_all(scratch("hot"));
    println!(
        "| re-dirtying 10% every pass ({} passes, {:.0} MiB copied in all): image MiB allocated vs memory covered | {:.0} | {:.0} | {:.2}x |",
        rep.iterations.len(),
        copied as f64 / 1048576.0,
        hot_alloc as f64 / 1048576.0,
        len as f64 / 1048576.0,
        hot_alloc as f64 / len as f64
    );
    // A forked pair sharing 256 MiB copy-on-write.
    let (rep, _) = pagescope_dump(pair.0.pid, &scratch("tree"), |o| {
        o.max_iterations = 0;
        o.tree = true;
    })?;
    let tree_alloc = allocated(&scratch("tree"));
    let _ = std::fs::remove_dir_all(scratch("tree"));
    println!(
        "| forked pair sharing 256 MiB COW (`--tree`, {} processes): image MiB allocated vs one copy | {:.0} | 256 | {:.2}x |",
        rep.pids.len(),
        tree_alloc as f64 / 1048576.0,
        tree_alloc as f64 / (256u64 << 20) as f64
    );
    drop(pair);
    drop(c);
    Ok(())
}

/// One incremental pass at 1% written, `reps` times: a dump with kept
/// tracking, 1% of the pages written, a dump with `--parent` (its first
/// pass, tracker collected, layout checked, written pages copied) vs the
/// bare collect + copy of the same pages in this process: `PAGEMAP_SCAN`
/// get-and-reset of the written pages over the buffer (the tracker's own
/// uffd-wp registration), `process_vm_readv` of them, written into a file.
/// The same pages are written twice (before the bare copy, whose reset
/// pagescope's tracker would otherwise miss, and again before the dump),
/// so the dump sees exactly what the bare copy saw.
fn incremental(c: &Child, ctl: &Control, pages: u64, reps: u64) -> anyhow::Result<()> {
    let (mut ours, mut bares, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut stored = 0;
    let mut written = Vec::new();
    for rep in 0..reps {
        let g0 = scratch("g0");
        pagescope_dump(c.pid, &g0, |o| {
            o.max_iterations = 0;
            o.keep_tracking = true;
        })?;
        let seed = 0xfeed + rep;
        ctl.burst(pages / 100, seed);
        let (bare, found) = bare_collect_copy(c.pid, c.base, pages, &scratch("bare-inc.pages"))?;
        let _ = std::fs::remove_file(scratch("bare-inc.pages"));
        written = pick(pages, pages / 100, seed);
        if found != written {
            eprintln!(
                "the bare collect found {} written pages, {} were written",
                found.len(),
                written.len()
            );
        }
        ctl.burst(pages / 100, seed);
        let (r, _) = pagescope_dump(c.pid, &scratch("g1"), |o| {
            o.max_iterations = 0;
            o.parent = Some(g0.clone());
        })?;
        let _ = std::fs::remove_dir_all(scratch("g1"));
        let _ = std::fs::remove_dir_all(&g0);
        let inc = Duration::from_secs_f64(r.iterations[0].seconds);
        stored = r.stored_pages;
        ratios.push(Duration::from_secs_f64(
            inc.as_secs_f64() / bare.as_secs_f64(),
        ));
        ours.push(inc);
        bares.push(bare);
    }
    eprintln!("incremental pass {ours:?}\nbare collect + copy {bares:?}");
    let (inc, bare, ratio) = (median(ours), median(bares), median(ratios));
    println!(
        "| one incremental pass at 1% written ({} pages; kept tracking, `--parent`) vs bare PAGEMAP_SCAN get+reset + copy of those pages (ms, median of {reps}; ratio: median of the runs' ratios) | {:.1} | {:.1} | {:.2}x |",
        written.len(),
        inc.as_secs_f64() * 1e3,
        bare.as_secs_f64() * 1e3,
        ratio.as_secs_f64()
    );
    println!(
        "| pages stored by that incremental image vs pages written | {stored} | {} | |",
        written.len()
    );
    Ok(())
}

/// The bare collect + copy: `PAGEMAP_SCAN` get-and-reset of the written
/// pages of the `pages` at `base` (registered uffd-wp async by a kept
/// tracker), then [`bare_copy`] of them. The time and the pages found.
fn bare_collect_copy(
    pid: u32,
    base: u64,
    pages: u64,
    file: &Path,
) -> anyhow::Result<(Duration, Vec<u64>)> {
    let t = Instant::now();
    let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap"))?;
    let mut regions = RegionBuf::new(4096);
    let mut found = Vec::new();
    let range = VirtRange::new(
        VirtAddr::new(base),
        VirtAddr::new(base + pages * PAGE as u64),
    )
    .ok_or_else(|| anyhow::anyhow!("empty range at {base:#x}"))?;
    wp_get_and_reset(pagemap.as_fd(), range, &mut regions, |w| {
        found.extend((w.start().get() - base) / PAGE as u64..(w.end().get() - base) / PAGE as u64);
    })?;
    bare_copy(pid, base, &found, file)?;
    Ok((t.elapsed(), found))
}

/// A child with `len` bytes written and a grandchild forked after, both
/// idle: every page shared copy-on-write.
fn spawn_pair(ctl: &Control, len: usize) -> anyhow::Result<(Child, Child)> {
    // SAFETY: single-threaded (see `spawn`).
    let pid = unsafe { libc::fork() };
    anyhow::ensure!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let Ok(m) = OwnedMapping::anonymous(len, 2 << 20) else {
            std::process::exit(1)
        };
        for p in 0..len / PAGE {
            let _ = m.write(p * PAGE, &(p as u64 + 7).to_ne_bytes());
        }
        // SAFETY: single-threaded child.
        let g = unsafe { libc::fork() };
        if g == 0 {
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        ctl.slot(BASE)
            .store(u64::from(g.unsigned_abs()), Ordering::SeqCst);
        ctl.slot(READY).store(1, Ordering::SeqCst);
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    while ctl.slot(READY).load(Ordering::SeqCst) == 0 {
        std::thread::sleep(Duration::from_millis(10));
    }
    let g = ctl.slot(BASE).load(Ordering::SeqCst) as u32;
    Ok((
        Child {
            pid: pid.cast_unsigned(),
            base: 0,
        },
        Child { pid: g, base: 0 },
    ))
}
