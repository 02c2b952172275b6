//! pagescope causes no `EINTR`: a C target blocked in each call of
//! signal(7)'s lists (never restarted after a stop or a handler, and the
//! restartable ones as controls), with no timeout and with a finite one,
//! under `watch` (attach, one interval, detach) and `dump` (its final
//! stopped pass): none returns early, and a finite timeout still ends as a
//! timeout. A real signal sent while the process is stopped still
//! interrupts it.

mod common;

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc::{Receiver, channel};
use std::time::Duration;

use common::skip;

/// Every call `tests/programs/blocking.c` can block in.
const CALLS: [&str; 24] = [
    "epoll_wait",
    "epoll_pwait",
    "epoll_pwait2",
    "semop",
    "semtimedop",
    "sigtimedwait",
    "sigwaitinfo",
    "io_getevents",
    "recv_timeo",
    "recvmmsg",
    "accept_timeo",
    "send_timeo",
    "msgrcv",
    "msgsnd",
    "futex",
    "nanosleep",
    "clock_nanosleep_abs",
    "poll",
    "ppoll",
    "select",
    "pselect",
    "read",
    "inotify_read",
    "pause",
];

/// The calls that take no timeout (recvmmsg checks its timeout only
/// after a datagram arrives: recvmmsg(2), BUGS).
const NO_TIMEOUT: [&str; 8] = [
    "recvmmsg",
    "read",
    "inotify_read",
    "pause",
    "msgrcv",
    "msgsnd",
    "semop",
    "sigwaitinfo",
];

/// The program, built once with `cc`.
fn blocking() -> Option<&'static PathBuf> {
    static EXE: OnceLock<Option<PathBuf>> = OnceLock::new();
    EXE.get_or_init(|| {
        let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/programs/blocking.c");
        let out = std::env::temp_dir().join(format!("pagescope-blocking-{}", std::process::id()));
        let ok = Command::new("cc")
            .args(["-O1", "-pthread", "-o"])
            .arg(&out)
            .arg(src)
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(out)
    })
    .as_ref()
}

struct Target {
    child: Child,
    lines: Receiver<String>,
}

