//! The library's behaviour tests share the fixture's test support.

#![allow(unused_imports)]

pub use pagescope_fixture::testing::{
    Scratch, assert_matches_truth, backends, can_dump, caps, check_scenario, checkable, fixture,
    fixture_exe, is_root, scan, scan_with, skip, status_field, uffd_fds, unprivileged_fixture,
    vmflag_mappings,
};
