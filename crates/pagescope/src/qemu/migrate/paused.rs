//! [`Paused`]: a VM stopped over QMP for its hand-over, and [`hand_off`],
//! the whole stop → caller's final pass → device-state migration
//! sequence. A migration is either run in one go ([`Paused::migrate`]) or
//! started right after the stop and held before the device state
//! ([`Paused::start_held`], needs `pause-before-switchover`) until the
//! caller's final pass is committed ([`Paused::release`]).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::json;

use super::super::QmpError;
use super::super::client::Qmp;
use super::super::message::Event;
use super::{
    MigrationStats, cont, query_migrate, set_ignore_shared, start_migration, stop,
    wait_migration_status,
};

/// How [`hand_off`] migrates.
#[derive(Clone, Debug)]
pub struct HandOffOptions {
    /// Where QEMU sends the device state (the destination's
    /// `migrate-incoming` URI).
    pub uri: String,
    /// Interval of `query-migrate` polls, for a caller's own
    /// [`wait_migration`](super::wait_migration) (the hand-off waits on `MIGRATION` events).
    pub poll: Duration,
    /// How long the device-state migration may take.
    pub timeout: Duration,
}

impl HandOffOptions {
    /// Polls every 5 ms, gives up after 60 s.
    pub fn new(uri: impl Into<String>) -> Self {
        Self {
            uri: uri.into(),
            poll: Duration::from_millis(5),
            timeout: Duration::from_secs(60),
        }
    }
}

/// What [`hand_off`] did. Every time is counted from the moment the VM
/// stopped.
#[derive(Clone, Debug, Serialize)]
pub struct HandOff {
    /// To the migration's completion: the guest's downtime as the source
    /// sees it (the destination's `cont` comes on top).
    pub stopped: Duration,
    /// To the end of the caller's final pass.
    pub final_pass: Duration,
    /// To the moment pagescope knew the vCPUs paused: QEMU's answer to
    /// `stop`, or its `pre-switchover` ([`Paused::migrate_held`]), ms.
    pub stop_seen_ms: f64,
    /// To QEMU's answer to `migrate`, ms (negative: before the stop).
    pub migrate_issued_ms: Option<f64>,
    /// To QEMU's answer to `migrate-continue` (a held migration), ms.
    pub switchover_ms: Option<f64>,
    /// The device-state migration, as QEMU reports it.
    pub migration: MigrationStats,
}

/// A VM stopped for its hand-over: `x-ignore-shared` set, the vCPUs
/// paused. [`Paused::migrate`] (or, with the migration held before the
/// device state, [`Paused::release`]) hands it over; any other end (an
/// error, a drop) cancels a migration it started and continues the VM
/// (`cont`): nothing ran on the destination, so the guest goes on where it
/// was.
#[derive(Debug)]
pub struct Paused<'q> {
    qmp: &'q mut Qmp,
    /// When the VM stopped.
    since: Instant,
    /// When pagescope knew it had.
    seen: Instant,
    /// When `migrate` was answered, if it was.
    issued: Option<Instant>,
    /// When QEMU was seen in `pre-switchover` (a held migration).
    held: Option<Instant>,
    /// A held migration that failed before it held: the VM was stopped
    /// with `stop` instead; [`Paused::release`] returns this.
    failed: Option<QmpError>,
    /// Still to be continued when dropped.
    armed: bool,
}

/// How long a cancelled migration may take to end before `cont`.
const CANCEL_WAIT: Duration = Duration::from_secs(5);

impl<'q> Paused<'q> {
    /// Sets `x-ignore-shared` (before the stop, so it adds no downtime)
    /// and `stop`s the VM.
    pub fn stop(qmp: &'q mut Qmp) -> Result<Self, QmpError> {
        set_ignore_shared(qmp)?;
        let since = Instant::now();
        if let Err(e) = stop(qmp) {
            // It may have stopped before the answer was lost.
            let _ = cont(qmp);
            return Err(e);
        }
        Ok(Self {
            qmp,
            since,
            seen: Instant::now(),
            issued: None,
            held: None,
            failed: None,
            armed: true,
        })
    }