impl Target {
    fn start(call: &str, timeout_ms: i64) -> Self {
        let mut child = Command::new(blocking().unwrap())
            .args([call, &timeout_ms.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let ready = lines.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(ready, "ready", "{call}");
        let t = Self { child, lines };
        t.wait_blocked(call);
        t
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Until the main thread sleeps in a system call.
    fn wait_blocked(&self, call: &str) {
        let t0 = std::time::Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            let stat =
                std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
            let state = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .next();
            if matches!(state, Some("S" | "D")) {
                std::thread::sleep(Duration::from_millis(20));
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("{call}: the target never blocked");
    }

    /// What it printed since (nothing while it still blocks).
    fn returned(&self, wait: Duration) -> Option<String> {
        self.lines.recv_timeout(wait).ok()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn usable() -> bool {
    if !common::is_root() {
        skip("attaching to other processes needs ptrace rights and userfaultfd (root)");
        return false;
    }
    if blocking().is_none() {
        skip("no C compiler (cc) to build tests/programs/blocking.c");
        return false;
    }
    true
}

fn watch(pid: u32) {
    let out = common::cli(&[
        "watch",
        &pid.to_string(),
        "--count",
        "1",
        "--interval",
        "20ms",
        "--json",
    ]);
    assert!(out.status.success(), "watch {pid}: {out:?}");
}

fn dump(pid: u32) {
    let dir = std::env::temp_dir().join(format!("pagescope-eintr-{pid}"));
    let _ = std::fs::remove_dir_all(&dir);
    let out = common::cli(&["dump", &pid.to_string(), "-o", &dir.display().to_string()]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "dump {pid}: {out:?}");
}

/// Blocked with no timeout: `watch` and `dump` make no call return.
#[test]
fn no_call_returns_early_under_watch_or_dump() {
    if !usable() {
        return;
    }
    let mut early = Vec::new();
    for call in CALLS {
        for (what, run) in [("watch", watch as fn(u32)), ("dump", dump)] {
            let t = Target::start(call, -1);
            run(t.pid());
            if let Some(line) = t.returned(Duration::from_millis(300)) {
                early.push(format!("{what}: {line}"));
            }
        }
    }
    assert!(early.is_empty(), "returned early:\n{}", early.join("\n"));
}

/// With a finite timeout the call ends by its timeout (re-issued whole,
/// so at least the timeout), never with EINTR.
#[test]
fn finite_timeouts_end_as_timeouts_not_eintr() {
    if !usable() {
        return;
    }
    const TIMEOUT_MS: i64 = 800;
    let mut wrong = Vec::new();
    for call in CALLS.into_iter().filter(|c| !NO_TIMEOUT.contains(c)) {
        for (what, run) in [("watch", watch as fn(u32)), ("dump", dump)] {
            let t = Target::start(call, TIMEOUT_MS);
            run(t.pid());
            let line = t.returned(Duration::from_secs(10)).unwrap_or_default();
            let elapsed: f64 = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("elapsed_ms="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            if line.contains("EINTR") || elapsed < TIMEOUT_MS as f64 - 5.0 {
                wrong.push(format!("{what}: {call}: {line}"));
            }
        }
    }
    assert!(wrong.is_empty(), "not a timeout:\n{}", wrong.join("\n"));
}

/// A real signal (SIGUSR1, with a handler) that arrives while the process
/// is stopped for the final pass still interrupts the call; one the
/// process ignores (SIGCHLD, default action) does not.
#[test]
fn a_real_signal_during_the_stop_still_interrupts() {
    if !usable() {
        return;
    }
    for (sig, expect_eintr) in [
        (rustix::process::Signal::USR1, true),
        (rustix::process::Signal::CHILD, false),
    ] {
        for call in ["epoll_wait", "semop", "sigtimedwait", "recv_timeo"] {
            let t = Target::start(call, -1);
            let target = pagescope::Target::open(t.pid()).unwrap();
            let stopped = pagescope::raw::Stopped::stop(&target).unwrap();
            let pid = rustix::process::Pid::from_raw(t.pid().cast_signed()).unwrap();
            rustix::process::kill_process(pid, sig).unwrap();
            std::thread::sleep(Duration::from_millis(20));
            stopped.resume();
            let line = t.returned(Duration::from_millis(500));
            if expect_eintr {
                let line = line.unwrap_or_default();
                assert!(
                    line.contains("errno=EINTR") && line.contains("usr1=1"),
                    "{call} {sig:?}: {line}"
                );
            } else {
                assert_eq!(line, None, "{call} {sig:?}");
            }
        }
    }
}

/// `dump --leave-stopped`: the thread is rewound before the `SIGSTOP`, so
/// the `SIGCONT` that lets it go finds it issuing the call again.
#[test]
fn leave_stopped_then_sigcont_does_not_interrupt() {
    if !usable() {
        return;
    }
    for call in ["epoll_wait", "semop", "recv_timeo"] {
        let t = Target::start(call, -1);
        let dir = std::env::temp_dir().join(format!("pagescope-eintr-ls-{}", t.pid()));
        let _ = std::fs::remove_dir_all(&dir);
        let out = common::cli(&[
            "dump",
            &t.pid().to_string(),
            "-o",
            &dir.display().to_string(),
            "--leave-stopped",
        ]);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(out.status.success(), "{out:?}");
        let pid = rustix::process::Pid::from_raw(t.pid().cast_signed()).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::CONT).unwrap();
        assert_eq!(t.returned(Duration::from_millis(300)), None, "{call}");
    }
}

/// `watch` injects into a thread that is not in such a call when there is
/// one: the main thread's finite `epoll_wait` is not even restarted (it
/// ends on time, not later by the time it had waited).
#[test]
fn injection_prefers_a_thread_outside_never_restarted_calls() {
    if !usable() {
        return;
    }
    const TIMEOUT_MS: f64 = 1000.0;
    let t = Target::start("epoll_wait_threaded", TIMEOUT_MS as i64);
    // Restarted whole, it would end 500 ms late.
    std::thread::sleep(Duration::from_millis(500));
    watch(t.pid());
    let line = t.returned(Duration::from_secs(5)).unwrap_or_default();
    let elapsed: f64 = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("elapsed_ms="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(
        line.contains("rc=0") && (TIMEOUT_MS - 5.0..TIMEOUT_MS + 300.0).contains(&elapsed),
        "{line}"
    );
}
