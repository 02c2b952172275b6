//! `send --qmp SOCKET --qemu-migrate URI`: pagescope moves a VM's guest RAM
//! (a shared object of the QEMU process: `memory-backend-memfd,share=on`
//! or `memory-backend-file,share=on`), QEMU only its device state.
//!
//! 1. `query-status`, `x-ignore-shared`, `events` and
//!    `pause-before-switchover` on the source first, so a QEMU that cannot
//!    do them fails before a page is sent;
//! 2. the full pass and the pre-copy passes of `send --object` while the
//!    guest runs (the write tracker sees TCG's stores, which QEMU makes
//!    from user space through its mapping of the object);
//! 3. where the dump's stopped final pass begins,
//!    [`Paused::migrate_held`]: QMP `migrate` to the destination's URI
//!    while the guest runs; QEMU connects and sets up, stops the VM itself
//!    and waits in `pre-switchover`, before the device state (the dump's
//!    own ptrace stop follows for its final pass);
//! 4. the final pass, sent and acknowledged by the receiver (it has
//!    committed FILE);
//! 5. [`Paused::release`]: `migrate-continue`; QEMU sends the device state
//!    (which the destination loads only now: its devices may read guest
//!    RAM as they load, virtio's rings do) and completes; the waits are on
//!    QEMU's `MIGRATION` events.
//!
//! Any failure after step 3 cancels QEMU's migration and continues the
//! source VM (`cont`): the destination never ran, so the guest goes on
//! where it was. [`MigrateReport::timeline`] says when each step ended.

use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::QmpError;
use super::client::Qmp;
use super::migrate::{
    HandOff, HandOffOptions, MigrationStats, Paused, query_status, set_ignore_shared,
    set_pause_before_switchover,
};
use crate::dump::{DumpError, Hooks};
use crate::error::ErrorKind;
use crate::kernel::KernelCaps;
use crate::proc::Target;
use crate::transfer::SendEvent;
use crate::transfer::{Conn, SendError, SendOptions, SendReport};

/// What [`send_and_migrate`] did.
#[derive(Clone, Debug, Serialize)]
pub struct MigrateReport {
    /// The guest RAM's passes and the stream.
    pub send: SendReport,
    /// From the VM's stop (QEMU's `STOP` event) to the migration's
    /// completion, ms: the guest's downtime as the source sees it (the
    /// destination's `cont` comes on top).
    pub stopped_ms: f64,
    /// From the VM's stop to the receiver's acknowledgement of the final
    /// pass, ms (inside `stopped_ms`).
    pub final_pass_ms: f64,
    /// When each step of the pause ended.
    pub timeline: PauseTimeline,
    /// QEMU's device-state migration (`query-migrate`): its own
    /// `downtime`, total time, bytes sent.
    pub migration: MigrationStats,
}

/// The VM's pause step by step: when each step ended, in ms after the VM
/// stopped (QEMU's `STOP` event's timestamp), in the order they end.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PauseTimeline {
    /// QEMU answered `migrate`: negative, its set-up ran while the guest
    /// still ran (`None`: no migration was started).
    pub migrate_issued_ms: Option<f64>,
    /// pagescope saw QEMU hold the migration in `pre-switchover` (the VM
    /// stopped; or QEMU's answer to `stop`, if the migration failed
    /// before it held).
    pub stop_seen_ms: f64,
    /// The final pass's first pages were read: QEMU's threads stopped,
    /// the write tracker collected, the pass planned (`None`: it read no
    /// page).
    pub final_scan_done_ms: Option<f64>,
    /// The final pass's pages were sent and QEMU's threads resumed.
    pub final_pages_sent_ms: Option<f64>,
    /// The receiver acknowledged: FILE is committed.
    pub ack_ms: f64,
    /// QEMU answered `migrate-continue`: the device state goes out.
    pub switchover_ms: Option<f64>,
    /// QEMU's `MIGRATION` event `completed` (= `stopped_ms`).
    pub migration_completed_ms: f64,
}

/// What the send's progress shows of the final pass, for the timeline.
#[derive(Default)]
struct FinalPassMarks {
    /// When the VM stopped (the final pass runs after it).
    stop_sent: Cell<Option<Instant>>,
    scanned: Cell<Option<Instant>>,
    sent: Cell<Option<Instant>>,
}

impl FinalPassMarks {
    fn see(&self, e: &SendEvent<'_>) {
        if self.stop_sent.get().is_none() {
            return;
        }
        match e {
            SendEvent::Progress(_) if self.scanned.get().is_none() => {
                self.scanned.set(Some(Instant::now()));
            }
            SendEvent::Pass(p) if p.iteration.stopped => self.sent.set(Some(Instant::now())),
            _ => {}
        }
    }
}

/// A failed migration. The source VM runs unless
/// [`MigrateError::NotContinued`] says otherwise.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// The options cannot migrate a VM.
    #[error("{0}")]
    Options(String),
    /// The guest RAM could not be sent (the dump or the stream failed).
    #[error(transparent)]
    Send(SendError),
    /// QEMU refused or failed a step (`x-ignore-shared`, `stop`,
    /// `migrate`).
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// The VM was paused and continuing it failed: it may be paused.
    #[error("{first}; and continuing the source VM failed: {cont}")]
    NotContinued {
        /// The failure that ended the migration.
        first: String,
        /// Why `cont` failed.
        #[source]
        cont: QmpError,
    },
}