    /// Lets QEMU stop the VM: `migrate` to `uri` while the guest runs, with
    /// `pause-before-switchover` on ([`set_pause_before_switchover`](super::set_pause_before_switchover)):
    /// QEMU connects and sets up meanwhile, runs its RAM stage (every
    /// shared block ignored: nothing, or the small unshared ROMs), stops
    /// the VM itself and waits in `pre-switchover`, before a single device
    /// is serialised, for [`Paused::release`]. The stop is QEMU's `STOP`
    /// event. Returns once it waits (within `timeout`).
    ///
    /// If that migration fails before it holds, the VM is stopped with
    /// `stop` instead and the failure kept for [`Paused::release`] (the
    /// caller's final pass runs as it would have, then the VM continues).
    pub fn migrate_held(qmp: &'q mut Qmp, uri: &str, timeout: Duration) -> Result<Self, QmpError> {
        set_ignore_shared(qmp)?;
        drop(qmp.take_events());
        let issuing = Instant::now();
        let held = start_migration(qmp, uri)
            .map(|()| Instant::now())
            .and_then(|issued| {
                wait_migration_status(qmp, "pre-switchover", timeout).map(|_| issued)
            });
        match held {
            Ok(issued) => {
                let seen = Instant::now();
                let since = stopped_at(&qmp.take_events(), seen).max(issuing);
                Ok(Self {
                    qmp,
                    since,
                    seen,
                    issued: Some(issued),
                    held: Some(seen),
                    failed: None,
                    armed: true,
                })
            }
            Err(e) => {
                // Best effort: QEMU restarts a VM it stopped itself.
                let _ = qmp.execute("migrate_cancel", None);
                let mut paused = Self::stop(qmp)?;
                paused.failed = Some(e);
                Ok(paused)
            }
        }
    }

    /// When the VM stopped (QMP `stop` sent, or QEMU's `STOP` event).
    pub fn stop_sent(&self) -> Instant {
        self.since
    }

    /// Since the VM stopped.
    pub fn elapsed(&self) -> Duration {
        self.since.elapsed()
    }

    /// `migrate`s the device state to `options.uri` and waits for
    /// completion; the source stays paused (`postmigrate`). If the
    /// migration does not complete it is cancelled and the VM continued.
    pub fn migrate(mut self, options: &HandOffOptions) -> Result<HandOff, QmpError> {
        let final_pass = self.since.elapsed();
        let migrated = self
            .issue(&options.uri)
            .and_then(|()| wait_migration_status(self.qmp, "completed", options.timeout));
        self.finish(final_pass, None, migrated)
    }

    /// `migrate`s to `uri` after the stop, QEMU holding the device state
    /// back (`pause-before-switchover` on): QEMU connects and runs its RAM
    /// stage meanwhile, and waits in `pre-switchover` for
    /// [`Paused::release`].
    pub fn start_held(&mut self, uri: &str) -> Result<(), QmpError> {
        self.issue(uri)
    }

    /// After [`Paused::migrate_held`] or [`Paused::start_held`] and the
    /// caller's final pass: waits for `pre-switchover` (unless seen),
    /// `migrate-continue`s, waits for completion. If the migration does not
    /// complete it is cancelled and the VM continued.
    pub fn release(mut self, options: &HandOffOptions) -> Result<HandOff, QmpError> {
        let final_pass = self.since.elapsed();
        if let Some(e) = self.failed.take() {
            return self.finish(final_pass, None, Err(e));
        }
        let mut switchover = None;
        let held = match self.held {
            Some(_) => Ok(None),
            None => wait_migration_status(self.qmp, "pre-switchover", options.timeout),
        };
        let migrated = held.and_then(|_| {
            let state = json!({"state": "pre-switchover"});
            self.qmp.execute("migrate-continue", Some(state))?;
            switchover = Some(Instant::now());
            wait_migration_status(self.qmp, "completed", options.timeout)
        });
        self.finish(final_pass, switchover, migrated)
    }

