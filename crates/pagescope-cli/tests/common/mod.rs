//! Helpers of the CLI's tests: the `pagescope` binary under test, run
//! directly or as `nobody`; everything else comes from the fixture's
//! shared test support (`pagescope_fixture::testing`).

#![allow(dead_code, unused_imports)]

pub mod exporter;
pub mod programs;
pub mod qemu;
pub mod transfer;

use std::path::Path;
use std::process::{Command, Output};

pub use pagescope_fixture::testing::{
    Scratch, assert_matches_truth, backends, can_dump, caps, check_scenario, checkable, fixture,
    fixture_exe, is_root, scan, scan_with, skip, status_field, uffd_fds, unprivileged_fixture,
    vmflag_mappings,
};

/// The `pagescope` binary under test.
pub fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_pagescope"))
}

/// Runs `pagescope ARGS` and returns its output.
pub fn cli(args: &[&str]) -> Output {
    Command::new(exe())
        .args(args)
        .output()
        .expect("run pagescope")
}

/// A command that runs `pagescope ARGS` as user `nobody`.
pub fn as_nobody(args: &[&str]) -> Command {
    pagescope_fixture::testing::as_nobody(exe(), args)
}

/// Starts `tests/programs/fork_shared_swapped.py` (shared 1024 pages,
/// private 16384, unmapped 256): the parent and the line it printed,
/// `<child pid> <shared addr> <private addr>`.
pub fn fork_shared_swapped() -> (std::process::Child, String) {
    use std::io::BufRead;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/programs/fork_shared_swapped.py"
    );
    let mut child = Command::new("python3")
        .args([script, "1024", "16384", "256"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the program's line");
    (child, line)
}
