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

/// The live view's frames in `output`: what a `rows` x `cols` terminal
/// (a VT100 emulator) shows at the end of each frame (each is one
/// synchronized update), one string per frame, a line per row up to the
/// last one written, trailing blanks dropped.
fn frames(output: &str, rows: u16, cols: u16) -> Vec<String> {
    use std::num::NonZeroU16;
    const FRAME_END: &str = "\x1b[?2026l";
    let size = |n| NonZeroU16::new(n).expect("a terminal size");
    let mut terminal = vt100::Parser::new(size(rows), size(cols), 0);
    let mut frames = Vec::new();
    let mut rest = output;
    while let Some(at) = rest.find(FRAME_END) {
        let (frame, next) = rest.split_at(at + FRAME_END.len());
        terminal.process(frame.as_bytes());
        let mut lines: Vec<String> = terminal
            .screen()
            .rows(0, cols)
            .map(|l| l.trim_end().to_owned())
            .collect();
        while lines.last().is_some_and(String::is_empty) {
            lines.pop();
        }
        frames.push(lines.join("\n"));
        rest = next;
    }
    frames
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
    // The pseudo-terminal reports no size: the view assumes 120 x 40.
    let frames = frames(&screen, 40, 120);
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
    let last = &frames[3];
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
    assert!(text.lines().any(|l| l.contains("KiB/s")), "{text}");
}

/// Starts `python3 tests/programs/SCRIPT ARGS` and waits for its first
/// line ("ready ..."), which it returns.
fn program(script: &str, args: &[&str]) -> Option<(Writer, String)> {
    if !usable() {
        return None;
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/programs")
        .join(script);
    let mut c = match Command::new("python3")
        .arg(path)
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(_) => {
            skip("python3 not available");
            return None;
        }
    };
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(c.stdout.take()?), &mut line).ok()?;
    Some((Writer(c), line.trim().to_owned()))
}