    /// Forgets earlier `MIGRATION` events, sends `migrate`.
    fn issue(&mut self, uri: &str) -> Result<(), QmpError> {
        drop(self.qmp.take_events());
        start_migration(self.qmp, uri)?;
        self.issued = Some(Instant::now());
        Ok(())
    }

    /// `t` in ms after the stop (negative: before it).
    fn ms_after_stop(&self, t: Instant) -> f64 {
        match t.checked_duration_since(self.since) {
            Some(d) => d.as_secs_f64() * 1e3,
            None => -(self.since.duration_since(t).as_secs_f64() * 1e3),
        }
    }

    /// The hand-over's end: the report, or the migration cancelled (the
    /// drop continues the VM).
    fn finish(
        mut self,
        final_pass: Duration,
        switchover: Option<Instant>,
        migrated: Result<Option<MigrationStats>, QmpError>,
    ) -> Result<HandOff, QmpError> {
        let done = migrated.and_then(|seen| {
            let stopped = self.since.elapsed();
            let migration = match seen {
                Some(s) => s,
                None => completed_stats(self.qmp)?,
            };
            Ok((stopped, migration))
        });
        match done {
            Ok((stopped, migration)) => {
                self.armed = false;
                Ok(HandOff {
                    stopped,
                    final_pass,
                    stop_seen_ms: self.ms_after_stop(self.seen),
                    migrate_issued_ms: self.issued.map(|t| self.ms_after_stop(t)),
                    switchover_ms: switchover.map(|t| self.ms_after_stop(t)),
                    migration,
                })
            }
            Err(e) => {
                // Best effort: the first error is the one to report.
                self.cancel(matches!(e, QmpError::Migration { .. }));
                Err(e)
            }
        }
    }

    /// `migrate_cancel`, and unless the migration is `over` already, a
    /// wait for it to end (so `cont` finds no migration running).
    fn cancel(&mut self, over: bool) {
        let _ = self.qmp.execute("migrate_cancel", None);
        if self.issued.is_some() && !over {
            let _ = wait_migration_status(self.qmp, "cancelled", CANCEL_WAIT);
        }
    }

    /// Continues the VM (no hand-over), cancelling a migration it started.
    pub fn resume(mut self) -> Result<(), QmpError> {
        self.armed = false;
        if self.issued.is_some() && self.failed.is_none() {
            self.cancel(false);
        }
        cont(self.qmp)
    }
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = cont(self.qmp);
        }
    }
}

/// Hands a VM over to the destination QEMU: [`Paused::stop`] (sets
/// `x-ignore-shared`, `stop`s the VM), runs `final_pass` (the caller
/// copies what the guest wrote since its last pass and waits for the
/// receiver's acknowledgement), then [`Paused::migrate`]: `migrate` to
/// `options.uri`, waiting for completion. The source stays paused
/// (`postmigrate`); the destination is continued by its owner.
///
/// If `final_pass` fails, or the migration does not complete, the source
/// VM is continued (`cont`) before the error is returned: nothing ran on
/// the destination, so the guest goes on where it was. (`send --qmp` runs
/// the same steps with the dump's stopped pass in between: the stop is
/// taken where the dump's final pass begins.)
pub fn hand_off<E>(
    qmp: &mut Qmp,
    options: &HandOffOptions,
    final_pass: impl FnOnce() -> Result<(), E>,
) -> Result<HandOff, QmpError>
where
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let paused = Paused::stop(qmp)?;
    if let Err(e) = final_pass() {
        paused.resume()?;
        return Err(QmpError::FinalPass(e.into()));
    }
    paused.migrate(options)
}

