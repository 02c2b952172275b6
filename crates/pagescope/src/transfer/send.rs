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

use super::frame::FrameWriter;
use super::handshake::{self, Session};
use super::wire::{self, Mode, Record, Why, kind};
use super::{Class, Conn, TransferError};
use crate::dump::sink::{
    Committed, NotStored, PageSink, PassStart, StoreOwner, StoreRef, store_name,
};
use crate::dump::{DumpError, DumpEvent, DumpOptions, DumpReport};
use crate::image::ImageError;
use crate::image::format::{self, Meta};
use crate::kernel::KernelCaps;
use crate::proc::Target;
use crate::proc::maps::DevId;
use crate::vma::ObjectId;

/// The one shared object `--object` sends.
#[derive(Clone, Debug)]
pub enum ObjectChoice {
    /// A file (tmpfs, hugetlbfs, /dev/shm) by path.
    Path(PathBuf),
    /// A memfd the process maps, by name (`memfd:NAME`).
    Memfd(String),
}

/// How to send.
#[derive(Clone, Debug)]
pub struct SendOptions {
    /// The passes (`out` only names the destination in the report).
    pub dump: DumpOptions,
    /// Only this shared object's pages (to `receive --into FILE`).
    pub object: Option<ObjectChoice>,
    /// The pre-shared key.
    pub psk: Option<Vec<u8>>,
    /// Bytes per second at most.
    pub bandwidth: Option<u64>,
}

/// What a send did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SendReport {
    /// The dump's passes.
    pub dump: DumpReport,
    /// Bytes written to the stream.
    pub bytes_sent: u64,
    /// Pages sent (a page sent in several passes counts each time).
    pub pages_sent: u64,
    /// Seconds from the handshake to the acknowledgement.
    pub seconds: f64,
    /// The receiver's acknowledgement.
    pub receiver: String,
}

/// A send's failure: the stream's, or the dump's own.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The stream failed or the receiver refused.
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// The dump failed (the receiver was told to discard everything).
    #[error(transparent)]
    Dump(#[from] DumpError),
}

/// Sends `target`'s memory over `conn` (see the module doc).
pub fn send(
    target: &Target,
    caps: &KernelCaps,
    conn: Conn,
    opts: &SendOptions,
    progress: &mut dyn FnMut(DumpEvent<'_>),
) -> Result<SendReport, SendError> {
    send_with(target, caps, conn, opts, None, progress)
}

/// [`send`], with `before_stop` run right before the stopped final pass
/// (`qemu::send_and_migrate` pauses the VM there).
pub(crate) fn send_with<'p>(
    target: &Target,
    caps: &KernelCaps,
    conn: Conn,
    opts: &SendOptions,
    before_stop: Option<crate::dump::BeforeStop<'p>>,
    progress: &'p mut dyn FnMut(DumpEvent<'_>),
) -> Result<SendReport, SendError> {
    let object = opts
        .object
        .as_ref()
        .map(|o| resolve(target, o))
        .transpose()?;
    let mode = if object.is_some() {
        Mode::Object
    } else {
        Mode::Image
    };
    let page = u32::try_from(caps.page_size.get()).unwrap_or(4096);
    let start = Instant::now();
    let session = handshake::client(conn, opts.psk.as_deref(), mode, page)?;
    let shared = Arc::new(Shared::default());
    let sink = Box::new(StreamSink::new(
        session,
        object,
        opts.bandwidth,
        Arc::clone(&shared),
    ));
    let mut dump = opts.dump.clone();
    dump.only_object = object;
    let result = crate::dump::dump_to(target, caps, &dump, sink, before_stop, progress);
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
    Ok(SendReport {
        dump,
        bytes_sent: totals.bytes,
        pages_sent: totals.pages,
        seconds: start.elapsed().as_secs_f64(),
        receiver: totals.ack,
    })
}

