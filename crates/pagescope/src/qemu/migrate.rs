//! The migration steps over QMP, and [`hand_off`]: stop the VM, let the
//! caller move the guest RAM (its final pass), then let QEMU migrate only
//! the device state (`x-ignore-shared`) and wait for it to complete.
//!
//! QMP commands used (QEMU 7.2): `stop`, `cont`, `query-status`,
//! `migrate-set-capabilities`, `migrate`, `migrate-incoming`,
//! `query-migrate`.

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
        matches!(self.status.as_str(), "completed" | "failed" | "cancelled")
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
/// sides need it.
pub fn set_ignore_shared(qmp: &mut Qmp) -> Result<(), QmpError> {
    let caps = json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]});
    qmp.execute("migrate-set-capabilities", Some(caps))
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
    /// Interval of `query-migrate` polls.
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

/// What [`hand_off`] did.
#[derive(Clone, Debug, Serialize)]
pub struct HandOff {
    /// From `stop` to the migration's completion: the guest's downtime as
    /// the source sees it (the destination's `cont` comes on top).
    pub stopped: Duration,
    /// The caller's final pass (inside `stopped`).
    pub final_pass: Duration,
    /// The device-state migration, as QEMU reports it.
    pub migration: MigrationStats,
}

/// A VM stopped for its hand-over: `x-ignore-shared` set, `stop` done.
/// [`Paused::migrate`] hands it over; any other end (an error, a drop)
/// continues it (`cont`): nothing ran on the destination, so the guest goes
/// on where it was.
#[derive(Debug)]
pub struct Paused<'q> {
    qmp: &'q mut Qmp,
    since: Instant,
    /// Still to be continued when dropped.
    armed: bool,
}

impl<'q> Paused<'q> {
    /// Sets `x-ignore-shared` (before the stop, so it adds no downtime)
    /// and `stop`s the VM.
    pub fn stop(qmp: &'q mut Qmp) -> Result<Self, QmpError> {
        set_ignore_shared(qmp)?;
        if let Err(e) = stop(qmp) {
            // It may have stopped before the answer was lost.
            let _ = cont(qmp);
            return Err(e);
        }
        Ok(Self {
            qmp,
            since: Instant::now(),
            armed: true,
        })
    }

    /// Since the `stop` returned.
    pub fn elapsed(&self) -> Duration {
        self.since.elapsed()
    }

    /// `migrate`s the device state to `options.uri` and waits for
    /// completion; the source stays paused (`postmigrate`). If the
    /// migration does not complete it is cancelled and the VM continued.
    pub fn migrate(mut self, options: &HandOffOptions) -> Result<HandOff, QmpError> {
        let final_pass = self.since.elapsed();
        let migrated = start_migration(self.qmp, &options.uri)
            .and_then(|()| wait_migration(self.qmp, options.poll, options.timeout));
        match migrated {
            Ok(migration) => {
                self.armed = false;
                Ok(HandOff {
                    stopped: self.since.elapsed(),
                    final_pass,
                    migration,
                })
            }
            Err(e) => {
                // Best effort: the first error is the one to report; the
                // drop continues the VM.
                let _ = self.qmp.execute("migrate_cancel", None);
                Err(e)
            }
        }
    }

    /// Continues the VM (no hand-over).
    pub fn resume(mut self) -> Result<(), QmpError> {
        self.armed = false;
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
