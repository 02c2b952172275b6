//! Moving memory to another host: `send` runs the dump's passes (full,
//! pre-copy, stopped final) through a [`PageSink`](crate::dump) that
//! streams every record over a connection (TCP, or stdin/stdout so `ssh`
//! can carry it); `receive` checks every record and writes the same image
//! directory `dump` writes (committed atomically, header last), or one
//! shared object's pages into a file at their offsets (`FILE.partial`,
//! renamed at commit). The format: `docs/stream-format.md`.
//!
//! * `wire.rs`: the records, bounded and checked; `frame.rs`: frames
//!   and their authentication tags;
//! * `handshake.rs`: magic, version, capabilities, mode, and the
//!   pre-shared-key challenge-response that keys every later frame;
//! * `send.rs`: the streaming sink and [`send`]; `out.rs`: its frames
//!   (runs of pages not stored merged), `pace.rs`: `--bandwidth` and the
//!   measured rate, `progress.rs`: live counters and [`SendEvent`]s,
//!   `stores.rs`: the stores it sends (`--object`);
//! * `receive.rs`, `output.rs`: [`receive`] and what it writes into;
//!   `in_place.rs`: into a file a destination already maps (`--in-place`:
//!   a marker file and the acknowledgement say it is committed);
//! * `postcopy/`: post-copy into a process that maps the file
//!   (userfaultfd missing-page faults).
//! * `resume.rs`, `partial.rs`: resuming after a dropped connection (the
//!   exchange, `KEEP` instead of `PAGES`; the receiver's partial state).
//!
//! No kernel interface of its own (sockets and files through `std`)
//! but post-copy's userfaultfd, in `postcopy/`.

mod frame;
mod handshake;
mod in_place;
mod out;
mod output;
mod pace;
mod pageout_sent;
mod partial;
pub mod postcopy;
mod progress;
mod receive;
mod resume;
mod send;
mod send_types;
mod stores;
pub(crate) mod wire;

#[cfg(test)]
mod codec_tests;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};

pub use pageout_sent::PageoutSentReport;
pub use partial::prepare as prepare_receive;
pub use progress::{PassSent, SendEvent, SendPass, SendProgress};
pub use receive::{ReceiveOptions, ReceiveReport, Target as ReceiveInto, receive};
pub use resume::Resumed;
pub(crate) use send::send_with;
pub use send::{SendError, SendOptions, SendReport, send};
pub use stores::ObjectChoice;

use crate::error::ErrorKind;

/// What kind of failure a transfer met (the CLI's exit code, and the
/// class an `ERROR` frame carries to the peer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Class {
    /// The peers cannot talk: magic, version, capability or mode.
    Handshake = 1,
    /// The pre-shared key is missing or wrong, or a frame's tag.
    Auth = 2,
    /// The stream broke its own rules (lengths, offsets, sums, totals).
    BadStream = 3,
    /// The connection failed or closed early.
    Connection = 4,
    /// The sender gave up (its dump failed): nothing was committed.
    Aborted = 5,
    /// Writing the output failed.
    Output = 6,
    /// The post-copy destination process could not be attached or
    /// filled.
    Destination = 7,
}

impl Class {
    /// The class of an `ERROR` frame's code (an unknown one: a stream
    /// fault).
    pub fn from_u8(c: u8) -> Self {
        match c {
            1 => Self::Handshake,
            2 => Self::Auth,
            4 => Self::Connection,
            5 => Self::Aborted,
            6 => Self::Output,
            7 => Self::Destination,
            _ => Self::BadStream,
        }
    }
}

/// A failed transfer: its class, the peer's address, one line.
#[derive(Debug, thiserror::Error)]
#[error("{peer}: {what}")]
pub struct TransferError {
    /// What kind of failure.
    pub class: Class,
    /// The peer's address (or `-`: stdin/stdout).
    pub peer: String,
    /// What happened.
    pub what: String,
    /// The underlying error, if any.
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl TransferError {
    /// A failure of `class` with `peer`.
    pub fn new(class: Class, peer: &str, what: impl Into<String>) -> Self {
        Self {
            class,
            peer: peer.to_owned(),
            what: what.into(),
            source: None,
        }
    }

    /// A connection failure while doing `what`.
    pub fn io(what: &str, peer: &str, e: std::io::Error) -> Self {
        Self::new(
            Class::Connection,
            peer,
            format!("cannot {what} the peer: {e}"),
        )
    }

    /// The broad class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self.class {
            Class::Auth => ErrorKind::PermissionDenied,
            Class::Handshake => ErrorKind::Unsupported,
            _ => ErrorKind::Other,
        }
    }
}

/// One end of a stream: where frames are read and written, and the
/// peer's name for messages.
pub struct Conn {
    /// Frames come from here.
    pub reader: Box<dyn Read + Send>,
    /// Frames go here.
    pub writer: Box<dyn Write + Send>,
    /// The peer (an address, or `-`).
    pub peer: String,
    /// The socket, to close gracefully after an `ERROR` (TCP only).
    pub socket: Option<TcpStream>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Conn {{ peer: {} }}", self.peer)
    }
}

impl Conn {
    /// A TCP connection.
    pub fn tcp(stream: TcpStream, peer: &str) -> std::io::Result<Self> {
        stream.set_nodelay(true)?;
        // A whole frame of pages fits the send buffer (capped by wmem_max).
        let _ = rustix::net::sockopt::set_socket_send_buffer_size(&stream, 16 << 20);
        let reader = stream.try_clone()?;
        let socket = Some(stream.try_clone()?);
        Ok(Self {
            reader: Box::new(reader),
            writer: Box::new(std::io::BufWriter::with_capacity(1 << 20, stream)),
            peer: peer.to_owned(),
            socket,
        })
    }

    /// Connects to `addr`.
    pub fn connect(addr: &str) -> Result<Self, TransferError> {
        let stream =
            TcpStream::connect(addr).map_err(|e| TransferError::io("connect to", addr, e))?;
        Self::tcp(stream, addr).map_err(|e| TransferError::io("set up", addr, e))
    }

    /// stdin and stdout (`--to -`, `--from -`: `ssh` carries both ways).
    pub fn stdio() -> Self {
        Self {
            reader: Box::new(std::io::stdin()),
            writer: Box::new(std::io::BufWriter::with_capacity(
                1 << 20,
                std::io::stdout(),
            )),
            peer: "-".to_owned(),
            socket: None,
        }
    }
}

/// Whether every address `addr` names is a loopback one (a receiver
/// listening anywhere else must authenticate its sender).
pub fn is_loopback(addr: &str) -> Result<bool, TransferError> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| TransferError::new(Class::Connection, addr, format!("not an address: {e}")))?
        .collect();
    Ok(!addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback()))
}

/// Reads a pre-shared key file (its bytes, a trailing newline dropped;
/// at least 16 bytes).
pub fn read_psk(path: &std::path::Path) -> Result<Vec<u8>, TransferError> {
    let shown = path.display().to_string();
    let mut key = std::fs::read(path).map_err(|e| {
        TransferError::new(Class::Auth, &shown, format!("cannot read the key: {e}"))
    })?;
    while key.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        key.pop();
    }
    if key.len() < 16 {
        return Err(TransferError::new(
            Class::Auth,
            &shown,
            "a pre-shared key needs at least 16 bytes",
        ));
    }
    Ok(key)
}
