//! The migration steps over QMP; in `migrate/paused.rs`, [`Paused`] and
//! [`hand_off`]: stop the VM, let the caller move the guest RAM (its final
//! pass), then let QEMU migrate only the device state (`x-ignore-shared`)
//! and wait for it to complete.
//!
//! The wait is on QEMU's `MIGRATION` events (capability `events`), with
//! `query-migrate` as a fallback after every 100 ms without one.
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
const EVENT_SLICE: Duration = Duration::from_millis(100);

/// Waits until the migration reaches `status` (or is over, or `timeout`
/// passes), on `MIGRATION` events, asking `query-migrate` after every
/// 100 ms without one. Returns the stats if `query-migrate` was
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

mod paused;

pub use paused::{HandOff, HandOffOptions, Paused, hand_off};

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
}