/// The object `choice` names, as the process maps it.
fn resolve(target: &Target, choice: &ObjectChoice) -> Result<ObjectId, DumpError> {
    use std::os::unix::fs::MetadataExt;
    let not_found = |what: String| DumpError::Image(ImageError::NotFound { what });
    match choice {
        ObjectChoice::Path(p) => {
            let m =
                std::fs::metadata(p).map_err(|_| not_found(format!("object {}", p.display())))?;
            Ok(ObjectId {
                dev: DevId::from_st_dev(m.dev()),
                inode: m.ino(),
            })
        }
        ObjectChoice::Memfd(name) => {
            let want = format!("/memfd:{name}");
            let maps = target.maps()?;
            maps.iter()
                .find(|e| {
                    let p = e.path.display();
                    p == want || p == format!("{want} (deleted)")
                })
                .map(|e| ObjectId {
                    dev: e.dev,
                    inode: e.inode,
                })
                .ok_or_else(|| {
                    not_found(format!("memfd:{name} mapped by process {}", target.pid()))
                })
        }
    }
}

/// What the sink and `send` share.
#[derive(Default)]
struct Shared {
    /// The first failure of the stream (the receiver's `ERROR`, a
    /// connection lost).
    failure: Mutex<Option<TransferError>>,
    totals: Mutex<Totals>,
}

#[derive(Clone, Default)]
struct Totals {
    bytes: u64,
    pages: u64,
    records: u64,
    ack: String,
}

/// The frames going out, and the pacing of `--bandwidth`.
struct Out {
    writer: FrameWriter,
    records: u64,
    pages: u64,
    started: Instant,
    bandwidth: Option<u64>,
}

impl Out {
    fn frame(&mut self, kind: u8, parts: &[&[u8]]) -> std::io::Result<()> {
        self.writer.frame(kind, parts)?;
        self.records += 1;
        if let Some(rate) = self.bandwidth.filter(|&r| r > 0) {
            let due = Duration::from_secs_f64(self.writer.bytes as f64 / rate as f64);
            let spent = self.started.elapsed();
            if due > spent {
                self.writer.flush()?;
                std::thread::sleep(due - spent);
            }
        }
        Ok(())
    }
}

/// A store as the stream knows it.
struct StoreState {
    /// Its index on the wire; `None`: not sent (not the chosen object).
    wire: Option<u32>,
    /// Which pages were sent last as data (for [`PageSink::stored`]).
    stored: Mutex<Vec<u64>>,
}

