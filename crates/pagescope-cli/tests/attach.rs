//! Attaching to a process must never harm it: a fault or a signal to
//! pagescope at every step of the userfaultfd injection leaves the target
//! running, its registers and memory intact and no userfaultfd in it.
//! Plus the ways attaching can fail or degrade: a target already tracked,
//! one whose seccomp filter refuses userfaultfd, an unprivileged target.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{caps, fixture, skip, status_field};
use pagescope::dirty::Device;
use pagescope::dirty::{DirtyReport, TrackOptions, TrackerBackend, WriteSource, attach_owned};
use pagescope::raw::InjectStep as Step;
use pagescope::{Target, VirtAddr};
use pagescope_fixture::{FixtureProcess, Truth};

fn usable() -> bool {
    if !common::is_root() {
        skip(
            "injecting into other processes needs ptrace rights and userfaultfd (root or CAP_SYS_PTRACE)",
        );
        return false;
    }
    if !caps().has_uffd_wp_async() {
        skip("kernel lacks userfaultfd WP_ASYNC or PAGEMAP_SCAN (Linux 6.7+)");
        return false;
    }
    true
}

/// The system call the fixture sleeps in, with its arguments, stack
/// pointer and instruction pointer (`/proc/PID/syscall`), once it sleeps
/// in read() on its stdin.
fn sleeping_syscall(pid: u32) -> String {
    let t0 = Instant::now();
    loop {
        let s = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
        let traced = status_field(pid, "TracerPid:") != "0";
        if (s.starts_with("0 ") && !traced) || t0.elapsed() > Duration::from_secs(10) {
            return s;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs `attach_attempt` against the sleeping fixture and checks that
/// nothing changed: the same read() with the same registers, no tracer,
/// no userfaultfd fd, no write-protected VMA, the same memory, the same
/// fds.
fn assert_untouched(fx: &mut FixtureProcess, what: &str, attach_attempt: impl FnOnce()) {
    let pid = fx.pid();
    let view = fx.command("selfview").unwrap();
    let fds = Target::open(pid).unwrap().fds().unwrap();
    let before = sleeping_syscall(pid);
    attach_attempt();
    let after = sleeping_syscall(pid);
    assert_eq!(
        Target::open(pid).unwrap().fds().unwrap(),
        fds,
        "{what}: fds changed"
    );
    assert_eq!(status_field(pid, "TracerPid:"), "0", "{what}: still traced");
    assert_eq!(
        after, before,
        "{what}: registers at the sleeping system call changed"
    );
    assert_eq!(fx.command("ping").unwrap(), "pong", "{what}: target dead");
    assert_eq!(
        fx.command("selfview").unwrap(),
        view,
        "{what}: memory view changed"
    );
    for n in Target::open(pid).unwrap().fds().unwrap() {
        let link = std::fs::read_link(format!("/proc/{pid}/fd/{n}")).unwrap_or_default();
        assert!(
            !link.to_string_lossy().contains("userfaultfd"),
            "{what}: fd {n} -> {link:?}"
        );
    }
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    assert!(
        !smaps
            .lines()
            .any(|l| l.starts_with("VmFlags:") && l.split(' ').any(|f| f == "uw")),
        "{what}: write protection left behind"
    );
}

fn watch_once(pid: u32, failpoint: &str) -> std::process::ExitStatus {
    pagescope_with_default_signals()
        .args([
            "watch",
            &pid.to_string(),
            "--count",
            "1",
            "--interval",
            "10ms",
            "--json",
        ])
        .env("PAGESCOPE_FAILPOINT", failpoint)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
}

/// `pagescope` with the default action for every signal the failpoints
/// send: a suite started in the background by a non-interactive shell
/// inherits SIGINT and SIGQUIT ignored, and a SIGQUIT would then not end
/// pagescope.
fn pagescope_with_default_signals() -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(common::exe());
    // SAFETY: between fork and exec only sigaction-level calls
    // (async-signal-safe) run; no allocation, no locks.
    unsafe {
        cmd.pre_exec(|| {
            for sig in [
                libc::SIGINT,
                libc::SIGTERM,
                libc::SIGHUP,
                libc::SIGQUIT,
                libc::SIGPIPE,
            ] {
                libc::signal(sig, libc::SIG_DFL);
            }
            Ok(())
        });
    }
    cmd
}

/// The steps the helper does not reach for `fx`: for a root-owned
/// target the system call succeeds (no device handed, no fallback); for
/// an unprivileged one pagescope (root) hands it `/dev/userfaultfd`
/// (no `UFFD_USER_MODE_ONLY` or in-target `open` fallback).
fn unreached(unprivileged: bool) -> Vec<Step> {
    let mut skipped = vec![Step::UserModeOnly, Step::DevUserfaultfd];
    if !unprivileged {
        skipped.extend(
            (1..=Step::LAST)
                .filter_map(Step::from_raw)
                .filter(|s| s.hands_device()),
        );
    }
    skipped
}

/// The targets every failpoint runs against: root-owned, and unprivileged
/// (`nobody`: the device is handed to it).
fn attach_targets() -> [(bool, FixtureProcess); 2] {
    [
        (false, fixture(&["anon"])),
        (true, common::unprivileged_fixture(&["anon"])),
    ]
}

/// Every step of the injection, every signal that ends or interrupts
/// pagescope (SIGKILL included): the helper finishes restoring the
/// target, which never notices.
#[test]
fn signals_to_pagescope_during_attach_never_harm_the_target() {
    if !usable() {
        return;
    }
    for (unprivileged, mut fx) in attach_targets() {
        let pid = fx.pid();
        let mut killed = 0;
        for step in 1..=Step::LAST {
            for sig in [
                libc::SIGINT,
                libc::SIGTERM,
                libc::SIGHUP,
                libc::SIGQUIT,
                libc::SIGPIPE,
                libc::SIGKILL,
            ] {
                let what = format!("signal {sig} at step {step} (unprivileged: {unprivileged})");
                assert_untouched(&mut fx, &what, || {
                    let status = watch_once(pid, &format!("inject:{step}:signal-parent:{sig}"));
                    use std::os::unix::process::ExitStatusExt;
                    if status.signal() == Some(sig) {
                        killed += 1;
                    }
                });
            }
        }
        // The failpoint really fired: SIGQUIT and SIGKILL killed pagescope
        // at every step the helper reached (SIGINT, SIGTERM and SIGHUP are
        // handled, SIGPIPE ignored).
        let reached = Step::LAST - i32::try_from(unreached(unprivileged).len()).unwrap();
        assert!(
            killed >= 2 * reached,
            "only {killed} kills (unprivileged: {unprivileged})"
        );
    }
}

/// A failure at any step is reported as an error (never a crash), and
/// the target is left as it was.
#[test]
fn a_failure_at_any_attach_step_leaves_the_target_intact() {
    if !usable() {
        return;
    }
    for (unprivileged, mut fx) in attach_targets() {
        let pid = fx.pid();
        for n in 1..=Step::LAST {
            let step = Step::from_raw(n).unwrap();
            let mut status = None;
            let what = format!("failure at step {n} {step:?} (unprivileged: {unprivileged})");
            assert_untouched(&mut fx, &what, || {
                status = Some(watch_once(pid, &format!("inject:{n}:fail")));
            });
            // A failure up to creating and copying the fd, or handing it
            // over, fails the attach; closing fds in the target, restoring
            // its registers and detaching are retried and recover (steps
            // not reached for this target cannot fail it).
            let recovers = [
                Step::HandClose,
                Step::CloseInTarget,
                Step::Restore,
                Step::Detach,
            ];
            if !recovers.contains(&step) && !unreached(unprivileged).contains(&step) {
                assert!(
                    !status.unwrap().success(),
                    "{what}: a failed attach must not exit 0"
                );
            }
        }
    }
}

/// A second tracker of the same process gets a clear error naming it.
#[test]
fn a_second_watcher_is_refused_with_a_clear_error() {
    if !usable() {
        return;
    }
    let fx = fixture(&["anon"]);
    let pid = fx.pid().to_string();
    let _first = attach_owned(
        Target::open(fx.pid()).unwrap(),
        caps(),
        &TrackOptions::default(),
    )
    .expect("first attach");
    let out = common::cli(&["watch", &pid, "--count", "1", "--interval", "10ms"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(11), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&pid) && err.contains("already tracked"),
        "{err}"
    );
}

/// A seccomp filter that refuses userfaultfd() (as container runtimes'
/// default profiles do): pagescope creates the uffd through
/// /dev/userfaultfd inside the target and tracks exactly; if that is
/// refused too, `watch` will not silently report everything.
#[test]
fn seccomp_refusing_userfaultfd_uses_dev_userfaultfd_or_says_degraded() {
    if !usable() {
        return;
    }
    let mut fx = fixture(&["anon", "--deny-uffd", "syscall"]);
    let truth = fx.truth().clone();
    let mut t = attach_owned(
        Target::open(fx.pid()).unwrap(),
        caps(),
        &TrackOptions::default(),
    )
    .expect("attach through /dev/userfaultfd");
    assert_eq!(t.backend(), TrackerBackend::UffdWpAsync, "{:?}", t.notes());
    t.collect().unwrap();
    fx.command("write anon_present 3 2").unwrap();
    assert_eq!(
        pages(&truth, "anon_present", &t.collect().unwrap()),
        vec![3, 4]
    );
    drop(t);

    let fx = fixture(&["anon", "--deny-uffd", "all"]);
    let pid = fx.pid().to_string();
    let out = common::cli(&["watch", &pid, "--count", "1", "--interval", "10ms"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(10), "{err}");
    assert!(
        err.contains("--allow-fallback") && err.contains(&pid),
        "{err}"
    );
    let out = common::cli(&[
        "watch",
        &pid,
        "--count",
        "2",
        "--interval",
        "50ms",
        "--json",
        "--allow-fallback",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for l in &lines[..2] {
        assert_eq!(l["backend"], "all_dirty");
        assert!(
            l["degraded"]
                .as_str()
                .is_some_and(|d| d.contains("userfaultfd")),
            "{l}"
        );
    }
}

fn pages(truth: &Truth, region: &str, r: &DirtyReport) -> Vec<u64> {
    let reg = truth.region(region).unwrap();
    (0..reg.pages)
        .filter(|&i| r.contains(VirtAddr::new(reg.page_addr(i, truth.page_size))))
        .collect()
}

/// An unprivileged target where `vm.unprivileged_userfaultfd = 0`, and
/// pagescope does not hand it `/dev/userfaultfd`: the injected
/// userfaultfd() gets EPERM, pagescope retries with UFFD_USER_MODE_ONLY,
/// and a kernel-mode write (read() into a tracked page) is still reported.
#[test]
fn unprivileged_targets_are_tracked_with_user_mode_only() {
    if !usable() {
        return;
    }
    let sysctl =
        std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").unwrap_or_default();
    let mut fx = common::unprivileged_fixture(&["anon"]);
    let truth = fx.truth().clone();
    // pagescope (root) would hand the target its /dev/userfaultfd; here it
    // must not.
    let opts = TrackOptions {
        device: Device::Keep,
        ..TrackOptions::default()
    };
    let mut t = attach_owned(Target::open(fx.pid()).unwrap(), caps(), &opts).expect("attach");
    assert_eq!(t.backend(), TrackerBackend::UffdWpAsync);
    assert_eq!(t.degraded(), None);
    if sysctl.trim() == "0" {
        assert!(
            t.notes().iter().any(|n| n.contains("UFFD_USER_MODE_ONLY")),
            "{:?}",
            t.notes()
        );
    }
    t.collect().unwrap();
    fx.command("readinto anon_present 6 2").unwrap();
    fx.command("write anon_present 1 1").unwrap();
    let r = t.collect().unwrap();
    assert_eq!(pages(&truth, "anon_present", &r), vec![1, 6, 7]);
    assert!(
        r.sources_at(VirtAddr::new(
            truth
                .region("anon_present")
                .unwrap()
                .page_addr(6, truth.page_size)
        )) == vec![WriteSource::Tracked]
    );
}

/// An unprivileged target, pagescope root: it hands the target its
/// `/dev/userfaultfd` and the target's uffd is a full one, so its shared
/// memory is tracked synchronously across fork, and a kernel-mode write
/// (read() into a tracked shared page) succeeds and is reported exactly.
#[test]
fn unprivileged_targets_get_a_full_userfaultfd_from_pagescope() {
    if !usable() {
        return;
    }
    let mut fx = common::unprivileged_fixture(&["anon", "shared_anon"]);
    let truth = fx.truth().clone();
    let mut t = attach_owned(
        Target::open(fx.pid()).unwrap(),
        caps(),
        &TrackOptions::default(),
    )
    .expect("attach");
    assert_eq!(t.backend(), TrackerBackend::UffdWpAsync);
    assert_eq!(t.degraded(), None);
    let notes = t.notes();
    assert!(
        notes
            .iter()
            .any(|n| n.contains("handed it /dev/userfaultfd"))
            && !notes.iter().any(|n| n.contains("UFFD_USER_MODE_ONLY")),
        "{notes:?}"
    );
    assert!(t.collect().unwrap().forks_tracked, "{notes:?}");
    let sharer: u32 = fx.command("sharer start").unwrap().parse().unwrap();
    t.collect().unwrap();
    fx.command("readinto shared_anon 6 2")
        .expect("a kernel-mode write into a synchronously protected page");
    fx.command("write anon_present 1 1").unwrap();
    fx.command("sharer write shared_anon 3 1").unwrap();
    let r = t.collect().unwrap();
    assert!(r.forks_tracked);
    assert_eq!(pages(&truth, "anon_present", &r), vec![1]);
    assert_eq!(pages(&truth, "shared_anon", &r), vec![3, 6, 7]);
    for p in [3, 6, 7] {
        let at = VirtAddr::new(
            truth
                .region("shared_anon")
                .unwrap()
                .page_addr(p, truth.page_size),
        );
        assert!(r.sources_at(at).iter().all(|s| s.is_exact()), "page {p}");
    }
    assert!(r.children.contains(&sharer), "{:?}", r.children);
    fx.command("sharer stop").unwrap();
}

/// The device is handed to a busy multi-threaded unprivileged target: the
/// helper stops every thread for it, the attach succeeds while four
/// threads write, and every page they write afterwards is reported
/// exactly.
#[test]
fn the_device_is_handed_to_a_busy_multi_threaded_target() {
    if !usable() {
        return;
    }
    let mut fx = common::unprivileged_fixture(&["shared_anon"]);
    let truth = fx.truth().clone();
    let pid = fx.pid();
    let fds = Target::open(pid).unwrap().fds().unwrap();
    let mut t = std::thread::scope(|s| {
        let writers = s.spawn(|| fx.command("writers shared_anon 4 2000"));
        std::thread::sleep(Duration::from_millis(300));
        let tasks = Target::open(pid).unwrap().tasks().unwrap().len();
        let t = attach_owned(Target::open(pid).unwrap(), caps(), &TrackOptions::default())
            .expect("attach to a busy target");
        writers.join().unwrap().expect("the writers ran on");
        assert!(tasks >= 5, "{tasks} threads");
        t
    });
    assert!(
        t.notes()
            .iter()
            .any(|n| n.contains("handed it /dev/userfaultfd")),
        "{:?}",
        t.notes()
    );
    let r = t.collect().unwrap();
    assert!(r.forks_tracked);
    let all: Vec<u64> = (0..truth.region("shared_anon").unwrap().pages).collect();
    assert_eq!(pages(&truth, "shared_anon", &r), all);
    assert_eq!(Target::open(pid).unwrap().fds().unwrap(), fds);
}

/// `watch` on a process that exits before the first interval ends says
/// so with exit code 9.
#[test]
fn watch_of_a_process_that_exits_at_once_exits_9() {
    if !usable() {
        return;
    }
    // sh runs sleep and exits; the sleep is reparented and reaped by init,
    // so the target does not linger as our zombie.
    let out = Command::new("sh")
        .args(["-c", "sleep 0.5 >/dev/null 2>&1 & echo $!"])
        .output()
        .unwrap();
    let pid = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let out = common::cli(&["watch", &pid, "--interval", "2s"]);
    assert_eq!(
        out.status.code(),
        Some(9),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
