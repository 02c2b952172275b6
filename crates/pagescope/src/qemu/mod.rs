//! Driving a QEMU VM over QMP (the QEMU Machine Protocol: JSON lines on a
//! unix socket, `-qmp unix:PATH,server=on,wait=off`), for migrations where
//! pagescope moves the guest RAM and QEMU only the device state.
//!
//! * `message.rs`: QMP's wire format (greeting, `return`, `error`, events),
//!   parsed without I/O;
//! * `client.rs`: [`Qmp`], a client over the socket: capabilities
//!   negotiation, commands with a timeout, events kept for the caller;
//! * `migrate.rs`: the migration steps (`stop`, `query-status`,
//!   `migrate-set-capabilities` `x-ignore-shared`, `migrate`, waits on
//!   `MIGRATION` events), [`Paused`] (a VM stopped for its hand-over,
//!   continued unless it is migrated; its migration can be started early
//!   and held before the device state) and [`hand_off`], the whole stop →
//!   final pass → device-state migration sequence;
//! * `send.rs`: [`send_and_migrate`], what `send --qmp SOCKET
//!   --qemu-migrate URI` runs: `send --object`'s passes with the VM paused
//!   right before the final one, then the device-state migration;
//! * `postcopy.rs`: [`send_and_migrate_postcopy`], the same with
//!   `--postcopy-after N`: the device state goes over at the switch and
//!   the destination runs while its RAM is served.
//!
//! With guest RAM in a shared object (`memory-backend-memfd,share=on` or
//! `memory-backend-file,share=on`) and `x-ignore-shared` set on both sides,
//! QEMU's migration stream carries no RAM: the destination must already
//! hold it, in the file its `memory-backend-file,mem-path=FILE` maps. See
//! the README's QEMU recipe and `docs/qemu.md`.

mod client;
mod message;
mod migrate;
mod postcopy;
mod send;

use std::path::PathBuf;
use std::time::Duration;

pub use client::Qmp;
pub use message::{Event, Message, command_line, parse_message};
pub use migrate::{
    HandOff, HandOffOptions, MigrationStats, Paused, VmStatus, cont, hand_off, incoming,
    parse_query_migrate, query_migrate, query_status, set_ignore_shared,
    set_pause_before_switchover, start_migration, stop, wait_migration, wait_migration_status,
};
pub use postcopy::{
    PostcopyMigrateError, PostcopyMigrateReport, continue_when_migrated, send_and_migrate_postcopy,
};
pub use send::{MigrateError, MigrateReport, PauseTimeline, send_and_migrate};

use crate::error::ErrorKind;

/// Errors of talking to QEMU.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QmpError {
    /// The QMP socket could not be connected to.
    #[error("cannot connect to the QMP socket {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("QMP I/O failed")]
    Io(#[source] std::io::Error),
    /// QEMU closed the connection (it exited or another client took over).
    #[error("QEMU closed the QMP connection")]
    Closed,
    /// No answer within the time allowed.
    #[error("no answer from QEMU to {what} within {waited:?}")]
    Timeout {
        /// The command or event waited for.
        what: String,
        /// How long.
        waited: Duration,
    },
    /// A line that is not a QMP message.
    #[error("not a QMP message: {detail}")]
    Protocol {
        /// What was wrong (with the start of the line).
        detail: String,
    },
    /// QEMU answered a command with an error.
    #[error("QMP {command} failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class (`GenericError`, `CommandNotFound`, ...).
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// The migration ended in a state other than `completed`.
    #[error("QEMU migration {status}{}", error.as_deref().map(|e| format!(": {e}")).unwrap_or_default())]
    Migration {
        /// The final status (`failed`, `cancelled`).
        status: String,
        /// QEMU's `error-desc`, if any.
        error: Option<String>,
    },
    /// The caller's final pass failed; the VM was continued again.
    #[error("the final pass failed (the VM was continued)")]
    FinalPass(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl QmpError {
    /// The broad class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Connect { source, .. } => match source.kind() {
                std::io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                    ErrorKind::BadInput
                }
                _ => ErrorKind::Other,
            },
            Self::Command { class, .. } if class == "CommandNotFound" => ErrorKind::Unsupported,
            Self::Command { .. } => ErrorKind::BadInput,
            Self::FinalPass(e) => crate::error_kind(e.as_ref()).unwrap_or(ErrorKind::Other),
            Self::Io(_)
            | Self::Closed
            | Self::Timeout { .. }
            | Self::Protocol { .. }
            | Self::Migration { .. } => ErrorKind::Other,
        }
    }
}
