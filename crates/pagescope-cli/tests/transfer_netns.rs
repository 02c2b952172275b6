//! `send` and `receive` across a real link: a pair of network namespaces
//! (`ip netns add`) joined by a veth pair with its own addresses, the
//! sender in one, the receiver in the other, so the receiver listens on a
//! non-loopback address and needs a pre-shared key. An unmodified python3
//! writer with a memfd is sent into an image (`verify` against the stopped
//! process: no difference) and its memfd alone into a file (byte-identical
//! at the stop); a receiver without a key refuses to listen, a sender
//! without the key or with a wrong one is refused; `--bandwidth` holds the
//! stream to the cap (time against bytes, measured, generous bounds); a
//! writer faster than the capped link makes pre-copy stop at
//! `--max-iterations` / `--max-time` and report that it did not converge,
//! a slow writer converges. The namespaces are removed by a guard, also
//! when a test fails; their names are unique per test and process.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use common::programs::{Proc, Scratch, start, usable};
use common::transfer::{AUTH, code, text, writer};
use common::{cli, exe, skip};

/// Exit code of an authentication failure (`docs/stream-format.md`).
/// The receiver's side of the link.
const RECEIVER_IP: &str = "10.199.53.2";
/// The sender's side of the link.
const SENDER_IP: &str = "10.199.53.1";

/// Two network namespaces joined by a veth pair, removed on drop.
struct NetnsPair {
    sender: String,
    receiver: String,
}

