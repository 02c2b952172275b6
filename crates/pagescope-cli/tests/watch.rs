//! `pagescope watch` against unmodified processes started outside
//! pagescope (python writing a buffer in a loop).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{caps, skip};

const WRITER: &str = "import time,sys\nb=bytearray(16<<20)\nsys.stdout.write('ready\\n'); sys.stdout.flush()\nend=time.time()+float(sys.argv[1])\nwhile time.time()<end:\n    for i in range(0,len(b),4096): b[i]=(b[i]+1)%256\n    time.sleep(0.01)\n";

struct Writer(Child);

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn writer(seconds: f64) -> Option<Writer> {
    let mut c = Command::new("python3")
        .args(["-c", WRITER, &seconds.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .ok()?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(c.stdout.take()?), &mut line).ok()?;
    Some(Writer(c))
}

fn has_uw(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("VmFlags:") && l.split(' ').any(|f| f == "uw"))
}

/// A python writer running for `seconds`, if the environment allows the
/// test at all (else skipped with the reason).
fn setup(seconds: f64) -> Option<Writer> {
    if !usable() {
        return None;
    }
    let w = writer(seconds);
    if w.is_none() {
        skip("python3 not available");
    }
    w
}

fn usable() -> bool {
    if !common::is_root() {
        skip(
            "watching another process needs ptrace rights and userfaultfd (root or CAP_SYS_PTRACE)",
        );
        return false;
    }
    if !caps().has_uffd_wp_async() {
        skip("kernel lacks userfaultfd WP_ASYNC (Linux 6.7+)");
        return false;
    }
    true
}

#[test]
fn watch_json_reports_a_python_writer() {
    let Some(w) = setup(30.0) else {
        return;
    };
    let pid = w.0.id().to_string();
    let out = common::cli(&[
        "watch",
        &pid,
        "--interval",
        "300ms",
        "--count",
        "3",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "3 intervals and a summary: {lines:?}");
    for l in &lines[..3] {
        for key in [
            "t",
            "interval_s",
            "written_pages",
            "written_bytes",
            "dirty_rate_mib_s",
            "vmas",
            "backend",
        ] {
            assert!(l.get(key).is_some(), "missing {key}: {l}");
        }
        assert_eq!(l["backend"], "uffd_wp_async");
        assert!(
            l["written_pages"].as_u64().unwrap() >= 4096,
            "the writer touches 4096 pages per pass: {l}"
        );
        assert_eq!(
            l["written_bytes"].as_u64().unwrap(),
            l["written_pages"].as_u64().unwrap() * 4096
        );
        let top = &l["vmas"][0];
        assert!(
            top["written_pages"].as_u64().unwrap() >= 4096,
            "the 16 MiB buffer is the hottest mapping: {top}"
        );
    }
    assert_eq!(lines[3]["end"], "detached");
    assert!(
        !has_uw(w.0.id()),
        "write protection left behind after watch"
    );
}

/// Runs pagescope with stdout and stderr on a fresh pseudo-terminal and
/// returns everything it wrote there.
fn run_on_pty(args: &[&str]) -> (std::process::ExitStatus, String) {
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).expect("openpt");
    grantpt(&master).expect("grantpt");
    unlockpt(&master).expect("unlockpt");
    let name = ptsname(&master, Vec::new()).expect("ptsname");
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(name.to_str().expect("pts path"))
        .expect("open pts");
    let mut child = Command::new(common::exe())
        .args(args)
        .stdout(slave.try_clone().expect("dup pts"))
        .stderr(slave)
        .spawn()
        .expect("spawn pagescope");
    let mut master = std::fs::File::from(master);
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        // EIO once every writer of the terminal is gone.
        while let Ok(n) = std::io::Read::read(&mut master, &mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        out
    });
    let status = child.wait().expect("wait");
    let out = reader.join().expect("reader");
    (status, String::from_utf8_lossy(&out).into_owned())
}

/// On a terminal, watch redraws one screen per interval (a live view with
/// the rate, its history and the hottest mappings) instead of printing
/// lines.
#[test]
fn watch_on_a_terminal_redraws_a_live_view() {
    let Some(w) = setup(30.0) else {
        return;
    };
    let pid = w.0.id().to_string();
    let (status, screen) = run_on_pty(&["watch", &pid, "--interval", "300ms", "--count", "3"]);
    assert!(status.success(), "{screen}");
    let frames: Vec<&str> = screen.split("\x1b[H\x1b[2J").skip(1).collect();
    assert_eq!(
        frames.len(),
        4,
        "a first frame at once, then one redraw per interval: {screen:?}"
    );
    assert!(
        frames[0].contains("waiting for the first interval"),
        "{}",
        frames[0]
    );
    let last = frames[3];
    for want in [
        "dirty rate",
        "history",
        "hottest mappings",
        "[anon]",
        "pre-copy at",
    ] {
        assert!(last.contains(want), "{want:?} missing from {last}");
    }
    let hottest = last
        .lines()
        .skip_while(|l| !l.starts_with("hottest mappings"))
        .nth(1)
        .expect("a hottest mapping");
    let pages: u64 = hottest.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(pages >= 4096, "the 16 MiB buffer leads: {hottest}");
    assert!(screen.contains("detached: process"), "{screen}");
    // Piped, the same command prints lines and no escape sequences.
    let piped = common::cli(&["watch", &pid, "--interval", "200ms", "--count", "1"]);
    let text = String::from_utf8_lossy(&piped.stdout);
    assert!(!text.contains('\x1b') && text.contains("pages"), "{text}");
}

#[test]
fn watch_ends_cleanly_when_the_target_exits() {
    let Some(mut w) = setup(1.0) else {
        return;
    };
    let pid = w.0.id().to_string();
    let t0 = Instant::now();
    let mut child = Command::new(common::exe())
        .args(["watch", &pid, "--interval", "200ms"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let _ = w.0.wait();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "watch did not notice the exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut text = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut text).unwrap();
    assert!(status.success(), "{text}");
    assert!(text.contains("the process exited"), "{text}");
}

#[test]
fn watch_detaches_on_ctrl_c() {
    let Some(w) = setup(30.0) else {
        return;
    };
    let pid = w.0.id().to_string();
    let mut child = Command::new(common::exe())
        .args(["watch", &pid, "--interval", "200ms"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !has_uw(w.0.id()) && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(has_uw(w.0.id()), "watch never attached");
    std::thread::sleep(Duration::from_millis(500));
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id().cast_signed()).unwrap(),
        rustix::process::Signal::INT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut text).unwrap();
    assert!(status.success(), "{text}");
    assert!(text.contains("detached"), "{text}");
    assert!(
        !has_uw(w.0.id()),
        "write protection left behind after Ctrl-C"
    );
    assert!(text.lines().any(|l| l.contains("MiB/s")), "{text}");
}
