//! The floor under `send` → `receive` (BENCHMARKS.md, "Moving memory"):
//! the least work that moves a process's memory over loopback into a
//! tmpfs file, with none of pagescope's (no scan, no tracking, no frames,
//! no image): `process_vm_readv` of the target's buffer in 4 MiB chunks,
//! `write` to a TCP socket; on the other end (a thread of this process)
//! `read` into one buffer and `pwrite` into the file at its offset, then
//! `fsync`. `--sums` adds what the stream format cannot drop: an xxh3 of
//! every page on both sides. `--local` is the same without the socket
//! (`process_vm_readv`, then `pwrite`): the floor under a local dump.
//! `--mmap` receives into a shared mapping of the file instead of
//! `read` + `pwrite` (one copy fewer: what a receiver writing straight
//! into its destination could reach).
//!
//! `scripts/bench-move` runs it against its writer (`f` routes):
//! `pagescope-bench move-floor PID ADDR BYTES OUT [--sums] [--local | --mmap]`
//! prints one JSON line (`seconds`, `cpu_s`: this process's user+system).

#![allow(unsafe_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::time::Instant;

use anyhow::{Context, bail};
use pagescope::raw::image_format::file_sum;

const CHUNK: usize = 4 << 20;
const PAGE: usize = 4096;

/// `move-floor PID ADDR BYTES OUT [--sums] [--local | --mmap]`.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    let [pid, addr, bytes, out, ..] = args else {
        bail!("usage: pagescope-bench move-floor PID ADDR BYTES OUT [--sums] [--local | --mmap]");
    };
    let pid: libc::pid_t = pid.parse().context("PID")?;
    let addr = parse_addr(addr)?;
    let bytes: usize = bytes.parse().context("BYTES")?;
    let sums = args.iter().any(|a| a == "--sums");
    let local = args.iter().any(|a| a == "--local");
    let mmap = args.iter().any(|a| a == "--mmap");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(out)
        .with_context(|| format!("create {out}"))?;
    let start = Instant::now();
    let checked = if local {
        copy_local(pid, addr, bytes, &file, sums)?
    } else {
        copy_over_loopback(pid, addr, bytes, &file, sums, mmap)?
    };
    file.sync_all().context("fsync")?;
    let seconds = start.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(out).ok();
    println!(
        "{}",
        serde_json::json!({
            "seconds": seconds,
            "cpu_s": cpu_seconds(),
            "bytes": bytes,
            "sums": sums,
            "local": local,
            "mmap": mmap,
            "checked": checked,
        })
    );
    Ok(())
}

fn parse_addr(s: &str) -> anyhow::Result<usize> {
    let s = s.trim();
    let hex = s.strip_prefix("0x").unwrap_or(s);
    usize::from_str_radix(hex, 16).with_context(|| format!("address {s:?}"))
}

