//! `dump` as the process's owner, without privilege: python3's default
//! `mmap.mmap(-1, n)` (`MAP_SHARED|MAP_ANONYMOUS`, no descriptor anyone
//! holds, `map_files` refused) is copied through the process's own
//! mapping, a note names the object and what was not copied, the dump
//! succeeds and restores the bytes python wrote.
//!
//! As root both python3 and pagescope run as `nobody` (setpriv).

mod common;

use std::io::BufRead;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::skip;

const PAGES: usize = 64;
const WRITTEN: usize = 40;

const SCRIPT: &str = r#"
import ctypes, mmap, sys, time
m = mmap.mmap(-1, 64 * 4096)
for i in range(40):
    m[i * 4096] = i + 1
    m[i * 4096 + 4095] = 255 - i
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
print("ready %x" % addr, flush=True)
sys.stdin.read()
"#;

#[test]
fn unprivileged_dump_copies_python_shared_anonymous_mmap_through_the_mapping() {
    if !common::is_root() {
        skip("needs root to run python3 and pagescope as nobody");
        return;
    }
    let python = PathBuf::from("/usr/bin/python3");
    if !python.exists() {
        skip("no /usr/bin/python3 (a python nobody can run)");
        return;
    }
    let dir = common::Scratch::new("dumpunpriv");
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o777)).unwrap();
    let script = dir.0.join("shared_anon.py");
    std::fs::write(&script, SCRIPT).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut child = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&python)
        .arg(&script)
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = u64::from_str_radix(line.trim().strip_prefix("ready ").unwrap(), 16).unwrap();
    let pid = child.id().to_string();
    let img = dir.0.join("img").display().to_string();
    let out = common::as_nobody(&["dump", &pid, "-o", &img, "--json"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let notes: Vec<&str> = report["notes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n.as_str())
        .collect();
    let note = notes
        .iter()
        .find(|n| n.contains("/dev/zero") && n.contains("cannot be opened"))
        .unwrap_or_else(|| panic!("no note on the shared anonymous object: {notes:?}"));
    assert!(
        note.contains("copied through the process's mappings"),
        "{note}"
    );
    assert!(note.contains("not copied"), "{note}");
    let to = dir.0.join("restored").display().to_string();
    let restored = common::as_nobody(&["restore", &img, "--to", &to])
        .output()
        .unwrap();
    assert_eq!(restored.status.code(), Some(0), "{restored:?}");
    let name = std::fs::read_dir(&to)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with(&format!("pid-{pid}-{addr:x}-")))
        .unwrap_or_else(|| panic!("no restored file for the mapping at {addr:#x}"));
    let bytes = std::fs::read(PathBuf::from(&to).join(name)).unwrap();
    assert_eq!(bytes.len(), PAGES * 4096);
    for p in 0..PAGES {
        let page = &bytes[p * 4096..(p + 1) * 4096];
        let mut want = vec![0u8; 4096];
        if p < WRITTEN {
            want[0] = u8::try_from(p + 1).unwrap();
            want[4095] = u8::try_from(255 - p).unwrap();
        }
        assert!(page == want.as_slice(), "page {p} restored wrong");
    }
    drop(child.stdin.take());
    let _ = child.kill();
    let _ = child.wait();
}

/// The fixture's SysV segment and shared anonymous region (resident,
/// swapped and hole pages, no descriptor held) dumped and restored as
/// `nobody`: every shared mapping restores to exactly the process's
/// memory, and the SysV note says no page of the segment was left out.
#[test]
fn unprivileged_dump_of_sysv_and_shared_anonymous_restores_exactly_swapdev() {
    if !common::is_root() {
        skip("needs root to run the fixture and pagescope as nobody");
        return;
    }
    let mut fx = common::unprivileged_fixture(&["sysv", "shared_anon"]);
    for s in &fx.truth().skipped {
        skip(&format!("scenario {}: {}", s.scenario, s.reason));
    }
    let pid = fx.pid();
    let dir = common::Scratch::new("dumpunpriv-fx");
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o777)).unwrap();
    let img = dir.p("img");
    let out = common::as_nobody(&["dump", &pid.to_string(), "-o", &img, "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let notes = report["notes"].to_string();
    assert!(
        notes.contains("SYSV") && notes.contains("no mapping leaves any of its pages out"),
        "{notes}"
    );
    let to = dir.p("restored");
    let restored = common::as_nobody(&["restore", &img, "--to", &to])
        .output()
        .unwrap();
    assert_eq!(restored.status.code(), Some(0), "{restored:?}");
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut compared = 0;
    for l in maps.lines().filter(|l| l.contains(" rw-s ")) {
        let (range, _) = l.split_once(' ').unwrap();
        let (s, e) = range.split_once('-').unwrap();
        let (s, e) = (
            u64::from_str_radix(s, 16).unwrap(),
            u64::from_str_radix(e, 16).unwrap(),
        );
        let name = format!("pid-{pid}-{s:x}-{e:x}.mem");
        let got = std::fs::read(std::path::Path::new(&to).join(&name))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut want = vec![0u8; usize::try_from(e - s).unwrap()];
        std::os::unix::fs::FileExt::read_exact_at(&mem, &mut want, s).unwrap();
        assert!(got == want, "{l}: restored bytes differ from the process's");
        compared += 1;
    }
    assert!(compared >= 2, "no shared mappings compared:\n{maps}");
    assert_eq!(fx.command("ping").unwrap(), "pong");
}
