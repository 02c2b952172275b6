//! `pagescope verify` on unmodified programs: no false mismatch from the
//! kernel-owned fields of glibc's rseq area (an idle `sleep`, a C program
//! blocked in `read()`, a python3 process blocked in `read()` moved to
//! the other CPU between dump and verify), while a real change next to the area is still
//! reported; and the listing of differing ranges (`--limit`, JSON counts
//! that add up, private vs shared, other writers, a running process).

mod common;

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use common::{cli, is_root, skip};

/// Rounds of dump + verify per program.
const ROUNDS: usize = 50;

struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let p = PathBuf::from(format!(
            "/dev/shm/pagescope-verify-{tag}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    fn p(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A started program, killed at the end.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn usable() -> bool {
    if !is_root() {
        skip("dump and verify of another process need ptrace rights and userfaultfd (root)");
        return false;
    }
    true
}

/// Starts `cmd` and waits for its first stdout line.
fn start(cmd: &mut Command) -> (Proc, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the program");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (Proc(child), line.trim().to_owned())
}

/// `dump PID -o DIR` then `verify DIR PID --json`: (exit code, report).
fn dump_verify(pid: u32, dir: &str, extra: &[&str]) -> (i32, serde_json::Value) {
    let _ = std::fs::remove_dir_all(dir);
    let pid_s = pid.to_string();
    let d = cli(&["dump", &pid_s, "-o", dir, "--max-iterations", "1"]);
    assert!(
        d.status.success(),
        "dump: {}",
        String::from_utf8_lossy(&d.stderr)
    );
    verify(pid, dir, extra)
}

fn verify(pid: u32, dir: &str, extra: &[&str]) -> (i32, serde_json::Value) {
    let pid_s = pid.to_string();
    let mut args = vec!["verify", dir, &pid_s, "--json"];
    args.extend_from_slice(extra);
    let v = cli(&args);
    let report = serde_json::from_slice(&v.stdout).unwrap_or_else(|e| {
        panic!(
            "verify output ({e}): {}{}",
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&v.stderr)
        )
    });
    (v.status.code().unwrap_or(-1), report)
}

/// Runs `ROUNDS` dump + verify rounds of `pid` (`between` runs between
/// dump and verify); returns in how many rounds kernel-owned fields moved.
fn rounds(what: &str, pid: u32, dir: &Scratch, mut between: impl FnMut(usize)) -> usize {
    let mut moved = 0;
    for round in 0..ROUNDS {
        let img = dir.p("img");
        let _ = std::fs::remove_dir_all(&img);
        let d = cli(&[
            "dump",
            &pid.to_string(),
            "-o",
            &img,
            "--max-iterations",
            "1",
        ]);
        assert!(d.status.success(), "{what} round {round}: dump failed");
        between(round);
        let (code, r) = verify(pid, &img, &[]);
        assert!(
            code == 0 && r["mismatched_pages"] == 0,
            "{what} round {round}: false mismatch (exit {code}): {r:#}"
        );
        if !r["kernel_owned"].as_array().unwrap().is_empty() {
            moved += 1;
        }
    }
    moved
}

fn rseq_recorded(dir: &str, pid: u32) -> Vec<serde_json::Value> {
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(format!("{dir}/meta.json")).unwrap()).unwrap();
    meta["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == pid)
        .unwrap()["rseq"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|a| a["address"] != 0)
        .collect()
}

const BLOCKED_IN_READ: &str = r#"
#include <stdio.h>
#include <unistd.h>
int main(void) {
    char c;
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        if (read(0, &c, 1) <= 0) return 0;
    }
}
"#;

/// A C program blocked in `read()` on its stdin (built with `cc`).
fn c_reader(dir: &Scratch) -> Option<Proc> {
    let src = dir.0.join("reader.c");
    let exe = dir.0.join("reader");
    std::fs::write(&src, BLOCKED_IN_READ).unwrap();
    let built = Command::new("cc")
        .arg("-O2")
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .status()
        .ok()?;
    built.success().then(|| start(&mut Command::new(&exe)).0)
}

/// python3 blocked reading its stdin.
const PY_IDLE: &str = "import sys\nprint('ready', flush=True)\nsys.stdin.read()\n";

