//! `pagescope exporter`: the exposition passes `promtool check metrics`,
//! both formats are served as the Accept header asks, and a real
//! Prometheus server scrapes two exporters (one as root, one as `nobody`)
//! while the test checks through its HTTP API that the values for the
//! fixture and for a forked python3 pair sharing swapped memory equal what
//! `pagescope map --json` / `top --json` say, that the pair's divided swap
//! sums to the swap slots they really hold, that a process exiting
//! between scrapes drops out without failing the scrape, that a denied
//! process is counted, that `--watch` counts writes, and that every query
//! of the Grafana dashboard (`dashboards/pagescope.json`) returns data.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::exporter::{
    Killed, Prometheus, eventually, exporter_cmd, get, have, json_of, promtool_check, serve,
};
use common::{cli, fixture, skip};
use serde_json::Value;

#[test]
fn the_exposition_passes_promtool_in_both_formats() {
    if !have("promtool") {
        return skip("exporter: promtool (Debian package prometheus) is not installed");
    }
    let fx = fixture(&["anon"]);
    let pid = fx.pid().to_string();
    let out = cli(&["exporter", "--once", "--pid", &pid]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    promtool_check(&text);
    for family in [
        "pagescope_process_swap_bytes",
        "pagescope_process_memory_bytes",
        "pagescope_machine_meminfo_bytes",
        "pagescope_scrape_duration_seconds",
        "pagescope_scrapes_total",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "{family}: {text}"
        );
    }
    assert!(text.contains(&format!("pagescope_process_rss_bytes{{pid=\"{pid}\"")));

    for bad in [
        &["exporter"][..],
        &["exporter", "--listen", "256.0.0.1:80"],
        &["exporter", "--once", "--listen", "127.0.0.1:0"],
        &["exporter", "--once", "--object-min-size", "lots"],
    ] {
        let out = cli(bad);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{bad:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let (server, addr) = serve(exporter_cmd(&["--pid", &pid]));
    let url = format!("http://{addr}/metrics");
    let (plain, ctype) = get(&url, None);
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    promtool_check(&plain);
    let om_accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
    let (om, ctype) = get(&url, Some(om_accept));
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(
        om.contains("# UNIT pagescope_process_rss_bytes bytes"),
        "{om}"
    );
    assert!(
        om.contains("pagescope_scrapes_total 2"),
        "a counter per scrape: {om}"
    );
    let missing = ureq::get(&format!("http://{addr}/nothing")).call();
    assert!(
        matches!(missing, Err(ureq::Error::StatusCode(404))),
        "{missing:?}"
    );
    drop(server);

    // A collection slower than --scrape-timeout never holds the scrape:
    // it is served the previous snapshot (here: none yet), said late.
    let (_slow, addr) = serve(exporter_cmd(&["--scrape-timeout", "10ms", "--pid", &pid]));
    let url = format!("http://{addr}/metrics");
    let start = Instant::now();
    let (first, _) = get(&url, None);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert!(first.contains("pagescope_late_scrapes_total 1"), "{first}");
    assert!(!first.contains(&format!("pid=\"{pid}\"")), "{first}");
    promtool_check(&first);
    // Later scrapes get the collection the first one started.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (text, _) = get(&url, None);
        if text.contains(&format!("pagescope_process_rss_bytes{{pid=\"{pid}\"")) {
            break;
        }
        assert!(Instant::now() < deadline, "no snapshot arrived: {text}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `map --json` of `pid`: bytes per (backing, state), special mappings
/// left out, holes too (as the exporter exports them).
fn map_states(pid: u32) -> BTreeMap<(String, String), f64> {
    let doc = json_of(&["map", &pid.to_string(), "--json"]);
    let page = doc["page_size"].as_f64().unwrap();
    let mut out = BTreeMap::new();
    for v in doc["vmas"].as_array().unwrap() {
        let backing = v["backing"].as_str().unwrap();
        if backing == "special" {
            continue;
        }
        for (state, n) in v["counts"].as_object().unwrap() {
            let n = n.as_f64().unwrap();
            if n > 0.0 {
                *out.entry((backing.to_owned(), state.clone())).or_default() += n * page;
            }
        }
    }
    out
}

fn prom_states(p: &Prometheus, pid: u32) -> BTreeMap<(String, String), f64> {
    p.query(&format!(
        "pagescope_process_memory_bytes{{job=\"root\",pid=\"{pid}\"}} > 0"
    ))
    .iter()
    .map(|s| {
        let m = &s["metric"];
        let key = (
            m["backing"].as_str().unwrap().to_owned(),
            m["state"].as_str().unwrap().to_owned(),
        );
        (key, s["value"][1].as_str().unwrap().parse().unwrap())
    })
    .collect()
}

/// The python pair of `fork_shared_swapped.py`: (parent, child).
fn python_pair() -> (Killed, u32, u32) {
    let (child, line) = common::fork_shared_swapped();
    let parent = child.id();
    let kid: u32 = line
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap();
    (Killed(child), parent, kid)
}

/// The swap slots (type, offset) a process's page tables hold.
fn slots(pid: u32) -> BTreeSet<(u64, u64)> {
    let doc = json_of(&["pages", &pid.to_string(), "--swap-detail", "--json"]);
    let mut out = BTreeSet::new();
    for v in doc["vmas"].as_array().unwrap() {
        if v["backing"] == "shmem" {
            continue;
        }
        for r in v["ranges"].as_array().unwrap() {
            if let Some(s) = r.get("swap").filter(|s| s.is_object()) {
                let (ty, off) = (s["type"].as_u64().unwrap(), s["offset"].as_u64().unwrap());
                for i in 0..r["pages"].as_u64().unwrap() {
                    out.insert((ty, off + i));
                }
            }
        }
    }
    out
}

#[test]
fn a_real_prometheus_scrapes_the_exporter() {
    if !common::is_root() {
        return skip(
            "exporter under prometheus: needs root (divided swap slots, a nobody exporter)",
        );
    }
    if !have("prometheus") {
        return skip("exporter: prometheus (Debian package prometheus) is not installed");
    }
    if common::caps().swaps.is_empty() {
        return skip("exporter: no swap device active");
    }
    let fx = fixture(&["anon"]);
    let (_pair, parent, kid) = python_pair();
    let writer_script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/programs/anon_memfd_writer.py"
    );
    let mut writer = Command::new("python3")
        .args([writer_script, "2000", "900"])
        .stdout(Stdio::piped())
        .spawn()
        .map(Killed)
        .expect("python3 writer");
    let mut ready = String::new();
    BufReader::new(writer.0.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    let writer_pid = writer.0.id();
    let mut exiting = Command::new("sleep")
        .arg("600")
        .spawn()
        .map(Killed)
        .unwrap();
    let exiting_pid = exiting.0.id();
    let nobody_fx = common::unprivileged_fixture(&["anon"]);

    let pids = [fx.pid(), parent, kid, exiting_pid, nobody_fx.pid()].map(|p| p.to_string());
    let w = writer_pid.to_string();
    let mut args: Vec<&str> = vec!["--min-interval", "500ms", "--watch", &w];
    for p in &pids {
        args.extend(["--pid", p]);
    }
    let (_root, root_addr) = serve(exporter_cmd(&args));
    let (_nobody, nobody_addr) = serve(common::as_nobody(&[
        "exporter",
        "--listen",
        "127.0.0.1:0",
        "--min-interval",
        "500ms",
        "--pid",
        &pids[4],
        "--pid",
        &pids[0],
    ]));
    let prom = Prometheus::start(&[("root", &root_addr), ("nobody", &nobody_addr)]);
    let series = |expr: &str| prom.value(expr);

    // The fixture: bytes per backing and state as `map` counts them.
    eventually("fixture states equal map --json", || {
        let want = map_states(fx.pid());
        std::thread::sleep(Duration::from_millis(2000));
        let got = prom_states(&prom, fx.pid());
        (got == want)
            .then_some(())
            .ok_or(format!("prometheus {got:?}\nmap {want:?}"))
    });

    // The pair: every divided column equals top --json; the divided swap
    // sums to the slots they really hold, smaps charges it to both.
    let page = common::caps().page_size.get() as f64;
    eventually("pair equals top --json", || {
        let top = json_of(&["top", &parent.to_string(), &kid.to_string(), "--json"]);
        std::thread::sleep(Duration::from_millis(2000));
        for row in top["processes"].as_array().unwrap() {
            let pid = row["pid"].as_u64().unwrap();
            for (metric, field) in [
                ("process_rss_bytes", "rss_bytes"),
                ("process_pss_bytes", "pss_bytes"),
                ("process_swap_bytes", "swap_bytes"),
                ("process_shmem_swap_bytes", "shmem_swap_bytes"),
                ("process_shmem_unmapped_bytes", "unmapped_bytes"),
            ] {
                let got = series(&format!("pagescope_{metric}{{job=\"root\",pid=\"{pid}\"}}"));
                let want = row[field].as_f64();
                // Pss moves with every process mapping a library page at
                // that instant (`pagescope top` itself maps libc).
                let slack = if field == "pss_bytes" {
                    want.unwrap_or(0.0) / 100.0
                } else {
                    0.0
                };
                if got.zip(want).is_none_or(|(g, w)| (g - w).abs() > slack) {
                    return Err(format!(
                        "{metric} of {pid}: prometheus {got:?}, top {want:?}"
                    ));
                }
            }
        }
        Ok(())
    });
    eventually("the pair's divided swap is what they hold in swap", || {
        let held = slots(parent).union(&slots(kid)).count() as f64 * page;
        let objects = json_of(&["objects", &parent.to_string(), &kid.to_string(), "--json"]);
        let shmem_swapped: f64 = objects["objects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                o["counts"]["swapped"].as_f64().unwrap()
                    + o["counts"]["swapcache"].as_f64().unwrap()
            })
            .sum::<f64>()
            * page;
        std::thread::sleep(Duration::from_millis(2000));
        let pair = format!("job=\"root\",pid=~\"{parent}|{kid}\"");
        let swap = series(&format!("sum(pagescope_process_swap_bytes{{{pair}}})")).unwrap();
        let shmem = series(&format!(
            "sum(pagescope_process_shmem_swap_bytes{{{pair}}})"
        ))
        .unwrap();
        let smaps = series(&format!(
            "sum(pagescope_process_smaps_swap_bytes{{{pair}}})"
        ))
        .unwrap();
        if (swap - held).abs() > page || (shmem - shmem_swapped).abs() > page {
            return Err(format!(
                "divided {swap} + {shmem}, held {held} + {shmem_swapped}"
            ));
        }
        if smaps < 1.9 * (held + shmem_swapped) - 64.0 * page {
            return Err(format!(
                "smaps charges shared swap to both: {smaps} vs {held}"
            ));
        }
        Ok(())
    });
    assert!(
        (16384.0 * page..=2.0 * 16384.0 * page).contains(
            &series(&format!(
                "sum(pagescope_process_swap_bytes{{job=\"root\",pid=~\"{parent}|{kid}\"}})"
            ))
            .unwrap()
        ),
        "the forked private region is in swap once, not twice"
    );

    // A process exiting between scrapes: its series go, the scrape stays up.
    let alive = format!("pagescope_process_rss_bytes{{job=\"root\",pid=\"{exiting_pid}\"}}");
    assert!(series(&alive).is_some_and(|v| v > 0.0), "{alive}");
    let _ = exiting.0.kill();
    let _ = exiting.0.wait();
    prom.wait_for(
        &format!(
            "pagescope_process_missing{{job=\"root\",pid=\"{exiting_pid}\",reason=\"exited\"}} == 1"
        ),
        Duration::from_secs(20),
    );
    assert_eq!(series(&alive), None, "series of an exited process");
    assert_eq!(series("up{job=\"root\"}"), Some(1.0));

    // A denied process: the nobody exporter counts what it cannot read and
    // still reports the process nobody owns.
    prom.wait_for(
        "pagescope_processes_skipped{job=\"nobody\",reason=\"permission\"} > 0",
        Duration::from_secs(10),
    );
    // The root fixture, named by --pid, is missing for `nobody`, and why.
    assert_eq!(
        series(&format!(
            "pagescope_process_missing{{job=\"nobody\",pid=\"{}\",reason=\"permission\"}}",
            pids[0]
        )),
        Some(1.0)
    );
    assert!(
        series(&format!(
            "pagescope_process_pss_bytes{{job=\"nobody\",pid=\"{}\"}}",
            pids[4]
        ))
        .is_some_and(|v| v > 0.0),
        "the nobody exporter reports nobody's fixture"
    );
    assert_eq!(series("up{job=\"nobody\"}"), Some(1.0));

    // --watch: the writer writes 2000 pages a second.
    prom.wait_for(
        &format!(
            "increase(pagescope_process_written_bytes_total{{pid=\"{writer_pid}\"}}[5s]) > 1e6"
        ),
        Duration::from_secs(20),
    );

    // Machine totals are there, per field.
    for field in ["Shmem", "SwapCached", "SwapUsed"] {
        assert!(
            series(&format!(
                "pagescope_machine_unexplained_bytes{{job=\"root\",field=\"{field}\"}}"
            ))
            .is_some()
        );
    }

    // Every query of the dashboard returns data.
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../dashboards/pagescope.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut queries = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$instance", &root_addr)
                .replace("$__rate_interval", "10s");
            let r = prom.query(&expr);
            assert!(
                !r.is_empty(),
                "dashboard panel {:?}: {expr} returns no data",
                panel["title"]
            );
            queries += 1;
        }
    }
    assert!(queries >= 10, "{queries} dashboard queries");
    drop(nobody_fx);
}

/// Without their own series, processes are divided from a cheaper scan
/// (holdings only; a process whose swap is all its own, by smaps SwapPss,
/// is not walked at all): the sums must still be `top`'s, with the python
/// pair and a process with unshared swap on the machine.
#[test]
fn aggregated_processes_divide_like_top() {
    if !common::is_root() || common::caps().swaps.is_empty() {
        return skip("exporter aggregate vs top: needs root and a swap device");
    }
    let (_pair, _, _) = python_pair();
    let mut solo = Command::new("python3")
        .args([
            "-c",
            "import mmap,time\nm=mmap.mmap(-1,8<<20,flags=mmap.MAP_PRIVATE|mmap.MAP_ANONYMOUS)\nfor i in range(0,8<<20,4096): m[i]=1\nm.madvise(21,0,4<<20)\nprint('ready',flush=True)\ntime.sleep(600)",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .map(Killed)
        .unwrap();
    let mut line = String::new();
    BufReader::new(solo.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // Machine-wide swap moves while the suite runs (DAMON pages idle
    // memory out, other tests swap in): `top` is read before and after
    // the exporter, and the exporter's sums must lie between the two.
    eventually("exporter aggregates equal top's sums", || {
        let before = json_of(&["top", "--json"]);
        let out = cli(&["exporter", "--once", "--top", "0", "--pid", "999999999"]);
        let text = String::from_utf8(out.stdout).unwrap();
        let after = json_of(&["top", "--json"]);
        let value = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .unwrap_or_else(|| panic!("{name} in {text}"))
                .parse()
                .unwrap()
        };
        let sum = |top: &Value, field: &str| -> f64 {
            top["processes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p[field].as_f64().unwrap())
                .sum()
        };
        for (metric, field) in [
            ("pagescope_other_processes_swap_bytes", "swap_bytes"),
            (
                "pagescope_other_processes_shmem_swap_bytes",
                "shmem_swap_bytes",
            ),
            (
                "pagescope_other_processes_shmem_unmapped_bytes",
                "unmapped_bytes",
            ),
        ] {
            let (a, b) = (sum(&before, field), sum(&after, field));
            let got = value(metric);
            // Rounding: each process's share is rounded to whole bytes.
            if got < a.min(b) - 64.0 || got > a.max(b) + 64.0 {
                return Err(format!("{metric} {got}, top sums {a} before and {b} after"));
            }
        }
        if value("pagescope_other_processes_swap_bytes")
            < 16384.0 * common::caps().page_size.get() as f64
        {
            return Err("the pair's swap is missing".into());
        }
        Ok(())
    });
}