/// Reads `buf.len()` bytes at `addr` of process `pid`.
fn read_target(pid: libc::pid_t, addr: usize, buf: &mut [u8]) -> anyhow::Result<()> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: one local iovec covering `buf` (valid, writable, exclusively
    // borrowed for the call) and one remote iovec, which the kernel checks
    // against the target's address space.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    if usize::try_from(n).ok() != Some(buf.len()) {
        bail!(
            "process_vm_readv at {addr:#x}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// An xxh3 of every page of `chunk` (as the stream's sums); folded so the
/// work is not optimised away.
fn sum_pages(chunk: &[u8]) -> u64 {
    chunk.chunks(PAGE).fold(0, |acc, p| acc ^ file_sum(p))
}

/// Target → buffer → file.
fn copy_local(
    pid: libc::pid_t,
    addr: usize,
    bytes: usize,
    file: &std::fs::File,
    sums: bool,
) -> anyhow::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut folded = 0;
    for at in (0..bytes).step_by(CHUNK) {
        let chunk = &mut buf[..CHUNK.min(bytes - at)];
        read_target(pid, addr + at, chunk)?;
        if sums {
            folded ^= sum_pages(chunk);
        }
        file.write_all_at(chunk, at as u64).context("pwrite")?;
    }
    Ok(folded)
}

/// Target → buffer → socket, and in a thread socket → buffer → file.
fn copy_over_loopback(
    pid: libc::pid_t,
    addr: usize,
    bytes: usize,
    file: &std::fs::File,
    sums: bool,
    mmap: bool,
) -> anyhow::Result<u64> {
    let listener = TcpListener::bind("127.0.0.1:0").context("listen")?;
    let port = listener.local_addr()?.port();
    std::thread::scope(|s| {
        let receiver = s.spawn(move || -> anyhow::Result<u64> {
            let (mut conn, _) = listener.accept().context("accept")?;
            let folded = if mmap {
                receive_mapped(&mut conn, bytes, file, sums)?
            } else {
                let mut buf = vec![0u8; CHUNK];
                let mut folded = 0;
                for at in (0..bytes).step_by(CHUNK) {
                    let chunk = &mut buf[..CHUNK.min(bytes - at)];
                    conn.read_exact(chunk).context("read")?;
                    if sums {
                        folded ^= sum_pages(chunk);
                    }
                    file.write_all_at(chunk, at as u64).context("pwrite")?;
                }
                folded
            };
            conn.write_all(b"k").context("acknowledge")?;
            Ok(folded)
        });
        let sent = send_all(pid, addr, bytes, port, sums);
        let received = receiver
            .join()
            .map_err(|_| anyhow::anyhow!("the receiver panicked"))??;
        let folded = sent?;
        if received != folded {
            bail!("the sums differ: {folded:#x} sent, {received:#x} received");
        }
        Ok(folded)
    })
}

/// The sending end: target → buffer → socket, then the receiver's
/// acknowledgement.
fn send_all(
    pid: libc::pid_t,
    addr: usize,
    bytes: usize,
    port: u16,
    sums: bool,
) -> anyhow::Result<u64> {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).context("connect")?;
    let mut buf = vec![0u8; CHUNK];
    let mut folded = 0;
    for at in (0..bytes).step_by(CHUNK) {
        let chunk = &mut buf[..CHUNK.min(bytes - at)];
        read_target(pid, addr + at, chunk)?;
        if sums {
            folded ^= sum_pages(chunk);
        }
        conn.write_all(chunk).context("send")?;
    }
    let mut ack = [0u8; 1];
    conn.read_exact(&mut ack).context("wait for the receiver")?;
    Ok(folded)
}

/// The receiving end with `--mmap`: the file mapped shared, each chunk
/// populated (`MADV_POPULATE_WRITE`) and read from the socket straight
/// into it: one copy fewer than `read` + `pwrite`.
fn receive_mapped(
    conn: &mut TcpStream,
    bytes: usize,
    file: &std::fs::File,
    sums: bool,
) -> anyhow::Result<u64> {
    use std::os::fd::AsRawFd;
    file.set_len(bytes as u64).context("size the file")?;
    // SAFETY: a new shared mapping of `bytes` bytes of `file` (sized just
    // above), at an address the kernel picks; unmapped below, and no other
    // reference to it exists meanwhile.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if base == libc::MAP_FAILED {
        bail!("mmap: {}", std::io::Error::last_os_error());
    }
    // SAFETY: the mapping above: `bytes` bytes, readable and writable,
    // borrowed only through this slice until the munmap.
    let map = unsafe { std::slice::from_raw_parts_mut(base.cast::<u8>(), bytes) };
    let mut folded = 0;
    let mut result = Ok(());
    for at in (0..bytes).step_by(CHUNK) {
        let chunk = &mut map[at..at + CHUNK.min(bytes - at)];
        // SAFETY: advice on a range inside the mapping; it changes no
        // memory a reference points at (it only faults pages in).
        unsafe {
            libc::madvise(
                chunk.as_mut_ptr().cast(),
                chunk.len(),
                libc::MADV_POPULATE_WRITE,
            )
        };
        if let Err(e) = conn.read_exact(chunk) {
            result = Err(e);
            break;
        }
        if sums {
            folded ^= sum_pages(chunk);
        }
    }
    // SAFETY: the mapping made above, no longer borrowed.
    unsafe { libc::munmap(base, bytes) };
    result.context("read")?;
    Ok(folded)
}

/// This process's user + system seconds so far.
fn cpu_seconds() -> f64 {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `u` is a writable `rusage` the call fills; RUSAGE_SELF is a
    // valid `who`.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr()) };
    if rc != 0 {
        return f64::NAN;
    }
    // SAFETY: zero-initialised, and filled by a successful getrusage.
    let u = unsafe { u.assume_init() };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(u.ru_utime) + secs(u.ru_stime)
}
