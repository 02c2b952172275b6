//! QEMU end to end (issue 19, point 5): a VM live-migrated with pagescope
//! moving the guest RAM (`send --qmp --qemu-migrate` to `receive --into
//! FILE --in-place`) and QEMU only the device state (`x-ignore-shared`).
//!
//! Two TCG VMs on this machine: the destination started first, mapping a
//! file in /dev/shm and waiting with `-incoming defer`; the source with its
//! RAM in a memfd, its guest writing 2,000 pages/s the whole time. `send`
//! pre-copies the memfd while the guest runs, pauses the VM over QMP for
//! the final pass, and once the receiver acknowledged it, has QEMU migrate
//! the devices. FILE must be byte-identical to the source's RAM before the
//! destination continues, and the destination guest must keep running
//! with its self-check passing. Failures (a final pass refused, a
//! migration to nowhere) must leave the source running.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::qemu::{GuestLine, GuestSpec, Receiver, Vm, first_difference, missing};
use common::{Scratch, exe, skip};
use pagescope::PageSize;
use pagescope::qemu::{
    HandOffOptions, QmpError, cont, hand_off, incoming, query_status, wait_migration,
};

#[test]
fn guest_status_lines() {
    let console = "boot noise\r\nps-guest: ready pages=16384 rate=2000\n\
        ps-guest: seq=0 uptime_ms=1001 written=1860 checks=0 failures=0\r\n\
        [   1.2] ps-guest: seq=12 uptime_ms=13010 written=26020 checks=6 failures=2\n\
        ps-guest: seq=13 uptime_ms=x written=1 checks=1 failures=0\n\
        ps-guest: seq=14 uptime_ms=1 written=1 checks=1\n";
    assert_eq!(
        GuestLine::parse_all(console),
        [
            GuestLine {
                seq: 0,
                uptime_ms: 1001,
                written: 1860,
                checks: 0,
                failures: 0
            },
            GuestLine {
                seq: 12,
                uptime_ms: 13010,
                written: 26020,
                checks: 6,
                failures: 2
            },
        ]
    );
}

#[test]
fn qemu_live_migration_through_send_and_receive_in_place() {
    if let Some(why) = missing() {
        skip(&why);
        return;
    }
    let started = Instant::now();
    let scratch = Scratch::new("qemu");
    let spec = GuestSpec {
        ram_mib: 256,
        work_mib: 64,
        rate: 2000,
    };
    let ram_file = PathBuf::from(format!(
        "/dev/shm/pagescope-fixture-qemu-{}.ram",
        std::process::id()
    ));
    let marker = PathBuf::from(format!("{}.incomplete", ram_file.display()));
    let _remove = RemoveOnDrop(vec![ram_file.clone(), marker.clone()]);

    // The destination first: it creates and maps FILE, and waits.
    let mut dst = Vm::destination(&spec, &scratch.0.join("dst"), &ram_file);
    let uri = format!("unix:{}", scratch.0.join("migrate.sock").display());
    incoming(&mut dst.qmp, &uri).expect("destination: migrate-incoming");
    assert!(ram_file.is_file(), "the destination QEMU made FILE");
    let mut src = Vm::source(&spec, &scratch.0.join("src"));
    src.wait_guest("the source guest checks its memory", WAIT, |l| {
        l.last().is_some_and(|l| l.checks >= 2)
    });

    // The library's hand-off: a failed final pass leaves the source running.
    let failed = hand_off(&mut src.qmp, &HandOffOptions::new(&uri), || {
        Err(std::io::Error::other("final pass refused"))
    });
    assert!(matches!(failed, Err(QmpError::FinalPass(_))), "{failed:?}");
    assert!(query_status(&mut src.qmp).expect("query-status").running);

    // A migration that fails after the stop (nothing listens at the URI):
    // one line, an exit code, the source continued and its guest going on.
    let nowhere = format!("unix:{}", scratch.0.join("nobody.sock").display());
    let r = Receiver::in_place(&ram_file);
    let bad = send_and_migrate(&src, &r.addr, &nowhere);
    let (rc, rerr) = r.finish();
    assert_eq!(rc, 0, "receive: {rerr}");
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success(), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("pagescope: ") && last.contains("not handed over"),
        "{err}"
    );
    assert!(query_status(&mut src.qmp).expect("query-status").running);
    eprintln!("a migration to nowhere: {last}");
    let seq = src.guest_lines().last().expect("a status line").seq;
    src.wait_guest("the source guest goes on", WAIT, |l| {
        l.last().is_some_and(|l| l.seq >= seq + 2)
    });

    // The migration, the guest writing all along.
    let last_on_source = *src.guest_lines().last().expect("a status line");
    let r = Receiver::in_place(&ram_file);
    let out = send_and_migrate(&src, &r.addr, &uri);
    let (rc, rerr) = r.finish();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "send: {err}\nreceive: {rerr}");
    assert_eq!(rc, 0, "receive: {rerr}");
    assert!(rerr.contains("in place"), "{rerr}");
    assert!(!marker.exists(), "the marker outlived the commit");
    let report: serde_json::Value = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("the report on stdout; stderr: {err}"));

    let on_destination = wait_migration(
        &mut dst.qmp,
        Duration::from_millis(10),
        Duration::from_secs(30),
    )
    .expect("destination: migration completed");
    let status = query_status(&mut dst.qmp).expect("destination status");
    assert!(!status.running, "destination ran before cont: {status:?}");
    assert_eq!(
        first_difference(&src.memfd_path(), &ram_file),
        None,
        "FILE differs from the source's RAM before the destination continues"
    );
    let source_status = query_status(&mut src.qmp).expect("source status");
    assert_eq!(source_status.status, "postmigrate", "{source_status:?}");
    check_report(&report, &spec);

    cont(&mut dst.qmp).expect("destination: cont");
    dst.wait_guest(
        "the destination guest keeps running and checking",
        WAIT,
        |l| {
            l.first().is_some_and(|f| f.seq > last_on_source.seq)
                && l.last()
                    .is_some_and(|z| z.checks >= last_on_source.checks + 3 && z.seq >= 3 + l[0].seq)
        },
    );
    let after = dst.guest_lines();
    assert!(
        after.iter().all(|l| l.failures == 0),
        "self-check failures after the migration: {after:?}"
    );
    assert!(
        after.windows(2).all(|w| w[1].seq == w[0].seq + 1),
        "{after:?}"
    );
    let passes = report["send"]["dump"]["iterations"]
        .as_array()
        .map_or(0, Vec::len);
    eprintln!(
        "qemu migration: {} bytes sent over {passes} passes in {:.2} s; VM paused {:.1} ms \
         (final pass + ack {:.1} ms); QEMU downtime {} ms, total {} ms, {} bytes; destination {:?}; test {:?}",
        report["send"]["bytes_sent"],
        report["send"]["seconds"].as_f64().unwrap_or(0.0),
        report["stopped_ms"].as_f64().unwrap_or(0.0),
        report["final_pass_ms"].as_f64().unwrap_or(0.0),
        report["migration"]["downtime_ms"],
        report["migration"]["total_time_ms"],
        report["migration"]["ram_transferred"],
        on_destination.status,
        started.elapsed()
    );
    eprintln!(
        "qemu migration: the pause's timeline (ms after stop): {}",
        report["timeline"]
    );
}

