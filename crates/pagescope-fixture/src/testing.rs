//! What the behaviour tests of pagescope's library and CLI share: the one
//! skip helper, starting fixtures, scanning them, checking reports
//! against the fixture's ground truth, running programs as `nobody`.
//!
//! Every skip goes through [`skip`], which writes `skipped: <reason>` to
//! the real stderr (libtest does not capture it) and to
//! `$PAGESCOPE_SKIP_LOG` when set, so `scripts/test` can count skips per
//! test binary; under `PAGESCOPE_NO_SKIP=1` (set by `scripts/test` when run
//! as root, as in CI) it fails the test instead.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use pagescope::{
    BackendChoice, KernelCaps, ProcessReport, ScanOptions, ScanStrategy, Target, scan_process,
};

use crate::{FixtureProcess, Region, Truth};

/// Reports a skipped check (or fails it under `PAGESCOPE_NO_SKIP=1`).
pub fn skip(reason: &str) {
    if std::env::var_os("PAGESCOPE_NO_SKIP").is_some_and(|v| v == "1") {
        panic!("test would skip, but PAGESCOPE_NO_SKIP=1 forbids it: {reason}");
    }
    let line = format!("skipped: {reason}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
    if let Some(log) = std::env::var_os("PAGESCOPE_SKIP_LOG") {
        let binary = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_default();
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            let _ = write!(f, "{binary}\t{line}");
        }
    }
}

/// Whether we run as root.
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Kernel capabilities, probed once.
pub fn caps() -> &'static KernelCaps {
    static CAPS: OnceLock<KernelCaps> = OnceLock::new();
    CAPS.get_or_init(KernelCaps::probe)
}

/// The fixture binary (next to the test executable's directory).
pub fn fixture_exe() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| FixtureProcess::locate().expect("the pagescope-fixture binary"))
}

/// Starts the fixture with `args` as the current user.
pub fn fixture(args: &[&str]) -> FixtureProcess {
    FixtureProcess::spawn(fixture_exe(), args).expect("start fixture")
}

/// Scans `pid` through the library.
pub fn scan(pid: u32, backend: BackendChoice) -> ProcessReport {
    let target = Target::open(pid).expect("pin target");
    let opts = ScanOptions {
        backend,
        objects: true,
        ..ScanOptions::default()
    };
    scan_process(&target, caps(), &opts).expect("scan")
}

/// Scans with explicit options.
pub fn scan_with(pid: u32, opts: &ScanOptions) -> ProcessReport {
    let target = Target::open(pid).expect("pin target");
    scan_process(&target, caps(), opts).expect("scan")
}

/// Regions of `truth` the test must check; regions whose layout could not
/// be built go through [`skip`].
pub fn checkable<'a>(truth: &'a Truth, scenario: Option<&str>) -> Vec<&'a Region> {
    let mut out = Vec::new();
    for s in &truth.skipped {
        if scenario.is_none_or(|want| want == s.scenario) {
            skip(&format!("scenario {}: {}", s.scenario, s.reason));
        }
    }
    for r in truth
        .regions
        .iter()
        .filter(|r| scenario.is_none_or(|s| s == r.scenario))
    {
        match &r.skip {
            Some(why) if r.scenario == "bench" => {
                let _ = why;
            }
            Some(why) => skip(&format!("region {}: {why}", r.name)),
            None => out.push(r),
        }
    }
    out
}

/// Asserts that every checkable region of `truth` matches `report`.
pub fn assert_matches_truth(truth: &Truth, report: &ProcessReport, scenario: Option<&str>) {
    let regions = checkable(truth, scenario);
    let mismatches: Vec<_> = regions
        .iter()
        .flat_map(|r| crate::check::check_region(truth, r, report))
        .collect();
    assert!(
        mismatches.is_empty(),
        "{} mismatching pages (backend {}), first: {}",
        mismatches.len(),
        report.backend,
        mismatches
            .iter()
            .take(8)
            .map(|m| m.to_string())
            .collect::<Vec<_>>()
            .join("; ")
    );
}

