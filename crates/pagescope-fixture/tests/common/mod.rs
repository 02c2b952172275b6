//! The library's behaviour tests share the fixture's test support.

#![allow(unused_imports)]

pub use pagescope_fixture::testing::{
    assert_matches_truth, backends, caps, check_scenario, checkable, fixture, fixture_exe, is_root,
    scan, scan_with, skip, unprivileged_fixture,
};
