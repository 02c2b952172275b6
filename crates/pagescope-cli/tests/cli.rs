//! The command line: JSON contract (validated against the checked-in
//! schemas), text output, `kernel`, `demo`, and bad input with its exit
//! codes.

mod common;

use std::collections::BTreeSet;

use common::{cli, fixture, skip};
use serde_json::Value;

fn schema(name: &str) -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/");
    let text = std::fs::read_to_string(format!("{path}{name}")).expect("schema file");
    serde_json::from_str(&text).expect("schema is JSON")
}

fn validate(schema_name: &str, doc: &Value) {
    let pages = schema("pages.schema.json");
    let resource = jsonschema::Resource::from_contents(pages.clone()).expect("resource");
    let validator = jsonschema::options()
        .with_resource("https://pagescope.invalid/pages.schema.json", resource)
        .build(&schema(schema_name))
        .expect("valid schema");
    let errors: Vec<String> = validator
        .iter_errors(doc)
        .map(|e| format!("{} at {}", e, e.instance_path))
        .take(5)
        .collect();
    assert!(errors.is_empty(), "{schema_name}: {errors:?}");
}

fn json_of(args: &[&str]) -> Value {
    let out = cli(args);
    assert!(
        out.status.success(),
        "pagescope {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is JSON")
}

fn hex(v: &Value) -> u64 {
    u64::from_str_radix(v.as_str().expect("hex string").trim_start_matches("0x"), 16).expect("hex")
}

/// Every page of every VMA is covered by exactly one range, in order, and
/// adjacent ranges differ (they would have been merged otherwise).
fn assert_ranges_cover_vmas(doc: &Value) {
    let page = doc["page_size"].as_u64().unwrap();
    for vma in doc["vmas"].as_array().unwrap() {
        let start = vma
            .get("scanned_start")
            .map_or_else(|| hex(&vma["start"]), hex);
        let end = vma.get("scanned_end").map_or_else(|| hex(&vma["end"]), hex);
        let mut at = start;
        let mut prev: Option<&Value> = None;
        for r in vma["ranges"].as_array().unwrap() {
            assert_eq!(hex(&r["start"]), at, "gap or overlap in {}", vma["path"]);
            assert_eq!(hex(&r["end"]) - at, r["pages"].as_u64().unwrap() * page);
            if let Some(p) = prev {
                let same = p["state"] == r["state"]
                    && p["flags"] == r["flags"]
                    && p.get("reason") == r.get("reason");
                assert!(
                    !same || r.get("swap").is_some(),
                    "unmerged equal neighbours in {}",
                    vma["path"]
                );
            }
            at = hex(&r["end"]);
            prev = Some(r);
        }
        assert_eq!(at, end, "ranges do not reach the end of {}", vma["path"]);
    }
}

#[test]
fn pages_json_matches_schema_and_covers_every_page() {
    let fx = fixture(&["all"]);
    let pid = fx.pid().to_string();
    let doc = json_of(&["pages", &pid, "--json"]);
    validate("pages.schema.json", &doc);
    assert_ranges_cover_vmas(&doc);
    assert_eq!(doc["pid"].as_u64(), Some(u64::from(fx.pid())));
    assert_eq!(doc["complete"], Value::Bool(true));
    let paths: BTreeSet<_> = doc["vmas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["backing"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        paths.contains("anon") && paths.contains("file") && paths.contains("special"),
        "{paths:?}"
    );
}

#[test]
fn pages_json_with_swap_detail_and_range_swapdev() {
    let fx = fixture(&["anon"]);
    let region = fx.truth().region("anon_swapped").unwrap().clone();
    let range = format!(
        "{:x}-{:x}",
        region.start,
        region.start + region.pages * 4096
    );
    let pid = fx.pid().to_string();
    let doc = json_of(&["pages", &pid, "--json", "--swap-detail", "--range", &range]);
    validate("pages.schema.json", &doc);
    assert_ranges_cover_vmas(&doc);
    let vmas = doc["vmas"].as_array().unwrap();
    assert_eq!(vmas.len(), 1);
    assert_eq!(hex(&vmas[0]["scanned_start"]), region.start);
    if region.skip.is_some() || !common::is_root() {
        skip("swap detail needs root and an active swap device");
        return;
    }
    for r in vmas[0]["ranges"].as_array().unwrap() {
        assert_eq!(r["state"], "swapped");
        let swap = &r["swap"];
        assert!(swap["device"].is_string(), "device named: {swap}");
        assert!(swap["offset"].as_u64().is_some());
    }
}

