//! The migration steps over QMP, and [`hand_off`]: stop the VM, let the
//! caller move the guest RAM (its final pass), then let QEMU migrate only
//! the device state (`x-ignore-shared`) and wait for it to complete.
//!
//! The wait is on QEMU's `MIGRATION` events (capability `events`), with
//! `query-migrate` as a fallback every [`EVENT_SLICE`] without one.
//! [`Paused::start_held`] / [`Paused::release`] overlap QEMU's migration
//! set-up with the caller's final pass: with `pause-before-switchover`
//! QEMU connects, sends its (empty) RAM stage and waits in
//! `pre-switchover` before it serialises a single device; `migrate-continue`
//! lets it go on once the RAM is committed on the destination (whose
//! device loading may read guest RAM: virtio's rings are).
//!
//! QMP commands used (QEMU 7.2): `stop`, `cont`, `query-status`,
//! `migrate-set-capabilities`, `migrate`, `migrate-continue`,
//! `migrate_cancel`, `migrate-incoming`, `query-migrate`.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};

use super::QmpError;
use super::client::Qmp;

/// What `query-status` says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VmStatus {
    /// Whether the vCPUs run.
    pub running: bool,
    /// QEMU's run state (`running`, `paused`, `inmigrate`, `postmigrate`, ...).
    pub status: String,
}

/// What `query-migrate` says about a migration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MigrationStats {
    /// `none`, `setup`, `active`, `completed`, `failed`, `cancelled`, ...
    pub status: String,
    /// Milliseconds from start to completion (`total-time`).
    pub total_time_ms: Option<u64>,
    /// QEMU's downtime in milliseconds (`downtime`; on completion).
    pub downtime_ms: Option<u64>,
    /// QEMU's predicted downtime while active (`expected-downtime`).
    pub expected_downtime_ms: Option<u64>,
    /// Setup time in milliseconds (`setup-time`).
    pub setup_time_ms: Option<u64>,
    /// RAM bytes QEMU sent (`ram.transferred`).
    pub ram_transferred: Option<u64>,
    /// RAM bytes still to send (`ram.remaining`).
    pub ram_remaining: Option<u64>,
    /// Guest RAM size QEMU migrates (`ram.total`; 0 with every block
    /// ignored as shared).
    pub ram_total: Option<u64>,
    /// QEMU's error description of a failed migration (`error-desc`).
    pub error: Option<String>,
}

impl MigrationStats {
    /// The migration is over, one way or the other.
    pub fn is_finished(&self) -> bool {
        is_final(&self.status)
    }
}

/// Parses a `query-migrate` result.
pub fn parse_query_migrate(v: &Value) -> MigrationStats {
    let num = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64);
    let ram = v.get("ram").cloned().unwrap_or(Value::Null);
    MigrationStats {
        status: v
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("none")
            .to_owned(),
        total_time_ms: num(v, "total-time"),
        downtime_ms: num(v, "downtime"),
        expected_downtime_ms: num(v, "expected-downtime"),
        setup_time_ms: num(v, "setup-time"),
        ram_transferred: num(&ram, "transferred"),
        ram_remaining: num(&ram, "remaining"),
        ram_total: num(&ram, "total"),
        error: v
            .get("error-desc")
            .and_then(Value::as_str)
            .map(str::to_owned),
    }
}

/// `query-status`.
pub fn query_status(qmp: &mut Qmp) -> Result<VmStatus, QmpError> {
    let v = qmp.execute("query-status", None)?;
    Ok(VmStatus {
        running: v.get("running").and_then(Value::as_bool).unwrap_or(false),
        status: v
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned(),
    })
}

/// `stop`: pauses the vCPUs (returns once they are paused).
pub fn stop(qmp: &mut Qmp) -> Result<(), QmpError> {
    qmp.execute("stop", None).map(drop)
}

/// `cont`: resumes the vCPUs.
pub fn cont(qmp: &mut Qmp) -> Result<(), QmpError> {
    qmp.execute("cont", None).map(drop)
}

