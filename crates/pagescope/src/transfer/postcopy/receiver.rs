//! `receive --into FILE --postcopy --pid DEST`: the records of one
//! object stream, checked as `receive` checks them (store, ranges, page
//! sums, totals), kept in memory until the sender's switch (`START`),
//! then installed into the destination: pages nobody waits for by a
//! filler thread in order, pages a thread faulted on at once (held) or
//! as soon as they arrive after a `REQUEST` sent by the fault thread.
//! When every page is in and the `COMMIT` checked, the destination is
//! unregistered and released, and the `ACK` sent. A connection dropped
//! after the switch is waited out (`rejoin.rs`) when a [`Rejoin`] is
//! given.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use super::dest::Destination;
use super::faults::{fill, serve_faults};
pub use super::rejoin::Rejoin;
use super::spill::HeldPages;
use super::state::{Ask, Pages, PostcopyStats, show_ranges};
use super::urgent::{Preempt, Urgent};
use super::wire::{CAP_POSTCOPY, CAP_POSTCOPY_PREEMPT, CAP_POSTCOPY_RESUME, PostcopyRecord};
use crate::image::format::{self, MAX_META_BYTES, MAX_STORE_PAGES};
use crate::transfer::frame::FrameWriter;
use crate::transfer::handshake;
use crate::transfer::receive::{bad, in_store, out_of_place};
use crate::transfer::wire::{Mode, Record, Why};
use crate::transfer::{Class, Conn, TransferError};

/// What a post-copy receive did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PostcopyReport {
    /// What was made (a line).
    pub committed: String,
    /// Pages received (each time one was sent).
    pub pages: u64,
    /// Records received.
    pub records: u64,
    /// Passes seen.
    pub passes: u32,
    /// Pages still to come at the switch.
    pub pending_at_switch: u64,
    /// Seconds from the switch to the last page in.
    pub postcopy_seconds: f64,
    /// Connections the sender made again after a drop.
    pub reconnects: u32,
    /// Mappings of FILE the destination made after the start, registered
    /// when found.
    pub mappings_added: u64,
    /// Whether the sender's urgent channel (a second connection for
    /// requested pages) was taken.
    pub urgent_channel: bool,
    /// Pages that came over the urgent channel.
    pub pages_urgent: u64,
    /// How the pages got in, and the faults' wait.
    #[serde(flatten)]
    pub stats: PostcopyStats,
}

/// What the receiving thread, the fault thread, the filler and the
/// urgent channel's reader share.
pub(super) struct Shared {
    pub(super) state: Mutex<Pages>,
    pub(super) dest: Destination,
    pub(super) writer: Mutex<FrameWriter>,
    pub(super) stop: AtomicBool,
    pub(super) failure: Mutex<Option<String>>,
}

impl Shared {
    pub(super) fn state(&self) -> MutexGuard<'_, Pages> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn fail(&self, m: String) {
        let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        f.get_or_insert(m);
    }

    /// Asks the sender for pages (a failure shows in the receiving loop).
    pub(super) fn ask(&self, asks: &[Ask]) {
        if asks.is_empty() {
            return;
        }
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        for &(first, count) in asks {
            let r = Record::Postcopy(PostcopyRecord::Request {
                store: 0,
                first,
                count,
            });
            let _ = w.record(&r);
        }
        let _ = w.flush();
    }
}

/// Receives one object stream from `conn` into `dest` (see the module
/// doc). On failure the destination keeps its registration and its copy
/// of the userfaultfd (its threads block on the pages that never
/// arrived), and the error names those pages.
pub fn receive(
    conn: Conn,
    psk: Option<&[u8]>,
    dest: Destination,
) -> Result<PostcopyReport, TransferError> {
    receive_with(conn, psk, dest, None)
}

/// [`receive`], waiting for the sender to connect again through
/// `rejoin` when the connection drops after the switch.
pub fn receive_rejoining(
    conn: Conn,
    psk: Option<&[u8]>,
    dest: Destination,
    rejoin: Rejoin,
) -> Result<PostcopyReport, TransferError> {
    receive_with(conn, psk, dest, Some(rejoin))
}