impl NetnsPair {
    /// The pair for test `tag` (unique per test and process), or `None`
    /// (skipped) without root or `ip`.
    fn new(tag: &str) -> Option<Self> {
        if !usable() {
            return None;
        }
        if Command::new("ip").arg("-V").output().is_err() {
            skip("the network namespace tests need `ip` (iproute2)");
            return None;
        }
        static PAIRS: AtomicU32 = AtomicU32::new(0);
        let n = PAIRS.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // The guard exists before anything is created.
        let pair = Self {
            sender: format!("pgs-{pid}-{n}-{tag}-s"),
            receiver: format!("pgs-{pid}-{n}-{tag}-r"),
        };
        // Interface names: 15 bytes at most.
        let (vs, vr) = (
            format!("pv{}-{n}s", pid % 1_000_000),
            format!("pv{}-{n}r", pid % 1_000_000),
        );
        let (vs, vr) = (vs.as_str(), vr.as_str());
        pair.ip(&["netns", "add", &pair.sender]);
        pair.ip(&["netns", "add", &pair.receiver]);
        pair.ip(&[
            "link",
            "add",
            vs,
            "netns",
            &pair.sender,
            "type",
            "veth",
            "peer",
            "name",
            vr,
            "netns",
            &pair.receiver,
        ]);
        for (ns, dev, ip) in [
            (&pair.sender, vs, SENDER_IP),
            (&pair.receiver, vr, RECEIVER_IP),
        ] {
            pair.ip(&["-n", ns, "addr", "add", &format!("{ip}/24"), "dev", dev]);
            pair.ip(&["-n", ns, "link", "set", dev, "up"]);
            pair.ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        Some(pair)
    }

    fn ip(&self, args: &[&str]) {
        let o = Command::new("ip").args(args).output().expect("run ip");
        assert!(
            o.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// `pagescope ARGS` inside namespace `ns`.
    fn pagescope(ns: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(exe()).args(args);
        c
    }

    /// `pagescope send PID --to ADDR EXTRA...` from the sender's namespace.
    fn send(&self, pid: u32, addr: &str, extra: &[&str]) -> Output {
        let pid = pid.to_string();
        let mut args = vec!["send", &pid, "--to", addr];
        args.extend_from_slice(extra);
        Self::pagescope(&self.sender, &args)
            .output()
            .expect("run send")
    }

    /// A receiver in the receiver's namespace, listening on its address.
    fn receive(&self, args: &[&str]) -> Receiver {
        let listen = format!("{RECEIVER_IP}:0");
        let mut a = vec!["receive", "--listen", &listen];
        a.extend_from_slice(args);
        Receiver::start(Self::pagescope(&self.receiver, &a))
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        // Removing a namespace destroys the veth end in it, and with it
        // the pair.
        for ns in [&self.sender, &self.receiver] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// A receiver: it and the address it listens on (killed on drop if it
/// still runs).
struct Receiver {
    child: Child,
    /// Empty if it did not listen.
    addr: String,
    /// Its first line, if not that it listens (its error).
    said: String,
    stderr: BufReader<std::process::ChildStderr>,
}

impl Receiver {
    fn start(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start receive");
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        stderr.read_line(&mut line).unwrap();
        let (addr, said) = match line.trim().strip_prefix("pagescope: listening on ") {
            Some(a) => (a.to_owned(), String::new()),
            None => (String::new(), line),
        };
        Self {
            child,
            addr,
            said,
            stderr,
        }
    }

    /// Its exit code and the rest of its stderr.
    fn finish(mut self) -> (i32, String) {
        let mut rest = std::mem::take(&mut self.said);
        self.stderr.read_to_string(&mut rest).unwrap();
        let code = self.child.wait().unwrap().code().unwrap_or(-1);
        (code, rest)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The report: the last NDJSON line of `send --json`.
fn report(o: &Output) -> serde_json::Value {
    let out = String::from_utf8_lossy(&o.stdout);
    let last = out.lines().last().unwrap_or_default();
    let r: serde_json::Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("send's last line {last:?}: {e}\n{}", text(o)));
    assert_eq!(r["event"], "report", "{r}");
    r
}

/// Resumes a process left stopped.
fn resume(pid: u32) {
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(i32::try_from(pid).unwrap()).unwrap(),
        rustix::process::Signal::CONT,
    );
}

/// A memfd `netns-ram` of MIB MiB, every page non-zero, then RATE
/// distinct pages written per second (never to zero) for SECONDS.
const RATE_WRITER: &str = r#"
import mmap, os, sys, time
mib, rate, seconds = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
PAGE = mmap.PAGESIZE
size = mib << 20
pages = size // PAGE
fd = os.memfd_create("netns-ram")
os.ftruncate(fd, size)
m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
for i in range(pages):
    m[i * PAGE:(i + 1) * PAGE] = bytes([1 + i % 250]) * PAGE
print("ready", flush=True)
start = time.monotonic()
done = 0
while time.monotonic() - start < seconds:
    due = int((time.monotonic() - start) * rate)
    while done < due:
        at = (done % pages) * PAGE
        m[at] = m[at] % 250 + 1
        done += 1
    time.sleep(0.002)
"#;

fn rate_writer(mib: u32, rate: u32) -> Proc {
    let (p, line) = start(Command::new("python3").args([
        "-c",
        RATE_WRITER,
        &mib.to_string(),
        &rate.to_string(),
        "600",
    ]));
    assert_eq!(line, "ready");
    p
}

/// The memfd `name` process `pid` holds, as `/proc/PID/fd/N`.
fn memfd_of(pid: u32, name: &str) -> String {
    let want = format!("/memfd:{name}");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(Result::ok)
        .find(|e| {
            std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with(&want))
        })
        .map(|e| e.path().display().to_string())
        .expect("the writer's memfd")
}

fn key_files(scratch: &Scratch) -> (String, String) {
    let (key, other) = (scratch.p("key"), scratch.p("other"));
    std::fs::write(&key, "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::write(&other, "fedcba9876543210fedcba9876543210\n").unwrap();
    (key, other)
}

#[test]
fn a_python_writer_crosses_the_link_with_the_key_and_verifies() {
    let Some(net) = NetnsPair::new("image") else {
        return;
    };
    let scratch = Scratch::new("netns-image");
    let (key, _) = key_files(&scratch);
    let w = writer();
    let pid = w.0.id();
    let img = scratch.p("img");
    let r = net.receive(&["-o", &img, "--psk-file", &key]);
    assert!(r.addr.starts_with(RECEIVER_IP), "listening on {:?}", r.addr);
    let s = net.send(
        pid,
        &r.addr,
        &[
            "--psk-file",
            &key,
            "--leave-stopped",
            "--max-iterations",
            "2",
        ],
    );
    let (rc, rerr) = r.finish();
    assert_eq!(code(&s), 0, "send: {}", text(&s));
    assert_eq!(rc, 0, "receive: {rerr}");
    assert!(text(&s).contains("receiver: image"), "{}", text(&s));
    let v = cli(&["verify", &img, &pid.to_string(), "--json"]);
    let verdict: serde_json::Value = serde_json::from_slice(&v.stdout).expect("verify JSON");
    assert_eq!(code(&v), 0, "verify: {verdict}\n{}", text(&v));
    assert_eq!(verdict["mismatched_pages"], 0, "{verdict}");
    assert_eq!(verdict["process_stopped"], true, "{verdict}");
    let show = cli(&["image", "show", &img]);
    assert_eq!(code(&show), 0, "{}", text(&show));
    resume(pid);
}

#[test]
fn beyond_loopback_a_missing_or_wrong_key_is_refused_and_nothing_is_written() {
    let Some(net) = NetnsPair::new("auth") else {
        return;
    };
    let scratch = Scratch::new("netns-auth");
    let (key, other) = key_files(&scratch);
    let w = rate_writer(1, 10);
    let img = scratch.p("img");
    // A receiver without a key does not listen on the link's address.
    let r = net.receive(&["-o", &img]);
    let (rc, rerr) = r.finish();
    assert_eq!(rc, AUTH, "{rerr}");
    assert_eq!(rerr.lines().count(), 1, "{rerr}");
    assert!(rerr.contains("--psk-file"), "{rerr}");
    for sender_key in [None, Some(&other)] {
        let r = net.receive(&["-o", &img, "--psk-file", &key]);
        let mut extra = vec!["--max-iterations", "0"];
        if let Some(k) = sender_key {
            extra.extend(["--psk-file", k]);
        }
        let s = net.send(w.0.id(), &r.addr, &extra);
        let (rc, rerr) = r.finish();
        assert_eq!(
            (code(&s), rc),
            (AUTH, AUTH),
            "send: {}\nreceive: {rerr}",
            text(&s)
        );
        assert_eq!(text(&s).lines().count(), 1, "{}", text(&s));
        assert!(!Path::new(&img).exists(), "nothing written");
    }
}

#[test]
fn the_bandwidth_cap_holds_across_the_link_and_the_memfd_arrives_whole() {
    let Some(net) = NetnsPair::new("cap") else {
        return;
    };
    let scratch = Scratch::new("netns-cap");
    let (key, _) = key_files(&scratch);
    let w = rate_writer(8, 20);
    let pid = w.0.id();
    let file = scratch.p("ram.bin");
    let cap: f64 = 4.0 * 1048576.0;
    let r = net.receive(&["--into", &file, "--psk-file", &key]);
    let t0 = Instant::now();
    let s = net.send(
        pid,
        &r.addr,
        &[
            "--psk-file",
            &key,
            "--object",
            "memfd:netns-ram",
            "--bandwidth",
            "4M",
            "--max-iterations",
            "1",
            "--leave-stopped",
            "--json",
        ],
    );
    let wall = t0.elapsed().as_secs_f64();
    let (rc, rerr) = r.finish();
    assert_eq!(code(&s), 0, "send: {}", text(&s));
    assert_eq!(rc, 0, "receive: {rerr}");
    let rep = report(&s);
    let bytes = rep["bytes_sent"].as_f64().unwrap();
    let seconds = rep["seconds"].as_f64().unwrap();
    let measured = rep["bandwidth_bytes_s"].as_f64().unwrap();
    eprintln!(
        "--bandwidth 4M: {bytes} bytes in {seconds:.2} s ({:.2} MiB/s; measured {:.2} MiB/s; wall {wall:.2} s)",
        bytes / seconds / 1048576.0,
        measured / 1048576.0
    );
    // 8 MiB of memfd at least: never faster than the cap (one frame of
    // 50 ms may go early), and not absurdly slower.
    assert!(bytes >= 8.0 * 1048576.0, "{rep}");
    assert!(
        seconds >= bytes / cap - 0.1,
        "{seconds} s for {bytes} bytes"
    );
    assert!(
        seconds <= bytes / cap * 4.0 + 5.0,
        "{seconds} s for {bytes} bytes"
    );
    assert!(measured > 0.0 && measured <= cap, "{measured}");
    // Every pass is listed with what it sent.
    let passes = rep["passes"].as_array().unwrap();
    assert_eq!(
        passes.len(),
        rep["dump"]["iterations"].as_array().unwrap().len()
    );
    let per_pass: u64 = passes
        .iter()
        .map(|p| p["pages_sent"].as_u64().unwrap())
        .sum();
    assert_eq!(per_pass, rep["pages_sent"].as_u64().unwrap(), "{rep}");
    // The NDJSON before the report: updates and one line per pass.
    let out = String::from_utf8_lossy(&s.stdout);
    let events: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let count = |e: &str| events.iter().filter(|v| v["event"] == e).count();
    assert_eq!(count("pass"), passes.len(), "{out}");
    assert!(count("progress") >= 2, "{out}");
    let got = std::fs::read(&file).unwrap();
    let want = std::fs::read(memfd_of(pid, "netns-ram")).unwrap();
    assert_eq!(got.len(), 8 << 20);
    assert!(got == want, "FILE differs from the memfd at the stop");
    resume(pid);
}

/// `send` of the rate writer's memfd over the link capped at 4 MiB/s
/// with `extra` options: its report.
fn send_capped(tag: &str, mib: u32, rate: u32, extra: &[&str]) -> Option<serde_json::Value> {
    let net = NetnsPair::new(tag)?;
    let scratch = Scratch::new(&format!("netns-{tag}"));
    let (key, _) = key_files(&scratch);
    let w = rate_writer(mib, rate);
    let file = scratch.p("ram.bin");
    let r = net.receive(&["--into", &file, "--psk-file", &key]);
    let mut args = vec![
        "--psk-file",
        &key,
        "--object",
        "memfd:netns-ram",
        "--bandwidth",
        "4M",
        "--json",
    ];
    args.extend_from_slice(extra);
    let s = net.send(w.0.id(), &r.addr, &args);
    let (rc, rerr) = r.finish();
    assert_eq!(code(&s), 0, "send: {}", text(&s));
    assert_eq!(rc, 0, "receive: {rerr}");
    let rep = report(&s);
    eprintln!("{tag}: {}", text(&s));
    Some(rep)
}

#[test]
fn a_writer_faster_than_the_capped_link_stops_at_the_bounds_unconverged() {
    // 1024 pages written over and over at 2000 pages/s: every pass finds
    // them all written, 1 s of the 4 MiB/s link, far over 300 ms.
    let Some(rep) = send_capped(
        "fast",
        4,
        2000,
        &["--max-iterations", "3", "--max-time", "60s"],
    ) else {
        return;
    };
    assert_eq!(rep["converged"], false, "{rep}");
    assert_eq!(rep["precopy_end"], "max_iterations", "{rep}");
    // The full pass, three pre-copy passes, the stopped one.
    assert_eq!(rep["passes"].as_array().unwrap().len(), 5, "{rep}");
    let its = rep["dump"]["iterations"].as_array().unwrap();
    for it in &its[1..4] {
        assert!(it["predicted_downtime_s"].as_f64().unwrap() > 0.3, "{it}");
    }
    let Some(rep) = send_capped(
        "fast-time",
        4,
        2000,
        &["--max-iterations", "100", "--max-time", "2500ms"],
    ) else {
        return;
    };
    assert_eq!(rep["converged"], false, "{rep}");
    assert_eq!(rep["precopy_end"], "max_time", "{rep}");
    assert!(rep["passes"].as_array().unwrap().len() < 100, "{rep}");
}

#[test]
fn a_slow_writer_converges_within_the_downtime_target() {
    // 20 pages/s against 1024 pages/s of link: a pass after the full one
    // has tens of pages, well under 300 ms.
    let Some(rep) = send_capped("slow", 4, 20, &["--max-iterations", "8"]) else {
        return;
    };
    assert_eq!(rep["converged"], true, "{rep}");
    assert!(
        matches!(
            rep["precopy_end"].as_str(),
            Some("fits_downtime" | "nothing_written")
        ),
        "{rep}"
    );
    let passes = rep["passes"].as_array().unwrap().len();
    assert!(passes < 10, "{rep}");
    let stop = rep["downtime_s"].as_f64().unwrap();
    eprintln!("slow writer: {passes} passes, stopped {:.1} ms", stop * 1e3);
}
