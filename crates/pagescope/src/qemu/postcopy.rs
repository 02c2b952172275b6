//! `send --qmp SOCKET --qemu-migrate URI --postcopy-after N`: a VM's
//! guest RAM moved by pagescope's post-copy, QEMU moving only the device
//! state (`x-ignore-shared`), the destination QEMU running before all of
//! its RAM has arrived. Kernel interfaces: none of its own (the pre-copy
//! passes are `send --object`'s; the destination's missing-page faults
//! are served by `receive --postcopy`, `transfer/postcopy/`); `SIGCONT`
//! to the source QEMU process through its pidfd (`pidfd_send_signal`,
//! see step 4).
//!
//! 1. `query-status` and `x-ignore-shared` on the source first, so a QEMU
//!    that cannot do it fails before a page is sent;
//! 2. pre-copy passes while the guest runs, at most N (fewer when the
//!    written set shrinks by less than a tenth per pass: the guest writes faster than the link
//!    carries pages, pre-copy cannot converge);
//! 3. QMP `stop` right before the stopped pass; the pass keeps what the
//!    guest wrote since the last one (the sender's stash) and tells the
//!    receiver which pages are still to come (the switch);
//! 4. at once (from the pass's progress event, after the switch went
//!    out): the QEMU process, which post-copy's stopped pass leaves
//!    stopped by `SIGSTOP`, gets `SIGCONT` (its vCPUs stay paused by
//!    QMP), and QMP `migrate` to the destination starts in a thread: the
//!    device state goes over while the stash is served, so the
//!    destination's faults during its device-state load (virtio reads
//!    its rings from guest RAM) are answered; the destination is
//!    continued as soon as the device state is in
//!    ([`continue_when_migrated`], run by `receive --postcopy --qmp`:
//!    QEMU keeps it paused otherwise, the source having been paused);
//! 5. the stash is served (faulted pages first), the receiver
//!    acknowledges once every page is in, the migration thread is joined.
//!
//! Failure: before the device state went over, the source VM is continued
//! (`migrate_cancel`, `cont`): the destination never ran. After it went
//! over, the destination runs, so the source must not run too: it stays
//! paused (`postmigrate`) with every page, and the error says so
//! ([`PostcopyMigrateError::SourceHeld`]).

use std::cell::RefCell;
use std::thread::ScopedJoinHandle;
use std::time::Instant;

use serde::Serialize;

use super::QmpError;
use super::client::Qmp;
use super::migrate::{
    HandOffOptions, MigrationStats, cont, query_status, set_ignore_shared, start_migration, stop,
    wait_migration,
};
use super::send::MigrateError;
use crate::dump::{DumpError, Hooks};
use crate::error::ErrorKind;
use crate::kernel::KernelCaps;
use crate::proc::Target;
use crate::transfer::{Conn, SendError, SendEvent, SendOptions, SendReport};

/// What [`send_and_migrate_postcopy`] did.
#[derive(Clone, Debug, Serialize)]
pub struct PostcopyMigrateReport {
    /// The guest RAM's passes, the stream and the post-copy phase.
    pub send: SendReport,
    /// From QMP `stop` to the switch (the stopped pass read into memory),
    /// ms.
    pub switch_ms: f64,
    /// From QMP `stop` to QEMU's `completed` of the device-state
    /// migration, ms: the guest's downtime as the source sees it (the
    /// destination runs right after loading the device state).
    pub downtime_ms: f64,
    /// From QMP `stop` to the receiver's acknowledgement (every page in),
    /// ms: how long the source held its pages for the destination.
    pub held_ms: f64,
    /// QEMU's device-state migration (`query-migrate`).
    pub migration: MigrationStats,
}

/// A failed post-copy migration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PostcopyMigrateError {
    /// Failed before the destination ran: the source VM runs (unless
    /// [`MigrateError::NotContinued`] says otherwise).
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    /// The device state went to the destination, which runs, and the
    /// pages did not all follow: the source VM is left paused
    /// (`postmigrate`) holding every page, so the guest does not run twice.
    #[error(
        "{first}; the destination VM already runs on the device state, so the source VM stays paused with all of its RAM (kill the destination and `cont` the source to go on there)"
    )]
    SourceHeld {
        /// What failed.
        first: String,
    },
}

