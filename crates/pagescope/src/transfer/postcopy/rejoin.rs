//! The receiver's side of a dropped connection during post-copy
//! (`docs/stream-format.md`, "Post-copy", "A dropped connection"): the
//! destination stays registered, its faulting threads block, the fault
//! thread and the filler go on; the receiver listens for the sender of
//! the same transfer (`RECONNECT` with the id it gave in `RESUMABLE`),
//! answers with the pages it still lacks (`LACK`), and the stream goes on
//! over the new connection. Any other connection is refused and the wait
//! goes on; when nobody comes within the wait, the receive fails naming
//! the pages that never arrived.
//!
//! No kernel interface of its own (TCP).

use std::io::ErrorKind;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use super::wire::{CAP_POSTCOPY, CAP_POSTCOPY_RESUME, MAX_RANGES, PostcopyRecord};
use crate::transfer::handshake::{self, Session};
use crate::transfer::wire::{Mode, Record};
use crate::transfer::{Class, Conn, TransferError};

/// Where a post-copy receiver waits for its sender after a drop, and how
/// long (`receive --reconnect-wait`).
#[derive(Debug)]
pub struct Rejoin {
    /// The listener the first connection came from.
    pub listener: TcpListener,
    /// How long to wait after each drop.
    pub wait: Duration,
}

/// A random id for this transfer (`RESUMABLE`).
pub(super) fn transfer_id() -> u64 {
    let mut b = [0u8; 8];
    let _ = rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty());
    u64::from_le_bytes(b)
}

/// How long one connection may take over its handshake.
const HANDSHAKE_WAIT: Duration = Duration::from_secs(5);

impl Rejoin {
    /// Waits for the sender of transfer `id`: its new session, `LACK`
    /// (the pages `lack` gives then) sent. An error says why nobody came.
    pub(super) fn wait(
        &self,
        psk: Option<&[u8]>,
        id: u64,
        lack: &dyn Fn() -> Vec<(u64, u64)>,
    ) -> Result<Session, String> {
        let until = Instant::now() + self.wait;
        let mut refused = String::new();
        self.listener
            .set_nonblocking(true)
            .map_err(|e| format!("cannot wait for the sender: {e}"))?;
        while Instant::now() < until {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Err(e) => return Err(format!("cannot wait for the sender: {e}")),
            };
            match accept(stream, psk, id, lack) {
                Ok(s) => return Ok(s),
                Err(e) => refused = format!(" (a connection refused: {})", e.what),
            }
        }
        Err(format!(
            "no sender reconnected within {:?}{refused}",
            self.wait
        ))
    }
}

/// One connection: the handshake, `RECONNECT` of transfer `id`, `LACK`.
fn accept(
    stream: std::net::TcpStream,
    psk: Option<&[u8]>,
    id: u64,
    lack: &dyn Fn() -> Vec<(u64, u64)>,
) -> Result<Session, TransferError> {
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "?".to_owned(), |a| a.to_string());
    let io = |e| TransferError::io("set up", &peer, e);
    stream.set_nonblocking(false).map_err(io)?;
    stream.set_read_timeout(Some(HANDSHAKE_WAIT)).map_err(io)?;
    let timed = stream.try_clone().map_err(io)?;
    let conn = Conn::tcp(stream, &peer).map_err(io)?;
    let caps = CAP_POSTCOPY | CAP_POSTCOPY_RESUME;
    let mut s = handshake::server(conn, psk, Mode::Object, caps, CAP_POSTCOPY)?;
    if s.peer_caps & CAP_POSTCOPY_RESUME == 0 {
        return Err(s.refuse(waiting(&peer)));
    }
    match handshake::expect(&mut s, "RECONNECT")? {
        Record::Postcopy(PostcopyRecord::Reconnect { id: got }) if got == id => {}
        Record::Postcopy(PostcopyRecord::Reconnect { .. }) => {
            let e = TransferError::new(
                Class::Handshake,
                &peer,
                "this receiver waits for another transfer's sender to reconnect",
            );
            return Err(s.refuse(e));
        }
        _ => return Err(s.refuse(waiting(&peer))),
    }
    let ranges = lack();
    let mut chunks = ranges.chunks(MAX_RANGES).peekable();
    if chunks.peek().is_none() {
        send_lack(&mut s, true, Vec::new())?;
    }
    while let Some(c) = chunks.next() {
        send_lack(&mut s, chunks.peek().is_none(), c.to_vec())?;
    }
    timed.set_read_timeout(None).map_err(io)?;
    Ok(s)
}

fn send_lack(s: &mut Session, last: bool, ranges: Vec<(u64, u64)>) -> Result<(), TransferError> {
    handshake::send(s, &Record::Postcopy(PostcopyRecord::Lack { last, ranges }))
}

fn waiting(peer: &str) -> TransferError {
    TransferError::new(
        Class::Handshake,
        peer,
        "this receiver waits for its post-copy sender to reconnect after a drop; a new send cannot continue the transfer",
    )
}
