//! QEMU post-copy end to end (issue 20, point 3): a VM whose guest writes
//! faster than a `--bandwidth`-capped link carries pages, migrated with
//! `send --qmp --qemu-migrate --postcopy-after auto` into a destination
//! QEMU served by `receive --into FILE --postcopy --pid DEST`.
//!
//! Pre-copy alone cannot converge here (the written set stops shrinking:
//! the automatic switch fires, and the last pre-copy pass's expected
//! downtime is far over `--max-downtime`); the source is paused over QMP,
//! QEMU moves only the device state (`x-ignore-shared`) to the destination
//! (started `-incoming defer`, without `-S`), which runs at once while its
//! RAM is served on fault and in the background. Then: the receiver put
//! in every page exactly once (none found present: nothing QEMU wrote into
//! FILE before the switch was kept, and every page installed is one the
//! receiver checked against the sender's checksum of the source's page at
//! the stop), the source stayed paused, and the destination guest keeps
//! running with its self-check passing.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::qemu::{GuestSpec, Receiver, Vm, missing, tail};
use common::{Scratch, exe, is_root, skip};
use pagescope::PageSize;
use pagescope::qemu::{incoming, query_status, wait_migration};

/// The guest writes 3,000 pages/s (about 12 MiB/s) over a 4 MiB/s link.
const BANDWIDTH: &str = "4M";

#[test]
fn qemu_postcopy_migration_of_a_guest_writing_faster_than_the_link() {
    if let Some(why) = missing() {
        skip(&why);
        return;
    }
    if !is_root() {
        skip("post-copy needs ptrace rights and userfaultfd in the destination (root)");
        return;
    }
    let started = Instant::now();
    let scratch = Scratch::new("qemu-postcopy");
    let spec = GuestSpec {
        ram_mib: 256,
        work_mib: 16,
        rate: 3000,
    };
    let ram_file = PathBuf::from(format!(
        "/dev/shm/pagescope-fixture-qemu-postcopy-{}.ram",
        std::process::id()
    ));
    let _remove = RemoveOnDrop(ram_file.clone());

    // The destination first: it creates and maps FILE and waits; it runs
    // as soon as the device state is in (no -S).
    let mut dst = Vm::destination_running(&spec, &scratch.0.join("dst"), &ram_file);
    let mut src = Vm::source(&spec, &scratch.0.join("src"));
    src.wait_guest("the source guest checks its memory", WAIT, |l| {
        l.last().is_some_and(|l| l.checks >= 2)
    });
    // What QEMU wrote into FILE while starting `-incoming defer`: not
    // the guest's, and punched out by the receiver when it attaches.
    let written = nonzero_pages(&ram_file);
    eprintln!("FILE before the receiver attached: {written} non-zero pages");

    // A device-state migration that fails at the switch (nothing listens
    // at the URI): the source is continued, its guest goes on.
    let nowhere = format!("unix:{}", scratch.0.join("nobody.sock").display());
    let r = Receiver::postcopy(&ram_file, dst.pid(), None);
    let bad = send(&src, &r.addr, &nowhere, &["--postcopy-after", "0"])
        .output()
        .expect("run pagescope send");
    let (rc, rerr, _) = r.finish_json();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success(), "{err}");
    assert_eq!(rc, 0, "receive: {rerr}");
    let last = err.lines().last().unwrap_or_default();
    assert!(last.contains("not handed over"), "{err}");
    assert!(query_status(&mut src.qmp).expect("status").running, "{err}");
    eprintln!("a post-copy migration to nowhere: {last}");

    let r = Receiver::postcopy(&ram_file, dst.pid(), Some(&dst.tool_socket()));
    let uri = format!("unix:{}", scratch.0.join("migrate.sock").display());
    incoming(&mut dst.qmp, &uri).expect("destination: migrate-incoming");
    let last_on_source = *src.guest_lines().last().expect("a status line");
    let out = send(&src, &r.addr, &uri, &["--postcopy-after", "auto"])
        .args(["--bandwidth", BANDWIDTH])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run pagescope send");
    // The destination runs while the source still serves its pages.
    let mut out = out;
    let mut ran_during_postcopy = false;
    while out.try_wait().expect("send").is_none() {
        ran_during_postcopy |= query_status(&mut dst.qmp).is_ok_and(|s| s.running);
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = out.wait_with_output().expect("send's output");
    let (rc, rerr, received) = r.finish_json();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "send: {err}\nreceive: {rerr}");
    assert_eq!(rc, 0, "receive: {rerr}");
    let report: serde_json::Value = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("the report on stdout; stderr: {err}"));
    assert!(ran_during_postcopy, "send: {err}\nreceive: {rerr}");
    assert!(rerr.contains("continued"), "{rerr}");
    check_no_convergence(&report);
    check_received(&received, &spec);

    wait_migration(
        &mut dst.qmp,
        Duration::from_millis(10),
        Duration::from_secs(30),
    )
    .expect("destination: migration completed");
    assert!(query_status(&mut dst.qmp).expect("status").running);
    let source = query_status(&mut src.qmp).expect("source status");
    assert_eq!(source.status, "postmigrate", "{source:?}");
    assert!(
        report["held_ms"].as_f64() >= report["downtime_ms"].as_f64(),
        "the source held its pages until the acknowledgement: {report}"
    );
    dst.wait_guest(
        "the destination guest keeps running and checking",
        WAIT,
        |l| {
            l.first().is_some_and(|f| f.seq > last_on_source.seq)
                && l.last()
                    .is_some_and(|z| z.checks >= last_on_source.checks + 2 && z.seq >= 3 + l[0].seq)
        },
    );
    let after = dst.guest_lines();
    assert!(
        after.iter().all(|l| l.failures == 0),
        "self-check failures after the migration: {after:?}\n{}",
        tail(&dst.console())
    );
    eprintln!(
        "qemu post-copy: {} passes, pre-copy {}; switch {:.1} ms, downtime {:.1} ms, held {:.1} ms; \
         receiver: {} by fault, {} in the background, fault wait p50 {} us p99 {} us; test {:?}",
        report["send"]["dump"]["iterations"]
            .as_array()
            .map_or(0, Vec::len),
        report["send"]["precopy_end"],
        report["switch_ms"].as_f64().unwrap_or(0.0),
        report["downtime_ms"].as_f64().unwrap_or(0.0),
        report["held_ms"].as_f64().unwrap_or(0.0),
        received["pages_by_fault"],
        received["pages_background"],
        received["fault_latency_p50_us"],
        received["fault_latency_p99_us"],
        started.elapsed()
    );
}

