//! The sender's side of a dropped connection during post-copy
//! (`docs/stream-format.md`, "Post-copy", "A dropped connection"): the
//! source stays stopped and every kept page stays kept; the sender
//! connects to the receiver again (`--reconnect-wait` after each drop),
//! names the transfer (`RECONNECT` with the receiver's id), learns what
//! the receiver still lacks (`LACK`), and sends those pages (asked-for
//! ones first, as before), then the metadata, `COMMIT` (counting this
//! connection's records) and waits for the `ACK`. A refusal by the
//! receiver ends it; so does a wait with no receiver: the error then says
//! the source is left stopped with its pages.
//!
//! No kernel interface of its own (TCP).

use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::sender::{Reconnect, Stash, lock};
use super::wire::{CAP_POSTCOPY, CAP_POSTCOPY_RESUME, PostcopyRecord};
use crate::dump::DumpError;
use crate::dump::sink::{Committed, StoreRef};
use crate::image::ImageError;
use crate::image::format::{self, Meta};
use crate::transfer::frame::FrameWriter;
use crate::transfer::handshake::{self, Session};
use crate::transfer::send::Shared;
use crate::transfer::wire::{self, Mode, Record, kind};
use crate::transfer::{Class, Conn, TransferError};

/// Where to reconnect, with the key to prove.
pub(crate) struct Link {
    /// The address and the wait.
    pub(crate) to: Reconnect,
    /// The pre-shared key.
    pub(crate) psk: Option<Vec<u8>>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Link {{ to: {:?} }}", self.to)
    }
}

/// How one attempt over a new connection ended, if not with the `ACK`.
enum Attempt {
    /// The connection failed: try again.
    Dropped(String),
    /// The receiver refused, or cannot continue: give up.
    Refused(TransferError),
}

fn dropped(e: impl std::fmt::Display) -> Attempt {
    Attempt::Dropped(e.to_string())
}

impl Stash {
    /// The stream failed with `failed` after the switch: connects again
    /// and finishes (see the module doc), or gives up with an error that
    /// says so. `shared`: the stream's failure slot (cleared on success,
    /// the final error on failure).
    pub(super) fn rejoin(
        &self,
        shared: &Shared,
        meta: &Meta,
        failed: DumpError,
    ) -> Result<Committed, DumpError> {
        let first = lock(&shared.failure)
            .as_ref()
            .map(|e| (e.class, e.what.clone()));
        let resumable = first.as_ref().is_none_or(|e| e.0 == Class::Connection);
        let (Some(link), Some(id), true) = (&self.link, *lock(&self.id), resumable) else {
            return Err(failed);
        };
        if lock(&self.store).is_none() {
            return Err(failed);
        }
        let meta = serde_json::to_vec(meta).map_err(|e| give_up(shared, e.to_string()))?;
        let mut last = first.map_or_else(|| failed.to_string(), |e| e.1);
        loop {
            let until = Instant::now() + link.to.wait;
            let conn = loop {
                match Conn::connect(&link.to.to) {
                    Ok(c) => break c,
                    Err(_) if Instant::now() < until => {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) => {
                        let m = format!(
                            "the connection dropped during post-copy ({last}) and no receiver took a new one within {:?} ({}); the source is left stopped with its pages",
                            link.to.wait, e.what
                        );
                        return Err(give_up(shared, m));
                    }
                }
            };
            lock(&self.stats).reconnects += 1;
            match self.attempt(conn, link, id, &meta) {
                Ok(c) => {
                    *lock(&shared.failure) = None;
                    return Ok(c);
                }
                Err(Attempt::Dropped(m)) => last = m,
                Err(Attempt::Refused(e)) => {
                    let m = format!(
                        "reconnecting after a drop during post-copy: {}; the source is left stopped with its pages",
                        e.what
                    );
                    let e = TransferError { what: m, ..e };
                    let shown = e.what.clone();
                    *lock(&shared.failure) = Some(e);
                    return Err(lost(&link.to.to, shown));
                }
            }
        }
    }

    /// One new connection: the handshake, `RECONNECT`, the `LACK`, the
    /// pages, the commit, the `ACK`.
    fn attempt(&self, conn: Conn, link: &Link, id: u64, meta: &[u8]) -> Result<Committed, Attempt> {
        let page = u32::try_from(rustix::param::page_size()).unwrap_or(4096);
        let caps = CAP_POSTCOPY | CAP_POSTCOPY_RESUME;
        let psk = link.psk.as_deref();
        let mut s = handshake::client(conn, psk, Mode::Object, page, 0, caps).map_err(refused)?;
        handshake::send(&mut s, &Record::Postcopy(PostcopyRecord::Reconnect { id }))
            .map_err(refused)?;
        let lack = read_lack(&mut s)?;
        let again = self.lacking(&lack).map_err(|m| {
            let e = TransferError::new(Class::BadStream, &s.peer, m);
            Attempt::Refused(s.refuse(e))
        })?;
        lock(&self.stats).pages_resent += again;
        let (rx, refusal) = read_back(&mut s);
        let mut out = Counted::new(std::mem::replace(
            &mut s.writer,
            FrameWriter::new(Box::new(std::io::sink())),
        ));
        let requests = Mutex::new(rx);
        let served = {
            let mut send = |_: &StoreRef, first: u64, b: &[u8]| out.pages(first, b, page);
            self.serve(&mut send, &requests, &|m| lost(&s.peer, m))
        };
        let ended = served
            .map_err(dropped)
            .and_then(|()| out.commit(meta).map_err(dropped))
            .and_then(|()| wait_ack(&requests));
        match (ended, lock(&refusal).take()) {
            (_, Some(e)) => Err(Attempt::Refused(e)),
            (r, None) => r.map(|_| Committed {
                image_id: String::new(),
                generation: 0,
            }),
        }
    }
}

