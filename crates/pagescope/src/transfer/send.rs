//! `send`: the dump's passes through [`StreamSink`], a [`PageSink`] that
//! turns every record into a frame (pages in frames of at most 8 MiB,
//! each page with its sum), written by whichever thread produced it under
//! one lock; a reader thread takes the receiver's frames meanwhile (an
//! `ERROR` stops the dump at its next record; the `ACK` ends it).

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::handshake::{self, Session};
use super::out::{Out, Run};
use super::pageout_sent::{SentStore, page_out_sent};
use super::postcopy;
use super::progress::{Counters, Live, SendEvent};
use super::resume::{self, Have};
pub use super::send_types::{SendError, SendOptions, SendReport};
use super::stores::{self, StoreState};
use super::wire::{self, Mode, Record, kind};
use super::{Class, Conn, TransferError};
use crate::dump::sink::{
    Committed, NotStored, PageSink, PassStart, StoreOwner, StoreRef, store_name,
};
use crate::dump::{DumpError, Hooks};
use crate::image::ImageError;
use crate::image::format::{self, Meta};
use crate::kernel::KernelCaps;
use crate::proc::Target;
use crate::vma::ObjectId;

/// Sends `target`'s memory over `conn` (see the module doc).
pub fn send(
    target: &Target,
    caps: &KernelCaps,
    conn: Conn,
    opts: &SendOptions,
    progress: &mut dyn FnMut(SendEvent<'_>),
) -> Result<SendReport, SendError> {
    send_with(target, caps, conn, opts, Hooks::default(), progress)
}

/// [`send`], with `hooks` run right before the stopped final pass and right
/// after the commit (`qemu::send_and_migrate` pauses the VM at the first,
/// migrates it at the second).
pub(crate) fn send_with<'p>(
    target: &Target,
    caps: &KernelCaps,
    conn: Conn,
    opts: &SendOptions,
    hooks: Hooks<'p>,
    progress: &mut dyn FnMut(SendEvent<'_>),
) -> Result<SendReport, SendError> {
    let object = opts
        .object
        .as_ref()
        .map(|o| stores::resolve(target, o))
        .transpose()?;
    let mode = if object.is_some() {
        Mode::Object
    } else {
        Mode::Image
    };
    let page = u32::try_from(caps.page_size.get()).unwrap_or(4096);
    let start = Instant::now();
    let (dump_opts, extra, stash) = postcopy::plan(opts, mode == Mode::Object)?;
    let mut session = handshake::client(
        conn,
        opts.psk.as_deref(),
        mode,
        page,
        handshake::CAP_RESUME
            | postcopy::wire::CAP_POSTCOPY_RESUME
            | postcopy::wire::CAP_POSTCOPY_PREEMPT,
        extra,
    )?;
    stash.iter().for_each(|s| s.peer_caps(session.peer_caps));
    let have = Arc::new(resume::client(&mut session, target, object, opts.resume)?);
    let shared = Arc::new(Shared::default());
    let mut sink = StreamSink::new(session, object, opts.bandwidth, Arc::clone(&shared));
    sink.have = Arc::clone(&have);
    let sink = postcopy::wrap(sink, stash.as_ref());
    let mut dump_opts = dump_opts;
    dump_opts.only_object = object;
    let mut live = Live::new(&shared.counters, progress);
    let Hooks {
        mut before_stop,
        mut after_commit,
    } = hooks;
    // The hooks reborrowed for as long as the progress closure lives.
    let hooks = Hooks {
        before_stop: before_stop.as_mut().map(|b| &mut **b as _),
        after_commit: after_commit.as_mut().map(|b| &mut **b as _),
    };
    let result = crate::dump::dump_to(target, caps, &dump_opts, sink, hooks, &mut |e| {
        live.dump_event(e);
    });
    let stream_failure = shared
        .failure
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    let dump = match (result, stream_failure) {
        (Ok(d), _) => d,
        (Err(_), Some(e)) => return Err(e.into()),
        (Err(e), None) => return Err(e.into()),
    };
    let totals = shared
        .totals
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let seconds = start.elapsed().as_secs_f64();
    let pageout = page_out_sent(target, caps, &shared.sent, opts);
    Ok(SendReport {
        bytes_sent: totals.bytes,
        pages_sent: totals.pages,
        seconds,
        downtime_s: dump.stopped_s,
        bandwidth_bytes_s: totals.bandwidth,
        precopy_end: dump.precopy_end,
        converged: dump.converged,
        passes: shared.counters.passes(),
        receiver: totals.ack,
        pageout_sent: pageout,
        dump,
        postcopy: stash.map(|s| s.stats()),
        resumed: have.report(),
    })
}

/// What the sink and `send` share.
#[derive(Default)]
pub(super) struct Shared {
    /// The first failure of the stream (the receiver's `ERROR`, a
    /// connection lost).
    pub(super) failure: Mutex<Option<TransferError>>,
    totals: Mutex<Totals>,
    /// What the progress reads as the stream goes.
    counters: Arc<Counters>,
    /// The pages each sent store carried as data, at the commit.
    sent: Mutex<Vec<SentStore>>,
}

#[derive(Clone, Default)]
struct Totals {
    bytes: u64,
    pages: u64,
    records: u64,
    bandwidth: f64,
    ack: String,
}

/// The [`PageSink`] that streams.
pub(super) struct StreamSink {
    out: Mutex<Out>,
    pub(super) acks: Mutex<Receiver<Record>>,
    peer: String,
    pub(super) page: usize,
    object: Option<ObjectId>,
    stores: RwLock<Vec<StoreState>>,
    names: Mutex<HashSet<String>>,
    shared: Arc<Shared>,
    have: Arc<Have>,
}

impl StreamSink {
    fn new(
        s: Session,
        object: Option<ObjectId>,
        bandwidth: Option<u64>,
        shared: Arc<Shared>,
    ) -> Self {
        let Session {
            mut reader,
            writer,
            peer,
            page_size,
            ..
        } = s;
        let (tx, rx) = std::sync::mpsc::channel();
        let failure = Arc::clone(&shared);
        let from = peer.clone();
        // The return path: an ERROR stops the dump, anything else (the
        // ACK) goes to whoever waits for it.
        std::thread::spawn(move || {
            loop {
                match reader.next() {
                    Ok(Some(Record::Error(class, msg))) => {
                        let e = TransferError::new(
                            class,
                            &from,
                            format!("the receiver refused: {msg}"),
                        );
                        set_failure(&failure, e);
                        return;
                    }
                    Ok(Some(r)) => {
                        if tx.send(r).is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        set_failure(&failure, e);
                        return;
                    }
                }
            }
        });
        Self {
            out: Mutex::new(Out::new(writer, bandwidth, Arc::clone(&shared.counters))),
            acks: Mutex::new(rx),
            peer,
            page: page_size as usize,
            object,
            stores: RwLock::new(Vec::new()),
            names: Mutex::new(HashSet::new()),
            shared,
            have: Arc::default(),
        }
    }

    /// Sends one frame, unless the stream already failed.
    fn send(&self, kind: u8, parts: &[&[u8]]) -> Result<(), DumpError> {
        self.check()?;
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let sent = out.frame(kind, parts);
        drop(out);
        sent.map_err(|e| self.failed(e))
    }

    /// The connection failed writing: the stream's failure, as the
    /// dump's error.
    fn failed(&self, e: std::io::Error) -> DumpError {
        let shown = e.to_string();
        set_failure(&self.shared, TransferError::io("write to", &self.peer, e));
        self.lost(shown)
    }

    pub(super) fn record(&self, r: &Record) -> Result<(), DumpError> {
        self.send(r.kind(), &[&r.encode()])
    }

    /// The stream's failure so far, as the dump's error.
    fn check(&self) -> Result<(), DumpError> {
        let failure = self
            .shared
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match failure.as_ref() {
            Some(e) => Err(self.lost(e.what.clone())),
            None => Ok(()),
        }
    }

    pub(super) fn lost(&self, what: String) -> DumpError {
        DumpError::Image(ImageError::Io {
            what: "send pages to",
            path: PathBuf::from(&self.peer),
            source: std::io::Error::other(what),
        })
    }

    pub(super) fn wire(&self, s: &StoreRef) -> Option<u32> {
        let stores = self.stores.read().unwrap_or_else(|p| p.into_inner());
        stores.get(s.index()).and_then(|st| st.wire)
    }

    pub(super) fn mark(&self, s: &StoreRef, first: u64, count: u64, on: bool) {
        let stores = self.stores.read().unwrap_or_else(|p| p.into_inner());
        if let Some(st) = stores.get(s.index()) {
            st.mark(first, count, on);
        }
    }

    /// A unique name for `owner`'s store, as the image writer would give.
    fn name(&self, owner: StoreOwner) -> String {
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        let base = store_name(owner);
        let name = (0..)
            .map(|n| base.nth(n))
            .find(|n| !names.contains(n.as_str()))
            .unwrap_or(base);
        names.insert(name.as_str().to_owned());
        name.as_str().to_owned()
    }

    /// Waits for the receiver's acknowledgement.
    fn ack(&self, wait: Option<Duration>) -> Result<(bool, String), TransferError> {
        let acks = self.acks.lock().unwrap_or_else(|p| p.into_inner());
        let got = loop {
            let got = match wait {
                Some(t) => acks
                    .recv_timeout(t)
                    .map_err(|e| e == RecvTimeoutError::Timeout),
                None => acks.recv().map_err(|_| false),
            };
            // A late post-copy request: every page went out already.
            if !matches!(got, Ok(Record::Postcopy(_))) {
                break got;
            }
        };
        match got {
            Ok(Record::Ack(ok, msg)) => Ok((ok, msg)),
            Ok(r) => Err(TransferError::new(
                Class::BadStream,
                &self.peer,
                format!(
                    "record of kind {} where the acknowledgement was due",
                    r.kind()
                ),
            )),
            Err(_) => {
                let failure = self
                    .shared
                    .failure
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take();
                Err(failure.unwrap_or_else(|| {
                    TransferError::new(
                        Class::Connection,
                        &self.peer,
                        "the connection closed before the receiver acknowledged",
                    )
                }))
            }
        }
    }

    fn finish(&self, meta: &[u8]) -> Result<(), DumpError> {
        for part in meta.chunks(wire::MAX_PAYLOAD) {
            self.send(kind::META, &[part])?;
        }
        let (records, pages) = {
            let out = self.out.lock().unwrap_or_else(|p| p.into_inner());
            (out.records, out.pages)
        };
        self.record(&Record::Commit {
            meta_len: meta.len() as u64,
            meta_sum: format::file_sum(meta),
            pages,
            records,
        })?;
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        out.flush().map_err(|e| self.lost(e.to_string()))?;
        let mut totals = self.shared.totals.lock().unwrap_or_else(|p| p.into_inner());
        (totals.bytes, totals.pages, totals.records) = (out.bytes(), out.pages, out.records);
        totals.bandwidth = out.rate();
        Ok(())
    }
}

fn set_failure(shared: &Shared, e: TransferError) {
    let mut f = shared.failure.lock().unwrap_or_else(|p| p.into_inner());
    if f.is_none() {
        *f = Some(e);
    }
}

impl PageSink for StreamSink {
    fn begin_pass(&self, pass: PassStart) -> Result<(), DumpError> {
        self.out
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .begin_pass(pass.n, pass.stopped);
        self.record(&Record::BeginPass(pass.n, pass.stopped))
    }

    fn open_store(&self, owner: StoreOwner, pages: u64) -> Result<StoreRef, DumpError> {
        let sent = self.object.is_none_or(|id| owner == StoreOwner::Object(id));
        let name = self.name(owner);
        let mut stores = self.stores.write().unwrap_or_else(|p| p.into_inner());
        let wire = if sent {
            let n = stores.iter().filter(|s| s.wire.is_some()).count() as u32;
            self.record(&Record::OpenStore {
                store: n,
                object: matches!(owner, StoreOwner::Object(_)),
                pages,
                name: name.clone(),
            })?;
            self.have.bind(n, &name);
            Some(n)
        } else {
            None
        };
        stores.push(StoreState::new(wire, owner));
        Ok(StoreRef::new(stores.len() - 1, name.into()))
    }

    fn grow_store(&self, store: &StoreRef, pages: u64) -> Result<(), DumpError> {
        match self.wire(store) {
            Some(w) => self.record(&Record::GrowStore(w, pages)),
            None => Ok(()),
        }
    }

    fn write(&self, store: &StoreRef, first: u64, bytes: &[u8]) -> Result<(), DumpError> {
        let Some(w) = self.wire(store) else {
            return Ok(());
        };
        let per_frame = self
            .out
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .frame_pages(self.page, wire::MAX_PAYLOAD);
        for (i, chunk) in bytes.chunks(per_frame * self.page).enumerate() {
            let at = first + (i * per_frame) as u64;
            let sums: Vec<u64> = chunk
                .chunks(self.page)
                .map(|p| format::page_sum(0, p))
                .collect();
            for f in self.have.frames((w, at), &sums, self.page) {
                if f.kind == kind::KEEP {
                    self.send(f.kind, &[&f.head])?;
                    continue;
                }
                let (lo, hi) = (f.data.start / self.page, f.data.end / self.page);
                self.check()?;
                let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
                let sent = out.pages(w, at + lo as u64, &sums[lo..hi], &chunk[f.data], per_frame);
                drop(out);
                sent.map_err(|e| self.failed(e))?;
            }
            self.mark(store, at, sums.len() as u64, true);
        }
        Ok(())
    }

    fn not_stored(&self, store: &StoreRef, first: u64, count: u64, w: NotStored) {
        let Some(wi) = self.wire(store) else { return };
        self.mark(store, first, count, false);
        self.have.forget(wi, first, count);
        let run = Run {
            store: wi,
            first,
            count,
            why: stores::why(w),
        };
        if self.check().is_err() {
            return;
        }
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let sent = out.not_stored(run);
        drop(out);
        // A failure here is seen by the next record that can fail.
        if let Err(e) = sent {
            let _ = self.failed(e);
        }
    }

    fn read_back(&self, _store: &StoreRef, _page: u64, _buf: &mut [u8]) -> bool {
        false
    }

    fn stored(&self, store: &StoreRef) -> u64 {
        let stores = self.stores.read().unwrap_or_else(|p| p.into_inner());
        stores.get(store.index()).map_or(0, StoreState::stored)
    }

    fn end_pass(&self, pass: PassStart) -> Result<(), DumpError> {
        self.record(&Record::EndPass(pass.n))?;
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let pushed = out.end_pass();
        drop(out);
        pushed.map_err(|e| self.failed(e))
    }

    fn bandwidth(&self) -> Option<f64> {
        let rate = self.out.lock().unwrap_or_else(|p| p.into_inner()).rate();
        Some(rate)
    }

    fn commit(self: Box<Self>, meta: Meta) -> Result<Committed, DumpError> {
        if let Some(id) = self.object {
            let stores = self.stores.read().unwrap_or_else(|p| p.into_inner());
            if stores.iter().all(|s| s.wire.is_none()) {
                let what = format!(
                    "shared object {}:{} in the process's memory",
                    id.dev, id.inode
                );
                drop(stores);
                self.abort_with(&what);
                return Err(DumpError::Image(ImageError::NotFound { what }));
            }
        }
        let bytes = serde_json::to_vec(&meta).map_err(|e| self.lost(e.to_string()))?;
        self.finish(&bytes)?;
        match self.ack(None) {
            Ok((true, msg)) => {
                *self.shared.sent.lock().unwrap_or_else(|p| p.into_inner()) = self.sent_stores();
                self.shared
                    .totals
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .ack = msg;
                Ok(Committed {
                    image_id: String::new(),
                    generation: 0,
                })
            }
            Ok((false, msg)) => {
                let e = TransferError::new(
                    Class::BadStream,
                    &self.peer,
                    format!("the receiver did not commit: {msg}"),
                );
                set_failure(&self.shared, e);
                Err(self.lost(msg))
            }
            Err(e) => {
                let shown = e.what.clone();
                set_failure(&self.shared, e);
                Err(self.lost(shown))
            }
        }
    }

    fn abort(self: Box<Self>, why: &DumpError) {
        self.abort_with(&format!("{why}"));
    }
}

impl StreamSink {
    /// The pages each store on the wire carried as data.
    fn sent_stores(&self) -> Vec<SentStore> {
        let stores = self.stores.read().unwrap_or_else(|p| p.into_inner());
        let sent = stores.iter().filter(|s| s.wire.is_some());
        sent.map(StoreState::sent).collect()
    }

    /// What the sink and `send` share (post-copy's reconnect).
    pub(super) fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    /// Sends what is buffered.
    pub(super) fn flush(&self) -> Result<(), DumpError> {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        out.flush().map_err(|e| self.lost(e.to_string()))
    }

    /// Tells the receiver to discard everything, and waits a little for
    /// its acknowledgement.
    fn abort_with(&self, why: &str) {
        if self.record(&Record::Abort(why.to_owned())).is_ok() {
            let flushed = self.out.lock().unwrap_or_else(|p| p.into_inner()).flush();
            if flushed.is_ok() {
                let _ = self.ack(Some(Duration::from_secs(10)));
            }
        }
    }
}
