//! `send --resume` after a dropped connection: a small TCP proxy between
//! `send` and `receive --resume` forwards the stream frame by frame and
//! drops both sides at a chosen point (mid-handshake, in the middle of a
//! record at seeded random offsets, just before `COMMIT`); a new
//! `send --resume` against a restarted `receive --resume` then completes
//! it. The result must verify against the stopped writer (an unmodified
//! python3 process with a memfd and anonymous memory) like an
//! uninterrupted transfer, and a resumed transfer sends fewer pages than
//! a full one. Also: resuming with no partial state is a full transfer;
//! a partial state of another sender is refused, never merged.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread::JoinHandle;

use common::programs::{Scratch, usable};
use common::transfer::{CONNECTION, HANDSHAKE, Receiver, code, text, writer};
use common::{cli, exe};

/// The frame kind of `COMMIT` (`docs/stream-format.md`).
const COMMIT: u8 = 17;

/// Where the proxy drops the connection.
#[derive(Clone, Copy, Debug)]
enum Cut {
    /// After this many bytes from the sender.
    At(u64),
    /// Halfway into the first frame of this kind.
    InKind(u8),
}

/// A one-connection TCP proxy: the receiver's bytes go back freely, the
/// sender's are forwarded frame by frame until the cut, then both sides
/// are shut down. Its thread returns the bytes forwarded to the receiver.
struct Proxy {
    addr: String,
    thread: JoinHandle<u64>,
}

impl Proxy {
    fn start(to: &str, cut: Cut) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let to = to.to_owned();
        let thread = std::thread::spawn(move || {
            let (sender, _) = listener.accept().unwrap();
            let receiver = TcpStream::connect(&to).unwrap();
            let (mut back_from, mut back_to) =
                (receiver.try_clone().unwrap(), sender.try_clone().unwrap());
            let back = std::thread::spawn(move || {
                let _ = std::io::copy(&mut back_from, &mut back_to);
            });
            let sent = forward(&sender, &receiver, cut);
            let _ = sender.shutdown(Shutdown::Both);
            let _ = receiver.shutdown(Shutdown::Both);
            let _ = back.join();
            sent
        });
        Self { addr, thread }
    }

    fn bytes(self) -> u64 {
        self.thread.join().unwrap()
    }
}

/// Forwards whole frames from `from` to `to` until `cut`; the bytes sent.
fn forward(mut from: &TcpStream, mut to: &TcpStream, cut: Cut) -> u64 {
    let mut sent = 0u64;
    loop {
        let mut len = [0u8; 4];
        if from.read_exact(&mut len).is_err() {
            return sent;
        }
        let n = u32::from_le_bytes(len) as usize;
        let mut frame = len.to_vec();
        frame.resize(4 + n, 0);
        if from.read_exact(&mut frame[4..]).is_err() {
            return sent;
        }
        let keep = match cut {
            Cut::At(limit) => usize::try_from(limit.saturating_sub(sent)).unwrap_or(usize::MAX),
            Cut::InKind(k) if frame[4] == k => frame.len() / 2,
            Cut::InKind(_) => usize::MAX,
        };
        let part = &frame[..frame.len().min(keep)];
        if to.write_all(part).is_err() {
            return sent;
        }
        sent += part.len() as u64;
        if part.len() < frame.len() {
            return sent;
        }
    }
}

/// `pagescope send PID --to ADDR EXTRA...`.
fn send_to(pid: u32, addr: &str, extra: &[&str]) -> std::process::Output {
    let pid = pid.to_string();
    let mut args = vec!["send", &pid, "--to", addr];
    args.extend_from_slice(extra);
    cli(&args)
}

/// The final report of `send --json` (its last line).
fn report(o: &std::process::Output) -> serde_json::Value {
    let out = String::from_utf8_lossy(&o.stdout);
    let last = out
        .lines()
        .last()
        .unwrap_or_else(|| panic!("no report: {}", text(o)));
    serde_json::from_str(last).expect("send's JSON report")
}