fn receive_with(
    conn: Conn,
    psk: Option<&[u8]>,
    dest: Destination,
    rejoin: Option<Rejoin>,
) -> Result<PostcopyReport, TransferError> {
    let offered = if rejoin.is_some() {
        CAP_POSTCOPY_RESUME | CAP_POSTCOPY_PREEMPT
    } else {
        0
    };
    let main = conn.socket.as_ref().and_then(|s| s.try_clone().ok());
    let mut s = match handshake::server(conn, psk, Mode::Object, offered, CAP_POSTCOPY) {
        Ok(s) => s,
        Err(e) => {
            dest.abandon();
            return Err(e);
        }
    };
    let page = s.page_size as usize;
    if page as u64 != rustix::param::page_size() as u64 {
        dest.abandon();
        let e = TransferError::new(
            Class::Handshake,
            &s.peer,
            format!("the sender's page size {page} is not this machine's"),
        );
        return Err(s.refuse(e));
    }
    let rejoin = rejoin.filter(|_| s.peer_caps & CAP_POSTCOPY_RESUME != 0);
    let id = super::rejoin::transfer_id();
    if rejoin.is_some() {
        let r = Record::Postcopy(PostcopyRecord::Resumable { id });
        if let Err(e) = handshake::send(&mut s, &r) {
            dest.abandon();
            return Err(e);
        }
    }
    let writer = std::mem::replace(&mut s.writer, FrameWriter::new(Box::new(std::io::sink())));
    let held = HeldPages::new(page, dest.hold_bound(), dest.path());
    let sh = Arc::new(Shared {
        state: Mutex::new(Pages::new(page, held)),
        dest,
        writer: Mutex::new(writer),
        stop: AtomicBool::new(false),
        failure: Mutex::new(None),
    });
    let faults = {
        let sh = Arc::clone(&sh);
        std::thread::spawn(move || serve_faults(&sh))
    };
    let mut r = Receiving::new(page as u64);
    let both = CAP_POSTCOPY_RESUME | CAP_POSTCOPY_PREEMPT;
    if s.peer_caps & both == both {
        r.preempt = rejoin
            .as_ref()
            .and_then(|rj| Preempt::new(&rj.listener, psk, id, main));
    }
    let mut result = r.run(&mut s.reader, &sh);
    while let (Some(rj), Err(e)) = (&rejoin, &result) {
        if !r.broke || r.switched.is_none() {
            break;
        }
        let lack = || sh.state().lacking();
        match rj.wait(psk, id, &lack) {
            Ok(mut next) => {
                let w = std::mem::replace(
                    &mut next.writer,
                    FrameWriter::new(Box::new(std::io::sink())),
                );
                *sh.writer.lock().unwrap_or_else(|p| p.into_inner()) = w;
                r.rejoined();
                let asks = sh.state().reask();
                sh.ask(&asks);
                s = next;
                result = r.run(&mut s.reader, &sh);
            }
            Err(m) => {
                let what = format!("{}; {m}", e.what);
                result = Err(TransferError::new(Class::Connection, "", what));
                break;
            }
        }
    }
    sh.stop.store(true, Ordering::Relaxed);
    r.close_urgent();
    let _ = faults.join();
    if let Some(f) = r.filler.take() {
        let _ = f.join();
    }
    let peer = s.peer.clone();
    let sh = match Arc::try_unwrap(sh) {
        Ok(sh) => sh,
        Err(_) => unreachable!("the threads holding it were joined"),
    };
    let mut writer = sh.writer.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut state = sh.state.into_inner().unwrap_or_else(|p| p.into_inner());
    match result {
        Ok(committed) => {
            let mappings_added = sh.dest.mappings_added();
            sh.dest.finish();
            let _ = writer.record(&Record::Ack(true, committed.clone()));
            let _ = writer.flush();
            Ok(PostcopyReport {
                committed,
                pages: r.pages + r.pages_before,
                records: r.records,
                passes: r.passes,
                pending_at_switch: r.pending,
                reconnects: r.rejoins,
                mappings_added,
                urgent_channel: r.urgent_taken,
                pages_urgent: r.pages_urgent,
                postcopy_seconds: r.switched.map_or(0.0, |t| t.elapsed().as_secs_f64()),
                stats: state.report(),
            })
        }
        Err(e) => {
            let what = super::state::lost(&state, &sh.dest, &e.what);
            let target_fd = sh.dest.target_fd();
            sh.dest.abandon();
            let _ = target_fd;
            let e = TransferError { peer, what, ..e };
            if !matches!(e.class, Class::Connection) {
                let _ = writer.record(&Record::Error(e.class, e.what.clone()));
                let _ = writer.flush();
            }
            s.close_after_error();
            Err(e)
        }
    }
}

