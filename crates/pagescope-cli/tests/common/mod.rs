//! Helpers of the CLI's tests: the `pagescope` binary under test, run
//! directly or as `nobody`; everything else comes from the fixture's
//! shared test support (`pagescope_fixture::testing`).

#![allow(dead_code, unused_imports)]

pub mod programs;

use std::path::Path;
use std::process::{Command, Output};

pub use pagescope_fixture::testing::{
    assert_matches_truth, backends, caps, check_scenario, checkable, fixture, fixture_exe, is_root,
    scan, scan_with, skip, unprivileged_fixture,
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