/// `pagescope send` of `src`'s guest RAM memfd to `addr`, migrating the
/// VM to `uri` with `extra`, the report as JSON.
fn send(src: &Vm, addr: &str, uri: &str, extra: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new(exe());
    c.args(["send", &src.pid().to_string(), "--to", addr])
        .args(["--object", "memfd:memory-backend-memfd", "--qmp"])
        .arg(src.tool_socket())
        .args(["--qemu-migrate", uri, "--json"])
        .args(extra);
    c
}

/// Pre-copy could not converge: the automatic switch fired because the
/// written set stopped shrinking, with the last pre-copy pass's expected
/// downtime over the 300 ms target; then post-copy and QEMU completed.
fn check_no_convergence(report: &serde_json::Value) {
    let send = &report["send"];
    assert_eq!(send["precopy_end"], "stalled_above_downtime", "{report}");
    assert_eq!(send["converged"], false, "{report}");
    let its = send["dump"]["iterations"].as_array().expect("iterations");
    let precopy: Vec<&serde_json::Value> = its.iter().filter(|it| it["stopped"] == false).collect();
    let last = precopy.last().expect("pre-copy passes");
    assert!(
        last["predicted_downtime_s"].as_f64() > Some(0.3),
        "the last pre-copy pass would fit the downtime target: {report}"
    );
    assert!(
        send["postcopy"]["pending_at_switch"].as_u64() > Some(0),
        "{report}"
    );
    assert_eq!(report["migration"]["status"], "completed", "{report}");
    assert!(
        report["migration"]["ram_transferred"].as_u64() < Some(16 << 20),
        "x-ignore-shared should leave the RAM out of QEMU's stream: {report}"
    );
}

/// Every page of FILE put in exactly once, none found present, faults
/// served.
fn check_received(received: &serde_json::Value, spec: &GuestSpec) {
    let pages = (spec.ram_mib << 20) / PageSize::current().get();
    let n = |k: &str| received[k].as_u64().unwrap_or(u64::MAX);
    assert_eq!(
        n("pages_by_fault") + n("pages_background"),
        pages,
        "{received}"
    );
    assert_eq!(n("pages_already_present"), 0, "{received}");
    assert!(n("pending_at_switch") > 0, "{received}");
    assert!(n("faults") > 0, "the destination faulted: {received}");
}

/// FILE's pages that are not all zero.
fn nonzero_pages(file: &Path) -> u64 {
    let f = std::fs::File::open(file).expect("open FILE");
    let len = f.metadata().expect("stat FILE").len();
    let page = PageSize::current().get();
    let mut buf = vec![0u8; page as usize];
    let mut n = 0;
    for p in 0..len / page {
        f.read_exact_at(&mut buf, p * page).expect("read FILE");
        n += u64::from(buf.iter().any(|&b| b != 0));
    }
    n
}

/// How long a guest may take to boot, or to print its next lines (TCG on
/// a loaded machine).
const WAIT: Duration = Duration::from_secs(60);

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
