//! A pre-fork server in python3 (the parent maps a MAP_SHARED|MAP_ANONYMOUS
//! segment and forks a child per "request" that writes known pages and
//! exits within a few milliseconds): no write of a short-lived child may
//! be missed by `watch`, nor by the copy `dump` makes.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::{caps, skip};

/// The server, killed (with its children) when dropped.
struct Server {
    child: Child,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let pid = self.child.id();
        for p in descendants(pid) {
            let _ = Command::new("kill")
                .args(["-CONT", &p.to_string()])
                .status();
            let _ = Command::new("kill")
                .args(["-KILL", &p.to_string()])
                .status();
        }
        let _ = Command::new("kill")
            .args(["-CONT", &pid.to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The live children of `pid` (its threads' `children` files).
fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let s = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
    }
    out
}

/// One child, from the server's log.
#[derive(Debug)]
struct Request {
    pid: u32,
    t0: f64,
    t1: f64,
    pages: Vec<u64>,
}

impl Server {
    fn start(rate: u32, seconds: u32) -> Option<Self> {
        Self::start_as(rate, seconds, false)
    }

    /// The server, run as `nobody` when `unprivileged` (as PostgreSQL runs
    /// as `postgres`: it may create only a `UFFD_USER_MODE_ONLY`
    /// userfaultfd itself).
    fn start_as(rate: u32, seconds: u32, unprivileged: bool) -> Option<Self> {
        if !common::is_root() {
            skip("watching another process needs ptrace rights and userfaultfd (root)");
            return None;
        }
        if !caps().has_uffd_wp_async() {
            skip("kernel lacks userfaultfd WP_ASYNC (Linux 6.7+)");
            return None;
        }
        let log = std::env::temp_dir().join(format!(
            "pagescope-prefork-{}-{}.log",
            std::process::id(),
            rate
        ));
        let _ = std::fs::remove_file(&log);
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/programs/prefork_server.py");
        let mut cmd = if unprivileged {
            // pyenv's shim is not reachable by nobody: the system python.
            let mut c = Command::new("setpriv");
            c.args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--",
                "/usr/bin/python3",
            ]);
            c.current_dir("/");
            c
        } else {
            Command::new("python3")
        };
        // nobody cannot read a test tree under a 0700 directory (a clone in
        // mktemp -d): a world-readable copy of the program.
        let script = if unprivileged {
            pagescope_fixture::testing::world_copy(&script)
        } else {
            script
        };
        let (child, line) = spawn_ready(
            cmd.arg(script)
                .args([&rate.to_string(), &seconds.to_string()])
                .arg(&log),
        )?;
        assert_eq!(line.trim(), "ready");
        Some(Self { child, log })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn requests(&self) -> Vec<Request> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                Some(Request {
                    pid: f.get(1)?.parse().ok()?,
                    t0: f.get(2)?.parse().ok()?,
                    t1: f.get(3)?.parse().ok()?,
                    pages: f[4..].iter().filter_map(|p| p.parse().ok()).collect(),
                })
            })
            .collect()
    }
}

fn watch_json(pid: u32, args: &[&str]) -> Vec<serde_json::Value> {
    let pid = pid.to_string();
    let mut all = vec!["watch", pid.as_str(), "--json"];
    all.extend(args);
    let out = common::cli(&all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("written_pages").is_some())
        .collect()
}

