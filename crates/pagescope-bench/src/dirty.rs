//! "Dirty tracking": the target's cost of a first write to a protected page
//! against an unprotected write, and the read+reset cost over a 4 GiB
//! region against the bare PAGEMAP_SCAN loop and against hashing every
//! page. Everything runs in this process (the library's `track_self`).

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use pagescope::dirty::track_self;
use pagescope::raw::pagemap_scan::RegionBuf;
use pagescope::raw::wp_get_and_reset;
use pagescope::raw::{Advice, OwnedMapping};
use pagescope::{KernelCaps, VirtAddr, VirtRange};

use crate::util::{arg, median, ms};

/// Distinct pseudo-random page indices.
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

/// 64-bit hash of one page (multiply-xor over words).
fn hash_page(m: &OwnedMapping, page: usize, buf: &mut [u8]) -> u64 {
    m.read(page * buf.len(), buf).expect("read");
    buf.chunks_exact(8).fold(0xcbf2_9ce4_8422_2325u64, |h, w| {
        (h ^ u64::from_ne_bytes(w.try_into().unwrap_or_default()))
            .wrapping_mul(0x0000_0100_0000_01b3)
    })
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let gib = arg(args, "--gib", 4);
    let reps = arg(args, "--reps", 5);
    let caps = KernelCaps::probe();
    anyhow::ensure!(
        caps.has_uffd_wp_async(),
        "needs userfaultfd WP_ASYNC and PAGEMAP_SCAN (Linux 6.7+)"
    );
    first_write_cost(&caps, reps)?;
    reset_cost(&caps, gib, reps)
}

/// ns per first write to a page: unprotected vs. write-protected (the
/// kernel resolves the WP fault itself).
fn first_write_cost(caps: &KernelCaps, reps: u64) -> anyhow::Result<()> {
    let pages = 16 * 1024;
    let m = OwnedMapping::anonymous(pages * 4096, 0)?;
    m.madvise(0, m.len(), Advice::NoHugePage)?;
    for p in 0..pages {
        m.write_byte(p * 4096, 1)?;
    }
    let write_all = |v: u8| {
        let t = Instant::now();
        for p in 0..pages {
            let _ = m.write_byte(p * 4096 + 64, v);
        }
        t.elapsed()
    };
    let plain = median((0..reps).map(|i| write_all(i as u8)).collect());
    let range = VirtRange::from_start_len(VirtAddr::new(m.addr()), m.len() as u64).unwrap();
    let mut tracker = track_self(&[range], caps)?;
    let mut protected = Vec::new();
    for i in 0..reps {
        tracker.collect()?; // re-protect everything
        protected.push(write_all(0x80 | i as u8));
    }
    let protected = median(protected);
    let per = |d: Duration| d.as_secs_f64() * 1e9 / pages as f64;
    println!(
        "| first write to a page ({} pages, median of {reps}) | ns/page | ratio |",
        pages
    );
    println!("|---|---:|---:|");
    println!(
        "| unprotected (present, writable) | {:.0} | 1.00x |",
        per(plain)
    );
    println!(
        "| write-protected by uffd-wp async | {:.0} | {:.2}x |",
        per(protected),
        per(protected) / per(plain)
    );
    println!();
    Ok(())
}

fn reset_cost(caps: &KernelCaps, gib: u64, reps: u64) -> anyhow::Result<()> {
    let pages = (gib << 30) / 4096;
    eprintln!("populating {gib} GiB ...");
    let m = OwnedMapping::anonymous((pages * 4096) as usize, 0)?;
    m.madvise(0, m.len(), Advice::NoHugePage)?;
    for p in 0..pages as usize {
        m.write_byte(p * 4096, 1)?;
    }
    let range = VirtRange::from_start_len(VirtAddr::new(m.addr()), m.len() as u64).unwrap();
    let mut tracker = track_self(&[range], caps)?;
    tracker.collect()?;
    let pagemap = std::fs::File::open("/proc/self/pagemap")?;
    let mut vec = RegionBuf::new(16 * 1024);
    let mut buf = vec![0u8; 4096];
    let mut hashes: Vec<u64> = (0..pages as usize)
        .map(|p| hash_page(&m, p, &mut buf))
        .collect();
    println!(
        "| read+reset of a {gib} GiB region (median of {reps}) | written | pagescope ms | bare ioctl ms | pagescope / bare | hashing ms | hashing / pagescope |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (label, per_10k) in [("0.01%", 1u64), ("1%", 100), ("10%", 1000)] {
        let n = pages * per_10k / 10_000;
        let (mut lib, mut bare, mut hash) = (Vec::new(), Vec::new(), Vec::new());
        for rep in 0..reps {
            let dirty = pick(pages, n, 0x1234 + rep);
            // Every touch writes a value never written before, so hashing
            // sees every written page change.
            let touch = |v: u64| {
                dirty.iter().for_each(|&p| {
                    m.write(p as usize * 4096 + 128, &v.to_ne_bytes())
                        .expect("write")
                })
            };
            let stamp = (per_10k << 32 ^ rep) << 8;
            touch(stamp | 1);
            let t = Instant::now();
            let r = tracker.collect()?;
            lib.push(t.elapsed());
            anyhow::ensure!(
                r.pages() == n,
                "pagescope reported {} of {n} written pages",
                r.pages()
            );
            touch(stamp | 2);
            let t = Instant::now();
            let mut found = 0;
            wp_get_and_reset(pagemap.as_fd(), range, &mut vec, |w| {
                found += w.len() / 4096
            })?;
            bare.push(t.elapsed());
            anyhow::ensure!(found == n, "bare loop found {found} of {n}");
            touch(stamp | 3);
            let t = Instant::now();
            let mut changed = 0;
            for (p, h) in hashes.iter_mut().enumerate() {
                let now = hash_page(&m, p, &mut buf);
                if now != *h {
                    *h = now;
                    changed += 1;
                }
            }
            hash.push(t.elapsed());
            anyhow::ensure!(changed == n, "hashing found {changed} of {n}");
            tracker.collect()?; // drop the writes the other two methods made
        }
        let (l, b, h) = (median(lib), median(bare), median(hash));
        println!(
            "| {label} | {n} | {:.2} | {:.2} | {:.2}x | {:.0} | {:.0}x |",
            ms(l),
            ms(b),
            ms(l) / ms(b),
            ms(h),
            ms(h) / ms(l)
        );
    }
    Ok(())
}
