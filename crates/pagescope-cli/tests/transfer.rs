//! `send` and `receive` between real processes on loopback: an unmodified
//! python3 writer with a memfd sent into an image directory (then
//! `verify` against the stopped process: no difference), its memfd alone
//! into a file (byte-identical to the memfd at the stop), the stream over
//! stdin/stdout pipes; authentication (wrong or missing key refused,
//! non-loopback listening refused without one); every malformed-stream
//! case from a hostile python3 sender: a one-line error, the documented
//! exit code, nothing written.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::programs::{Scratch, usable};
use common::transfer::{
    ABORTED, AUTH, BAD_STREAM, CONNECTION, HANDSHAKE, Receiver, code, program, text, writer,
};
use common::{cli, exe};

fn verify_clean(dir: &str, pid: u32) {
    let v = cli(&["verify", dir, &pid.to_string(), "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&v.stdout).expect("verify JSON");
    assert_eq!(code(&v), 0, "verify: {report}\n{}", text(&v));
    assert_eq!(report["mismatched_pages"], 0, "{report}");
    assert_eq!(report["process_stopped"], true, "{report}");
}

/// Resumes a process left stopped.
fn resume(pid: u32) {
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(i32::try_from(pid).unwrap()).unwrap(),
        rustix::process::Signal::CONT,
    );
}

/// `pagescope send PID --to ADDR EXTRA...`.
fn send_to(pid: u32, addr: &str, extra: &[&str]) -> std::process::Output {
    let pid = pid.to_string();
    let mut args = vec!["send", &pid, "--to", addr];
    args.extend_from_slice(extra);
    cli(&args)
}

#[test]
fn a_python_writer_sent_into_an_image_verifies_against_the_stopped_process() {
    if !usable() {
        return;
    }
    let scratch = Scratch::new("send-image");
    let w = writer();
    let pid = w.0.id();
    let img = scratch.p("img");
    let r = Receiver::listen("127.0.0.1:0", &["-o", &img]);
    let s = send_to(pid, &r.addr, &["--leave-stopped", "--max-iterations", "2"]);
    let (rc, rerr) = r.finish();
    assert_eq!(code(&s), 0, "send: {}", text(&s));
    assert_eq!(rc, 0, "receive: {rerr}");
    assert!(text(&s).contains("receiver: image"), "{}", text(&s));
    verify_clean(&img, pid);
    let show = cli(&["image", "show", &img]);
    assert_eq!(code(&show), 0, "{}", text(&show));
    resume(pid);
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
fn one_memfd_into_a_file_is_byte_identical_to_the_memfd_at_the_stop() {
    if !usable() {
        return;
    }
    let scratch = Scratch::new("send-into");
    let w = writer();
    let pid = w.0.id();
    let file = scratch.p("ram.bin");
    let r = Receiver::listen("127.0.0.1:0", &["--into", &file]);
    let s = send_to(
        pid,
        &r.addr,
        &[
            "--object",
            "memfd:guest-ram",
            "--leave-stopped",
            "--max-iterations",
            "2",
        ],
    );
    let (rc, rerr) = r.finish();
    assert_eq!(code(&s), 0, "send: {}", text(&s));
    assert_eq!(rc, 0, "receive: {rerr}");
    let got = std::fs::read(&file).unwrap();
    let want = std::fs::read(memfd_of(pid)).unwrap();
    assert_eq!(got.len(), 64 << 20);
    assert!(got == want, "FILE differs from the memfd");
    assert!(!Path::new(&format!("{file}.partial")).exists());
    // An image receiver refuses an object stream (and the reverse).
    let r = Receiver::listen("127.0.0.1:0", &["-o", &scratch.p("img")]);
    let s = send_to(pid, &r.addr, &["--object", "memfd:guest-ram"]);
    let (rc, rerr) = r.finish();
    assert_eq!(
        (code(&s), rc),
        (HANDSHAKE, HANDSHAKE),
        "{}\n{rerr}",
        text(&s)
    );
    assert!(text(&s).contains("must not use --object"), "{}", text(&s));
    assert!(!Path::new(&scratch.p("img")).exists());
    resume(pid);
}

#[test]
fn the_stream_runs_over_stdin_and_stdout_pipes() {
    if !usable() {
        return;
    }
    let scratch = Scratch::new("send-pipe");
    let w = writer();
    let pid = w.0.id();
    let img = scratch.p("img");
    let mut r = Command::new(exe())
        .args(["receive", "--from", "-", "-o", &img])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let to_r = r.stdin.take().unwrap();
    let from_r = r.stdout.take().unwrap();
    let s = Command::new(exe())
        .args([
            "send",
            &pid.to_string(),
            "--to",
            "-",
            "--leave-stopped",
            "--max-iterations",
            "1",
        ])
        .stdin(Stdio::from(from_r))
        .stdout(Stdio::from(to_r))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let rc = r.wait().unwrap().code();
    assert_eq!(code(&s), 0, "send: {}", text(&s));
    assert_eq!(rc, Some(0));
    verify_clean(&img, pid);
    resume(pid);
}

#[test]
fn a_wrong_or_missing_key_is_refused_and_nothing_is_written() {
    if !usable() {
        return;
    }
    let scratch = Scratch::new("send-psk");
    let (key, other) = (scratch.p("key"), scratch.p("other"));
    std::fs::write(&key, "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::write(&other, "fedcba9876543210fedcba9876543210\n").unwrap();
    let w = writer();
    let pid = w.0.id().to_string();
    let img = scratch.p("img");
    for sender_key in [Some(&other), None] {
        let r = Receiver::listen("127.0.0.1:0", &["-o", &img, "--psk-file", &key]);
        let mut args = vec!["send", &pid, "--to", &r.addr];
        if let Some(k) = sender_key {
            args.extend(["--psk-file", k]);
        }
        let s = cli(&args);
        let (rc, rerr) = r.finish();
        assert_eq!(
            (code(&s), rc),
            (AUTH, AUTH),
            "send: {}\nreceive: {rerr}",
            text(&s)
        );
        assert_eq!(text(&s).lines().count(), 1, "{}", text(&s));
        assert!(text(&s).contains("send to 127.0.0.1:"), "{}", text(&s));
        assert!(!Path::new(&img).exists(), "nothing written");
    }
    // The right key, listening on every address (allowed with a key).
    let r = Receiver::listen("0.0.0.0:0", &["-o", &img, "--psk-file", &key]);
    let port = r.addr.rsplit(':').next().unwrap().to_owned();
    let s = cli(&[
        "send",
        &pid,
        "--to",
        &format!("127.0.0.1:{port}"),
        "--psk-file",
        &key,
        "--max-iterations",
        "0",
    ]);
    let (rc, rerr) = r.finish();
    assert_eq!(
        (code(&s), rc),
        (0, 0),
        "send: {}\nreceive: {rerr}",
        text(&s)
    );
    assert!(Path::new(&img).join("HEADER").exists());
}

#[test]
fn listening_beyond_loopback_without_a_key_is_refused() {
    let scratch = Scratch::new("send-nokey");
    let o = cli(&["receive", "--listen", "0.0.0.0:0", "-o", &scratch.p("img")]);
    assert_eq!(code(&o), AUTH, "{}", text(&o));
    assert!(
        text(&o).contains("receive on 0.0.0.0:0") && text(&o).contains("--psk-file"),
        "{}",
        text(&o)
    );
    assert_eq!(text(&o).lines().count(), 1);
}

/// Each hostile case: the receiver's exit code and what its line says.
const CASES: &[(&str, i32, &str)] = &[
    ("magic", HANDSHAKE, "wrong magic"),
    ("version", HANDSHAKE, "version 9 is not supported"),
    ("mode", HANDSHAKE, "must not use --object"),
    ("huge", BAD_STREAM, "frame length"),
    ("outside", BAD_STREAM, "outside store 0"),
    ("toolarge", BAD_STREAM, "pages, more than"),
    ("badsum", BAD_STREAM, "checksum"),
    ("datalen", BAD_STREAM, "bytes of data"),
    ("unopened", BAD_STREAM, "never opened"),
    ("totals", BAD_STREAM, "the commit counts"),
    ("midrecord", BAD_STREAM, "mid-record"),
    ("badname", BAD_STREAM, "not a store name"),
    ("eof", CONNECTION, "ended before its commit"),
    ("abort", ABORTED, "the sender aborted"),
    ("vma", 0, ""),
    ("two", 0, ""),
];

#[test]
fn every_malformed_stream_gives_one_line_an_exit_code_and_writes_nothing() {
    let scratch = Scratch::new("bad-stream");
    for &(case, want, says) in CASES {
        for into in [false, true] {
            let target = scratch.p("out");
            let (dest, mode) = if into {
                ("--into", "object")
            } else {
                ("-o", "image")
            };
            let r = Receiver::listen("127.0.0.1:0", &[dest, &target]);
            let p = Command::new("python3")
                .args([&program("bad_stream.py"), &r.addr, case, mode])
                .output()
                .unwrap();
            assert!(p.status.success(), "{case}: {}", text(&p));
            let (rc, rerr) = r.finish();
            let (want, says) = match (case, into) {
                ("mode", true) => (HANDSHAKE, "needs --object"),
                ("vma" | "two", true) => (BAD_STREAM, "exactly one shared object"),
                ("vma" | "two", false) => continue,
                _ => (want, says),
            };
            assert_eq!(rc, want, "{case} (into {into}): {rerr}");
            assert_eq!(rerr.lines().count(), 1, "{case}: {rerr}");
            assert!(
                rerr.starts_with("pagescope: receive on 127.0.0.1:"),
                "{case}: {rerr}"
            );
            assert!(rerr.contains(says), "{case} (into {into}): {rerr}");
            let left: Vec<_> = std::fs::read_dir(&scratch.0)
                .unwrap()
                .filter_map(Result::ok)
                .map(|e| e.file_name())
                .collect();
            assert!(left.is_empty(), "{case} (into {into}) left {left:?}");
        }
    }
}