/// The receiving loop's counts.
struct Receiving {
    page: u64,
    meta: Vec<u8>,
    pages: u64,
    records: u64,
    passes: u32,
    opened: bool,
    pending: u64,
    switched: Option<Instant>,
    filler: Option<std::thread::JoinHandle<()>>,
    /// Pages received over earlier connections.
    pages_before: u64,
    rejoins: u32,
    /// The connection failed (not a record in it).
    broke: bool,
    /// How to take the urgent channel, if both sides can.
    preempt: Option<Preempt>,
    /// The urgent channel while it runs.
    urgent: Option<Urgent>,
    urgent_taken: bool,
    pages_urgent: u64,
}

fn destination(what: String) -> TransferError {
    TransferError::new(Class::Destination, "", what)
}

impl Receiving {
    fn new(page: u64) -> Self {
        Self {
            page,
            meta: Vec::new(),
            pages: 0,
            records: 0,
            passes: 0,
            opened: false,
            pending: 0,
            switched: None,
            filler: None,
            pages_before: 0,
            rejoins: 0,
            broke: false,
            preempt: None,
            urgent: None,
            urgent_taken: false,
            pages_urgent: 0,
        }
    }

    /// Closes the urgent channel, if one runs (after a drop: the sender
    /// opens none on a new connection).
    fn close_urgent(&mut self) {
        if let Some(u) = self.urgent.take() {
            self.pages_urgent += u.close();
        }
    }

    /// A new connection continues the stream: what `COMMIT` counts starts
    /// again (pages, records, metadata).
    fn rejoined(&mut self) {
        self.pages_before += self.pages;
        self.pages = 0;
        self.records = 0;
        self.meta.clear();
        self.rejoins += 1;
        self.broke = false;
        self.close_urgent();
    }