/// The shared segment's entry in an interval (the only shared object).
fn segment(l: &serde_json::Value) -> Option<&serde_json::Value> {
    l["objects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["writers"].as_object().is_some_and(|w| !w.is_empty()))
}

/// Seconds around an interval's ends where a write may be counted in
/// either interval.
const SLACK: f64 = 0.05;

/// The tests of this file run one at a time: each needs the CPU time of a
/// server forking 150 children a second (on a 2-CPU machine, two at once
/// halve each other's fork rate).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `watch` of the parent reports, per interval, the union of the pages
/// its children wrote (within 1.0-1.25x), page by page, with no
/// whole-object over-report, and lists every fork.
#[test]
fn watch_sees_every_write_of_short_lived_children() {
    let _serial = one_at_a_time();
    let Some(server) = Server::start(150, 60) else {
        return;
    };
    check_every_write_seen(&server);
}

/// The same for a server run as `nobody`: pagescope (root) hands it
/// `/dev/userfaultfd`, so its segment is tracked synchronously too.
#[test]
fn watch_sees_every_write_of_short_lived_children_of_an_unprivileged_server() {
    let _serial = one_at_a_time();
    if !Path::new("/usr/bin/python3").exists() {
        skip("no /usr/bin/python3 to run as nobody");
        return;
    }
    let Some(server) = Server::start_as(150, 60, true) else {
        return;
    };
    check_every_write_seen(&server);
}

fn check_every_write_seen(server: &Server) {
    let lines = watch_json(server.pid(), &["--interval", "1s", "--count", "5"]);
    let requests = server.requests();
    assert!(requests.len() > 400, "the server forked too few children");
    // A child alive at a collect is listed then, maybe before it writes.
    let mut listed: HashSet<u64> = HashSet::new();
    for l in &lines {
        assert_eq!(l["forks_tracked"], true, "{l}");
        let end = l["clock_monotonic_s"].as_f64().unwrap();
        let start = end - l["interval_s"].as_f64().unwrap();
        // A collect takes a few ms: children writing around one may land
        // on either side of it.
        let certain: Vec<&Request> = requests
            .iter()
            .filter(|r| r.t0 >= start + SLACK && r.t1 <= end - SLACK)
            .collect();
        let possible: Vec<&Request> = requests
            .iter()
            .filter(|r| r.t1 >= start - SLACK && r.t0 <= end + SLACK)
            .collect();
        let pages = |rs: &[&Request]| -> usize {
            rs.iter()
                .flat_map(|r| r.pages.iter().copied())
                .collect::<BTreeSet<u64>>()
                .len()
        };
        let (lo, hi) = (pages(&certain), pages(&possible));
        let seg = segment(l).unwrap_or_else(|| panic!("no segment writes: {l}"));
        let got = seg["written_pages"].as_u64().unwrap() as usize;
        assert!(
            got >= lo && got as f64 <= 1.25 * hi as f64,
            "reported {got}, children wrote {lo}..{hi} pages: {l}"
        );
        let sources: Vec<&str> = seg["sources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s[0].as_str().unwrap())
            .collect();
        assert_eq!(sources, ["shared_writer"], "page-exact only: {seg}");
        let forks = l["forks"].as_u64().unwrap() as usize;
        assert!(
            forks >= certain.len() && forks <= possible.len(),
            "{forks} forks counted, {}..{} children ran: {l}",
            certain.len(),
            possible.len()
        );
        listed.extend(
            l["events"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["event"] == "fork")
                .filter_map(|e| e["child"].as_u64()),
        );
        let writers = seg["writers"].as_object().unwrap();
        for r in &certain {
            assert!(
                listed.contains(&u64::from(r.pid)) && writers.contains_key(&r.pid.to_string()),
                "child {} not listed (or not a writer): {l}",
                r.pid
            );
        }
    }
}

/// Starts `cmd` with a piped stdout and returns it with its first line
/// (the "ready" line); `None` (skipped) without python3.
fn spawn_ready(cmd: &mut Command) -> Option<(Child, String)> {
    let Ok(mut child) = cmd.stdout(Stdio::piped()).spawn() else {
        skip("python3 not available");
        return None;
    };
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take()?),
        &mut line,
    )
    .ok()?;
    Some((child, line))
}

/// Sends `sig` to `pid` (the test's own processes only).
fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status();
}