impl PostcopyMigrateError {
    /// The broad class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Migrate(e) => e.kind(),
            Self::SourceHeld { .. } => ErrorKind::Other,
        }
    }
}

/// The device-state migration thread's result, and the QMP session back.
type Migrated<'q> = (Result<MigrationStats, QmpError>, Instant, &'q mut Qmp);

/// Where the hand-over stands, shared by the dump's hooks and progress.
struct Phase<'q, 's> {
    qmp: Option<&'q mut Qmp>,
    stopped: Option<Instant>,
    switched: Option<Instant>,
    migration: Option<ScopedJoinHandle<'s, Migrated<'q>>>,
}

/// Sends `target`'s (a QEMU process's) guest RAM, `opts.object`, with
/// pre-copy while the guest runs and post-copy after the stop, migrating
/// the device state to `hand.uri` at the switch (see the module doc).
/// `opts.postcopy_after` must be set.
pub fn send_and_migrate_postcopy(
    target: &Target,
    caps: &KernelCaps,
    conn: Conn,
    opts: &SendOptions,
    qmp: &mut Qmp,
    hand: &HandOffOptions,
    progress: &mut dyn FnMut(SendEvent<'_>),
) -> Result<PostcopyMigrateReport, PostcopyMigrateError> {
    check_options(opts)?;
    query_status(qmp).map_err(MigrateError::Qmp)?;
    set_ignore_shared(qmp).map_err(MigrateError::Qmp)?;
    let pid = target.pid();
    std::thread::scope(|scope| {
        let phase = RefCell::new(Phase {
            qmp: Some(qmp),
            stopped: None,
            switched: None,
            migration: None,
        });
        let sent = {
            let mut pause = || pause(&mut phase.borrow_mut(), pid);
            let hooks = Hooks {
                before_stop: Some(&mut pause),
                after_commit: None,
            };
            let mut watch = |e: SendEvent<'_>| {
                if let SendEvent::Pass(p) = &e
                    && p.iteration.stopped
                {
                    switch(&mut phase.borrow_mut(), scope, target, hand);
                }
                progress(e);
            };
            crate::transfer::send_with(target, caps, conn, opts, hooks, &mut watch)
        };
        let acked = Instant::now();
        finish(phase.into_inner(), sent, acked, target)
    })
}

/// The `before_stop` hook: QMP `stop`.
fn pause(phase: &mut Phase<'_, '_>, pid: u32) -> Result<(), DumpError> {
    let qmp = phase
        .qmp
        .as_deref_mut()
        .ok_or_else(|| stop_failed(pid, "no QMP session"))?;
    if let Err(e) = stop(qmp) {
        // It may have stopped before the answer was lost.
        let _ = cont(qmp);
        return Err(stop_failed(pid, e));
    }
    phase.stopped = Some(Instant::now());
    Ok(())
}

/// At the switch: the QEMU process let go of its `SIGSTOP` (the VM stays
/// paused), the device-state migration started in a thread.
fn switch<'q, 's>(
    phase: &mut Phase<'q, 's>,
    scope: &'s std::thread::Scope<'s, '_>,
    target: &Target,
    hand: &'s HandOffOptions,
) where
    'q: 's,
{
    let Some(qmp) = phase.qmp.take() else {
        return;
    };
    phase.switched = Some(Instant::now());
    continue_process(target);
    phase.migration = Some(scope.spawn(move || {
        let r = start_migration(qmp, &hand.uri)
            .and_then(|()| wait_migration(qmp, hand.poll, hand.timeout));
        (r, Instant::now(), qmp)
    }));
}

/// `SIGCONT` to the QEMU process (post-copy's stopped pass leaves it
/// stopped; QMP needs its main loop).
fn continue_process(target: &Target) {
    let _ = rustix::process::pidfd_send_signal(target.pidfd(), rustix::process::Signal::CONT);
}

