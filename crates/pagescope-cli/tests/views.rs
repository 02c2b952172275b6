//! Everyday views: `map`'s pmap-style columns and units, `--columns`,
//! `--sort`, filters, several processes, `top`, and the SVG picture,
//! checked against the fixture's ground truth, smaps and the scan.

mod common;

use std::collections::BTreeMap;

use common::{cli, fixture, skip};
use serde_json::Value;

fn stdout_of(args: &[&str]) -> String {
    let out = cli(args);
    assert!(
        out.status.success(),
        "pagescope {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A `map` table: header names and rows (cells by column; PATH may hold
/// spaces or be empty).
struct MapTable {
    header: Vec<String>,
    rows: Vec<BTreeMap<String, String>>,
    total: BTreeMap<String, String>,
}

fn parse_map(text: &str) -> MapTable {
    let mut lines = text.lines();
    assert!(lines.next().unwrap().starts_with("process "), "{text}");
    let header: Vec<String> = lines
        .next()
        .unwrap()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let mut rows = Vec::new();
    let mut total = BTreeMap::new();
    for l in lines {
        let tokens: Vec<&str> = l.split_whitespace().collect();
        if tokens.first() == Some(&"total") {
            // Address, then the numeric columns (PERM, BACKING, PATH empty).
            let nums = header
                .iter()
                .filter(|h| !["ADDRESS", "PERM", "BACKING", "PATH"].contains(&h.as_str()));
            total = nums
                .zip(&tokens[1..])
                .map(|(h, v)| (h.clone(), (*v).to_owned()))
                .collect();
            continue;
        }
        let fixed = header.len() - 1;
        let mut row: BTreeMap<String, String> = header[..fixed]
            .iter()
            .zip(&tokens)
            .map(|(h, v)| (h.clone(), (*v).to_owned()))
            .collect();
        row.insert(
            "PATH".into(),
            tokens.get(fixed..).unwrap_or_default().join(" "),
        );
        rows.push(row);
    }
    MapTable {
        header,
        rows,
        total,
    }
}

fn num(row: &BTreeMap<String, String>, col: &str) -> u64 {
    row[col]
        .parse()
        .unwrap_or_else(|_| panic!("{col} in {row:?}"))
}

/// The row of the mapping containing `addr`.
fn row_at(t: &MapTable, addr: u64) -> &BTreeMap<String, String> {
    t.rows
        .iter()
        .find(|r| {
            let start = u64::from_str_radix(&r["ADDRESS"], 16).unwrap();
            start <= addr && addr < start + num(r, "SIZE")
        })
        .unwrap_or_else(|| panic!("no mapping at {addr:#x}"))
}

/// smaps' `field` (kB) of the VMA starting at `start`.
fn smaps_kb(pid: u32, start: u64, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut inside = false;
    for l in text.lines() {
        let first = l.split_whitespace().next().unwrap_or_default();
        if !first.ends_with(':') {
            // A VMA header line: `start-end perms ...`.
            let lo = first.split('-').next().unwrap_or_default();
            inside = u64::from_str_radix(lo, 16).ok() == Some(start);
            continue;
        }
        if inside && l.starts_with(&format!("{field}:")) {
            return l.split_whitespace().nth(1).unwrap().parse().unwrap();
        }
    }
    panic!("no {field} for {start:x} in smaps of {pid}");
}

/// The fixture's `anon` scenario: one 64-page mapping, 16 pages each
/// present, zero, untouched and paged out.
struct AnonLayout {
    page: u64,
    /// Start of the mapping (its present pages).
    start: u64,
    /// The pageout could not happen (no swap): those 16 pages are present.
    pageout_failed: bool,
}

fn anon_fixture() -> (pagescope_fixture::FixtureProcess, AnonLayout) {
    let fx = fixture(&["anon"]);
    let truth = fx.truth();
    let region = |name: &str| truth.regions.iter().find(|r| r.name == name).unwrap();
    let anon = AnonLayout {
        page: truth.page_size,
        start: region("anon_present").start,
        pageout_failed: region("anon_swapped").skip.is_some(),
    };
    (fx, anon)
}

#[test]
fn map_has_pmap_columns_in_one_unit_and_fits_120_columns() {
    let (fx, anon) = anon_fixture();
    let (pid, page) = (fx.pid().to_string(), anon.page);

    let text = stdout_of(&["map", &pid, "--bytes"]);
    for l in text.lines() {
        assert!(l.chars().count() <= 120, "line longer than 120: {l:?}");
    }
    let t = parse_map(&text);
    assert_eq!(
        t.header.join(" "),
        "ADDRESS PERM BACKING SIZE RSS PSS SWAP SWAPCACHE RESIDENT NOT_RESIDENT PATH"
    );
    let row = row_at(&t, anon.start);
    let start = u64::from_str_radix(&row["ADDRESS"], 16).unwrap();
    assert_eq!(num(row, "SIZE"), 64 * page, "the 64-page mapping: {row:?}");
    // Rss counts mapped pages: 16 written (and 16 more when the pageout
    // could not happen); the zero page and holes are not in Rss.
    let swap_pages = if anon.pageout_failed { 0 } else { 16 };
    assert_eq!(num(row, "RSS"), (32 - swap_pages) * page, "{row:?}");
    assert_eq!(num(row, "SWAP"), swap_pages * page, "{row:?}");
    assert_eq!(num(row, "RSS"), smaps_kb(fx.pid(), start, "Rss") * 1024);
    assert_eq!(num(row, "PSS"), smaps_kb(fx.pid(), start, "Pss") * 1024);
    let sizes: u64 = t
        .rows
        .iter()
        .filter(|r| r["BACKING"] != "special")
        .map(|r| num(r, "SIZE"))
        .sum();
    assert_eq!(
        num(&t.total, "SIZE"),
        sizes,
        "totals leave out special mappings"
    );

    // The same table in KiB (the default) and human units.
    let kib = parse_map(&stdout_of(&["map", &pid]));
    assert_eq!(num(row_at(&kib, anon.start), "SIZE"), 64 * page / 1024);
    let human = stdout_of(&["map", &pid, "-h"]);
    assert!(
        human.lines().next().unwrap().contains("KiB/MiB/GiB"),
        "{human}"
    );
    let line = human
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{start:x} ")))
        .unwrap();
    assert!(
        line.contains(&format!("{} KiB", 64 * page / 1024)),
        "{line}"
    );
}

#[test]
fn columns_sort_and_filters_select_what_is_shown() {
    let (fx, anon) = anon_fixture();
    let (pid, page) = (fx.pid().to_string(), anon.page);

    let t = parse_map(&stdout_of(&[
        "map",
        &pid,
        "--bytes",
        "--columns",
        "present,zero,hole",
        "--sort",
        "size",
    ]));
    assert_eq!(
        t.header.join(" "),
        "ADDRESS PERM BACKING PRESENT ZERO HOLE SIZE PATH",
        "chosen columns, the sort column added"
    );
    let sizes: Vec<u64> = t.rows.iter().map(|r| num(r, "SIZE")).collect();
    assert!(
        sizes.windows(2).all(|w| w[0] >= w[1]),
        "sorted by size: {sizes:?}"
    );
    let row = row_at(&t, anon.start);
    let extra = if anon.pageout_failed { 16 } else { 0 };
    assert_eq!(num(row, "PRESENT"), (16 + extra) * page, "{row:?}");
    assert_eq!(num(row, "ZERO"), 16 * page);
    assert_eq!(num(row, "HOLE"), 16 * page);

    let t = parse_map(&stdout_of(&[
        "map",
        &pid,
        "--backing",
        "anon",
        "--state",
        "zero",
    ]));
    assert!(!t.rows.is_empty());
    for r in &t.rows {
        assert_eq!(r["BACKING"], "anon", "{r:?}");
    }
    row_at(&t, anon.start);
    let t = parse_map(&stdout_of(&["map", &pid, "--path", "[[]heap]"]));
    assert_eq!(t.rows.len(), 1, "only [heap]");
    assert_eq!(t.rows[0]["PATH"], "[heap]");
    let t = parse_map(&stdout_of(&["map", &pid, "--path", "*pagescope-fixture*"]));
    assert!(
        !t.rows.is_empty()
            && t.rows
                .iter()
                .all(|r| r["PATH"].contains("pagescope-fixture"))
    );

    let pages = stdout_of(&["pages", &pid, "--state", "zero"]);
    let runs: Vec<&str> = pages.lines().filter(|l| l.starts_with("    ")).collect();
    assert!(!runs.is_empty(), "{pages}");
    assert!(runs.iter().all(|l| l.contains(" zero ")), "{pages}");

    let doc: Value =
        serde_json::from_str(&stdout_of(&["map", &pid, "--json", "--backing", "anon"])).unwrap();
    let vmas = doc["vmas"].as_array().unwrap();
    assert!(
        vmas.iter()
            .all(|v| v["backing"] == "anon" && v["rss_kb"].is_u64())
    );
    let present_sum: u64 = vmas
        .iter()
        .map(|v| v["counts"]["present"].as_u64().unwrap())
        .sum();
    assert_eq!(
        doc["totals"]["present"].as_u64().unwrap(),
        present_sum,
        "totals of what is listed"
    );

    for bad in [
        vec!["map", &pid, "--columns", "bogus"],
        vec!["map", &pid, "--state", "bogus"],
        vec!["map", &pid, "--sort", "bogus"],
        vec!["map", &pid, "--human", "--bytes"],
    ] {
        let out = cli(&bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?} is a usage error");
    }
    let help = cli(&["map", "--help"]);
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("--human"));
}

#[test]
fn map_covers_several_processes_by_pid_and_by_name() {
    let (a, b) = (fixture(&["anon"]), fixture(&["anon"]));
    let (pa, pb) = (a.pid().to_string(), b.pid().to_string());
    let text = stdout_of(&["map", &pa, &pb]);
    assert!(
        text.contains(&format!("process {pa} (")) && text.contains(&format!("process {pb} (")),
        "{text}"
    );

    let out = cli(&["map", &pa, "999999999"]);
    assert_eq!(
        out.status.code(),
        Some(8),
        "one bad PID among good ones: incomplete"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("999999999"), "names the skipped PID: {err}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("process {pa} (")));
    assert_eq!(cli(&["map", "999999999"]).status.code(), Some(3));

    let comm = std::fs::read_to_string(format!("/proc/{pa}/comm")).unwrap();
    let by_name = stdout_of(&["map", "--name", comm.trim(), "--columns", "size"]);
    for p in [&pa, &pb] {
        assert!(
            by_name.contains(&format!("process {p} (")),
            "--name finds {p}: {by_name}"
        );
    }
    let doc: Value = serde_json::from_str(&stdout_of(&["map", &pa, &pb, "--json"])).unwrap();
    assert_eq!(doc["processes"].as_array().unwrap().len(), 2);
    assert_eq!(doc["processes"][0]["pid"].as_u64().unwrap().to_string(), pa);
    assert!(doc["skipped"].as_array().unwrap().is_empty());

    let objects = cli(&["objects", &pa, "999999999", "-h"]);
    assert_eq!(objects.status.code(), Some(8));
    assert!(String::from_utf8_lossy(&objects.stdout).contains("sizes in KiB/MiB/GiB"));
}

/// Kills the python pair on drop.
struct Python(std::process::Child);

impl Drop for Python {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn top_divides_shared_swap_among_the_processes_holding_it() {
    if common::caps().swaps.is_empty() {
        return skip("top swap division: no swap device active");
    }
    let (child, line) = common::fork_shared_swapped();
    let py = Python(child);
    let parent = py.0.id();
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields.len(), 3, "the program's line: {line:?}");
    let kid: u32 = fields[0].parse().unwrap();
    let private = u64::from_str_radix(fields[2].trim_start_matches("0x"), 16).unwrap();

    // What is in swap, as the parent's own scan sees it.
    let swapped_in = |doc: &Value, pred: &dyn Fn(&Value) -> bool| -> u64 {
        doc["vmas"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| pred(v))
            .flat_map(|v| v["ranges"].as_array().unwrap())
            .filter(|r| r["state"] == "swapped" || r["state"] == "swapcache")
            .map(|r| r["pages"].as_u64().unwrap())
            .sum()
    };
    let pages: Value =
        serde_json::from_str(&stdout_of(&["pages", &parent.to_string(), "--json"])).unwrap();
    let page = pages["page_size"].as_u64().unwrap();
    let shmem_swapped = swapped_in(&pages, &|v| v["backing"] == "shmem");
    let private_swapped = swapped_in(&pages, &|v| {
        v["start"]
            .as_str()
            .is_some_and(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16) == Ok(private))
    });
    assert!(
        shmem_swapped > 512 && private_swapped > 8192,
        "paged out: {shmem_swapped} {private_swapped}"
    );

    let out = cli(&["top", &parent.to_string(), &kid.to_string(), "--json"]);
    assert!(
        matches!(out.status.code(), Some(0 | 8)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = |pid: u32| {
        doc["processes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["pid"].as_u64() == Some(u64::from(pid)))
            .unwrap_or_else(|| panic!("{pid} in {doc}"))
            .clone()
    };
    let (p, k) = (row(parent), row(kid));
    // The shmem region is mapped by both at the same offsets: half each.
    assert_eq!(p["shmem_swap_bytes"], k["shmem_swap_bytes"], "{p} {k}");
    let half = shmem_swapped * page / 2;
    assert!(
        p["shmem_swap_bytes"].as_u64().unwrap().abs_diff(half) <= page,
        "shmem swap split in two: {p} vs {half}"
    );
    // The private region's slots are shared by the fork: half each, so the
    // child (which swapped nothing of its own) holds about half, not all.
    let child_swap = k["swap_bytes"].as_u64().unwrap();
    let all = private_swapped * page;
    assert!(
        child_swap >= all / 2 - page && child_swap < all * 3 / 4,
        "child swap {child_swap} of {all}"
    );
    // 256 shared pages in RAM mapped by no one: half each; the 256 the
    // parent maps are in its Rss, in no one's UNMAPPED. The system's DAMON
    // pageout scheme may page a few of the idle ones out between the
    // program's set-up and `top` (they then count as shmem swap): both
    // halves stay equal, and what is missing is a handful of pages at most.
    assert_eq!(p["unmapped_bytes"], k["unmapped_bytes"], "{p} {k}");
    let unmapped = p["unmapped_bytes"].as_u64().unwrap();
    assert!(
        unmapped <= 128 * page && unmapped + 8 * page >= 128 * page,
        "unmapped shmem split in two: {p} vs {}",
        128 * page
    );
    let text = stdout_of(&[
        "top",
        &parent.to_string(),
        &kid.to_string(),
        "-h",
        "--sort",
        "shmem_swap",
    ]);
    assert!(
        text.contains("SHMEM_SWAP") && text.contains("python3"),
        "{text}"
    );
}

#[test]
fn the_svg_bands_match_the_scan() {
    let fx = fixture(&["anon"]);
    let pid = fx.pid().to_string();
    let svg_path = std::env::temp_dir().join(format!("pagescope-views-{}.svg", std::process::id()));
    let svg_arg = svg_path.to_str().unwrap();
    stdout_of(&["map", &pid, "--svg", svg_arg]);
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    std::fs::remove_file(&svg_path).unwrap();
    assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"));
    let doc: Value = serde_json::from_str(&stdout_of(&["pages", &pid, "--json"])).unwrap();
    let page = doc["page_size"].as_u64().unwrap();
    let mut checked = 0;
    for v in doc["vmas"].as_array().unwrap() {
        let start =
            u64::from_str_radix(v["start"].as_str().unwrap().trim_start_matches("0x"), 16).unwrap();
        // Runs of equal state joined: what the picture draws.
        let mut want: Vec<(String, u64, u64)> = Vec::new();
        for r in v["ranges"].as_array().unwrap() {
            let s = u64::from_str_radix(r["start"].as_str().unwrap().trim_start_matches("0x"), 16)
                .unwrap();
            let (state, n) = (
                r["state"].as_str().unwrap().to_owned(),
                r["pages"].as_u64().unwrap(),
            );
            match want.last_mut() {
                Some(last) if last.0 == state && last.1 + last.2 * page == s => last.2 += n,
                _ => want.push((state, s, n)),
            }
        }
        let key = format!(r#"<g class="vma" data-start="{start}""#);
        let at = svg
            .find(&key)
            .unwrap_or_else(|| panic!("no row for {start:x}"));
        let row = &svg[at..at + svg[at..].find("</g>").unwrap()];
        let got: Vec<(String, u64, u64)> = row
            .split(r#"<rect class="band""#)
            .skip(1)
            .map(|b| {
                (
                    attr(b, "data-state"),
                    attr(b, "data-start").parse().unwrap(),
                    attr(b, "data-pages").parse().unwrap(),
                )
            })
            .collect();
        // File pages can change state between the two scans (another
        // process faulting the same file in makes them `resident` here):
        // for those only the coverage must agree.
        if v["backing"] == "file" {
            let pages = |b: &[(String, u64, u64)]| b.iter().map(|x| x.2).sum::<u64>();
            assert_eq!(pages(&got), pages(&want), "pages of {start:x}");
        } else {
            assert_eq!(got, want, "bands of {start:x}");
        }
        let widths: Vec<f64> = row
            .split(r#"<rect class="band""#)
            .skip(1)
            .map(|b| attr(b, "width").parse().unwrap())
            .collect();
        let total: f64 = widths.iter().sum();
        assert!(
            (total - 640.0).abs() < 0.1,
            "a row spans the band width: {total}"
        );
        assert!(
            widths.iter().all(|&w| w >= 1.0),
            "every band stays visible: {widths:?}"
        );
        checked += 1;
    }
    assert!(checked > 10, "{checked} rows checked");
}

fn attr(s: &str, name: &str) -> String {
    let key = format!(r#" {name}=""#);
    let i = s.find(&key).unwrap_or_else(|| panic!("{name} in {s}")) + key.len();
    s[i..i + s[i..].find('"').unwrap()].to_owned()
}

#[test]
fn objects_take_the_same_units_and_filters() {
    let fx = fixture(&["memfd", "tmpfs", "file"]);
    let pid = fx.pid().to_string();
    let objects = |extra: &[&str]| -> Vec<Value> {
        let mut args = vec!["objects", pid.as_str(), "--json"];
        args.extend_from_slice(extra);
        let doc: Value = serde_json::from_str(&stdout_of(&args)).unwrap();
        doc["objects"].as_array().unwrap().clone()
    };
    let all = objects(&[]);
    let memfds = objects(&["--path", "/memfd:*"]);
    assert!(
        !memfds.is_empty() && memfds.len() < all.len(),
        "{} of {}",
        memfds.len(),
        all.len()
    );
    assert!(
        memfds
            .iter()
            .all(|o| o["path"].as_str().unwrap().starts_with("/memfd:"))
    );
    let holes = objects(&["--state", "hole"]);
    assert!(!holes.is_empty());
    assert!(
        holes
            .iter()
            .all(|o| o["counts"]["hole"].as_u64().unwrap() > 0)
    );
    assert!(
        objects(&["--backing", "file"])
            .iter()
            .all(|o| o["backing"] == "file")
    );

    let page = fx.truth().page_size;
    let text = stdout_of(&["objects", &pid, "--bytes"]);
    assert!(text.starts_with("shared objects: sizes in bytes"), "{text}");
    let size = all[0]["size_pages"].as_u64().unwrap() * page;
    assert!(
        text.contains(&format!("size {size}:")),
        "{size} bytes in {text}"
    );
}