#[test]
fn rseq_fields_give_no_false_mismatch_and_a_real_change_is_reported() {
    if !usable() {
        return;
    }
    let dir = Scratch::new("rseq");
    // An idle `sleep`.
    let sleeper = Proc(Command::new("sleep").arg("1000").spawn().unwrap());
    let pid = sleeper.0.id();
    std::thread::sleep(std::time::Duration::from_millis(50));
    rounds("sleep", pid, &dir, |_| {});
    assert!(
        !rseq_recorded(&dir.p("img"), pid).is_empty(),
        "the image records sleep's rseq area (glibc 2.35+ registers one)"
    );
    real_change_is_reported(pid, &dir);
    drop(sleeper);
    // A C program blocked in read().
    let Some(reader) = c_reader(&dir) else {
        skip("no C compiler (cc)");
        return;
    };
    rounds("C reader", reader.0.id(), &dir, |_| {});
    drop(reader);
    // python3 moved to the other CPU between dump and verify.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let Ok(py) = std::panic::catch_unwind(|| start(Command::new("python3").args(["-c", PY_IDLE])))
    else {
        skip("python3 not available");
        return;
    };
    let pid = py.0.0.id();
    let moved = rounds("python3", pid, &dir, |round| {
        let cpu = (round % cpus).to_string();
        let ok = Command::new("taskset")
            .args(["-p", "-c", &cpu, &pid.to_string()])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "taskset");
        // A blocked thread moves when it next wakes: a stop and a
        // continue wake it without running any of its code (read()
        // restarts), and it returns to user space on the new CPU.
        let p = rustix::process::Pid::from_raw(i32::try_from(pid).unwrap()).unwrap();
        rustix::process::kill_process(p, rustix::process::Signal::STOP).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        rustix::process::kill_process(p, rustix::process::Signal::CONT).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
    });
    if cpus > 1 {
        assert!(
            moved >= ROUNDS / 2,
            "python3 moved to another CPU in every round, but only {moved} of {ROUNDS} verifies saw its rseq cpu_id change: the test does not exercise the case"
        );
    }
}

/// One byte next to `pid`'s rseq area (same page, outside the area)
/// changed after the dump is a mismatch; put back, the image matches.
fn real_change_is_reported(pid: u32, dir: &Scratch) {
    use std::os::unix::fs::FileExt;
    let img = dir.p("img");
    let area = &rseq_recorded(&img, pid)[0];
    let (a, len) = (
        area["address"].as_u64().unwrap(),
        area["length"].as_u64().unwrap(),
    );
    let page = 4096;
    let at = if (a + len) / page == a / page && (a + len) % page != 0 {
        a + len
    } else {
        a - 1
    };
    assert_eq!(at / page, a / page);
    let mem = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .unwrap();
    let mut b = [0u8; 1];
    mem.read_exact_at(&mut b, at).unwrap();
    mem.write_all_at(&[b[0] ^ 0x5a], at).unwrap();
    let (code, r) = verify(pid, &img, &[]);
    mem.write_all_at(&b, at).unwrap();
    assert_eq!(code, 1, "{r:#}");
    assert_eq!(r["mismatched_pages"], 1, "{r:#}");
    assert_eq!(r["private_mismatched_pages"], 1, "{r:#}");
    let (code, r) = verify(pid, &img, &[]);
    assert_eq!(code, 0, "put back: {r:#}");
}

const PY_SHARED: &str = r#"
import ctypes, mmap, os, sys, time
n = 64 * 4096
buf = bytearray(b'\x01' * n)
seg = mmap.mmap(-1, n)
seg.write(b'\x02' * n)
child = os.fork()
if child == 0:
    while True:
        time.sleep(1)
a = ctypes.addressof((ctypes.c_char * n).from_buffer(buf))
s = ctypes.addressof(ctypes.c_char.from_buffer(seg))
print('ready', a, s, child, flush=True)
sys.stdin.read()
"#;

