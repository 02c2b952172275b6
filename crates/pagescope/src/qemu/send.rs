//! `send --qmp SOCKET --qemu-migrate URI`: pagescope moves a VM's guest RAM
//! (a shared object of the QEMU process: `memory-backend-memfd,share=on`
//! or `memory-backend-file,share=on`), QEMU only its device state.
//!
//! 1. `query-status` and `x-ignore-shared` on the source first, so a QEMU
//!    that cannot do it fails before a page is sent;
//! 2. the full pass and the pre-copy passes of `send --object` while the
//!    guest runs (the write tracker sees TCG's stores, which QEMU makes
//!    from user space through its mapping of the object);
//! 3. where the dump's stopped final pass begins, [`Paused::stop`]: QMP
//!    `stop` (the vCPUs and the devices quiesce; the dump's own ptrace
//!    stop follows for its final pass);
//! 4. the final pass, sent and acknowledged by the receiver (it has
//!    committed FILE);
//! 5. [`Paused::migrate`]: QMP `migrate` to the destination's URI, polled
//!    with `query-migrate` to `completed`.
//!
//! Any failure after step 3 continues the source VM (`cont`): the
//! destination never ran, so the guest goes on where it was.

use std::cell::RefCell;
use std::time::Duration;

use serde::Serialize;

use super::QmpError;
use super::client::Qmp;
use super::migrate::{
    HandOff, HandOffOptions, MigrationStats, Paused, query_status, set_ignore_shared,
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
    /// From QMP `stop` to the migration's completion, ms: the guest's
    /// downtime as the source sees it (the destination's `cont` comes on
    /// top).
    pub stopped_ms: f64,
    /// From QMP `stop` to the receiver's acknowledgement of the final
    /// pass, ms (inside `stopped_ms`).
    pub final_pass_ms: f64,
    /// QEMU's device-state migration (`query-migrate`): its own
    /// `downtime`, total time, bytes sent.
    pub migration: MigrationStats,
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
    let pid = target.pid();
    // Paused right before the final pass; migrated right after the
    // receiver's commit, before the swap policy pages anything back out
    // (that is no part of the VM's pause).
    let paused: RefCell<Option<Paused<'_>>> = RefCell::new(None);
    let migrated: RefCell<Option<Result<HandOff, QmpError>>> = RefCell::new(None);
    let mut unused = Some(qmp);
    let sent = {
        let mut pause = || -> Result<(), DumpError> {
            let q = unused
                .take()
                .ok_or_else(|| stop_failed(pid, "paused twice"))?;
            let p = Paused::stop(q).map_err(|e| stop_failed(pid, e))?;
            *paused.borrow_mut() = Some(p);
            Ok(())
        };
        let mut migrate = || {
            if let Some(p) = paused.borrow_mut().take() {
                *migrated.borrow_mut() = Some(p.migrate(hand));
            }
        };
        let hooks = Hooks {
            before_stop: Some(&mut pause),
            after_commit: Some(&mut migrate),
        };
        crate::transfer::send_with(target, caps, conn, opts, hooks, progress)
    };
    let report = |send, h: HandOff| MigrateReport {
        send,
        stopped_ms: ms(h.stopped),
        final_pass_ms: ms(h.final_pass),
        migration: h.migration,
    };
    match (sent, migrated.into_inner(), paused.into_inner()) {
        (Ok(send), Some(m), _) => Ok(report(send, m?)),
        (Ok(send), None, Some(p)) => Ok(report(send, p.migrate(hand)?)),
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