impl MigrateError {
    /// The broad class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Options(_) => ErrorKind::BadInput,
            Self::Send(SendError::Transfer(e)) => e.kind(),
            Self::Send(SendError::Dump(e)) => e.kind(),
            Self::Qmp(e) => e.kind(),
            Self::NotContinued { .. } => ErrorKind::Other,
        }
    }
}

/// Sends `target`'s (a QEMU process's) guest RAM, `opts.object`, over
/// `conn` with pre-copy while the guest runs, pauses the VM over `qmp`
/// for the final pass, and once the receiver acknowledged it, migrates
/// the device state to `hand.uri` (see the module doc).
pub fn send_and_migrate(
    target: &Target,
    caps: &KernelCaps,
    conn: Conn,
    opts: &SendOptions,
    qmp: &mut Qmp,
    hand: &HandOffOptions,
    progress: &mut dyn FnMut(SendEvent<'_>),
) -> Result<MigrateReport, MigrateError> {
    check_options(opts)?;
    query_status(qmp)?;
    set_ignore_shared(qmp)?;
    set_pause_before_switchover(qmp, true)?;
    let migrated = held_migration(target, caps, conn, opts, qmp, hand, progress);
    // Best effort: a later `migrate` of this QEMU is not held.
    let _ = set_pause_before_switchover(qmp, false);
    migrated
}

/// [`send_and_migrate`] once the source holds its migration before the
/// device state (`pause-before-switchover`).
fn held_migration(
    target: &Target,
    caps: &KernelCaps,
    conn: Conn,
    opts: &SendOptions,
    qmp: &mut Qmp,
    hand: &HandOffOptions,
    progress: &mut dyn FnMut(SendEvent<'_>),
) -> Result<MigrateReport, MigrateError> {
    let pid = target.pid();
    // Paused right before the final pass, QEMU's migration started at
    // once (held before the device state); released right after the
    // receiver's commit, before the swap policy pages anything back out
    // (that is no part of the VM's pause).
    let paused: RefCell<Option<Paused<'_>>> = RefCell::new(None);
    let migrated: RefCell<Option<Result<HandOff, QmpError>>> = RefCell::new(None);
    let marks = FinalPassMarks::default();
    let mut unused = Some(qmp);
    let sent = {
        let mut pause = || -> Result<(), DumpError> {
            let q = unused
                .take()
                .ok_or_else(|| stop_failed(pid, "paused twice"))?;
            let p = Paused::migrate_held(q, &hand.uri, hand.timeout)
                .map_err(|e| stop_failed(pid, e))?;
            marks.stop_sent.set(Some(p.stop_sent()));
            *paused.borrow_mut() = Some(p);
            Ok(())
        };
        let mut release = || {
            if let Some(p) = paused.borrow_mut().take() {
                *migrated.borrow_mut() = Some(p.release(hand));
            }
        };
        let hooks = Hooks {
            before_stop: Some(&mut pause),
            after_commit: Some(&mut release),
        };
        let mut observed = |e: SendEvent<'_>| {
            marks.see(&e);
            progress(e);
        };
        crate::transfer::send_with(target, caps, conn, opts, hooks, &mut observed)
    };
    let report = |send, h: HandOff| MigrateReport {
        send,
        stopped_ms: ms(h.stopped),
        final_pass_ms: ms(h.final_pass),
        timeline: timeline(&h, &marks),
        migration: h.migration,
    };
    match (sent, migrated.into_inner(), paused.into_inner()) {
        (Ok(send), Some(m), _) => Ok(report(send, m?)),
        (Ok(send), None, Some(p)) => Ok(report(send, p.release(hand)?)),
        (Ok(_), None, None) => Err(MigrateError::Options(
            "the send ended without a stopped final pass".into(),
        )),
        // Paused, not migrated: the source VM continues.
        (Err(e), _, Some(p)) => match p.resume() {
            Ok(()) => Err(MigrateError::Send(e)),
            Err(cont) => Err(MigrateError::NotContinued {
                first: e.to_string(),
                cont,
            }),
        },
        (Err(e), _, None) => Err(MigrateError::Send(e)),
    }
}

/// The report's timeline from the hand-over's times and the final pass's.
fn timeline(h: &HandOff, marks: &FinalPassMarks) -> PauseTimeline {
    let after_stop = |t: Option<Instant>| {
        let stop = marks.stop_sent.get()?;
        Some(ms(t?.saturating_duration_since(stop)))
    };
    PauseTimeline {
        stop_seen_ms: h.stop_seen_ms,
        migrate_issued_ms: h.migrate_issued_ms,
        final_scan_done_ms: after_stop(marks.scanned.get()),
        final_pages_sent_ms: after_stop(marks.sent.get()),
        ack_ms: ms(h.final_pass),
        switchover_ms: h.switchover_ms,
        migration_completed_ms: ms(h.stopped),
    }
}

/// A VM migrates through `x-ignore-shared` only with its RAM as one
/// shared object, and needs a final pass stopped by pagescope.
fn check_options(opts: &SendOptions) -> Result<(), MigrateError> {
    let refuse = |m: &str| Err(MigrateError::Options(m.to_owned()));
    if opts.object.is_none() {
        return refuse("a QEMU migration needs --object (the guest RAM's memfd or file)");
    }
    if opts.dump.cow || opts.dump.leave_stopped || opts.dump.tree {
        return refuse("a QEMU migration takes no --snapshot cow, --leave-stopped or --tree");
    }
    Ok(())
}

fn stop_failed(pid: u32, e: impl std::fmt::Display) -> DumpError {
    DumpError::Stop {
        pid,
        source: std::io::Error::other(format!("QMP stop: {e}")),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