/// The [`PageSink`] that streams.
struct StreamSink {
    out: Mutex<Out>,
    acks: Mutex<Receiver<Record>>,
    peer: String,
    page: usize,
    object: Option<ObjectId>,
    stores: RwLock<Vec<StoreState>>,
    names: Mutex<HashSet<String>>,
    shared: Arc<Shared>,
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
            out: Mutex::new(Out {
                writer,
                records: 0,
                pages: 0,
                started: Instant::now(),
                bandwidth,
            }),
            acks: Mutex::new(rx),
            peer,
            page: page_size as usize,
            object,
            stores: RwLock::new(Vec::new()),
            names: Mutex::new(HashSet::new()),
            shared,
        }
    }

    /// Sends one frame, unless the stream already failed.
    fn send(&self, kind: u8, parts: &[&[u8]], pages: u64) -> Result<(), DumpError> {
        self.check()?;
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        out.pages += pages;
        out.frame(kind, parts).map_err(|e| {
            let shown = e.to_string();
            set_failure(&self.shared, TransferError::io("write to", &self.peer, e));
            self.lost(shown)
        })
    }

    fn record(&self, r: &Record) -> Result<(), DumpError> {
        self.send(r.kind(), &[&r.encode()], 0)
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

    fn lost(&self, what: String) -> DumpError {
        DumpError::Image(ImageError::Io {
            what: "send pages to",
            path: PathBuf::from(&self.peer),
            source: std::io::Error::other(what),
        })
    }

    fn wire(&self, s: &StoreRef) -> Option<u32> {
        let stores = self.stores.read().unwrap_or_else(|p| p.into_inner());
        stores.get(s.index()).and_then(|st| st.wire)
    }

    fn mark(&self, s: &StoreRef, first: u64, count: u64, on: bool) {
        let stores = self.stores.read().unwrap_or_else(|p| p.into_inner());
        let Some(st) = stores.get(s.index()) else {
            return;
        };
        let mut bits = st.stored.lock().unwrap_or_else(|p| p.into_inner());
        for p in first..first + count {
            let (w, b) = ((p / 64) as usize, p % 64);
            if w >= bits.len() {
                bits.resize(w + 1, 0);
            }
            if on {
                bits[w] |= 1 << b;
            } else {
                bits[w] &= !(1 << b);
            }
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
        let got = match wait {
            Some(t) => acks
                .recv_timeout(t)
                .map_err(|e| e == RecvTimeoutError::Timeout),
            None => acks.recv().map_err(|_| false),
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
            self.send(kind::META, &[part], 0)?;
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
        out.writer.flush().map_err(|e| self.lost(e.to_string()))?;
        let mut totals = self.shared.totals.lock().unwrap_or_else(|p| p.into_inner());
        (totals.bytes, totals.pages, totals.records) = (out.writer.bytes, out.pages, out.records);
        Ok(())
    }
}

fn set_failure(shared: &Shared, e: TransferError) {
    let mut f = shared.failure.lock().unwrap_or_else(|p| p.into_inner());
    if f.is_none() {
        *f = Some(e);
    }
}

fn why(w: NotStored) -> Why {
    match w {
        NotStored::Zero => Why::Zero,
        NotStored::Hole => Why::Hole,
        NotStored::InParent => Why::InParent,
        NotStored::Swapped => Why::Swapped,
        NotStored::Object => Why::Object,
        NotStored::Dedup(d) => Why::Dedup(d.pid, d.vma_start, d.page),
    }
}

impl PageSink for StreamSink {
    fn begin_pass(&self, pass: PassStart) -> Result<(), DumpError> {
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
            Some(n)
        } else {
            None
        };
        stores.push(StoreState {
            wire,
            stored: Mutex::new(Vec::new()),
        });
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
        let per_frame = (wire::MAX_PAYLOAD / self.page).max(1);
        for (i, chunk) in bytes.chunks(per_frame * self.page).enumerate() {
            let at = first + (i * per_frame) as u64;
            let sums: Vec<u64> = chunk
                .chunks(self.page)
                .map(|p| format::page_sum(0, p))
                .collect();
            let head = wire::pages_header(w, at, &sums);
            self.send(kind::PAGES, &[&head, chunk], sums.len() as u64)?;
            self.mark(store, at, sums.len() as u64, true);
        }
        Ok(())
    }

    fn not_stored(&self, store: &StoreRef, first: u64, count: u64, w: NotStored) {
        let Some(wi) = self.wire(store) else { return };
        self.mark(store, first, count, false);
        let r = Record::NotStored {
            store: wi,
            first,
            count,
            why: why(w),
        };
        // A failure here is seen by the next record that can fail.
        let _ = self.record(&r);
    }

    fn read_back(&self, _store: &StoreRef, _page: u64, _buf: &mut [u8]) -> bool {
        false
    }

    fn stored(&self, store: &StoreRef) -> u64 {
        let stores = self.stores.read().unwrap_or_else(|p| p.into_inner());
        stores.get(store.index()).map_or(0, |st| {
            let bits = st.stored.lock().unwrap_or_else(|p| p.into_inner());
            bits.iter().map(|w| u64::from(w.count_ones())).sum()
        })
    }

    fn end_pass(&self, pass: PassStart) -> Result<(), DumpError> {
        self.record(&Record::EndPass(pass.n))
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
    /// Tells the receiver to discard everything, and waits a little for
    /// its acknowledgement.
    fn abort_with(&self, why: &str) {
        if self.record(&Record::Abort(why.to_owned())).is_ok() {
            let flushed = self
                .out
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .writer
                .flush();
            if flushed.is_ok() {
                let _ = self.ack(Some(Duration::from_secs(10)));
            }
        }
    }
}
