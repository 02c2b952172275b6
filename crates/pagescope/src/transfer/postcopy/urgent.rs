//! The receiver's side of the urgent channel (`docs/stream-format.md`,
//! "Post-copy", "The urgent channel"): on the sender's `PREEMPT` the
//! receiver takes one more connection on its listening address (the
//! handshake and the key's proof as for the stream, then `URGENT` naming
//! this transfer) and reads it on a thread of its own: `PAGES` checked as
//! on the stream (range, page sums) and installed at once, up to
//! `URGENT_END`. A failure of the channel is a failure of the connection:
//! the stream is shut down too, and the wait for the sender's reconnect
//! (`rejoin.rs`) begins.
//!
//! No kernel interface of its own (TCP).

use std::io::ErrorKind;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::receiver::Shared;
use super::wire::{CAP_POSTCOPY, CAP_POSTCOPY_PREEMPT, CAP_POSTCOPY_RESUME, PostcopyRecord};
use crate::image::format;
use crate::transfer::frame::FrameReader;
use crate::transfer::handshake::{self, Session};
use crate::transfer::wire::{Mode, Record};
use crate::transfer::{Class, Conn, TransferError};

/// How long the receiver waits for the urgent channel after `PREEMPT`
/// (and a connection for its handshake).
const ACCEPT_WAIT: Duration = Duration::from_secs(5);

/// Marks `sock`'s packets low-delay (`IP_TOS` `IPTOS_LOWDELAY`, which
/// also sets the socket's priority to `TC_PRIO_INTERACTIVE`), so a queue
/// that honours it (a `prio` qdisc, DSCP-aware routers) sends them ahead
/// of the background stream's. Best effort: IPv4 only.
pub(super) fn low_delay(sock: &TcpStream) {
    let _ = rustix::net::sockopt::set_ip_tos(sock, libc::IPTOS_LOWDELAY);
}

/// What the receiver needs to take the urgent channel: its listener, the
/// key, the transfer's id, and the stream's socket (shut down when the
/// channel fails).
pub(super) struct Preempt {
    listener: TcpListener,
    psk: Option<Vec<u8>>,
    id: u64,
    main: Option<TcpStream>,
}

/// A running urgent channel.
pub(super) struct Urgent {
    sock: TcpStream,
    pages: Arc<AtomicU64>,
    thread: JoinHandle<Result<u64, String>>,
}

impl Preempt {
    /// The urgent channel's setup, if the listener can be shared.
    pub(super) fn new(
        listener: &TcpListener,
        psk: Option<&[u8]>,
        id: u64,
        main: Option<TcpStream>,
    ) -> Option<Self> {
        // The stream's return path carries the requests: low-delay too.
        main.iter().for_each(low_delay);
        Some(Self {
            listener: listener.try_clone().ok()?,
            psk: psk.map(<[u8]>::to_vec),
            id,
            main,
        })
    }

