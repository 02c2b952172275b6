//! `dump`'s life as a command: exit codes exactly as documented (a target
//! that exits or turns zombie mid-dump is 9, privilege refusals 4, options
//! refused before the image directory exists), SIGINT/SIGTERM/SIGHUP
//! (the target let go untouched, the incomplete image removed, one line,
//! 128 + the signal), a directory an interrupted dump left is reused, and
//! a closed stdout exits 0 for every command.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Scratch, can_dump, cli, skip, status_field, uffd_fds, vmflag_mappings};
use pagescope_fixture::FixtureProcess;

/// A fixture holding `pages` written pages (a dump of it takes a while).
fn big_fixture(pages: u64) -> FixtureProcess {
    let mut fx = common::fixture(&["anon"]);
    fx.command(&format!("mmap big {pages}")).unwrap();
    fx.command(&format!("write big 0 {pages}")).unwrap();
    fx
}

fn dump_cmd(pid: u32, out: &str, extra: &[&str]) -> Child {
    Command::new(common::exe())
        .args(["dump", &pid.to_string(), "-o", out])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < Duration::from_secs(20), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// SIGINT, SIGTERM, SIGHUP in the middle of a dump (with pre-copy
/// tracking kept in the target, the case with the most to undo): exit
/// 130/143/129, one line, no image left, the target running, untraced,
/// with no userfaultfd and nothing write-protected.
#[test]
fn a_signal_stops_the_dump_and_leaves_the_target_as_it_was() {
    if !can_dump() {
        return;
    }
    let mut fx = big_fixture(65536);
    let pid = fx.pid();
    let dir = Scratch::new("dumpexit-sig");
    for (sig, code, how) in [
        (rustix::process::Signal::INT, 130, "--keep-tracking"),
        (rustix::process::Signal::TERM, 143, "--keep-tracking"),
        (rustix::process::Signal::HUP, 129, "--keep-tracking"),
        (rustix::process::Signal::TERM, 143, "--snapshot=cow"),
    ] {
        let out = dir.p(&format!("img{code}{how}"));
        let child = dump_cmd(pid, &out, &[how]);
        wait_for("the dump writes its first store", || {
            std::fs::read_dir(Path::new(&out).join("data")).is_ok_and(|mut d| d.next().is_some())
        });
        let dumper = rustix::process::Pid::from_raw(child.id().cast_signed()).unwrap();
        rustix::process::kill_process(dumper, sig).unwrap();
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        let last: Vec<&str> = err
            .lines()
            .filter(|l| l.starts_with("pagescope:"))
            .collect();
        assert_eq!(o.status.code(), Some(code), "{sig:?}: {err}");
        assert_eq!(last.len(), 1, "{sig:?}: {err}");
        assert!(last[0].contains("interrupted"), "{err}");
        assert!(
            !Path::new(&out).exists(),
            "{sig:?}: the incomplete image stayed"
        );
        assert_eq!(status_field(pid, "TracerPid:"), "0");
        assert_eq!(
            uffd_fds(pid),
            0,
            "{sig:?}: a userfaultfd stayed in the target"
        );
        assert_eq!(
            vmflag_mappings(pid, "uw"),
            0,
            "{sig:?}: still write-protected"
        );
        assert_eq!(fx.command("ping").unwrap(), "pong");
    }
}

/// The target is killed at different moments of the dump (left a zombie:
/// the test does not reap it until the dump ended): exit 9 unless the
/// dump completed first, never 5 or 1.
#[test]
fn a_target_that_exits_or_turns_zombie_mid_dump_is_exit_9() {
    if !can_dump() {
        return;
    }
    let dir = Scratch::new("dumpexit-exit");
    let mut nines = 0;
    for (round, delay_ms) in [0u64, 5, 20, 50, 100, 200].into_iter().enumerate() {
        let fx = big_fixture(32768);
        let pid = fx.pid();
        let out = dir.p(&format!("img{round}"));
        let child = dump_cmd(pid, &out, &[]);
        std::thread::sleep(Duration::from_millis(delay_ms));
        // Killed, not reaped: a zombie until `fx` is dropped.
        let target = rustix::process::Pid::from_raw(pid.cast_signed()).unwrap();
        rustix::process::kill_process(target, rustix::process::Signal::KILL).unwrap();
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        match o.status.code() {
            Some(0) => assert!(Path::new(&out).join("HEADER").exists()),
            Some(9) => {
                nines += 1;
                assert!(!Path::new(&out).exists(), "an incomplete image stayed");
            }
            c => panic!("killed after {delay_ms} ms: exit {c:?}: {err}"),
        }
        drop(fx);
    }
    assert!(nines > 0, "the target never died during a dump");
}

/// Refusals for lack of privilege exit 4; options that cannot be combined
/// exit 2; neither leaves an image directory behind.
#[test]
fn refusals_happen_before_the_image_directory_exists() {
    if !can_dump() {
        return;
    }
    let dir = Scratch::new("dumpexit-refuse");
    let mut fx = common::fixture(&["anon"]);
    let pid = fx.pid().to_string();
    let out = cli(&[
        "dump",
        &pid,
        "-o",
        &dir.p("a"),
        "--snapshot",
        "cow",
        "--tree",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(!Path::new(&dir.p("a")).exists());
    let unprivileged = common::unprivileged_fixture(&["anon"]);
    if std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
        .unwrap_or_default()
        .trim()
        != "0"
    {
        skip(
            "vm.unprivileged_userfaultfd = 1: an unprivileged process can take part in a cow snapshot",
        );
    } else {
        let upid = unprivileged.pid().to_string();
        let out = cli(&["dump", &upid, "-o", &dir.p("b"), "--snapshot", "cow"]);
        assert_eq!(out.status.code(), Some(4), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(!Path::new(&dir.p("b")).exists());
    }
    // nobody dumping a root process: ptrace refused.
    std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let out = common::as_nobody(&["dump", &pid, "-o", &dir.p("c")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(!Path::new(&dir.p("c")).exists());
    assert_eq!(fx.command("ping").unwrap(), "pong");
}

/// A dump killed with SIGKILL leaves a directory without HEADER; the next
/// `dump -o` there reuses it with a note. A directory holding anything
/// else is still refused (exit 2), and left alone.
#[test]
fn a_directory_left_by_an_interrupted_dump_is_reused() {
    if !can_dump() {
        return;
    }
    let mut fx = big_fixture(32768);
    let pid = fx.pid();
    let dir = Scratch::new("dumpexit-reuse");
    let out = dir.p("img");
    let mut child = dump_cmd(pid, &out, &[]);
    wait_for("the dump writes its first store", || {
        std::fs::read_dir(Path::new(&out).join("data")).is_ok_and(|mut d| d.next().is_some())
    });
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(Path::new(&out).join("data").exists());
    assert!(!Path::new(&out).join("HEADER").exists());
    let again = cli(&["dump", &pid.to_string(), "-o", &out]);
    let err = String::from_utf8_lossy(&again.stderr);
    assert_eq!(again.status.code(), Some(0), "{err}");
    assert!(err.contains("reused"), "{err}");
    assert!(Path::new(&out).join("HEADER").exists());
    let verify = cli(&["image", "show", &out, "--check-data"]);
    assert_eq!(verify.status.code(), Some(0), "{verify:?}");
    let other = dir.p("other");
    std::fs::create_dir_all(Path::new(&other).join("data")).unwrap();
    std::fs::write(Path::new(&other).join("mine.txt"), b"keep").unwrap();
    let refused = cli(&["dump", &pid.to_string(), "-o", &other]);
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    assert!(Path::new(&other).join("mine.txt").exists());
    assert_eq!(fx.command("ping").unwrap(), "pong");
}

/// Runs `pagescope ARGS` with stdout a pipe whose reader closes before
/// the first write (`| true`) or after reading a little (`| head -c 10`).
fn with_closed_stdout(args: &[&str], read_first: bool) -> Option<i32> {
    let mut child = Command::new(common::exe())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    if read_first {
        let mut b = [0u8; 10];
        let _ = std::io::Read::read(&mut out, &mut b);
    }
    drop(out);
    child.wait().unwrap().code()
}

#[test]
fn a_closed_stdout_exits_0_for_every_command() {
    let mut fx = common::fixture(&["anon", "shmem"]);
    let pid = fx.pid().to_string();
    let dir = Scratch::new("dumpexit-pipe");
    let img = dir.p("img");
    let mut commands: Vec<Vec<String>> = vec![
        vec!["pages".into(), pid.clone(), "--json".into()],
        vec!["pages".into(), pid.clone()],
        vec!["map".into(), pid.clone(), "--json".into()],
        vec!["map".into(), pid.clone()],
        vec!["top".into(), "--json".into()],
        vec!["top".into()],
        vec!["objects".into(), "--all".into(), "--json".into()],
        vec!["kernel".into()],
    ];
    if can_dump() {
        assert_eq!(cli(&["dump", &pid, "-o", &img]).status.code(), Some(0));
        commands.extend([
            vec![
                "watch".into(),
                pid.clone(),
                "--count".into(),
                "1".into(),
                "--interval".into(),
                "10ms".into(),
                "--json".into(),
            ],
            vec!["image".into(), "show".into(), img.clone(), "--json".into()],
            vec!["image".into(), "show".into(), img.clone()],
        ]);
    }
    let mut wrong = Vec::new();
    for args in &commands {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // What it exits with when its output is read whole (8: some
        // process could not be examined, as `top` may find on a busy host).
        let whole = Command::new(common::exe())
            .args(&args)
            .output()
            .unwrap()
            .status
            .code();
        for read_first in [false, true] {
            let code = with_closed_stdout(&args, read_first);
            if code != Some(0) && code != whole {
                wrong.push(format!(
                    "{args:?} (read first: {read_first}): exit {code:?}"
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert_eq!(fx.command("ping").unwrap(), "pong");
}