/// `query-migrate` after the `completed` event: QEMU announces the state
/// before it computes `total-time` and `downtime` (0 until then), so it is
/// asked again for up to [`STATS_WAIT`] (after the completion: no part of
/// the pause).
fn completed_stats(qmp: &mut Qmp) -> Result<MigrationStats, QmpError> {
    let deadline = Instant::now() + STATS_WAIT;
    loop {
        let stats = query_migrate(qmp)?;
        if stats.total_time_ms.is_some_and(|t| t > 0) || Instant::now() >= deadline {
            return Ok(stats);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// How long [`completed_stats`] waits for QEMU's figures.
const STATS_WAIT: Duration = Duration::from_millis(200);

/// The instant of QEMU's `STOP` event among `events` (its timestamp is
/// the wall clock), `seen` if there is none.
fn stopped_at(events: &[Event], seen: Instant) -> Instant {
    let stop = events.iter().rev().find(|e| e.name == "STOP");
    let Some(at) = stop.and_then(|e| e.timestamp_us) else {
        return seen;
    };
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let ago = Duration::from_micros(now_us.saturating_sub(at));
    seen.checked_sub(ago.saturating_sub(seen.elapsed()))
        .unwrap_or(seen)
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    /// A scripted QMP peer on a unix socket: greets, answers every
    /// command (`migrate` fails when `migrate_fails`; `query-migrate` says
    /// `completed`), and returns the commands it got once the client hangs
    /// up. With `held` it announces a held migration as QEMU does with
    /// `events` and `pause-before-switchover` on: `pre-switchover` after
    /// `migrate`, `completed` after `migrate-continue`, `cancelled` after
    /// `migrate_cancel`.
    fn fake_qemu(migrate_fails: bool, held: bool) -> (Qmp, std::thread::JoinHandle<Vec<String>>) {
        use std::io::{BufRead, BufReader, Write};
        let path = std::env::temp_dir().join(format!(
            "pagescope-fake-qmp-{}-{migrate_fails}-{held}.sock",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut out = stream.try_clone().unwrap();
            writeln!(out, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
            let mut got = Vec::new();
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                let cmd: Value = serde_json::from_str(&line).unwrap();
                let (name, id) = (cmd["execute"].as_str().unwrap().to_owned(), &cmd["id"]);
                let answer = match name.as_str() {
                    "migrate" if migrate_fails => {
                        json!({"error": {"class": "GenericError", "desc": "no listener"}, "id": id})
                    }
                    "query-migrate" => {
                        json!({"return": {"status": "completed", "downtime": 2, "total-time": 12}, "id": id})
                    }
                    _ => json!({"return": {}, "id": id}),
                };
                writeln!(out, "{answer}").unwrap();
                let then = match name.as_str() {
                    "migrate" if held && !migrate_fails => Some("pre-switchover"),
                    "migrate-continue" => Some("completed"),
                    "migrate_cancel" if held => Some("cancelled"),
                    _ => None,
                };
                if then == Some("pre-switchover") {
                    let ts = json!({"seconds": 1, "microseconds": 0});
                    writeln!(out, "{}", json!({"event": "STOP", "timestamp": ts})).unwrap();
                }
                if let Some(status) = then {
                    let e = json!({"event": "MIGRATION", "data": {"status": status}});
                    writeln!(out, "{e}").unwrap();
                }
                got.push(name);
            }
            got
        });
        let qmp = Qmp::connect(&path, Duration::from_secs(10)).unwrap();
        let _ = std::fs::remove_file(&path);
        (qmp, server)
    }

    const PAUSE: [&str; 3] = ["qmp_capabilities", "migrate-set-capabilities", "stop"];

    #[test]
    fn a_paused_vm_dropped_is_continued() {
        let (mut qmp, server) = fake_qemu(false, false);
        drop(Paused::stop(&mut qmp).unwrap());
        drop(qmp);
        assert_eq!(server.join().unwrap(), [&PAUSE[..], &["cont"]].concat());
    }

    #[test]
    fn a_failed_migration_is_cancelled_and_the_vm_continued() {
        let (mut qmp, server) = fake_qemu(true, false);
        let paused = Paused::stop(&mut qmp).unwrap();
        let e = paused
            .migrate(&HandOffOptions::new("unix:/nowhere"))
            .unwrap_err();
        assert!(matches!(e, QmpError::Command { .. }), "{e:?}");
        drop(qmp);
        let want = [&PAUSE[..], &["migrate", "migrate_cancel", "cont"]].concat();
        assert_eq!(server.join().unwrap(), want);
    }

    #[test]
    fn a_completed_hand_off_leaves_the_source_paused() {
        let (mut qmp, server) = fake_qemu(false, false);
        let mut passes = 0;
        let h = hand_off(&mut qmp, &HandOffOptions::new("unix:/dst"), || {
            passes += 1;
            Ok::<_, std::io::Error>(())
        })
        .unwrap();
        assert_eq!((passes, h.migration.downtime_ms), (1, Some(2)));
        drop(qmp);
        let want = [&PAUSE[..], &["migrate", "query-migrate"]].concat();
        assert_eq!(server.join().unwrap(), want);
    }

    #[test]
    fn a_held_migration_goes_on_after_release() {
        let (mut qmp, server) = fake_qemu(false, true);
        let mut paused = Paused::stop(&mut qmp).unwrap();
        paused.start_held("unix:/dst").unwrap();
        let h = paused.release(&HandOffOptions::new("unix:/dst")).unwrap();
        assert_eq!(h.migration.downtime_ms, Some(2));
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        assert!(h.migrate_issued_ms.is_some_and(|t| t >= h.stop_seen_ms));
        assert!(h.final_pass <= h.stopped);
        let within = |t: f64| t >= ms(h.final_pass) && t <= ms(h.stopped);
        assert!(h.switchover_ms.is_some_and(within), "{h:?}");
        drop(qmp);
        let want = [
            &PAUSE[..],
            &["migrate", "migrate-continue", "query-migrate"],
        ]
        .concat();
        assert_eq!(server.join().unwrap(), want);
    }

    #[test]
    fn a_held_migration_not_released_is_cancelled_and_the_vm_continued() {
        let (mut qmp, server) = fake_qemu(false, true);
        let mut paused = Paused::stop(&mut qmp).unwrap();
        paused.start_held("unix:/dst").unwrap();
        paused.resume().unwrap();
        drop(qmp);
        let want = [&PAUSE[..], &["migrate", "migrate_cancel", "cont"]].concat();
        assert_eq!(server.join().unwrap(), want);
    }

    #[test]
    fn a_migration_held_before_the_stop_goes_on_after_release() {
        let (mut qmp, server) = fake_qemu(false, true);
        let paused = Paused::migrate_held(&mut qmp, "unix:/dst", Duration::from_secs(10)).unwrap();
        let h = paused.release(&HandOffOptions::new("unix:/dst")).unwrap();
        assert_eq!(h.migration.downtime_ms, Some(2));
        // The fake's STOP timestamp lies in the past: the stop is taken
        // as when `migrate` was sent at the earliest.
        assert!(
            h.migrate_issued_ms
                .is_some_and(|t| (0.0..=h.stop_seen_ms).contains(&t)),
            "{h:?}"
        );
        assert!(
            h.switchover_ms.is_some_and(|t| t >= h.stop_seen_ms),
            "{h:?}"
        );
        drop(qmp);
        let want = [
            &PAUSE[..2],
            &["migrate", "migrate-continue", "query-migrate"],
        ]
        .concat();
        assert_eq!(server.join().unwrap(), want);
    }

    #[test]
    fn a_migration_that_fails_before_it_holds_stops_the_vm_then_continues_it() {
        let (mut qmp, server) = fake_qemu(true, true);
        let paused = Paused::migrate_held(&mut qmp, "unix:/dst", Duration::from_secs(10)).unwrap();
        let e = paused
            .release(&HandOffOptions::new("unix:/dst"))
            .unwrap_err();
        assert!(matches!(e, QmpError::Command { .. }), "{e:?}");
        drop(qmp);
        let want = [
            &PAUSE[..2],
            &["migrate", "migrate_cancel"],
            &PAUSE[1..],
            &["migrate_cancel", "cont"],
        ]
        .concat();
        assert_eq!(server.join().unwrap(), want);
    }
}