    fn run(
        &mut self,
        reader: &mut crate::transfer::frame::FrameReader,
        sh: &Arc<Shared>,
    ) -> Result<String, TransferError> {
        loop {
            if let Some(f) = sh.failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
                return Err(destination(f));
            }
            // A failure of the stream itself (closed, cut mid-record,
            // unreadable) may be waited out; a wrong record may not.
            let next = reader.next();
            if let Some(f) = sh.failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
                return Err(destination(f)); // the urgent channel's, say
            }
            let next = next.inspect_err(|_| self.broke = true)?;
            let Some(rec) = next else {
                self.broke = true;
                return Err(TransferError::new(
                    Class::Connection,
                    "",
                    "the stream ended before its commit",
                ));
            };
            if let Record::Commit {
                meta_len,
                meta_sum,
                pages,
                records,
            } = rec
            {
                return self.commit(sh, (meta_len, meta_sum, pages, records));
            }
            self.records += 1;
            self.apply(rec, sh)?;
        }
    }

    fn apply(&mut self, rec: Record, sh: &Arc<Shared>) -> Result<(), TransferError> {
        match rec {
            Record::BeginPass(..) => self.passes += 1,
            Record::EndPass(_) => {}
            Record::OpenStore {
                store,
                object,
                pages,
                ..
            } => {
                if self.opened || store != 0 || !object {
                    return Err(bad("--into FILE takes exactly one shared object's pages"));
                }
                self.opened = true;
                self.grow(sh, pages)?;
            }
            Record::GrowStore(store, pages) => {
                let held = self.held(sh, store)?;
                if pages < held {
                    return Err(bad(format!(
                        "store {store} cannot grow from {held} to {pages} pages"
                    )));
                }
                self.grow(sh, pages)?;
            }
            Record::Pages {
                store,
                first,
                sums,
                data,
            } => self.page_data(sh, store, first, &sums, &data)?,
            Record::NotStored {
                store,
                first,
                count,
                why,
            } => {
                self.range(sh, store, first, count)?;
                if !matches!(why, Why::Zero | Why::Hole) {
                    return Err(bad(format!(
                        "pages {first}..{} of the object were left out ({why:?}): a file needs every page",
                        first + count
                    )));
                }
                let mut st = sh.state();
                for p in first..first + count {
                    st.arrived(&sh.dest, p, None).map_err(destination)?;
                }
            }
            Record::Meta(part) => {
                if (self.meta.len() + part.len()) as u64 > MAX_META_BYTES {
                    return Err(bad("metadata larger than an image's bound"));
                }
                self.meta.extend_from_slice(&part);
            }
            Record::Postcopy(p) => self.postcopy(sh, p)?,
            r => return Err(out_of_place(r)),
        }
        Ok(())
    }

    fn postcopy(&mut self, sh: &Arc<Shared>, p: PostcopyRecord) -> Result<(), TransferError> {
        if self.switched.is_some() {
            return Err(bad("a post-copy record after the switch"));
        }
        match p {
            PostcopyRecord::Pending { store, ranges } => {
                for (first, count) in ranges {
                    self.range(sh, store, first, count)?;
                    self.pending += sh.state().pend(first, count);
                }
            }
            PostcopyRecord::Start { pending } => {
                if pending != self.pending {
                    return Err(bad(format!(
                        "the switch counts {pending} pages to come, {} were listed",
                        self.pending
                    )));
                }
                let asks = sh.state().start(&sh.dest).map_err(destination)?;
                sh.ask(&asks);
                self.switched = Some(Instant::now());
                let filler = Arc::clone(sh);
                self.filler = Some(std::thread::spawn(move || fill(&filler)));
            }
            PostcopyRecord::Preempt => {
                let Some(p) = self.preempt.take() else {
                    return Err(bad("an urgent channel the hellos did not agree on"));
                };
                // Without it, requested pages come over the stream.
                self.urgent = p.accept(sh, self.page).ok();
                self.urgent_taken = self.urgent.is_some();
            }
            r @ (PostcopyRecord::Request { .. }
            | PostcopyRecord::Resumable { .. }
            | PostcopyRecord::Reconnect { .. }
            | PostcopyRecord::Lack { .. }
            | PostcopyRecord::Urgent { .. }
            | PostcopyRecord::UrgentEnd { .. }) => {
                return Err(bad(format!(
                    "post-copy record of kind {} from the sender in the stream",
                    r.kind()
                )));
            }
        }
        Ok(())
    }

    fn grow(&self, sh: &Shared, pages: u64) -> Result<(), TransferError> {
        if pages > MAX_STORE_PAGES {
            return Err(bad(format!("{pages} pages, more than {MAX_STORE_PAGES}")));
        }
        sh.dest.size_at_least(pages).map_err(destination)?;
        sh.state().grow(pages);
        Ok(())
    }

    fn held(&self, sh: &Shared, store: u32) -> Result<u64, TransferError> {
        if !self.opened || store != 0 {
            return Err(bad(format!("store {store} was never opened")));
        }
        Ok(sh.state().pages())
    }

    fn range(&self, sh: &Shared, store: u32, first: u64, count: u64) -> Result<(), TransferError> {
        in_store(store, self.held(sh, store)?, first, count)
    }

    fn page_data(
        &mut self,
        sh: &Shared,
        store: u32,
        first: u64,
        sums: &[u64],
        data: &[u8],
    ) -> Result<(), TransferError> {
        let count = sums.len() as u64;
        self.range(sh, store, first, count)?;
        if data.len() as u64 != count * self.page {
            return Err(bad(format!(
                "{count} pages announced, {} bytes of data (page size {})",
                data.len(),
                self.page
            )));
        }
        let pages = data.chunks_exact(self.page as usize).zip(sums);
        for (i, (bytes, sum)) in pages.enumerate() {
            let p = first + i as u64;
            if format::page_sum(0, bytes) != *sum {
                return Err(bad(format!(
                    "page {p} of store {store} does not match its checksum"
                )));
            }
            sh.state()
                .arrived(&sh.dest, p, Some(bytes))
                .map_err(destination)?;
        }
        self.pages += count;
        Ok(())
    }

    fn commit(
        &mut self,
        sh: &Shared,
        (meta_len, meta_sum, pages, records): (u64, u64, u64, u64),
    ) -> Result<String, TransferError> {
        if pages != self.pages || records != self.records {
            return Err(bad(format!(
                "the commit counts {pages} pages in {records} records, {} pages in {} records arrived",
                self.pages, self.records
            )));
        }
        if meta_len != self.meta.len() as u64 || format::file_sum(&self.meta) != meta_sum {
            return Err(bad("the metadata does not match its length and checksum"));
        }
        if self.switched.is_none() {
            return Err(bad("the sender committed without switching to post-copy"));
        }
        if let Some(u) = self.urgent.take() {
            let n = u.finish().map_err(|m| {
                self.broke = true;
                TransferError::new(Class::Connection, "", format!("the urgent channel: {m}"))
            })?;
            self.pages_urgent += n;
        }
        if let Some(f) = self.filler.take() {
            let _ = f.join();
        }
        if let Some(f) = sh.failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(destination(f));
        }
        let st = sh.state();
        if !st.complete() {
            return Err(bad(format!(
                "committed with pages never sent: {}",
                show_ranges(&st.missing())
            )));
        }
        Ok(format!(
            "{} ({} pages, post-copy into process {})",
            sh.dest.path().display(),
            st.pages(),
            sh.dest.pid()
        ))
    }
}