    /// Takes the urgent channel (connections that are not it are refused,
    /// within [`ACCEPT_WAIT`]) and starts its reader. An error says why
    /// there is none (requested pages then come over the stream).
    pub(super) fn accept(&self, sh: &Arc<Shared>, page: u64) -> Result<Urgent, String> {
        let until = Instant::now() + ACCEPT_WAIT;
        let mut why = String::from("the sender did not connect");
        self.listener
            .set_nonblocking(true)
            .map_err(|e| e.to_string())?;
        while Instant::now() < until {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                Err(e) => return Err(e.to_string()),
            };
            let sock = stream.try_clone().map_err(|e| e.to_string())?;
            match self.handshake(stream) {
                Ok(s) => return Ok(self.start(s, sock, sh, page)),
                Err(e) => why = e.what,
            }
        }
        Err(why)
    }

    /// One connection's handshake and its `URGENT`.
    fn handshake(&self, stream: TcpStream) -> Result<Session, TransferError> {
        let peer = stream
            .peer_addr()
            .map_or_else(|_| "?".to_owned(), |a| a.to_string());
        let io = |e| TransferError::io("set up", &peer, e);
        stream.set_nonblocking(false).map_err(io)?;
        stream.set_read_timeout(Some(ACCEPT_WAIT)).map_err(io)?;
        low_delay(&stream);
        let timed = stream.try_clone().map_err(io)?;
        let conn = Conn::tcp(stream, &peer).map_err(io)?;
        let caps = CAP_POSTCOPY | CAP_POSTCOPY_RESUME | CAP_POSTCOPY_PREEMPT;
        let mut s = handshake::server(conn, self.psk.as_deref(), Mode::Object, caps, CAP_POSTCOPY)?;
        match handshake::expect(&mut s, "URGENT")? {
            Record::Postcopy(PostcopyRecord::Urgent { id }) if id == self.id => {}
            _ => {
                let e = TransferError::new(
                    Class::Handshake,
                    &peer,
                    "this receiver waits for its post-copy sender's urgent channel",
                );
                return Err(s.refuse(e));
            }
        }
        timed.set_read_timeout(None).map_err(io)?;
        Ok(s)
    }

    fn start(&self, s: Session, sock: TcpStream, sh: &Arc<Shared>, page: u64) -> Urgent {
        let pages = Arc::new(AtomicU64::new(0));
        let count = Arc::clone(&pages);
        let sh = Arc::clone(sh);
        let main = self.main.as_ref().and_then(|m| m.try_clone().ok());
        let thread = std::thread::spawn(move || {
            let Session { mut reader, .. } = s;
            let r = read(&mut reader, &sh, page, &count);
            if r.is_err() {
                // A failed channel is a failed connection: the stream stops too.
                if let Some(m) = main {
                    let _ = m.shutdown(Shutdown::Both);
                }
            }
            r
        });
        Urgent {
            sock,
            pages,
            thread,
        }
    }
}

impl Urgent {
    /// At the commit: waits for `URGENT_END`; the pages it carried.
    pub(super) fn finish(self) -> Result<u64, String> {
        self.thread
            .join()
            .unwrap_or_else(|_| Err("the urgent channel's reader panicked".into()))
    }

    /// After a drop, or at the end: closes it; the pages it carried.
    pub(super) fn close(self) -> u64 {
        let _ = self.sock.shutdown(Shutdown::Both);
        let _ = self.thread.join();
        self.pages.load(Ordering::Relaxed)
    }
}

/// Reads the urgent channel up to `URGENT_END`, installing its pages.
/// A wrong record is the transfer's failure (`sh.fail`).
fn read(
    reader: &mut FrameReader,
    sh: &Shared,
    page: u64,
    count: &AtomicU64,
) -> Result<u64, String> {
    loop {
        let rec = reader.next().map_err(|e| e.what)?;
        let r = match rec {
            None => return Err("the urgent channel closed before its end".into()),
            Some(Record::Pages {
                store: 0,
                first,
                sums,
                data,
            }) => install(sh, page, first, &sums, &data),
            Some(Record::Postcopy(PostcopyRecord::UrgentEnd { pages })) => {
                let got = count.load(Ordering::Relaxed);
                if pages == got {
                    return Ok(got);
                }
                Err(format!("its end counts {pages} pages, {got} arrived"))
            }
            Some(r) => Err(format!("a record of kind {}", r.kind())),
        };
        match r {
            Ok(n) => {
                count.fetch_add(n, Ordering::Relaxed);
            }
            Err(m) => {
                let m = format!("the urgent channel: {m}");
                sh.fail(m.clone());
                return Err(m);
            }
        }
    }
}

/// Checks and installs pages `first..` (store 0).
fn install(sh: &Shared, page: u64, first: u64, sums: &[u64], data: &[u8]) -> Result<u64, String> {
    let count = sums.len() as u64;
    let held = sh.state().pages();
    if first.checked_add(count).is_none_or(|end| end > held) || data.len() as u64 != count * page {
        return Err(format!(
            "pages {first}+{count} outside the object or cut short"
        ));
    }
    for (i, (bytes, sum)) in data.chunks_exact(page as usize).zip(sums).enumerate() {
        let p = first + i as u64;
        if format::page_sum(0, bytes) != *sum {
            return Err(format!("page {p} does not match its checksum"));
        }
        sh.state().arrived(&sh.dest, p, Some(bytes))?;
    }
    Ok(count)
}