/// The `LACK` records, up to the last: the ranges.
fn read_lack(s: &mut Session) -> Result<Vec<(u64, u64)>, Attempt> {
    let mut lack = Vec::new();
    loop {
        match handshake::expect(s, "the receiver's LACK").map_err(refused)? {
            Record::Postcopy(PostcopyRecord::Lack { last, ranges }) => {
                lack.extend(ranges);
                if last {
                    return Ok(lack);
                }
            }
            r => {
                let e = handshake::unexpected(&s.peer, &r, "LACK");
                return Err(Attempt::Refused(s.refuse(e)));
            }
        }
    }
}

/// The new connection's return path on a thread: records into the
/// channel, an `ERROR` into the slot.
type Refusal = Arc<Mutex<Option<TransferError>>>;

fn read_back(s: &mut Session) -> (Receiver<Record>, Refusal) {
    let (tx, rx) = channel();
    let slot: Refusal = Arc::default();
    let refusal = Arc::clone(&slot);
    let peer = s.peer.clone();
    let mut reader = std::mem::replace(
        &mut s.reader,
        crate::transfer::frame::FrameReader::new(Box::new(std::io::empty()), &peer),
    );
    std::thread::spawn(move || {
        while let Ok(Some(r)) = reader.next() {
            if let Record::Error(class, msg) = r {
                let m = format!("the receiver refused: {msg}");
                *lock(&refusal) = Some(TransferError::new(class, &peer, m));
                return;
            }
            if tx.send(r).is_err() {
                return;
            }
        }
    });
    (rx, slot)
}

/// Waits for the `ACK` (late requests passed over).
fn wait_ack(rx: &Mutex<Receiver<Record>>) -> Result<String, Attempt> {
    loop {
        match lock(rx).recv() {
            Ok(Record::Postcopy(_)) => {}
            Ok(Record::Ack(true, msg)) => return Ok(msg),
            Ok(Record::Ack(false, msg)) => {
                let e = TransferError::new(
                    Class::BadStream,
                    "",
                    format!("the receiver did not commit: {msg}"),
                );
                return Err(Attempt::Refused(e));
            }
            Ok(r) => return Err(dropped(format!("record of kind {} for the ACK", r.kind()))),
            Err(_) => {
                return Err(dropped(
                    "the connection closed before the receiver acknowledged",
                ));
            }
        }
    }
}

/// A writer that counts what `COMMIT` counts.
struct Counted {
    w: FrameWriter,
    records: u64,
    pages: u64,
}

impl Counted {
    fn new(w: FrameWriter) -> Self {
        Self {
            w,
            records: 0,
            pages: 0,
        }
    }

    /// Pages `first..` (`bytes`, whole pages of `page` bytes) of store 0.
    fn pages(&mut self, first: u64, bytes: &[u8], page: u32) -> Result<(), DumpError> {
        let per_frame = wire::MAX_PAYLOAD / page as usize;
        for (i, chunk) in bytes.chunks(per_frame * page as usize).enumerate() {
            let at = first + (i * per_frame) as u64;
            let sums: Vec<u64> = chunk
                .chunks(page as usize)
                .map(|p| format::page_sum(0, p))
                .collect();
            let head = wire::pages_header(0, at, &sums);
            self.w
                .frame(kind::PAGES, &[&head, chunk])
                .map_err(|e| lost("", e.to_string()))?;
            self.records += 1;
            self.pages += sums.len() as u64;
        }
        self.w.flush().map_err(|e| lost("", e.to_string()))
    }

    /// The metadata and `COMMIT`.
    fn commit(&mut self, meta: &[u8]) -> std::io::Result<()> {
        for part in meta.chunks(wire::MAX_PAYLOAD) {
            self.w.frame(kind::META, &[part])?;
            self.records += 1;
        }
        self.w.record(&Record::Commit {
            meta_len: meta.len() as u64,
            meta_sum: format::file_sum(meta),
            pages: self.pages,
            records: self.records,
        })?;
        self.w.flush()
    }
}

fn refused(e: TransferError) -> Attempt {
    if e.class == Class::Connection {
        Attempt::Dropped(e.what)
    } else {
        Attempt::Refused(e)
    }
}

/// The dump's error for a stream that is gone.
fn lost(peer: &str, what: String) -> DumpError {
    DumpError::Image(ImageError::Io {
        what: "send pages to",
        path: peer.into(),
        source: std::io::Error::other(what),
    })
}

/// Gives up: `m` becomes the stream's failure (a connection's).
fn give_up(shared: &Shared, m: String) -> DumpError {
    let e = TransferError::new(Class::Connection, "", m);
    let shown = e.what.clone();
    *lock(&shared.failure) = Some(e);
    lost("", shown)
}
