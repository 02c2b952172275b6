//! QEMU end to end (issue 19, point 5): a VM's guest RAM moved by
//! pagescope while QEMU migrates only the device state (`x-ignore-shared`).
//!
//! Two TCG VMs on this machine: the source with its RAM in a memfd, the
//! destination mapping a file in /dev/shm and waiting with `-incoming
//! defer`. `qemu::hand_off` stops the source over QMP; while it is stopped
//! pagescope's library copies the memfd into the file (the stand-in for
//! the final pass of `send`/`receive`), the file is checked byte-identical
//! to the source's RAM, QEMU migrates the devices, the file is checked
//! again, and the destination is continued: its guest must keep running
//! with its self-check passing.

mod common;

use std::time::{Duration, Instant};

use common::qemu::{GuestLine, GuestSpec, Vm, copy_guest_ram, first_difference, missing};
use common::{Scratch, skip};
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
fn qemu_ignore_shared_migration_with_ram_copied_while_stopped() {
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
    let ram_file = std::path::PathBuf::from(format!(
        "/dev/shm/pagescope-fixture-qemu-{}.ram",
        std::process::id()
    ));
    let _remove_ram_file = RemoveOnDrop(ram_file.clone());
    std::fs::File::create(&ram_file)
        .and_then(|f| f.set_len(spec.ram_mib << 20))
        .expect("create the destination's RAM file");

    let mut src = Vm::source(&spec, &scratch.0.join("src"));
    let mut dst = Vm::destination(&spec, &scratch.0.join("dst"), &ram_file);
    let uri = format!("unix:{}", scratch.0.join("migrate.sock").display());
    incoming(&mut dst.qmp, &uri).expect("destination: migrate-incoming");
    src.wait_guest("the source guest checks its memory", WAIT, |l| {
        l.last().is_some_and(|l| l.checks >= 2)
    });

    // A failed final pass leaves the source running.
    let failed = hand_off(&mut src.qmp, &HandOffOptions::new(&uri), || {
        Err(std::io::Error::other("final pass refused"))
    });
    assert!(matches!(failed, Err(QmpError::FinalPass(_))), "{failed:?}");
    assert!(query_status(&mut src.qmp).expect("query-status").running);

    let last_on_source = *src.guest_lines().last().expect("a status line");
    let (pid, memfd) = (src.pid(), src.memfd_path());
    let mut copied = 0;
    let mut difference_before_migrate = Some(u64::MAX);
    let handed = hand_off(&mut src.qmp, &HandOffOptions::new(&uri), || {
        copied = copy_guest_ram(pid, &ram_file);
        difference_before_migrate = first_difference(&memfd, &ram_file);
        Ok::<_, std::io::Error>(())
    })
    .expect("stop, copy, migrate the device state");
    assert_eq!(
        difference_before_migrate, None,
        "the RAM file differs from the stopped source's RAM at page {difference_before_migrate:?}"
    );
    let on_destination = wait_migration(
        &mut dst.qmp,
        Duration::from_millis(10),
        Duration::from_secs(30),
    )
    .expect("destination: migration completed");
    let status = query_status(&mut dst.qmp).expect("destination status");
    assert!(!status.running, "destination ran before cont: {status:?}");
    assert_eq!(
        first_difference(&memfd, &ram_file),
        None,
        "the RAM file differs from the source's RAM before the destination continues"
    );
    let source_status = query_status(&mut src.qmp).expect("source status");
    assert_eq!(source_status.status, "postmigrate", "{source_status:?}");
    let transferred = handed.migration.ram_transferred.unwrap_or(0);
    assert!(
        transferred < 16 << 20,
        "QEMU sent {transferred} bytes: x-ignore-shared should leave the RAM out"
    );

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
    eprintln!(
        "qemu migration: {copied} bytes copied, stopped {:?} (final pass {:?}), QEMU downtime {:?} ms, \
         total {:?} ms, {transferred} bytes on the wire; destination {:?}; test {:?}",
        handed.stopped,
        handed.final_pass,
        handed.migration.downtime_ms,
        handed.migration.total_time_ms,
        on_destination.status,
        started.elapsed()
    );
}

/// How long a guest may take to boot, or to print its next lines (TCG on
/// a loaded machine).
const WAIT: Duration = Duration::from_secs(60);

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