fn verify_clean(dir: &str, pid: u32) {
    let v = cli(&["verify", dir, &pid.to_string(), "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&v.stdout).expect("verify JSON");
    assert_eq!(code(&v), 0, "verify: {report}\n{}", text(&v));
    assert_eq!(report["mismatched_pages"], 0, "{report}");
    assert_eq!(report["process_stopped"], true, "{report}");
    let show = cli(&["image", "show", dir]);
    assert_eq!(code(&show), 0, "{}", text(&show));
    assert!(!Path::new(dir).join(".partial-sums").exists());
}

fn cont(pid: u32) {
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(i32::try_from(pid).unwrap()).unwrap(),
        rustix::process::Signal::CONT,
    );
}

/// A small xorshift generator: the cut offsets of a seed.
fn random(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// A first `send` (extra arguments `first`) through a proxy cutting at
/// `cut` into `receive --resume DEST TARGET`: both fail, the partial state
/// stays.
fn interrupted(pid: u32, dest: &[&str], cut: Cut, first: &[&str]) -> u64 {
    let r = Receiver::start(&[&["--resume"], dest].concat());
    let p = Proxy::start(&r.addr, cut);
    let s = send_to(pid, &p.addr, &[&["--max-iterations", "1"], first].concat());
    let forwarded = p.bytes();
    let (rc, rerr) = r.finish();
    assert_ne!(code(&s), 0, "{cut:?}: the cut send succeeded: {}", text(&s));
    if forwarded < 100 {
        // Cut in the hello: nothing was accepted, nothing written.
        assert_eq!(rc, HANDSHAKE, "{cut:?}: {rerr}");
        assert!(!Path::new(dest[1]).exists(), "{cut:?}");
    } else {
        assert_eq!(rc, CONNECTION, "{cut:?}: {rerr}");
        assert!(rerr.contains("kept for --resume"), "{cut:?}: {rerr}");
        assert_eq!(rerr.lines().count(), 1, "{cut:?}: {rerr}");
    }
    forwarded
}

/// `send --resume` into a restarted `receive --resume`: its report.
fn resumed(pid: u32, dest: &[&str], extra: &[&str]) -> serde_json::Value {
    let r = Receiver::start(&[&["--resume"], dest].concat());
    let mut args = vec![
        "--resume",
        "--leave-stopped",
        "--max-iterations",
        "2",
        "--json",
    ];
    args.extend_from_slice(extra);
    let s = send_to(pid, &r.addr, &args);
    let (rc, rerr) = r.finish();
    assert_eq!(code(&s), 0, "resumed send: {}\nreceive: {rerr}", text(&s));
    assert_eq!(rc, 0, "resumed receive: {rerr}");
    report(&s)
}

#[test]
fn a_cut_transfer_resumes_into_an_image_that_verifies_and_sends_fewer_pages() {
    if !usable() {
        return;
    }
    let scratch = Scratch::new("resume-image");
    let w = writer();
    let pid = w.0.id();
    // The full transfer, for its size (resuming with no partial state).
    let full_dir = scratch.p("full");
    let full = resumed(pid, &["-o", &full_dir], &[]);
    verify_clean(&full_dir, pid);
    cont(pid);
    let (full_pages, full_bytes) = (
        full["pages_sent"].as_u64().unwrap(),
        full["bytes_sent"].as_u64().unwrap(),
    );
    assert_eq!(full["resumed"]["pages_kept"], 0, "{full}");
    assert!(full_pages > 16_000, "{full}");
    let mut cuts = vec![(Cut::At(30), false), (Cut::InKind(COMMIT), true)];
    for seed in [1, 2, 3] {
        let mut rng = random(seed);
        let at = (1 << 20) + rng() % (full_bytes * 9 / 10 - (1 << 20));
        cuts.push((Cut::At(at), true));
    }
    for (i, (cut, holds)) in cuts.into_iter().enumerate() {
        let img = scratch.p(&format!("img{i}"));
        let mut forwarded = interrupted(pid, &["-o", &img], cut, &[]);
        if i == 2 {
            // Cut again while resuming: what is held survives that too.
            // (inside what is left to send: most of the rest is kept).
            let again = Cut::At(full_bytes.saturating_sub(forwarded) / 3);
            forwarded += interrupted(pid, &["-o", &img], again, &["--resume"]);
        }
        let r = resumed(pid, &["-o", &img], &[]);
        verify_clean(&img, pid);
        cont(pid);
        let (sent, kept) = (
            r["pages_sent"].as_u64().unwrap(),
            r["resumed"]["pages_kept"].as_u64().unwrap(),
        );
        if holds {
            assert!(kept > 0, "{cut:?} ({forwarded} bytes forwarded): {r}");
            assert!(
                sent < full_pages,
                "{cut:?}: {sent} pages sent, {full_pages} in full: {r}"
            );
        } else {
            assert_eq!(kept, 0, "{cut:?}: {r}");
        }
        if matches!(cut, Cut::InKind(COMMIT)) {
            assert!(
                sent * 4 < full_pages,
                "{cut:?}: {sent} of {full_pages}: {r}"
            );
        }
    }
}

/// The memfd the writer maps, as `/proc/PID/fd/N`.
fn memfd_of(pid: u32) -> String {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(Result::ok)
        .find(|e| {
            std::fs::read_link(e.path())
                .is_ok_and(|l| l.to_string_lossy().starts_with("/memfd:guest-ram"))
        })
        .map(|e| e.path().display().to_string())
        .expect("the writer's memfd")
}

#[test]
fn a_cut_object_transfer_resumes_into_a_byte_identical_file() {
    if !usable() {
        return;
    }
    let scratch = Scratch::new("resume-into");
    let w = writer();
    let pid = w.0.id();
    let file = scratch.p("ram.bin");
    let object = ["--object", "memfd:guest-ram"];
    for seed in [7, 8] {
        let at = (1 << 20) + random(seed)() % (48 << 20);
        interrupted(pid, &["--into", &file], Cut::At(at), &object);
        assert!(Path::new(&format!("{file}.partial")).exists());
        assert!(!Path::new(&file).exists());
        let r = resumed(pid, &["--into", &file], &object);
        assert!(r["resumed"]["pages_kept"].as_u64().unwrap() > 0, "{r}");
        assert!(r["pages_sent"].as_u64().unwrap() < 16384, "{r}");
        let got = std::fs::read(&file).unwrap();
        let want = std::fs::read(memfd_of(pid)).unwrap();
        assert_eq!(got.len(), 64 << 20);
        assert!(got == want, "FILE differs from the memfd (seed {seed})");
        assert!(!Path::new(&format!("{file}.partial")).exists());
        assert!(!Path::new(&format!("{file}.partial.sums")).exists());
        cont(pid);
        std::fs::remove_file(&file).unwrap();
    }
}

#[test]
fn another_senders_partial_state_is_refused_never_merged() {
    if !usable() {
        return;
    }
    let scratch = Scratch::new("resume-other");
    let (a, b) = (writer(), writer());
    let (pa, pb) = (a.0.id(), b.0.id());
    let img = scratch.p("img");
    interrupted(pa, &["-o", &img], Cut::At(8 << 20), &[]);
    let sidecars = Path::new(&img).join(".partial-sums");
    assert!(sidecars.exists());
    // B asks to resume A's transfer: refused on both sides, state kept.
    let r = Receiver::start(&["--resume", "-o", &img]);
    let s = send_to(pb, &r.addr, &["--resume"]);
    let (rc, rerr) = r.finish();
    assert_eq!(
        (code(&s), rc),
        (HANDSHAKE, HANDSHAKE),
        "{}\n{rerr}",
        text(&s)
    );
    assert!(text(&s).contains("another sender"), "{}", text(&s));
    assert_eq!(text(&s).lines().count(), 1, "{}", text(&s));
    assert!(sidecars.exists(), "the partial state is kept");
    // A fresh send from B discards it: a full transfer of B.
    let r = Receiver::start(&["--resume", "-o", &img]);
    let s = send_to(pb, &r.addr, &["--leave-stopped", "--max-iterations", "1"]);
    let (rc, rerr) = r.finish();
    assert_eq!((code(&s), rc), (0, 0), "{}\n{rerr}", text(&s));
    assert!(rerr.contains("discarded"), "{rerr}");
    verify_clean(&img, pb);
    cont(pb);
    // Without --resume a leftover partial state is discarded first.
    let img2 = scratch.p("img2");
    interrupted(pa, &["-o", &img2], Cut::At(8 << 20), &[]);
    let r = Receiver::start(&["-o", &img2]);
    let s = send_to(pa, &r.addr, &["--resume", "--leave-stopped"]);
    let (rc, rerr) = r.finish();
    assert_eq!((code(&s), rc), (0, 0), "{}\n{rerr}", text(&s));
    assert!(text(&s).contains("keeps no partial state"), "{}", text(&s));
    verify_clean(&img2, pa);
    cont(pa);
}

/// Bytes the files under `dir` hold on disk.
fn held_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir).map_or(0, |d| {
        d.filter_map(Result::ok)
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.blocks() * 512)
            .sum()
    })
}