/// `migrate-set-capabilities` with `x-ignore-shared` on: RAM blocks in a
/// shared backend (`share=on`) are left out of the migration stream. Both
/// sides need it. `events` too: QEMU announces each migration state
/// change with a `MIGRATION` event, which the waits here listen for.
pub fn set_ignore_shared(qmp: &mut Qmp) -> Result<(), QmpError> {
    set_capabilities(qmp, &[("x-ignore-shared", true), ("events", true)])
}

/// `migrate-set-capabilities` `pause-before-switchover`: an outgoing
/// migration waits in `pre-switchover`, before the device state, for
/// `migrate-continue` ([`Paused::start_held`]).
pub fn set_pause_before_switchover(qmp: &mut Qmp, on: bool) -> Result<(), QmpError> {
    set_capabilities(qmp, &[("pause-before-switchover", on)])
}

fn set_capabilities(qmp: &mut Qmp, caps: &[(&str, bool)]) -> Result<(), QmpError> {
    let list: Vec<Value> = caps
        .iter()
        .map(|(c, on)| json!({"capability": c, "state": on}))
        .collect();
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": list })),
    )
    .map(drop)
}

/// `migrate` to `uri` (`tcp:HOST:PORT`, `unix:PATH`, `exec:CMD`); returns
/// once the migration has started.
pub fn start_migration(qmp: &mut Qmp, uri: &str) -> Result<(), QmpError> {
    qmp.execute("migrate", Some(json!({ "uri": uri })))
        .map(drop)
}

/// On the destination (started with `-incoming defer`): sets
/// `x-ignore-shared` and starts listening on `uri` (`migrate-incoming`).
pub fn incoming(qmp: &mut Qmp, uri: &str) -> Result<(), QmpError> {
    set_ignore_shared(qmp)?;
    qmp.execute("migrate-incoming", Some(json!({ "uri": uri })))
        .map(drop)
}

/// `query-migrate`.
pub fn query_migrate(qmp: &mut Qmp) -> Result<MigrationStats, QmpError> {
    qmp.execute("query-migrate", None)
        .map(|v| parse_query_migrate(&v))
}

/// How long a wait for a `MIGRATION` event lasts before `query-migrate`
/// is asked instead (a QEMU without the `events` capability set, an event
/// missed).
pub const EVENT_SLICE: Duration = Duration::from_millis(100);

/// Waits until the migration reaches `status` (or is over, or `timeout`
/// passes), on `MIGRATION` events, asking `query-migrate` after every
/// [`EVENT_SLICE`] without one. Returns the stats if `query-migrate` was
/// the one that saw it. Reaching a final status other than `status` is an
/// error.
pub fn wait_migration_status(
    qmp: &mut Qmp,
    status: &str,
    timeout: Duration,
) -> Result<Option<MigrationStats>, QmpError> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let seen = match qmp.wait_event("MIGRATION", left.min(EVENT_SLICE)) {
            Ok(e) => e
                .data
                .get("status")
                .and_then(Value::as_str)
                .map(str::to_owned),
            Err(QmpError::Timeout { .. }) => None,
            Err(e) => return Err(e),
        };
        let stats = match seen {
            Some(s) if s == status => return Ok(None),
            Some(s) if !is_final(&s) => continue,
            // Over, or no event: ask (for the error's description too).
            _ => query_migrate(qmp)?,
        };
        if stats.status == status {
            return Ok(Some(stats));
        }
        if stats.is_finished() {
            return Err(QmpError::Migration {
                status: stats.status,
                error: stats.error,
            });
        }
        if Instant::now() >= deadline {
            return Err(QmpError::Timeout {
                what: format!(
                    "the migration to reach {status} (last status {})",
                    stats.status
                ),
                waited: timeout,
            });
        }
    }
}

fn is_final(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "cancelled")
}