#[test]
fn verify_lists_every_range_up_to_the_limit_with_counts_that_add_up() {
    if !usable() {
        return;
    }
    let dir = Scratch::new("listing");
    let Ok((py, line)) =
        std::panic::catch_unwind(|| start(Command::new("python3").args(["-c", PY_SHARED])))
    else {
        skip("python3 not available");
        return;
    };
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    let (buf, seg, child) = (f[0], f[1], f[2]);
    let _child = scopeguard(child);
    let pid = py.0.id();
    let img = dir.p("img");
    let (code, r) = dump_verify(pid, &img, &[]);
    assert_eq!(code, 0, "{r:#}");
    use std::os::unix::fs::FileExt;
    let mem = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .unwrap();
    let page = 4096;
    let first = buf.div_ceil(page) * page;
    // 20 private ranges of one page (every other page), 3 shared ones.
    for i in 0..20 {
        mem.write_all_at(&[0xee], first + 2 * i * page).unwrap();
    }
    for i in 0..3 {
        mem.write_all_at(&[0xee], seg + 4 * i * page).unwrap();
    }
    let (code, r) = verify(pid, &img, &["--limit", "5"]);
    assert_eq!(code, 1, "{r:#}");
    assert_eq!(r["mismatched_pages"], 23, "{r:#}");
    assert_eq!(r["private_mismatched_pages"], 20, "{r:#}");
    assert_eq!(r["shared_mismatched_pages"], 3, "{r:#}");
    assert_eq!(r["mismatched_ranges"], 23, "{r:#}");
    assert_eq!(r["listed_ranges"], 5, "{r:#}");
    assert_eq!(r["mismatches"].as_array().unwrap().len(), 5, "{r:#}");
    assert_eq!(r["omitted_ranges"], 18, "{r:#}");
    let listed: u64 = r["mismatches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["pages"].as_u64().unwrap())
        .sum();
    assert_eq!(listed + r["omitted_pages"].as_u64().unwrap(), 23, "{r:#}");
    assert_eq!(r["process_stopped"], false);
    let writers = r["other_writers"].as_array().unwrap();
    assert!(
        writers
            .iter()
            .any(|w| w["pids"].as_array().unwrap().contains(&child.into())),
        "the forked child maps the segment writable: {r:#}"
    );
    let text = cli(&["verify", &img, &pid.to_string(), "--limit", "3"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("and 20 more ranges (20 pages)"), "{text}");
    assert!(text.contains("differs (private)"), "{text}");
    assert!(text.contains("running (not stopped)"), "{text}");
    assert!(text.contains(&format!("process {child}")), "{text}");
    let all = verify(pid, &img, &["--limit", "100"]).1;
    assert_eq!(all["mismatches"].as_array().unwrap().len(), 23);
    assert!(
        all["mismatches"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["memory"] == "shared")
            .count()
            == 3,
        "{all:#}"
    );
    let _ = py.0.stdin.as_ref().map(|mut s| s.write_all(b""));
}

/// Kills `pid` when dropped.
fn scopeguard(pid: u64) -> impl Drop {
    struct K(i32);
    impl Drop for K {
        fn drop(&mut self) {
            if let Some(p) = rustix::process::Pid::from_raw(self.0) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
        }
    }
    K(i32::try_from(pid).unwrap())
}

/// Every file of an image (and of its parent) removed in turn: `image
/// show`, `verify` and `restore` all exit 12 with one line naming it.
#[test]
fn a_missing_image_file_is_exit_12_from_every_command() {
    if !usable() {
        return;
    }
    let dir = Scratch::new("missing");
    let sleeper = Proc(Command::new("sleep").arg("1000").spawn().unwrap());
    let pid = sleeper.0.id().to_string();
    std::thread::sleep(std::time::Duration::from_millis(50));
    let g0 = dir.p("g0");
    let g1 = dir.p("g1");
    // Relative paths: the copies below name their own parent.
    for (out, parent) in [("g0", None), ("g1", Some("g0"))] {
        let mut args = vec!["dump", pid.as_str(), "-o", out];
        if let Some(p) = parent {
            args.extend(["--parent", p]);
        }
        let d = Command::new(common::exe())
            .args(&args)
            .current_dir(&dir.0)
            .output()
            .unwrap();
        assert!(d.status.success(), "{}", String::from_utf8_lossy(&d.stderr));
    }
    let data_file = |img: &str, ext: &str| {
        std::fs::read_dir(format!("{img}/data"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == ext))
            .map(|p| format!("data/{}", p.file_name().unwrap().to_string_lossy()))
    };
    let files = |img: &str| {
        let mut v = vec![
            "HEADER".to_owned(),
            "meta.json".to_owned(),
            "data".to_owned(),
        ];
        v.extend(data_file(img, "pages"));
        v.extend(data_file(img, "sums"));
        v
    };
    assert_eq!(files(&g0).len(), 5, "the full image stores pages");
    let mut cases = files(&g1);
    cases.extend(files(&g0).into_iter().map(|f| format!("../g0/{f}")));
    for case in &cases {
        let copy = dir.p("copy");
        let _ = std::fs::remove_dir_all(&copy);
        std::fs::create_dir_all(&copy).unwrap();
        for g in ["g0", "g1"] {
            let ok = Command::new("cp")
                .args(["-a", &dir.p(g), &copy])
                .status()
                .unwrap()
                .success();
            assert!(ok);
        }
        let gone = std::path::Path::new(&copy).join("g1").join(case);
        if gone.is_dir() {
            std::fs::remove_dir_all(&gone).unwrap();
        } else {
            std::fs::remove_file(&gone).unwrap();
        }
        let img = format!("{copy}/g1");
        let to = format!("{copy}/restored");
        for args in [
            vec!["image", "show", img.as_str()],
            vec!["image", "show", img.as_str(), "--check-data"],
            vec!["verify", img.as_str(), pid.as_str()],
            vec!["restore", img.as_str(), "--to", to.as_str()],
        ] {
            let out = cli(&args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(12),
                "{case} missing: {args:?}: {err}"
            );
            assert_eq!(err.lines().count(), 1, "{case}: one line: {err}");
            assert!(!std::path::Path::new(&to).exists(), "{case}: restored");
        }
    }
}

const PY_FILES: &str = r#"
import mmap, os, sys
d = sys.argv[1]
f = open(d + '/kept', 'rb')
kept = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
g = open(d + '/gone', 'rb')
gone = mmap.mmap(g.fileno(), 0, prot=mmap.PROT_READ)
kept[0], gone[0]
os.unlink(d + '/gone')
g.close()
print('ready', flush=True)
sys.stdin.read()
"#;

/// A mapped file is reopened at restore only if it is still the same
/// file (another file of equal size and mtime put under its name is
/// refused, exit 12, nothing written); a deleted mapped file is copied
/// into the image and restored byte for byte; output files are 0600.
#[test]
fn files_are_restored_only_from_the_same_file_and_deleted_ones_are_copied() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if !usable() {
        return;
    }
    // On a disk filesystem: tmpfs files are shmem objects, always copied.
    let work = PathBuf::from(format!(
        "/var/tmp/pagescope-verify-files-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let work = Scratch(work);
    let kept: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 251) as u8).collect();
    let gone: Vec<u8> = (0..2 * 4096u32).map(|i| (i % 13) as u8 + 1).collect();
    std::fs::write(work.0.join("kept"), &kept).unwrap();
    std::fs::write(work.0.join("gone"), &gone).unwrap();
    let gone_inode = std::fs::metadata(work.0.join("gone")).unwrap().ino();
    let Ok((py, _)) = std::panic::catch_unwind(|| {
        start(Command::new("python3").args(["-c", PY_FILES, &work.0.display().to_string()]))
    }) else {
        skip("python3 not available");
        return;
    };
    let pid = py.0.id().to_string();
    let img = work.p("img");
    let d = cli(&["dump", &pid, "-o", &img]);
    assert!(d.status.success(), "{}", String::from_utf8_lossy(&d.stderr));
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(format!("{img}/meta.json")).unwrap()).unwrap();
    let objects = meta["objects"].as_array().unwrap();
    let kept_rec = objects
        .iter()
        .find(|o| o["path"].as_str().unwrap().ends_with("/kept"))
        .expect("kept is an object");
    assert!(kept_rec["file"]["inode"].as_u64().is_some(), "{kept_rec:#}");
    let gone_rec = objects
        .iter()
        .find(|o| o["inode"] == gone_inode)
        .expect("gone is an object");
    assert!(
        gone_rec["file"].is_null(),
        "a deleted file is copied: {gone_rec:#}"
    );
    let to = work.p("restored");
    let r = cli(&["restore", &img, "--to", &to]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let name = format!(
        "object-{}-{gone_inode}.mem",
        gone_rec["dev"].as_str().unwrap().replace(':', "_")
    );
    let restored = std::fs::read(format!("{to}/{name}")).unwrap();
    assert_eq!(
        &restored[..gone.len()],
        &gone[..],
        "the deleted file's pages"
    );
    for e in std::fs::read_dir(&to).unwrap() {
        let mode = e.unwrap().metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    // Another file, same size and mtime, under the recorded name.
    let other = work.0.join("other");
    std::fs::write(&other, vec![0x42u8; kept.len()]).unwrap();
    let mtime = std::fs::metadata(work.0.join("kept"))
        .unwrap()
        .modified()
        .unwrap();
    std::fs::File::options()
        .write(true)
        .open(&other)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    std::fs::rename(&other, work.0.join("kept")).unwrap();
    let to2 = work.p("restored2");
    let r = cli(&["restore", &img, "--to", &to2]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(12), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("kept"), "{err}");
    assert!(!std::path::Path::new(&to2).exists());
    assert!(!std::path::Path::new(&format!("{}/restored2.partial", work.0.display())).exists());
}

const PY_SHARED_ANON: &str = r#"
import mmap, sys
seg = mmap.mmap(-1, 64 * 4096)
for i in range(32):
    seg[i * 4096] = 7
print('ready', flush=True)
sys.stdin.read()
"#;

/// As the process's owner (not root), verify of python3's default
/// `mmap.mmap(-1, n)` (shared anonymous, no fd, no map_files privilege)
/// compares the segment through the process's own mappings, lists the
/// pages it does not have present as not compared, and never fails whole;
/// a change in the segment is still found.
#[test]
fn unprivileged_verify_compares_shared_anonymous_memory_through_the_mappings() {
    if !usable() {
        return;
    }
    let dir = Scratch::new("unpriv");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let Ok((py, _)) = std::panic::catch_unwind(|| {
        start(
            Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
                .args(["/usr/bin/python3", "-c", PY_SHARED_ANON])
                .current_dir("/"),
        )
    }) else {
        skip("python3 or setpriv not available");
        return;
    };
    if !std::path::Path::new("/usr/bin/python3").exists() {
        skip("no /usr/bin/python3 for user nobody");
        return;
    }
    let pid = py.0.id().to_string();
    let img = dir.p("img");
    // The image is taken as root (an unprivileged dump of it is issue 21
    // item 6's dump half); verify runs as the owner.
    let d = cli(&["dump", &pid, "-o", &img]);
    assert!(d.status.success(), "{}", String::from_utf8_lossy(&d.stderr));
    let run = || {
        let out = common::as_nobody(&["verify", &img, &pid, "--json"])
            .output()
            .unwrap();
        let r: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        (out.status.code(), r)
    };
    let (code, r) = run();
    assert_eq!(code, Some(0), "{r:#}");
    let through = r["notes"].as_array().unwrap().iter().any(|n| {
        n.as_str()
            .unwrap()
            .contains("through the process's own mappings")
    });
    assert!(through, "{r:#}");
    let unmapped: u64 = r["not_compared"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| {
            n["reason"]
                .as_str()
                .unwrap()
                .starts_with("no descriptor of the object")
        })
        .map(|n| n["pages"].as_u64().unwrap())
        .sum();
    assert_eq!(
        unmapped, 32,
        "the 32 pages never touched are not compared: {r:#}"
    );
    // A write into the segment (as root, through the mapping) is found.
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let seg = maps
        .lines()
        .find(|l| l.contains("rw-s") && l.contains("/dev/zero"))
        .and_then(|l| u64::from_str_radix(l.split('-').next()?, 16).ok())
        .expect("the shared anonymous segment");
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .unwrap()
        .write_all_at(&[9], seg + 3 * 4096 + 1)
        .unwrap();
    let (code, r) = run();
    assert_eq!(code, Some(1), "{r:#}");
    assert_eq!(r["shared_mismatched_pages"], 1, "{r:#}");
}
