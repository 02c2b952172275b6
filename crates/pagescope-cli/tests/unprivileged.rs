//! Without CAP_SYS_ADMIN pagemap hides PFNs and swap types. pagescope must
//! then use what still works (PAGEMAP_SCAN categories, VmFlags, smaps
//! counts), say which states became unknown, and never guess.
//!
//! As root these tests run both the fixture and pagescope as `nobody`
//! (setpriv); as a normal user they run as that user.

mod common;

use common::skip;
use pagescope_fixture::Truth;
use serde_json::Value;

use common::unprivileged_fixture;

fn unprivileged_json(args: &[&str]) -> Value {
    let out = if common::is_root() {
        common::as_nobody(args).output().expect("setpriv")
    } else {
        common::cli(args)
    };
    assert!(
        matches!(out.status.code(), Some(0)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// The (state, flags, reason) covering `addr` in a pages document.
fn at(doc: &Value, addr: u64) -> (String, Vec<String>, Option<String>) {
    for v in doc["vmas"].as_array().unwrap() {
        for r in v["ranges"].as_array().unwrap() {
            let s = u64::from_str_radix(r["start"].as_str().unwrap().trim_start_matches("0x"), 16)
                .unwrap();
            let e = u64::from_str_radix(r["end"].as_str().unwrap().trim_start_matches("0x"), 16)
                .unwrap();
            if s <= addr && addr < e {
                let flags = r["flags"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| f.as_str().unwrap().to_owned())
                    .collect();
                return (
                    r["state"].as_str().unwrap().to_owned(),
                    flags,
                    r["reason"].as_str().map(str::to_owned),
                );
            }
        }
    }
    panic!("no range covers {addr:#x}");
}

fn check(doc: &Value, truth: &Truth, region: &str, overrides: &[(u64, &str, &[&str])]) {
    let Some(r) = truth.region(region) else {
        panic!("region {region} missing");
    };
    if let Some(why) = &r.skip {
        skip(&format!("region {region}: {why}"));
        return;
    }
    for i in 0..r.pages {
        let exp = r.expected(i).unwrap();
        let (state, flags) = overrides
            .iter()
            .find(|(first, _, _)| *first == exp.first)
            .map_or((exp.state.clone(), exp.flags.clone()), |(_, s, f)| {
                ((*s).to_owned(), f.iter().map(|x| (*x).to_owned()).collect())
            });
        let (got, mut got_flags, _) = at(doc, r.page_addr(i, truth.page_size));
        let mut want = flags;
        want.sort();
        got_flags.sort();
        assert_eq!(
            (got.as_str(), &got_flags),
            (state.as_str(), &want),
            "{region} page {i}"
        );
    }
}

#[test]
fn unprivileged_scan_resolves_markers_and_zero_pages_swapdev() {
    if !common::caps().has_pagemap_scan() {
        skip("kernel has no PAGEMAP_SCAN (Linux 6.7+)");
        return;
    }
    let fx = unprivileged_fixture(&["anon", "guard", "uffd_wp", "file"]);
    let pid = fx.pid().to_string();
    let doc = unprivileged_json(&["pages", &pid, "--json"]);
    assert_eq!(doc["privileged"], Value::Bool(false));
    assert!(
        doc["notes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n.as_str().unwrap().contains("CAP_SYS_ADMIN"))
    );
    let truth = fx.truth();
    for s in &truth.skipped {
        skip(&format!("scenario {}: {}", s.scenario, s.reason));
    }
    // Zero pages come from PAGEMAP_SCAN's PFNZERO, which needs no privilege.
    check(&doc, truth, "anon_zero", &[]);
    check(&doc, truth, "anon_present", &[]);
    // Swap type is hidden, but smaps Swap: equals the unmarked entries.
    check(&doc, truth, "anon_swapped", &[]);
    check(&doc, truth, "guard_region", &[]);
    if truth.region("uffd_wp").is_some() {
        // uffd-wp markers: settled as holes because smaps counts no swap.
        check(&doc, truth, "uffd_wp", &[]);
    }
    check(&doc, truth, "file_private", &[]);
}

/// Without PFNs, pagemap entries cannot tell a PMD-mapped THP from 512
/// small pages, nor the zero page from a COW-shared one: the strategies
/// that read pagemap directly must walk those blocks with PAGEMAP_SCAN and
/// still get every page right.
#[test]
fn unprivileged_read_strategies_walk_what_entries_cannot_tell_swapdev() {
    if !common::caps().has_pagemap_scan() {
        skip("kernel has no PAGEMAP_SCAN (Linux 6.7+)");
        return;
    }
    let fx = unprivileged_fixture(&["dense_mixed"]);
    let pid = fx.pid().to_string();
    let truth = fx.truth();
    for s in &truth.skipped {
        skip(&format!("scenario {}: {}", s.scenario, s.reason));
    }
    for strategy in ["adaptive", "read", "walk"] {
        let doc = unprivileged_json(&["pages", &pid, "--json", "--strategy", strategy]);
        for region in [
            "dense_present",
            "dense_thp",
            "dense_present_zero",
            "dense_swapped",
            "dense_hole",
            "dense_guard",
            "dense_sparse",
        ] {
            check(&doc, truth, region, &[]);
        }
    }
}

#[test]
fn unprivileged_pagemap_backend_reports_unknown_not_guesses() {
    let fx = unprivileged_fixture(&["anon"]);
    let pid = fx.pid().to_string();
    let doc = unprivileged_json(&["pages", &pid, "--json", "--backend", "pagemap"]);
    let truth = fx.truth();
    let zero = truth.region("anon_zero").unwrap();
    let (state, _, reason) = at(&doc, zero.start);
    // Without PFNs or PAGEMAP_SCAN a zero page and a COW-shared page look
    // the same: unknown, with the reason spelled out.
    assert_eq!(state, "unknown");
    assert!(reason.unwrap().contains("CAP_SYS_ADMIN"));
    check(&doc, truth, "anon_present", &[]);
}

/// Unprivileged, objects are reachable through `/proc/PID/fd` (memfd, tmpfs
/// files the target keeps open) or their path (files): those are exact.
/// SysV and shared anonymous memory have neither: their unmapped pages are
/// unknown, and the VMA says why.
#[test]
fn unprivileged_objects_exact_where_reachable_unknown_elsewhere_swapdev() {
    let fx = unprivileged_fixture(&[
        "memfd",
        "tmpfs",
        "shared_anon",
        "sysv",
        "file",
        "memfd_private",
    ]);
    let pid = fx.pid().to_string();
    let doc = unprivileged_json(&["pages", &pid, "--json"]);
    let truth = fx.truth();
    for s in &truth.skipped {
        skip(&format!("scenario {}: {}", s.scenario, s.reason));
    }
    for name in [
        "memfd",
        "tmpfs",
        "file_private",
        "file_shared",
        "file_cache",
        "memfd_private",
    ] {
        check(&doc, truth, name, &[]);
    }
    for name in ["shared_anon", "sysv"] {
        let r = truth.region(name).unwrap();
        for i in 0..r.pages {
            let (state, _, reason) = at(&doc, r.page_addr(i, truth.page_size));
            // Pages 8..16 are paged out; without swap they stay mapped.
            if i < 8 || (i < 16 && truth.swap == "none") {
                assert_eq!(state, "present", "{name} page {i}");
            } else {
                assert_eq!(state, "unknown", "{name} page {i}");
                assert!(reason.unwrap().contains("backing object"));
            }
        }
        let vma = doc["vmas"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| {
                let s =
                    u64::from_str_radix(v["start"].as_str().unwrap().trim_start_matches("0x"), 16)
                        .unwrap();
                s == r.start
            })
            .expect("vma");
        let why = vma["object_error"].as_str().expect("object_error");
        assert!(why.contains("map_files") && why.contains("no fd"), "{why}");
    }
}