/// Polls `query-migrate` every `poll` until the migration is over (or
/// `timeout` passes); `completed` is `Ok`, anything else an error.
pub fn wait_migration(
    qmp: &mut Qmp,
    poll: Duration,
    timeout: Duration,
) -> Result<MigrationStats, QmpError> {
    let deadline = Instant::now() + timeout;
    loop {
        let stats = query_migrate(qmp)?;
        if stats.status == "completed" {
            return Ok(stats);
        }
        if stats.is_finished() {
            return Err(QmpError::Migration {
                status: stats.status,
                error: stats.error,
            });
        }
        if Instant::now() >= deadline {
            return Err(QmpError::Timeout {
                what: format!("the migration to complete (last status {})", stats.status),
                waited: timeout,
            });
        }
        std::thread::sleep(poll);
    }
}

/// How [`hand_off`] migrates.
#[derive(Clone, Debug)]
pub struct HandOffOptions {
    /// Where QEMU sends the device state (the destination's
    /// `migrate-incoming` URI).
    pub uri: String,
    /// Interval of `query-migrate` polls, for a caller's own
    /// [`wait_migration`] (the hand-off waits on `MIGRATION` events).
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

/// What [`hand_off`] did. Every time is counted from the moment `stop`
/// was sent.
#[derive(Clone, Debug, Serialize)]
pub struct HandOff {
    /// To the migration's completion: the guest's downtime as the source
    /// sees it (the destination's `cont` comes on top).
    pub stopped: Duration,
    /// To the end of the caller's final pass.
    pub final_pass: Duration,
    /// To QEMU's answer to `stop` (the vCPUs are paused).
    pub stop_acked: Duration,
    /// To QEMU's answer to `migrate`.
    pub migrate_issued: Duration,
    /// To QEMU's answer to `migrate-continue` (a held migration:
    /// [`Paused::start_held`]).
    pub switchover: Option<Duration>,
    /// The device-state migration, as QEMU reports it.
    pub migration: MigrationStats,
}

/// A VM stopped for its hand-over: `x-ignore-shared` set, `stop` done.
/// [`Paused::migrate`] (or [`Paused::start_held`] then
/// [`Paused::release`]) hands it over; any other end (an error, a drop)
/// cancels a migration it started and continues the VM (`cont`): nothing
/// ran on the destination, so the guest goes on where it was.
#[derive(Debug)]
pub struct Paused<'q> {
    qmp: &'q mut Qmp,
    /// When `stop` was sent.
    since: Instant,
    stop_acked: Duration,
    /// When `migrate` was answered, if it was.
    migrate_issued: Option<Duration>,
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
            stop_acked: since.elapsed(),
            migrate_issued: None,
            armed: true,
        })
    }

    /// When `stop` was sent.
    pub fn stop_sent(&self) -> Instant {
        self.since
    }

    /// Since `stop` was sent.
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

    /// `migrate`s to `uri` with QEMU holding the device state back: the
    /// source must have `pause-before-switchover` on
    /// ([`set_pause_before_switchover`]). QEMU connects and runs its RAM
    /// stage (empty: every block is shared and ignored) meanwhile, and
    /// waits in `pre-switchover` for [`Paused::release`].
    pub fn start_held(&mut self, uri: &str) -> Result<(), QmpError> {
        self.issue(uri)
    }

    /// After [`Paused::start_held`] and the caller's final pass: waits for
    /// `pre-switchover`, `migrate-continue`s, waits for completion. If the
    /// migration does not complete it is cancelled and the VM continued.
    pub fn release(self, options: &HandOffOptions) -> Result<HandOff, QmpError> {
        let final_pass = self.since.elapsed();
        let mut switchover = None;
        let migrated =
            wait_migration_status(self.qmp, "pre-switchover", options.timeout).and_then(|_| {
                let state = json!({"state": "pre-switchover"});
                self.qmp.execute("migrate-continue", Some(state))?;
                switchover = Some(self.since.elapsed());
                wait_migration_status(self.qmp, "completed", options.timeout)
            });
        self.finish(final_pass, switchover, migrated)
    }

    /// Forgets earlier `MIGRATION` events, sends `migrate`.
    fn issue(&mut self, uri: &str) -> Result<(), QmpError> {
        drop(self.qmp.take_events());
        start_migration(self.qmp, uri)?;
        self.migrate_issued = Some(self.since.elapsed());
        Ok(())
    }

    /// The hand-over's end: the report, or the migration cancelled (the
    /// drop continues the VM).
    fn finish(
        mut self,
        final_pass: Duration,
        switchover: Option<Duration>,
        migrated: Result<Option<MigrationStats>, QmpError>,
    ) -> Result<HandOff, QmpError> {
        let done = migrated.and_then(|seen| {
            let stopped = self.since.elapsed();
            let migration = match seen {
                Some(s) => s,
                None => query_migrate(self.qmp)?,
            };
            Ok((stopped, migration))
        });
        match done {
            Ok((stopped, migration)) => {
                self.armed = false;
                Ok(HandOff {
                    stopped,
                    final_pass,
                    stop_acked: self.stop_acked,
                    migrate_issued: self.migrate_issued.unwrap_or_default(),
                    switchover,
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
        if self.migrate_issued.is_some() && !over {
            let _ = wait_migration_status(self.qmp, "cancelled", CANCEL_WAIT);
        }
    }

    /// Continues the VM (no hand-over), cancelling a migration it started.
    pub fn resume(mut self) -> Result<(), QmpError> {
        self.armed = false;
        if self.migrate_issued.is_some() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completed_migration() {
        // QEMU 7.2's answer after an x-ignore-shared migration (trimmed).
        let v = json!({
            "status": "completed", "setup-time": 1, "downtime": 7, "total-time": 12,
            "ram": {"transferred": 614_400, "remaining": 0, "total": 0, "duplicate": 0,
                    "normal": 0, "mbps": 450.1}
        });
        let s = parse_query_migrate(&v);
        assert_eq!(
            s,
            MigrationStats {
                status: "completed".into(),
                total_time_ms: Some(12),
                downtime_ms: Some(7),
                expected_downtime_ms: None,
                setup_time_ms: Some(1),
                ram_transferred: Some(614_400),
                ram_remaining: Some(0),
                ram_total: Some(0),
                error: None,
            }
        );
        assert!(s.is_finished());
    }

    #[test]
    fn active_failed_and_none() {
        let active = parse_query_migrate(&json!({
            "status": "active", "expected-downtime": 300, "total-time": 40,
            "ram": {"transferred": 1000, "remaining": 5000, "total": 8000}
        }));
        assert_eq!(active.expected_downtime_ms, Some(300));
        assert_eq!(active.ram_remaining, Some(5000));
        assert!(!active.is_finished());
        let failed = parse_query_migrate(&json!({
            "status": "failed", "error-desc": "Unable to write to socket: Broken pipe"
        }));
        assert!(failed.is_finished());
        assert_eq!(
            failed.error.as_deref(),
            Some("Unable to write to socket: Broken pipe")
        );
        let none = parse_query_migrate(&json!({}));
        assert_eq!(none.status, "none");
        assert!(!none.is_finished());
    }

    /// A scripted QMP peer on a unix socket: greets, answers every
    /// command (`migrate` fails when `migrate_fails`; `query-migrate` says
    /// `completed`), and returns the commands it got once the client hangs
    /// up.
    fn fake_qemu(migrate_fails: bool) -> (Qmp, std::thread::JoinHandle<Vec<String>>) {
        use std::io::{BufRead, BufReader, Write};
        let path = std::env::temp_dir().join(format!(
            "pagescope-fake-qmp-{}-{migrate_fails}.sock",
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
                        json!({"return": {"status": "completed", "downtime": 2}, "id": id})
                    }
                    _ => json!({"return": {}, "id": id}),
                };
                writeln!(out, "{answer}").unwrap();
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
        let (mut qmp, server) = fake_qemu(false);
        drop(Paused::stop(&mut qmp).unwrap());
        drop(qmp);
        assert_eq!(server.join().unwrap(), [&PAUSE[..], &["cont"]].concat());
    }

    #[test]
    fn a_failed_migration_is_cancelled_and_the_vm_continued() {
        let (mut qmp, server) = fake_qemu(true);
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
        let (mut qmp, server) = fake_qemu(false);
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
}