/// `pagescope send` of `src`'s guest RAM memfd to `addr`, migrating the VM
/// to `uri`, with the JSON report.
fn send_and_migrate(src: &Vm, addr: &str, uri: &str) -> std::process::Output {
    std::process::Command::new(exe())
        .args(["send", &src.pid().to_string(), "--to", addr])
        .args(["--object", "memfd:memory-backend-memfd", "--qmp"])
        .arg(src.tool_socket())
        .args(["--qemu-migrate", uri, "--json"])
        .output()
        .expect("run pagescope send")
}

/// The send's report: pre-copy saw the guest's writes while it ran, only
/// the guest RAM was read (the memfd and its one mapping: nothing of
/// QEMU's own memory), QEMU's stream carried no RAM.
fn check_report(report: &serde_json::Value, spec: &GuestSpec) {
    let its = report["send"]["dump"]["iterations"]
        .as_array()
        .expect("iterations");
    assert!(its.len() >= 3, "full, pre-copy and final passes: {report}");
    let last = its.last().expect("a pass");
    assert_eq!(last["stopped"], true, "{report}");
    assert!(
        its[1..its.len() - 1]
            .iter()
            .any(|it| it["written_pages"].as_u64() > Some(0) && it["stopped"] == false),
        "no pre-copy pass saw the running guest's writes: {report}"
    );
    let ram_pages = (spec.ram_mib << 20) / PageSize::current().get();
    assert_eq!(
        report["send"]["dump"]["covered_pages"].as_u64(),
        Some(2 * ram_pages),
        "--object covers only the guest RAM (object + its mapping): {report}"
    );
    let transferred = report["migration"]["ram_transferred"].as_u64().unwrap_or(0);
    assert!(
        transferred < 16 << 20,
        "QEMU sent {transferred} bytes: x-ignore-shared should leave the RAM out"
    );
    assert_eq!(report["migration"]["status"], "completed", "{report}");
    assert!(report["migration"]["downtime_ms"].is_u64(), "{report}");
    assert!(report["stopped_ms"].as_f64() > Some(0.0), "{report}");
    // The timeline: QEMU's device state went out only after the receiver's
    // acknowledgement (FILE committed), and completed within the pause.
    let t = &report["timeline"];
    let at = |k: &str| {
        t[k].as_f64()
            .unwrap_or_else(|| panic!("timeline {k}: {report}"))
    };
    assert!(at("migrate_issued_ms") <= at("stop_seen_ms"), "{report}");
    assert!(at("final_pages_sent_ms") <= at("ack_ms"), "{report}");
    assert!(at("ack_ms") <= at("switchover_ms"), "{report}");
    assert!(
        at("switchover_ms") <= at("migration_completed_ms"),
        "{report}"
    );
}

/// How long a guest may take to boot, or to print its next lines (TCG on
/// a loaded machine).
const WAIT: Duration = Duration::from_secs(60);

struct RemoveOnDrop(Vec<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}
