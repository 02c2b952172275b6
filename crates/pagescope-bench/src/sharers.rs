//! "Tracking N sharers of one object": N processes map one 1 GiB memfd
//! shared and writable and together write 1% of its pages between
//! collects. pagescope tracks one of them (`attach`, default options), so
//! the other N-1 are tracked as sharers with their own injected
//! userfaultfds and the writes are joined in object space. The baseline is
//! the bare per-process loop: one `PAGEMAP_SCAN` get-and-reset over each
//! process's mapping of the memfd (the same registrations), nothing else.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use pagescope::dirty::{TrackOptions, WriteSource, attach_owned};
use pagescope::raw::OwnedMapping;
use pagescope::raw::pagemap_scan::RegionBuf;
use pagescope::raw::wp_get_and_reset;
use pagescope::{KernelCaps, Target, VirtRange};

use crate::util::{arg, median, ms};

const PAGE: usize = 4096;

/// One child process mapping the memfd, writing pages when told.
struct Writer {
    pid: u32,
    sock: UnixStream,
}

impl Writer {
    /// Writes `count` distinct pseudo-random pages (from `seed`) and waits
    /// until it has.
    fn write(&mut self, seed: u64, count: u64) -> anyhow::Result<()> {
        let mut msg = [0u8; 16];
        msg[..8].copy_from_slice(&seed.to_ne_bytes());
        msg[8..].copy_from_slice(&count.to_ne_bytes());
        self.sock.write_all(&msg)?;
        let mut ack = [0u8];
        self.sock.read_exact(&mut ack)?;
        Ok(())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        let _ = rustix::process::waitpid(
            rustix::process::Pid::from_raw(self.pid.cast_signed()),
            rustix::process::WaitOptions::empty(),
        );
    }
}

/// Distinct pseudo-random page indices below `pages`.
fn pick(pages: u64, n: u64, seed: u64) -> Vec<u64> {
    let mut x = seed | 1;
    let mut set = std::collections::BTreeSet::new();
    while (set.len() as u64) < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        set.insert(x % pages);
    }
    set.into_iter().collect()
}

/// The child's loop: write what it is told into `m`, until the socket
/// closes.
fn serve(m: &OwnedMapping, mut sock: UnixStream, pages: u64) -> ! {
    let mut msg = [0u8; 16];
    let mut value = 0u64;
    while sock.read_exact(&mut msg).is_ok() {
        let seed = u64::from_ne_bytes(msg[..8].try_into().unwrap_or_default());
        let count = u64::from_ne_bytes(msg[8..].try_into().unwrap_or_default());
        for p in pick(pages, count, seed) {
            value += 1;
            let _ = m.write(p as usize * PAGE + 64, &value.to_ne_bytes());
        }
        if sock.write_all(b"k").is_err() {
            break;
        }
    }
    std::process::exit(0)
}

/// Forks `n` writers sharing `m` (must run before this process starts any
/// thread).
fn fork_writers(m: &OwnedMapping, n: usize, pages: u64) -> anyhow::Result<Vec<Writer>> {
    let mut out = Vec::new();
    for _ in 0..n {
        let (ours, theirs) = UnixStream::pair()?;
        // SAFETY: the benchmark is single-threaded here (this runs first in
        // its own subcommand), so the child may run ordinary code.
        let pid = unsafe { libc::fork() };
        anyhow::ensure!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            drop(ours);
            serve(m, theirs, pages);
        }
        out.push(Writer {
            pid: pid.cast_unsigned(),
            sock: ours,
        });
    }
    Ok(out)
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let gib = arg(args, "--gib", 1);
    let reps = arg(args, "--reps", 5);
    let caps = KernelCaps::probe();
    anyhow::ensure!(
        caps.has_uffd_wp_async() && rustix::process::geteuid().is_root(),
        "needs root and userfaultfd WP_ASYNC with PAGEMAP_SCAN (Linux 6.7+)"
    );
    let len = (gib << 30) as usize;
    let pages = (len / PAGE) as u64;
    println!(
        "| read+reset, {gib} GiB memfd, 1% written per round (median of {reps}) | processes | written | pagescope ms | bare ioctl loop ms | pagescope / bare |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for n in [1usize, 4, 16] {
        let fd =
            rustix::fs::memfd_create("pagescope-bench-sharers", rustix::fs::MemfdFlags::CLOEXEC)?;
        rustix::fs::ftruncate(&fd, len as u64)?;
        let m = OwnedMapping::file(fd.as_fd(), 0, len, true, true)?;
        for p in 0..pages as usize {
            m.write_byte(p * PAGE, 1)?;
        }
        let mut writers = fork_writers(&m, n, pages)?;
        // The benchmark process itself must not be one of the writers.
        drop(m);
        drop(fd);
        let (lib, bare, written) = measure(&caps, &mut writers, pages, reps)?;
        println!(
            "| | {n} | {written} | {:.2} | {:.2} | {:.2}x |",
            ms(lib),
            ms(bare),
            ms(lib) / ms(bare)
        );
    }
    Ok(())
}