/// A copy of `exe` that an unprivileged user can execute (the test tree
/// may live under a 0700 directory).
pub fn world_copy(exe: &Path) -> PathBuf {
    // Tests run on several threads; one copy at a time.
    static COPYING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = COPYING.lock().unwrap_or_else(|p| p.into_inner());
    let dir = std::env::temp_dir().join(format!("pagescope-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let dst = dir.join(exe.file_name().expect("a file name"));
    if !dst.exists() {
        let tmp = dir.join(format!(".{}.tmp", std::process::id()));
        std::fs::copy(exe, &tmp).expect("copy binary");
        std::fs::rename(&tmp, &dst).expect("rename binary");
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).expect("chmod exe");
    dst
}

/// A command running a world-executable copy of `exe` with `args` as user
/// `nobody`.
pub fn as_nobody(exe: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]);
    c.arg(world_copy(exe)).args(args);
    c.current_dir("/");
    c
}

/// The fixture with `args`, run as `nobody` when we are root (as the
/// current user otherwise).
pub fn unprivileged_fixture(args: &[&str]) -> FixtureProcess {
    let cmd = if is_root() {
        as_nobody(fixture_exe(), args)
    } else {
        let mut c = Command::new(fixture_exe());
        c.args(args);
        c
    };
    FixtureProcess::spawn_command(cmd).expect("start unprivileged fixture")
}

/// Options for every way this kernel can scan: the pagemap reader always;
/// PAGEMAP_SCAN (Linux 6.7+, else that part goes through [`skip`]) with
/// each [`ScanStrategy`], which must all give the same pages.
pub fn backends() -> Vec<ScanOptions> {
    let with = |backend, strategy| ScanOptions {
        backend,
        strategy,
        objects: true,
        ..ScanOptions::default()
    };
    let mut v = vec![with(BackendChoice::Pagemap, ScanStrategy::Adaptive)];
    if caps().has_pagemap_scan() {
        for strategy in [
            ScanStrategy::Adaptive,
            ScanStrategy::Walk,
            ScanStrategy::Read,
        ] {
            v.push(with(BackendChoice::PagemapScan, strategy));
        }
    } else {
        skip("kernel has no PAGEMAP_SCAN (Linux 6.7+)");
    }
    v
}

/// Builds `scenario` in a fixture, scans it with every backend and checks
/// every page against the ground truth. Needs root (`why_root` says why).
pub fn check_scenario(scenario: &str, why_root: &str) {
    if !is_root() {
        skip(why_root);
        return;
    }
    let fx = fixture(&[scenario]);
    for opts in backends() {
        let report = scan_with(fx.pid(), &opts);
        assert!(report.complete(), "scan incomplete: {:?}", report.skipped);
        eprintln!(
            "checking {scenario}: {:?}, {:?}",
            opts.backend, opts.strategy
        );
        assert_matches_truth(fx.truth(), &report, Some(scenario));
    }
}

/// A scratch directory under the temporary directory, removed at the end.
#[derive(Debug)]
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// `pagescope-TAG-PID`, empty.
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("pagescope-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create a scratch directory");
        Self(p)
    }

    /// The path of `name` inside.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// The same, as a string (a command-line argument).
    pub fn p(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether this test may dump another process (ptrace rights and a
/// userfaultfd in it: root); skips otherwise.
pub fn can_dump() -> bool {
    if !is_root() {
        skip("dumping another process needs ptrace rights and userfaultfd (root)");
        return false;
    }
    true
}

/// The value of `key` (`"TracerPid:"`) in `/proc/PID/status`.
pub fn status_field(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_owned()))
        .unwrap_or_default()
}

/// How many userfaultfds process `pid` holds.
pub fn uffd_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|l| l.as_os_str() == "anon_inode:[userfaultfd]")
                })
                .count()
        })
        .unwrap_or(0)
}

/// How many mappings of `pid` carry `flag` (`"uw"`) in their smaps
/// `VmFlags`.
pub fn vmflag_mappings(pid: u32, flag: &str) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("VmFlags:") && l.split_whitespace().any(|f| f == flag))
        .count()
}
