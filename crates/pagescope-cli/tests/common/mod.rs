//! Helpers shared by the integration tests.
//!
//! Every skip goes through [`skip`], which prints `skipped: <reason>`; under
//! `PAGESCOPE_NO_SKIP=1` (set by `scripts/test` when run as root, as in CI)
//! it fails the test instead, so nothing can silently skip in CI.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use pagescope::{
    BackendChoice, KernelCaps, ProcessReport, ScanOptions, ScanStrategy, Target, scan_process,
};
use pagescope_fixture::{FixtureProcess, Truth};

/// The `pagescope` binary under test.
pub fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_pagescope"))
}

/// Reports a skipped test (or fails it under `PAGESCOPE_NO_SKIP=1`).
/// Returns `true` so callers can write `if cond { return skip(..) }`-style
/// code with `skip(..); return;`.
pub fn skip(reason: &str) {
    if std::env::var_os("PAGESCOPE_NO_SKIP").is_some_and(|v| v == "1") {
        panic!("test would skip, but PAGESCOPE_NO_SKIP=1 forbids it: {reason}");
    }
    println!("skipped: {reason}");
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

/// Starts the fixture with `args` as the current user.
pub fn fixture(args: &[&str]) -> FixtureProcess {
    FixtureProcess::spawn(exe(), args).expect("start fixture")
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

/// Runs `pagescope ARGS` and returns its output.
pub fn cli(args: &[&str]) -> Output {
    Command::new(exe())
        .args(args)
        .output()
        .expect("run pagescope")
}

/// Regions of `truth` the test must check; regions whose layout could not
/// be built go through [`skip`].
pub fn checkable<'a>(
    truth: &'a Truth,
    scenario: Option<&str>,
) -> Vec<&'a pagescope_fixture::Region> {
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
        .flat_map(|r| pagescope_fixture::check::check_region(truth, r, report))
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

/// A copy of the binary that an unprivileged user can execute (the test
/// tree may live under a 0700 directory).
pub fn world_exe() -> &'static Path {
    static COPY: OnceLock<PathBuf> = OnceLock::new();
    COPY.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("pagescope-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let dst = dir.join("pagescope");
        std::fs::copy(exe(), &dst).expect("copy binary");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).expect("chmod exe");
        dst
    })
}

/// A command that runs the world-executable binary as user `nobody`.
pub fn as_nobody(args: &[&str]) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]);
    c.arg(world_exe()).args(args);
    c.current_dir("/");
    c
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
