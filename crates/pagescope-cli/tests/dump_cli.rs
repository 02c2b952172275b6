//! `pagescope dump / verify / restore / image show` on unmodified programs
//! started outside pagescope: a python process writing a private buffer
//! and a memfd while it is dumped, a forked pair, chains of generations,
//! and the exit codes of bad input.

mod common;

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::{Scratch, can_dump, cli, skip, uffd_fds, vmflag_mappings};

const PROGRAMS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/programs");

struct Proc {
    child: Child,
    extra: Vec<u32>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        for pid in self.extra.iter().copied().chain([self.child.id()]) {
            signal(pid, rustix::process::Signal::CONT);
        }
        for &pid in &self.extra {
            signal(pid, rustix::process::Signal::KILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(p) = rustix::process::Pid::from_raw(i32::try_from(pid).unwrap_or(0)) {
        let _ = rustix::process::kill_process(p, sig);
    }
}

/// Starts `tests/programs/NAME` and waits for its `ready` line (the rest
/// of which it returns).
fn start(name: &str, args: &[&str]) -> Option<(Proc, String)> {
    let mut child = Command::new("python3")
        .arg(Path::new(PROGRAMS).join(name))
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .ok()?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take()?)
        .read_line(&mut line)
        .ok()?;
    let rest = line.trim().strip_prefix("ready")?.trim().to_owned();
    Some((
        Proc {
            child,
            extra: Vec::new(),
        },
        rest,
    ))
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(path: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn a_python_writer_dumped_while_writing_restores_byte_for_byte() {
    if !can_dump() {
        return;
    }
    // 4000 pages/s over a 64 MiB buffer and a 64 MiB memfd.
    let Some((p, _)) = start("anon_memfd_writer.py", &["4000", "120"]) else {
        skip("python3 not available");
        return;
    };
    let pid = p.child.id();
    let dir = Scratch::new("writer");
    let out = cli(&[
        "dump",
        &pid.to_string(),
        "-o",
        &dir.p("img"),
        "--leave-stopped",
        "--json",
        "--max-iterations",
        "4",
    ]);
    let report: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("pre-copy 1:") && stderr.contains("final (stopped):"),
        "{stderr}"
    );
    let its = report["iterations"].as_array().unwrap();
    assert!(its.len() >= 3, "full, pre-copy, final: {its:?}");
    assert!(its.last().unwrap()["stopped"].as_bool().unwrap());
    assert!(
        its[1]["written_pages"].as_u64().unwrap() > 0,
        "the writer wrote during pre-copy"
    );
    // The process is stopped now: the image must be its memory exactly.
    let verify = ok(&cli(&["verify", &dir.p("img"), &pid.to_string()]));
    assert!(verify.contains("match:"), "{verify}");
    ok(&cli(&[
        "restore",
        &dir.p("img"),
        "--to",
        &dir.p("restored"),
    ]));
    let meta = json(&dir.p("img/meta.json"));
    let memfd = meta["objects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["path"].as_str().unwrap().contains("memfd:guest-ram"))
        .expect("the memfd is one object");
    let file = format!(
        "{}/object-{}-{}.mem",
        dir.p("restored"),
        memfd["dev"].as_str().unwrap().replace(':', "_"),
        memfd["inode"]
    );
    let fd = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|f| {
            std::fs::read_link(f).is_ok_and(|l| l.to_string_lossy().contains("memfd:guest-ram"))
        })
        .unwrap();
    assert!(
        std::fs::read(&file).unwrap() == std::fs::read(&fd).unwrap(),
        "memfd restored byte for byte"
    );
    drop(p);
}

#[test]
fn chains_of_three_generations_verify_and_leave_nothing_behind() {
    if !can_dump() {
        return;
    }
    let Some((p, _)) = start("anon_memfd_writer.py", &["300", "120"]) else {
        skip("python3 not available");
        return;
    };
    let pid = p.child.id().to_string();
    let dir = Scratch::new("chain");
    ok(&cli(&["dump", &pid, "-o", &dir.p("g0"), "--keep-tracking"]));
    assert!(json(&dir.p("g0/meta.json"))["kept_tracking"].is_object());
    assert_eq!(
        uffd_fds(p.child.id()),
        1,
        "one userfaultfd kept in the process"
    );
    ok(&cli(&[
        "dump",
        &pid,
        "-o",
        &dir.p("g1"),
        "--parent",
        &dir.p("g0"),
        "--keep-tracking",
    ]));
    assert_eq!(
        uffd_fds(p.child.id()),
        1,
        "the kept userfaultfd was reused, not duplicated"
    );
    ok(&cli(&[
        "dump",
        &pid,
        "-o",
        &dir.p("g2"),
        "--parent",
        &dir.p("g1"),
        "--leave-stopped",
    ]));
    assert_eq!(
        uffd_fds(p.child.id()),
        0,
        "nothing left in the process without --keep-tracking"
    );
    let verify = ok(&cli(&["verify", &dir.p("g2"), &pid]));
    assert!(verify.contains("match:"), "{verify}");
    let show = ok(&cli(&["image", "show", &dir.p("g2"), "--check-data"]));
    assert_eq!(show.matches("  parent ").count(), 2, "{show}");
    // Without kept tracking: pages compared with the parent.
    signal(p.child.id(), rustix::process::Signal::CONT);
    ok(&cli(&[
        "dump",
        &pid,
        "-o",
        &dir.p("h1"),
        "--parent",
        &dir.p("g2"),
    ]));
    ok(&cli(&[
        "dump",
        &pid,
        "-o",
        &dir.p("h2"),
        "--parent",
        &dir.p("h1"),
        "--leave-stopped",
    ]));
    let verify = ok(&cli(&["verify", &dir.p("h2"), &pid]));
    assert!(verify.contains("match:"), "{verify}");
    let g2: serde_json::Value =
        serde_json::from_str(&ok(&cli(&["image", "show", &dir.p("h2"), "--json"]))).unwrap();
    assert_eq!(g2["header"]["generation"], 4);
    drop(p);
}

#[test]
fn a_forked_pair_is_dumped_as_a_tree_and_the_stop_is_invisible_to_the_parent() {
    if !can_dump() {
        return;
    }
    let Some((mut p, child)) = start("fork_shared_writer.py", &["500", "120"]) else {
        skip("python3 not available");
        return;
    };
    let child: u32 = child.parse().unwrap();
    p.extra.push(child);
    let dir = Scratch::new("tree");
    let parent = p.child.id().to_string();
    let out = cli(&[
        "dump",
        &parent,
        "-o",
        &dir.p("img"),
        "--tree",
        "--leave-stopped",
        "--json",
    ]);
    let report: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(report["pids"].as_array().unwrap().len(), 2, "{report}");
    for pid in [p.child.id(), child] {
        let v = ok(&cli(&["verify", &dir.p("img"), &pid.to_string()]));
        assert!(v.contains("match:"), "process {pid}: {v}");
    }
    let meta = json(&dir.p("img/meta.json"));
    let shared: Vec<_> = meta["objects"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["kind"] == "shared_anon")
        .collect();
    assert_eq!(
        shared.len(),
        1,
        "the shared region is one object, stored once"
    );
    let dedup: u64 = meta["processes"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["vmas"].as_array().unwrap())
        .flat_map(|v| v["runs"].as_array().unwrap())
        .filter(|r| r["kind"] == "dedup")
        .map(|r| r["count"].as_u64().unwrap())
        .sum();
    assert!(dedup > 0, "COW-shared pages of the pair stored once");
}

#[test]
fn the_final_stop_is_not_seen_by_the_targets_parent() {
    if !can_dump() {
        return;
    }
    // A parent that reports any stop of its child (waitpid WUNTRACED).
    const WATCHER: &str = "import os,sys,time\nc=os.fork()\nif c==0:\n    b=bytearray(8<<20)\n    while True:\n        b[0]=(b[0]+1)%256; time.sleep(0.01)\nprint('ready',c,flush=True)\nwhile True:\n    p,s=os.waitpid(c,os.WUNTRACED|os.WCONTINUED)\n    print('event',s,flush=True)\n";
    let Ok(mut c) = Command::new("python3")
        .args(["-c", WATCHER])
        .stdout(Stdio::piped())
        .spawn()
    else {
        skip("python3 not available");
        return;
    };
    let mut lines = std::io::BufReader::new(c.stdout.take().unwrap()).lines();
    let child: u32 = lines
        .next()
        .unwrap()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let guard = Proc {
        child: c,
        extra: vec![child],
    };
    let dir = Scratch::new("invisible");
    ok(&cli(&["dump", &child.to_string(), "-o", &dir.p("img")]));
    // Now a visible stop, to prove the watcher would have said so.
    signal(child, rustix::process::Signal::STOP);
    let first = lines.next().unwrap().unwrap();
    signal(child, rustix::process::Signal::CONT);
    assert!(first.starts_with("event"), "{first}");
    let status: i32 = first.split(' ').nth(1).unwrap().parse().unwrap();
    assert!(
        libc::WIFSTOPPED(status) && libc::WSTOPSIG(status) == libc::SIGSTOP,
        "the first event the parent saw is our explicit SIGSTOP, not the dump: {first}"
    );
    drop(guard);
}

#[test]
fn bad_input_and_corrupt_images_have_distinct_exit_codes() {
    let dir = Scratch::new("bad");
    std::fs::create_dir_all(dir.p("notimage")).unwrap();
    std::fs::write(dir.p("notimage/HEADER"), b"PGSCIMG\nrubbish").unwrap();
    let out = cli(&["image", "show", &dir.p("notimage")]);
    assert_eq!(out.status.code(), Some(12), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("HEADER") && err.contains("byte"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let out = cli(&["restore", &dir.p("missing"), "--to", &dir.p("x")]);
    assert_eq!(out.status.code(), Some(12), "no image there: {out:?}");
    assert!(!Path::new(&dir.p("x")).exists());
    let out = cli(&["verify", &dir.p("notimage"), "999999999"]);
    assert_eq!(out.status.code(), Some(12), "{out:?}");
    if can_dump() {
        let me = std::process::id().to_string();
        std::fs::write(dir.p("full"), b"").unwrap();
        let out = cli(&["dump", &me, "-o", &dir.0.display().to_string()]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "not an empty directory: {out:?}"
        );
        let out = cli(&["dump", "999999999", "-o", &dir.p("new")]);
        assert_eq!(out.status.code(), Some(3), "no such process: {out:?}");
    }
}

/// pagescope killed (SIGKILL) in the middle of a copy-before-write
/// snapshot: the kernel releases its userfaultfd (the target never held
/// a copy), so the target's writer threads go on, no mapping stays
/// write-protected, and no image is left behind.
#[test]
fn a_cow_snapshot_killed_midway_leaves_the_process_running_and_unprotected() {
    if !can_dump() {
        return;
    }
    let mut fx = common::fixture(&["anon"]);
    fx.command("mmap big 131072").unwrap();
    let pid = fx.pid();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = fx.command("cowwriters big 4 4000");
        let _ = tx.send((fx, r));
    });
    std::thread::sleep(std::time::Duration::from_millis(200));
    let dir = Scratch::new("cowkill");
    let mut dumper = Command::new(common::exe())
        .args([
            "dump",
            &pid.to_string(),
            "-o",
            &dir.p("img"),
            "--snapshot",
            "cow",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while vmflag_mappings(pid, "uw") == 0 && t0.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    assert!(
        vmflag_mappings(pid, "uw") > 0,
        "the snapshot never write-protected the process"
    );
    std::thread::sleep(std::time::Duration::from_millis(20));
    let _ = dumper.kill();
    let _ = dumper.wait();
    let t1 = std::time::Instant::now();
    while vmflag_mappings(pid, "uw") > 0 && t1.elapsed() < std::time::Duration::from_secs(2) {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(
        vmflag_mappings(pid, "uw"),
        0,
        "still write-protected after pagescope died"
    );
    let (_fx, done) = rx
        .recv_timeout(std::time::Duration::from_secs(15))
        .expect("the writer threads are stuck: the process stayed write-protected");
    let total: u64 = done.unwrap().parse().unwrap();
    assert!(total > 0);
    assert!(
        !std::path::Path::new(&dir.p("img")).join("HEADER").exists(),
        "a killed dump left something that looks like an image"
    );
}