#[test]
fn map_json_matches_schema_and_counts_add_up() {
    let fx = fixture(&["anon", "guard"]);
    let pid = fx.pid().to_string();
    let doc = json_of(&["map", &pid, "--json"]);
    validate("map.schema.json", &doc);
    let page = doc["page_size"].as_u64().unwrap();
    let mut total = 0;
    for v in doc["vmas"].as_array().unwrap() {
        let counted: u64 = v["counts"]
            .as_object()
            .unwrap()
            .values()
            .map(|n| n.as_u64().unwrap())
            .sum();
        assert_eq!(
            counted * page,
            hex(&v["end"]) - hex(&v["start"]),
            "counts of {} do not add up",
            v["path"]
        );
        // The kernel's special mappings are listed but not totalled.
        if v["backing"] != "special" {
            total += counted;
        }
    }
    let totals: u64 = doc["totals"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(totals, total);
    assert!(doc["totals"]["guard"].as_u64().unwrap() >= 8 || !common::caps().guard_regions);
}

#[test]
fn text_outputs_name_states() {
    let fx = fixture(&["anon"]);
    let pid = fx.pid().to_string();
    let map = cli(&["map", &pid]);
    assert!(map.status.success());
    let text = String::from_utf8(map.stdout).unwrap();
    assert!(
        text.contains("[heap]") && text.lines().any(|l| l.trim_start().starts_with("total ")),
        "{text}"
    );
    assert!(!text.contains("note:"), "notes belong on stderr: {text}");
    let pages = cli(&["pages", &pid]);
    let text = String::from_utf8(pages.stdout).unwrap();
    assert!(
        text.contains(" zero") && text.contains(" present"),
        "{text}"
    );
    assert!(!text.contains("note:"), "notes belong on stderr: {text}");
    assert!(
        !String::from_utf8_lossy(&pages.stderr).contains("soft-dirty"),
        "the soft-dirty note changes no answer of `pages`"
    );
}

#[test]
fn special_mappings_are_listed_but_not_totalled() {
    let fx = fixture(&[]);
    let pid = fx.pid().to_string();
    let doc = json_of(&["map", &pid, "--json"]);
    let specials: Vec<&Value> = doc["vmas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["backing"] == "special")
        .collect();
    assert!(!specials.is_empty(), "no [vdso]/[vvar] listed");
    let unknown_in_specials: u64 = specials
        .iter()
        .map(|v| v["counts"]["unknown"].as_u64().unwrap())
        .sum();
    let others_unknown: u64 = doc["vmas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["backing"] != "special")
        .map(|v| v["counts"]["unknown"].as_u64().unwrap())
        .sum();
    assert_eq!(
        doc["totals"]["unknown"].as_u64().unwrap(),
        others_unknown,
        "[vsyscall] ({unknown_in_specials} unknown pages) must not count in the totals"
    );
}

#[test]
fn kernel_reports_features() {
    let out = cli(&["kernel"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("PAGEMAP_SCAN ioctl") && text.contains("soft-dirty"),
        "{text}"
    );
    let doc = json_of(&["kernel", "--json"]);
    assert_eq!(doc["caps"]["page_size"].as_u64(), Some(4096));
    assert!(doc["features"].as_array().unwrap().len() >= 8);
}

#[test]
fn demo_runs_and_matches_its_own_truth() {
    let out = cli(&["demo"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("fixture regions"), "{text}");
    assert!(!text.contains("MISMATCH"), "{text}");
}

fn assert_fails(args: &[&str], code: i32, needle: &str) {
    let out = cli(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "pagescope {args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "one-line error expected: {err:?}");
    assert!(err.contains(needle), "{err:?} should name {needle:?}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn nonexistent_pid_exits_3() {
    // PIDs above pid_max never exist.
    assert_fails(&["pages", "999999999"], 3, "999999999");
    assert_fails(&["map", "999999999", "--json"], 3, "999999999");
}

#[test]
fn kernel_thread_exits_5() {
    // PID 2 is kthreadd on Linux.
    assert_fails(&["map", "2"], 5, "process 2 is a kernel thread");
}

#[test]
fn bad_range_exits_7() {
    let fx = fixture(&[]);
    let pid = fx.pid().to_string();
    assert_fails(
        &["pages", &pid, "--range", "zzz"],
        7,
        "range \"zzz\" is malformed",
    );
    let out = cli(&["pages", &pid, "--range", "zzz"]);
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("0x0-0x0"),
        "a malformed range must be quoted, not shown as 0x0-0x0"
    );
    assert_fails(
        &["pages", &pid, "--range", "1000-1800"],
        7,
        "not page aligned",
    );
    assert_fails(&["pages", &pid, "--range", "1000-2000"], 7, "not mapped");
}

#[test]
fn permission_denied_exits_4() {
    if !common::is_root() {
        // As a normal user, PID 1 belongs to root.
        assert_fails(&["pages", "1"], 4, "/proc/1/");
        return;
    }
    let out = common::as_nobody(&["pages", "1"])
        .output()
        .expect("setpriv");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        err.contains("permission denied") && err.contains("/proc/1/"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1);
}

#[test]
fn usage_errors_exit_2() {
    let out = cli(&["pages", "notapid"]);
    assert_eq!(out.status.code(), Some(2));
}

/// A target that remaps while it is scanned: the CLI exits 8 for an
/// incomplete result (saying so on stderr), 0 for a complete one.
#[test]
fn pages_of_a_remapping_target_exit_8_when_incomplete() {
    let fx = common::fixture(&["anon", "--churn"]);
    // The CLI exits 8 for an incomplete result, 0 for a complete one.
    let pid = fx.pid().to_string();
    for _ in 0..10 {
        let out = common::cli(&["pages", &pid, "--json"]);
        let code = out.status.code();
        assert!(matches!(code, Some(0 | 8)), "exit code {code:?}");
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(doc["complete"].as_bool(), Some(code == Some(0)));
        if code == Some(8) {
            assert!(!doc["skipped"].as_array().unwrap().is_empty());
            assert!(String::from_utf8_lossy(&out.stderr).contains("incomplete"));
        }
    }
}

/// Shared libraries `pid` maps (`.so` files in its maps).
fn shared_libraries(pid: u32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| p.contains(".so"))
        .map(str::to_owned)
        .collect()
}

/// The libraries a running `pagescope watch` of a fixture maps.
fn libraries_while_watching(exe: &std::path::Path) -> Vec<String> {
    let fx = fixture(&["anon"]);
    let mut w = std::process::Command::new(exe)
        .args([
            "watch",
            &fx.pid().to_string(),
            "--interval",
            "200ms",
            "--json",
            "--allow-fallback",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(600));
    assert!(
        w.try_wait().unwrap().is_none(),
        "{} watch exited early: nothing to look at",
        exe.display()
    );
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", w.id())).unwrap_or_default();
    assert!(
        maps.lines().count() > 3,
        "no maps read for {}",
        exe.display()
    );
    let libs = shared_libraries(w.id());
    let _ = w.kill();
    let _ = w.wait();
    libs
}

/// A statically linked pagescope maps no shared library, so the pages of
/// libc or libgcc_s it inspects in a target are not mapped twice (which
/// would take `exclusive` away from them) while it runs. The build is made
/// by `scripts/test` (`PAGESCOPE_STATIC_BIN`); the dynamic build, for
/// contrast, does map libraries.
#[test]
fn the_static_binary_maps_no_shared_library() {
    let Some(bin) = std::env::var_os("PAGESCOPE_STATIC_BIN") else {
        skip("PAGESCOPE_STATIC_BIN not set (scripts/test builds the static binary)");
        return;
    };
    if !common::is_root() {
        skip("watch injects a userfaultfd into the target (root)");
        return;
    }
    let dynamic = libraries_while_watching(common::exe());
    assert!(
        !dynamic.is_empty(),
        "the dynamic build should map libc: the check is blind"
    );
    let libs = libraries_while_watching(std::path::Path::new(&bin));
    assert!(libs.is_empty(), "the static build maps {libs:?}");
}

#[test]
fn completions_and_manpage_are_generated() {
    for shell in ["bash", "zsh", "fish"] {
        let out = cli(&["completions", shell]);
        assert!(out.status.success(), "completions {shell}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("pageout") && text.contains("dump"),
            "{shell}: {text}"
        );
    }
    let man = cli(&["manpage"]);
    assert!(man.status.success());
    let text = String::from_utf8_lossy(&man.stdout);
    assert!(
        text.contains(".TH pagescope 1") && text.contains("watch"),
        "{text}"
    );
}
