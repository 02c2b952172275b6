//! The sender's urgent channel (`docs/stream-format.md`, "Post-copy",
//! "The urgent channel"): a second connection, opened at the switch, that
//! carries only the pages the receiver asked for, so a requested page
//! never queues behind background pages already in the stream's socket
//! buffers (QEMU's `postcopy-preempt`). The background pages go on over
//! the stream, one thread each. A failure of the urgent channel is a
//! failure of the connection: the stream stops and `reconnect.rs` takes
//! over (a reconnected stream carries requested pages itself).
//!
//! No kernel interface of its own (TCP).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::sender::{FIRST_CHUNK, MAX_CHUNK, SendRun, Stash, lock};
use super::wire::{CAP_POSTCOPY, CAP_POSTCOPY_PREEMPT, CAP_POSTCOPY_RESUME, PostcopyRecord};
use crate::dump::DumpError;
use crate::dump::sink::StoreRef;
use crate::image::format;
use crate::transfer::frame::FrameWriter;
use crate::transfer::handshake;
use crate::transfer::wire::{self, Mode, Record, kind};
use crate::transfer::{Conn, TransferError};

/// How long the sender waits for the receiver's `RESUMABLE` (its id
/// names the urgent channel) at the switch.
const ID_WAIT: Duration = Duration::from_secs(2);
/// How often the urgent thread looks whether the background is done.
const POLL: Duration = Duration::from_millis(5);

type Fallible<'a> = dyn Fn() -> Result<(), DumpError> + 'a;

impl Stash {
    /// At the switch, before `START`: when both hellos carry
    /// `POSTCOPY_PREEMPT` and `POSTCOPY_RESUME` and the receiver gave its
    /// id, announces the urgent channel on the stream (`announce`, then
    /// `flush`) and opens it. If it cannot be opened, requested pages go
    /// over the stream as before.
    pub(super) fn open_urgent(
        &self,
        acks: &Mutex<Receiver<Record>>,
        announce: &Fallible<'_>,
        flush: &Fallible<'_>,
    ) -> Result<(), DumpError> {
        let both = CAP_POSTCOPY_PREEMPT | CAP_POSTCOPY_RESUME;
        let Some(link) = self.link.as_ref().filter(|l| l.to.preempt) else {
            return Ok(());
        };
        if self.peer_caps.load(Ordering::Relaxed) & both != both {
            return Ok(());
        }
        let Some(id) = self.await_id(acks) else {
            return Ok(());
        };
        announce()?;
        flush()?;
        match connect(&link.to.to, link.psk.as_deref(), id) {
            Ok(w) => {
                *lock(&self.urgent) = Some(w);
                lock(&self.stats).urgent_channel = true;
            }
            // Requested pages then go over the stream, as without it.
            Err(e) => lock(&self.stats).urgent_refused = Some(e.what),
        }
        Ok(())
    }