fn measure(
    caps: &KernelCaps,
    writers: &mut [Writer],
    pages: u64,
    reps: u64,
) -> anyhow::Result<(std::time::Duration, std::time::Duration, u64)> {
    let n = writers.len() as u64;
    let per = pages / 100 / n;
    let written = per * n;
    let mut tracker = attach_owned(
        Target::open(writers[0].pid)?,
        caps,
        &TrackOptions::default(),
    )?;
    anyhow::ensure!(tracker.degraded().is_none(), "{:?}", tracker.degraded());
    tracker.collect()?;
    let mappings: Vec<(std::fs::File, VirtRange)> = writers
        .iter()
        .map(|w| memfd_mapping(w.pid))
        .collect::<anyhow::Result<_>>()?;
    let mut vec = RegionBuf::new(16 * 1024);
    let (mut lib, mut bare) = (Vec::new(), Vec::new());
    for rep in 0..reps {
        let write_round = |writers: &mut [Writer], salt: u64| -> anyhow::Result<()> {
            for (i, w) in writers.iter_mut().enumerate() {
                // Disjoint pages per writer: seeds differ, and each picks
                // from its own slice of the object.
                w.write(
                    (rep << 20) ^ (salt << 10) ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                    per,
                )?;
            }
            Ok(())
        };
        write_round(writers, 1)?;
        let t = Instant::now();
        let r = tracker.collect()?;
        lib.push(t.elapsed());
        let obj = r
            .objects
            .first()
            .ok_or_else(|| anyhow::anyhow!("no object writes"))?;
        anyhow::ensure!(
            obj.sources
                .iter()
                .all(|(s, _)| s.is_exact() || *s == WriteSource::ObjectFilled),
            "over-reported: {:?}",
            obj.sources
        );
        anyhow::ensure!(
            obj.written_pages >= written * 99 / 100 && obj.written_pages <= written,
            "pagescope reported {} of ~{written} object pages: {obj:?} events {:?}",
            obj.written_pages,
            r.events
        );
        write_round(writers, 2)?;
        let t = Instant::now();
        let mut found = 0;
        for (pagemap, range) in &mappings {
            wp_get_and_reset(pagemap.as_fd(), *range, &mut vec, |w| {
                found += w.len() / PAGE as u64
            })?;
        }
        bare.push(t.elapsed());
        anyhow::ensure!(
            found >= written * 99 / 100,
            "bare loop found {found} of ~{written}"
        );
    }
    Ok((median(lib), median(bare), written))
}

/// The process's pagemap and its mapping of the memfd.
fn memfd_mapping(pid: u32) -> anyhow::Result<(std::fs::File, VirtRange)> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let line = maps
        .lines()
        .find(|l| l.contains("pagescope-bench-sharers"))
        .ok_or_else(|| anyhow::anyhow!("process {pid} does not map the memfd"))?;
    let range: VirtRange = line.split_whitespace().next().unwrap_or("").parse()?;
    Ok((std::fs::File::open(format!("/proc/{pid}/pagemap"))?, range))
}