/// A scratch directory for images (emptied first; removed at the end of
/// each test by [`Drop`] of the server's guard or explicitly).
fn scratch(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("pagescope-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `dump --leave-stopped` of the server while its children write, then
/// `verify` against the stopped server: no difference, 20 times over
/// (the children's writes are in the image, and children alive at the
/// final pass were stopped with the server).
#[test]
fn dumps_of_a_prefork_server_match_the_stopped_server() {
    let _serial = one_at_a_time();
    let Some(server) = Server::start(150, 300) else {
        return;
    };
    let dir = scratch("prefork-dump");
    let pid = server.pid().to_string();
    for round in 0..20 {
        let img = dir.join(format!("img{round}")).display().to_string();
        let report: serde_json::Value = serde_json::from_str(&ok(&common::cli(&[
            "dump",
            &pid,
            "-o",
            &img,
            "--leave-stopped",
            "--json",
        ])))
        .unwrap();
        assert_eq!(report["shared_writers"]["stop_sharers"], true, "{report}");
        assert_eq!(
            report["shared_writers"]["inconsistent"],
            serde_json::json!([]),
            "{report}"
        );
        let verify = common::cli(&["verify", &img, &pid]);
        let text = ok(&verify);
        assert!(text.contains("match:"), "round {round}: {text}");
        for p in descendants(server.pid()) {
            signal(p, "CONT");
        }
        signal(server.pid(), "CONT");
        let _ = std::fs::remove_dir_all(&img);
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A group sharing a segment every member writes: `dump` of one member
/// stops the others for the final pass (and leaves them stopped), so
/// `verify` against the stopped group finds no difference; with
/// `--no-stop-sharers` the report names the segment and its writers.
#[test]
fn dump_of_one_member_of_a_writing_group_stops_the_others() {
    let _serial = one_at_a_time();
    if !common::is_root() {
        skip("dumping another process needs ptrace rights (root)");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/programs/group_writers.py");
    let Some((child, line)) = spawn_ready(Command::new("python3").arg(script).arg("4")) else {
        return;
    };
    let group: Vec<u32> = line
        .split_whitespace()
        .skip(1)
        .map(|p| p.parse().unwrap())
        .collect();
    let server = Server {
        child,
        log: std::env::temp_dir().join("pagescope-group-unused"),
    };
    assert_eq!(group.len(), 4, "{line}");
    let dir = scratch("group-dump");
    let member = group[2].to_string();
    let loose: serde_json::Value = serde_json::from_str(&ok(&common::cli(&[
        "dump",
        &member,
        "-o",
        &dir.join("loose").display().to_string(),
        "--no-stop-sharers",
        "--json",
    ])))
    .unwrap();
    let inconsistent = &loose["shared_writers"]["inconsistent"];
    assert_eq!(inconsistent.as_array().unwrap().len(), 1, "{loose}");
    let writers: BTreeSet<u64> = inconsistent[0]["writers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(serde_json::Value::as_u64)
        .collect();
    let others: BTreeSet<u64> = group
        .iter()
        .filter(|p| p.to_string() != member)
        .map(|p| u64::from(*p))
        .collect();
    assert_eq!(writers, others, "{loose}");
    for round in 0..3 {
        let img = dir.join(format!("img{round}")).display().to_string();
        let report: serde_json::Value = serde_json::from_str(&ok(&common::cli(&[
            "dump",
            &member,
            "-o",
            &img,
            "--leave-stopped",
            "--json",
        ])))
        .unwrap();
        let stopped: BTreeSet<u64> = report["shared_writers"]["writers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["stopped"] == true)
            .filter_map(|w| w["pid"].as_u64())
            .collect();
        assert_eq!(stopped, others, "{report}");
        let text = ok(&common::cli(&["verify", &img, &member]));
        assert!(text.contains("match:"), "round {round}: {text}");
        for p in &group {
            signal(*p, "CONT");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A process that writes its shared segment and exits mid-interval: the
/// last interval is reported, flagged partial, with those writes (its
/// shared memory's writes were recorded as they happened), and left out
/// of the mean.
#[test]
fn the_last_partial_interval_is_reported_when_the_target_exits() {
    let _serial = one_at_a_time();
    if !common::is_root() || !caps().has_uffd_wp_async() {
        skip("watching another process needs root and userfaultfd WP_ASYNC");
        return;
    }
    const EXITING: &str = "import mmap,sys,time\nP=mmap.PAGESIZE\nseg=mmap.mmap(-1,4<<20,flags=mmap.MAP_SHARED|mmap.MAP_ANONYMOUS)\nprint('ready',flush=True)\ntime.sleep(1.5)\nfor i in range(300): seg[i*P]=7\ntime.sleep(0.05)\n";
    let Some((mut child, _)) = spawn_ready(Command::new("python3").args(["-c", EXITING])) else {
        return;
    };
    let pid = child.id().to_string();
    let out = common::cli(&["watch", &pid, "--interval", "1s", "--json"]);
    let _ = child.wait();
    let text = ok(&out);
    let all: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let summary = all.last().unwrap();
    assert_eq!(summary["end"], "the process exited", "{text}");
    let last = &all[all.len() - 2];
    assert_eq!(last["partial"], true, "{text}");
    let seg = segment(last).unwrap_or_else(|| panic!("no segment writes: {text}"));
    assert_eq!(seg["written_pages"], 300, "{seg}");
    assert_eq!(
        summary["intervals"],
        all.len() as u64 - 2,
        "the partial interval is not counted: {text}"
    );
}