    /// The receiver's id from its `RESUMABLE`, waited for a little.
    fn await_id(&self, acks: &Mutex<Receiver<Record>>) -> Option<u64> {
        let until = Instant::now() + ID_WAIT;
        loop {
            if let Some(id) = *lock(&self.id) {
                return Some(id);
            }
            // Nothing but `RESUMABLE` comes before the switch.
            if self.next_request(&lock(acks)).is_err() || Instant::now() > until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// [`Stash::serve`] with the urgent channel `w`: requests read from
    /// `requests` and served over `w` by one thread, the rest in page
    /// order over the stream (`send`) by this one. Either failing stops
    /// both.
    pub(super) fn serve_preempted(
        &self,
        store: &StoreRef,
        w: FrameWriter,
        send: &mut SendRun<'_>,
        requests: &Mutex<Receiver<Record>>,
        lost: &dyn Fn(String) -> DumpError,
    ) -> Result<(), DumpError> {
        let t0 = Instant::now();
        let done = AtomicBool::new(false);
        let failed = AtomicBool::new(false);
        let nearby = Mutex::new(VecDeque::new());
        let (background, urgent) = std::thread::scope(|sc| {
            let urgent = sc.spawn(|| {
                let r = self.serve_urgent(store, w, requests, &done, &nearby);
                failed.store(r.is_err(), Ordering::Relaxed);
                r
            });
            let background = self.background(store, send, &failed, &nearby);
            done.store(true, Ordering::Relaxed);
            let urgent = urgent
                .join()
                .unwrap_or_else(|_| Err("the urgent channel's thread panicked".into()));
            (background, urgent)
        });
        urgent.map_err(|m| lost(format!("the urgent channel: {m}")))?;
        background?;
        lock(&self.stats).seconds = t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// Every unsent page until none is left or `failed`: the
    /// neighbourhoods asked for (`nearby`) first, then page order in
    /// growing chunks.
    fn background(
        &self,
        store: &StoreRef,
        send: &mut SendRun<'_>,
        failed: &AtomicBool,
        nearby: &Mutex<VecDeque<(u64, u64)>>,
    ) -> Result<(), DumpError> {
        let mut chunk = FIRST_CHUNK;
        while !failed.load(Ordering::Relaxed) {
            let asked = lock(nearby).pop_front();
            if let Some((first, count)) = asked {
                let run = self.take(first, count, usize::MAX);
                self.send_runs(store, run, true, send)?;
                continue;
            }
            let run = self.take(0, u64::MAX, chunk);
            if run.is_empty() {
                break;
            }
            chunk = (chunk * 2).min(MAX_CHUNK);
            self.send_runs(store, run, false, send)?;
        }
        Ok(())
    }

    /// The urgent thread: a faulting thread's own page (a request of one
    /// page) over `w`, flushed at once; a neighbourhood (a longer request)
    /// to `nearby`, for the background to send next, so it never delays
    /// the next fault's page. When `done` and no request waits,
    /// `URGENT_END`.
    fn serve_urgent(
        &self,
        store: &StoreRef,
        mut w: FrameWriter,
        requests: &Mutex<Receiver<Record>>,
        done: &AtomicBool,
        nearby: &Mutex<VecDeque<(u64, u64)>>,
    ) -> Result<(), String> {
        let page = rustix::param::page_size();
        let mut sent = 0;
        loop {
            let wait = if done.load(Ordering::Relaxed) {
                Duration::ZERO
            } else {
                POLL
            };
            let next = requests
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .recv_timeout(wait);
            match next {
                Ok(Record::Postcopy(PostcopyRecord::Request { first, count, .. })) => {
                    lock(&self.stats).requests += 1;
                    if count > 1 {
                        lock(nearby).push_back((first, count));
                        continue;
                    }
                    let run = self.take(first, count, usize::MAX);
                    // A faulting thread's own page (asked alone) that the
                    // background took already may still sit in the
                    // stream's buffers: it goes again, ahead of them (the
                    // receiver drops whichever copy comes second).
                    let again = (count == 1 && run.is_empty())
                        .then(|| lock(&self.pages).get(&first).cloned())
                        .flatten();
                    sent += run.len() as u64;
                    let mut out = |_: &StoreRef, first: u64, b: &[u8]| {
                        urgent_pages(&mut w, first, b, page).map_err(|e| lost_urgent(&e))
                    };
                    self.send_runs(store, run, true, &mut out)
                        .map_err(|e| e.to_string())?;
                    if let Some(data) = again {
                        urgent_pages(&mut w, first, &data, page).map_err(|e| e.to_string())?;
                        sent += 1;
                        lock(&self.stats).pages_urgent_again += 1;
                    }
                }
                Ok(Record::Postcopy(PostcopyRecord::Resumable { id })) => {
                    *lock(&self.id) = Some(id);
                }
                Ok(r) => {
                    return Err(format!(
                        "record of kind {} from the receiver during post-copy",
                        r.kind()
                    ));
                }
                Err(RecvTimeoutError::Timeout) if done.load(Ordering::Relaxed) => break,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err("the receiver closed the connection during post-copy".into());
                }
            }
        }
        w.record(&Record::Postcopy(PostcopyRecord::UrgentEnd { pages: sent }))
            .and_then(|()| w.flush())
            .map_err(|e| e.to_string())
    }
}

/// Connects the urgent channel to `to`: the handshake (the key's proof
/// as on the stream), `URGENT` with the receiver's `id`.
fn connect(to: &str, psk: Option<&[u8]>, id: u64) -> Result<FrameWriter, TransferError> {
    let page = u32::try_from(rustix::param::page_size()).unwrap_or(4096);
    let conn = Conn::connect(to)?;
    if let Some(sock) = &conn.socket {
        // A peer that never answers (not the receiver) is given up on.
        let _ = sock.set_read_timeout(Some(Duration::from_secs(5)));
        super::urgent::low_delay(sock);
    }
    let offered = CAP_POSTCOPY_RESUME | CAP_POSTCOPY_PREEMPT;
    let mut s = handshake::client(conn, psk, Mode::Object, page, offered, CAP_POSTCOPY)?;
    handshake::send(&mut s, &Record::Postcopy(PostcopyRecord::Urgent { id }))?;
    Ok(std::mem::replace(
        &mut s.writer,
        FrameWriter::new(Box::new(std::io::sink())),
    ))
}

/// Pages `first..` (`bytes`, whole pages of `page` bytes) of store 0 as
/// `PAGES` frames, flushed.
fn urgent_pages(w: &mut FrameWriter, first: u64, bytes: &[u8], page: usize) -> std::io::Result<()> {
    let per_frame = wire::MAX_PAYLOAD / page;
    for (i, chunk) in bytes.chunks(per_frame * page).enumerate() {
        let at = first + (i * per_frame) as u64;
        let sums: Vec<u64> = chunk.chunks(page).map(|p| format::page_sum(0, p)).collect();
        w.frame(kind::PAGES, &[&wire::pages_header(0, at, &sums), chunk])?;
    }
    w.flush()
}

fn lost_urgent(e: &std::io::Error) -> DumpError {
    DumpError::Image(crate::image::ImageError::Io {
        what: "send pages over the urgent channel to",
        path: "receiver".into(),
        source: std::io::Error::other(e.to_string()),
    })
}
