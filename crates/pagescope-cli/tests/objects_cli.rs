//! `pagescope objects` on the fixture: the JSON contract, `--files`,
//! `--all`, and objects classification leaving the target's own pageout
//! working.

mod common;

use common::fixture;

#[test]
fn objects_cli_json_and_all() {
    let fx = fixture(&["memfd", "file"]);
    let pid = fx.pid().to_string();
    let out = common::cli(&["objects", &pid, "--json", "--ranges"]);
    assert!(
        matches!(out.status.code(), Some(0)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/objects.schema.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(&doc)
        .map(|e| format!("{e} at {}", e.instance_path))
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
    let objects = doc["objects"].as_array().unwrap();
    let memfd: Vec<_> = objects
        .iter()
        .filter(|o| o["kind"] == "memfd" && o["sharers"][0]["pid"] == fx.pid())
        .collect();
    assert_eq!(memfd.len(), 1);
    let ranges: u64 = memfd[0]["ranges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["count"].as_u64().unwrap())
        .sum();
    assert_eq!(ranges, 64);
    // The shared file mapping is listed; privately mapped libraries only
    // with --files.
    assert!(
        objects
            .iter()
            .any(|o| o["kind"] == "file"
                && o["path"].as_str().unwrap().contains("pagescope-fixture"))
    );
    assert!(
        !objects
            .iter()
            .any(|o| o["path"].as_str().unwrap().contains("libc.so"))
    );
    let with_files: serde_json::Value =
        serde_json::from_slice(&common::cli(&["objects", &pid, "--json", "--files"]).stdout)
            .unwrap();
    assert!(
        with_files["objects"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["path"].as_str().unwrap().contains("libc.so"))
    );
    let all = common::cli(&["objects", "--all", "--json"]);
    assert!(matches!(all.status.code(), Some(0 | 8)));
    let all: serde_json::Value = serde_json::from_slice(&all.stdout).unwrap();
    assert!(all["objects"].as_array().unwrap().iter().any(|o| {
        o["sharers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["pid"] == fx.pid())
    }));
}

/// Classifying objects must not pin their pages: no fault-around mapping in
/// pagescope, so the target's own MADV_PAGEOUT afterwards still pages out
/// every page it maps (a page mapped by a second process is skipped).
#[test]
fn target_pageout_still_works_after_scans_swapdev() {
    let mut fx = fixture(&["memfd", "shared_anon", "sysv", "tmpfs"]);
    if fx.truth().swap == "none" {
        common::skip("no active swap device");
        return;
    }
    for _ in 0..3 {
        let r = common::scan_with(
            fx.pid(),
            &pagescope::ScanOptions {
                objects: true,
                ..Default::default()
            },
        );
        assert!(r.complete());
        let pid = fx.pid().to_string();
        assert!(common::cli(&["objects", &pid]).status.success());
    }
    for kind in ["memfd", "shared_anon", "sysv", "tmpfs"] {
        let reply = fx
            .command(&format!("pageout {kind} 0 8"))
            .expect("pageout after scans");
        let states: Vec<String> = serde_json::from_str(&reply).unwrap();
        assert_eq!(states.len(), 8);
        assert!(
            states.iter().all(|s| s == "swapped" || s == "swapcache"),
            "{kind}: {states:?}"
        );
    }
}