#[test]
fn a_killed_receiver_restarted_with_resume_completes_the_transfer() {
    if !usable() {
        return;
    }
    let scratch = Scratch::new("resume-killed");
    let w = writer();
    let pid = w.0.id();
    let img = scratch.p("img");
    let mut r = Receiver::start(&["--resume", "-o", &img]);
    let mut s = Command::new(exe())
        .args([
            "send",
            &pid.to_string(),
            "--to",
            &r.addr,
            "--bandwidth",
            "32M",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let data = Path::new(&img).join("data");
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while held_bytes(&data) < 16 << 20 && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    r.child.kill().unwrap(); // SIGKILL: no sync, no goodbye
    let _ = r.child.wait();
    let rc = s.wait().unwrap().code();
    assert_ne!(rc, Some(0), "the send outlived its receiver");
    let report = resumed(pid, &["-o", &img], &[]);
    verify_clean(&img, pid);
    let kept = report["resumed"]["pages_kept"].as_u64().unwrap();
    assert!(kept > 2000, "{report}");
    cont(pid);
}

#[test]
fn an_interrupted_sender_aborts_and_the_receiver_keeps_its_state_for_a_resume() {
    if !usable() {
        return;
    }
    let scratch = Scratch::new("resume-sigint");
    let w = writer();
    let pid = w.0.id();
    let img = scratch.p("img");
    let r = Receiver::start(&["--resume", "-o", &img]);
    let mut s = Command::new(exe())
        .args([
            "send",
            &pid.to_string(),
            "--to",
            &r.addr,
            "--bandwidth",
            "32M",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let data = Path::new(&img).join("data");
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while held_bytes(&data) < 16 << 20 && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let sender = rustix::process::Pid::from_raw(i32::try_from(s.id()).unwrap()).unwrap();
    rustix::process::kill_process(sender, rustix::process::Signal::INT).unwrap();
    assert_ne!(s.wait().unwrap().code(), Some(0));
    let (rc, rerr) = r.finish();
    assert_eq!(rc, 24, "{rerr}");
    assert!(rerr.contains("kept for --resume"), "{rerr}");
    let report = resumed(pid, &["-o", &img], &[]);
    verify_clean(&img, pid);
    assert!(
        report["resumed"]["pages_kept"].as_u64().unwrap() > 2000,
        "{report}"
    );
    cont(pid);
}