/// `watch PID ARGS --json`: the intervals (the summary line dropped).
fn watch_json(pid: u32, args: &[&str]) -> Vec<serde_json::Value> {
    let pid = pid.to_string();
    let mut all = vec!["watch", &pid, "--json"];
    all.extend_from_slice(args);
    let out = common::cli(&all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        lines.pop().is_some_and(|s| s.get("end").is_some()),
        "summary line"
    );
    lines
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn source(l: &serde_json::Value, name: &str) -> u64 {
    l["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s[0] == name)
        .map_or(0, |s| s[1].as_u64().unwrap())
}

/// The case the tool exists for: a process writing ~2,000 distinct pages
/// per second, half into private anonymous memory and half into a memfd
/// it maps shared (a VM's guest RAM). The reported pages per interval
/// must be within 1.0x-1.25x of what it wrote (a little slack below for
/// the writer's own schedule jitter).
#[test]
fn an_anon_and_memfd_writer_is_reported_within_1_25x_of_the_truth() {
    const RATE: f64 = 2000.0;
    let Some((w, _)) = program("anon_memfd_writer.py", &["2000", "60"]) else {
        return;
    };
    let lines = watch_json(w.0.id(), &["--interval", "500ms", "--count", "8"]);
    let ratios: Vec<f64> = lines
        .iter()
        .map(|l| l["written_pages"].as_f64().unwrap() / (RATE * l["interval_s"].as_f64().unwrap()))
        .collect();
    let m = median(ratios.clone());
    assert!((0.98..=1.25).contains(&m), "median ratio {m}: {ratios:?}");
    for l in &lines {
        assert_eq!(l["degraded"], serde_json::Value::Null);
        let memfd = l["objects"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["path"].as_str().unwrap().contains("guest-ram"))
            .unwrap_or_else(|| panic!("memfd object missing: {l}"));
        let srcs: Vec<&str> = memfd["sources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s[0].as_str().unwrap())
            .collect();
        assert_eq!(srcs, ["tracked"], "only page-exact sources: {memfd}");
    }
}

/// A forked server sharing MAP_SHARED|MAP_ANONYMOUS memory: the parent
/// writes nothing, the child writes ~500 pages/s into the shared region.
/// `watch` of the parent reports the child's writes (the parent's memory
/// changes), page by page, attributed to the child.
#[test]
fn writes_by_a_forked_child_into_shared_memory_are_reported_exactly() {
    const RATE: f64 = 500.0;
    let Some((w, ready)) = program("fork_shared_writer.py", &["500", "60"]) else {
        return;
    };
    let child: u64 = ready.split_whitespace().nth(1).unwrap().parse().unwrap();
    let lines = watch_json(w.0.id(), &["--interval", "500ms", "--count", "6"]);
    let ratios: Vec<f64> = lines
        .iter()
        .map(|l| source(l, "shared_writer") as f64 / (RATE * l["interval_s"].as_f64().unwrap()))
        .collect();
    let m = median(ratios.clone());
    assert!((0.98..=1.25).contains(&m), "median ratio {m}: {ratios:?}");
    let last = lines.last().unwrap();
    assert!(
        last["written_pages"].as_f64().unwrap()
            <= 1.25 * RATE * last["interval_s"].as_f64().unwrap(),
        "{last}"
    );
    let obj = &last["objects"][0];
    assert!(obj["writers"].get(child.to_string()).is_some(), "{obj}");
}

/// After the target executes a new program, tracking is set up again on
/// the new image: one interval reports everything (with the event), the
/// next ones only what the new program writes.
#[test]
fn watch_reattaches_after_exec() {
    let Some((w, _)) = program("exec_then_write.py", &["exec", "1.0"]) else {
        return;
    };
    let lines = watch_json(w.0.id(), &["--interval", "300ms", "--count", "12"]);
    let at = lines
        .iter()
        .position(|l| {
            l["events"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["event"] == "exec")
        })
        .expect("an exec event");
    let ev = lines[at]["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event"] == "exec")
        .unwrap()
        .clone();
    assert_eq!(ev["reattached"], true, "{ev}");
    // The new program's own start-up (libraries, its 16 MiB buffer) maps
    // new memory, reported conservatively until it is tracked; on a
    // loaded machine that takes more than one interval. From the first
    // interval without it on, every interval is page by page.
    let settled = lines[at + 1..]
        .iter()
        .position(|l| source(l, "new_mapping") + source(l, "untracked") == 0)
        .map(|k| at + 1 + k)
        .expect("an interval tracked page by page after the exec");
    assert!(
        settled + 2 < lines.len(),
        "exec too late to check the intervals after it"
    );
    for l in &lines[settled..] {
        assert_eq!(l["backend"], "uffd_wp_async");
        assert_eq!(l["degraded"], serde_json::Value::Null);
        assert_eq!(source(l, "new_mapping") + source(l, "untracked"), 0, "{l}");
    }
    let last = lines.last().unwrap()["written_pages"].as_u64().unwrap();
    assert!(
        (4096..3 * 4096).contains(&last),
        "the new program writes 4096 pages per pass: {last}"
    );
}

/// Children are listed; with `--follow-forks` their writes are tracked.
#[test]
fn watch_lists_children_and_follows_them_on_request() {
    for follow in [false, true] {
        let Some((w, _)) = program("exec_then_write.py", &["fork", "0.2"]) else {
            return;
        };
        let mut args = vec!["--interval", "300ms", "--count", "6"];
        if follow {
            args.push("--follow-forks");
        }
        let lines = watch_json(w.0.id(), &args);
        let last = lines.last().unwrap();
        let children = last["children"].as_array().unwrap();
        assert_eq!(children.len(), 1, "{last}");
        let child = children[0].as_u64().unwrap();
        assert!(
            lines.iter().any(|l| l["events"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["event"] == "fork" && e["child"] == child)),
            "a fork event"
        );
        let followed = last["followed"].as_array().unwrap();
        if follow {
            let c = followed
                .iter()
                .find(|c| c["pid"] == child)
                .unwrap_or_else(|| panic!("{last}"));
            let n = c["written_pages"].as_u64().unwrap();
            assert!((4096..3 * 4096).contains(&n), "{c}");
        } else {
            assert!(followed.is_empty(), "{last}");
        }
    }
}

/// The live view on a terminal that is resized and then quit with `q`:
/// it redraws at once to fit the new size (no line wider than the
/// terminal, no more lines than it has rows) and detaches on `q`.
#[test]
fn live_view_fits_a_resized_terminal_and_quits_on_q() {
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    use rustix::termios::{Winsize, tcsetwinsize};
    let Some(w) = setup(30.0) else {
        return;
    };
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).expect("openpt");
    grantpt(&master).expect("grantpt");
    unlockpt(&master).expect("unlockpt");
    let size = |rows, cols| Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    tcsetwinsize(&master, size(40, 120)).expect("winsize");
    let name = ptsname(&master, Vec::new()).expect("ptsname");
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(name.to_str().unwrap())
        .unwrap();
    let pid = w.0.id().to_string();
    let mut child = Command::new(common::exe())
        .args(["watch", &pid, "--interval", "200ms"])
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave)
        .spawn()
        .unwrap();
    let mut master = std::fs::File::from(master);
    let reader = {
        let mut m = master.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut out = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut m, &mut buf) {
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
            }
            out
        })
    };
    std::thread::sleep(Duration::from_millis(700));
    tcsetwinsize(&master, size(12, 50)).expect("resize");
    std::thread::sleep(Duration::from_millis(300));
    std::io::Write::write_all(&mut master, b"q").unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "q did not quit");
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(master);
    let screen = String::from_utf8_lossy(&reader.join().unwrap()).into_owned();
    assert!(status.success(), "{screen}");
    assert!(screen.contains("detached: process"), "{screen}");
    // Read on a terminal of the first size: a frame still drawn for it
    // after the resize spills past 50 x 12.
    let frames = frames(&screen, 40, 120);
    let fits = |f: &String| {
        let lines: Vec<&str> = f
            .lines()
            .take_while(|l| !l.starts_with("detached"))
            .collect();
        lines.len() <= 11
            && lines
                .iter()
                .all(|l| l.trim_end_matches('\r').chars().count() <= 49)
    };
    assert!(frames.iter().any(fits), "no frame fits 50x12: {screen}");
    assert!(
        !fits(&frames[1]),
        "the first frames are drawn for 120 columns"
    );
}