/// The outcome from the send's result and the migration's (see the
/// module doc for which failure continues the source).
fn finish(
    phase: Phase<'_, '_>,
    sent: Result<SendReport, SendError>,
    acked: Instant,
    target: &Target,
) -> Result<PostcopyMigrateReport, PostcopyMigrateError> {
    let Phase {
        qmp,
        stopped,
        switched,
        migration,
    } = phase;
    let joined = migration.map(|h| match h.join() {
        Ok(m) => m,
        Err(p) => std::panic::resume_unwind(p),
    });
    let (qmp, migrated) = match (qmp, joined) {
        (Some(q), None) => (q, None),
        (_, Some((r, done, q))) => (q, Some((r, done))),
        (None, None) => unreachable!("the session is held or with the migration"),
    };
    let Some(t0) = stopped else {
        // Never paused: the VM ran all along.
        return Err(sent
            .err()
            .map_or_else(
                || MigrateError::Options("the send ended without a stopped final pass".into()),
                MigrateError::Send,
            )
            .into());
    };
    let ms = |t: Instant| t.saturating_duration_since(t0).as_secs_f64() * 1e3;
    match (sent, migrated) {
        (Ok(send), Some((Ok(migration), done))) => Ok(PostcopyMigrateReport {
            send,
            switch_ms: switched.map_or(0.0, ms),
            downtime_ms: ms(done),
            held_ms: ms(acked),
            migration,
        }),
        (Err(e), Some((Ok(_), _))) => Err(PostcopyMigrateError::SourceHeld {
            first: SendFailed(e).to_string(),
        }),
        (sent, migrated) => {
            let first: MigrateError = match (sent, migrated) {
                (Err(e), _) => MigrateError::Send(e),
                (Ok(_), Some((Err(q), _))) => MigrateError::Qmp(q),
                (Ok(_), _) => MigrateError::Options("the send ended without a switch".into()),
            };
            Err(resume_source(qmp, target, first).into())
        }
    }
}

/// Continues the source VM after a failure before the destination ran.
fn resume_source(qmp: &mut Qmp, target: &Target, first: MigrateError) -> MigrateError {
    continue_process(target);
    let _ = qmp.execute("migrate_cancel", None);
    match cont(qmp) {
        Ok(()) => first,
        Err(c) => MigrateError::NotContinued {
            first: first.to_string(),
            cont: c,
        },
    }
}

/// A send error with its cause, in one line.
struct SendFailed(SendError);

impl std::fmt::Display for SendFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = std::error::Error::source(&self.0);
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

/// Post-copy migrates one shared object, with a stopped pass of its own.
fn check_options(opts: &SendOptions) -> Result<(), MigrateError> {
    let refuse = |m: &str| Err(MigrateError::Options(m.to_owned()));
    if opts.object.is_none() {
        return refuse("a QEMU migration needs --object (the guest RAM's memfd or file)");
    }
    if opts.postcopy_after.is_none() {
        return refuse("a post-copy QEMU migration needs --postcopy-after");
    }
    if opts.dump.cow || opts.dump.tree {
        return refuse("a QEMU migration takes no --snapshot cow or --tree");
    }
    Ok(())
}

fn stop_failed(pid: u32, e: impl std::fmt::Display) -> DumpError {
    DumpError::Stop {
        pid,
        source: std::io::Error::other(format!("QMP stop: {e}")),
    }
}

/// On the destination QEMU (`-incoming defer`, `migrate-incoming`
/// issued): waits for the incoming migration to complete (`query-migrate`
/// polled every 2 ms, for at most `timeout`), then `cont`s the VM; returns
/// the migration's stats. QEMU keeps a destination paused when the source
/// was paused as the device state left (its run state travels with the
/// migration), as it is in post-copy: this is what lets the destination
/// run right away (`receive --postcopy --qmp SOCKET`).
pub fn continue_when_migrated(
    qmp: &mut Qmp,
    timeout: std::time::Duration,
) -> Result<MigrationStats, QmpError> {
    let stats = wait_migration(qmp, std::time::Duration::from_millis(2), timeout)?;
    if !query_status(qmp)?.running {
        cont(qmp)?;
    }
    Ok(stats)
}
