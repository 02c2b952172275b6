//! The sender's side of post-copy (`send --postcopy-after N`): after N
//! pre-copy passes (at most `--max-iterations`; fewer when the written set
//! stops shrinking by a tenth per pass, i.e. the writer outpaces the measured bandwidth and
//! pre-copy cannot converge, or when the rest fits in `--max-downtime`) the dump's stopped pass runs as usual,
//! but the pages it reads are kept here instead of sent (the source
//! stays stopped: post-copy implies `--leave-stopped`); at its end the
//! receiver learns which pages are still to come (`PENDING`, `START`)
//! and its destination runs. Then, at the commit, the kept pages go out:
//! the ones the receiver asks for first (`REQUEST`, read from the return
//! path between frames), the rest in page order in growing chunks; then
//! the usual metadata, `COMMIT` and the receiver's `ACK` once every page
//! is in. Every kept page stays kept until that `ACK`: if the connection
//! drops after the switch, `reconnect.rs` connects again and sends what
//! the receiver still lacks. When both sides can, requested pages go over
//! a second connection of their own (`preempt.rs`), so they never queue
//! behind the background pages.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::wire::{MAX_RANGES, PostcopyRecord};
use crate::dump::sink::{Committed, NotStored, PageSink, PassStart, StoreOwner, StoreRef};
use crate::dump::{DumpError, DumpOptions};
use crate::image::format::Meta;
use crate::transfer::send::StreamSink;
use crate::transfer::wire::Record;
use crate::transfer::{Class, SendOptions, TransferError};

/// Sends one run of pages of a store: first page, bytes.
pub(super) type SendRun<'a> = dyn FnMut(&StoreRef, u64, &[u8]) -> Result<(), DumpError> + 'a;

/// Background chunks grow from this many pages ...
pub(super) const FIRST_CHUNK: usize = 16;
/// ... up to this many (1 MiB of 4 KiB pages: a request waits behind one
/// such frame at most).
pub(super) const MAX_CHUNK: usize = 256;

/// What the post-copy phase of a send did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PostcopySendStats {
    /// Pages kept at the stop, still to send.
    pub pending_at_switch: u64,
    /// Pages sent because the receiver asked.
    pub pages_requested: u64,
    /// Pages sent in order.
    pub pages_background: u64,
    /// Requests received.
    pub requests: u64,
    /// Seconds from the switch until every kept page was sent.
    pub seconds: f64,
    /// Connections made again after a drop during post-copy.
    pub reconnects: u64,
    /// Pages sent again because the receiver lacked them after a drop.
    pub pages_resent: u64,
    /// Whether requested pages went over the urgent channel (a second
    /// connection) rather than the stream.
    pub urgent_channel: bool,
    /// Pages a faulting thread asked for after the background had taken
    /// them, sent again over the urgent channel.
    pub pages_urgent_again: u64,
    /// Why the urgent channel could not be opened, if it was tried.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub urgent_refused: Option<String>,
}

/// Where and how long a post-copy sender reconnects after a drop.
#[derive(Clone, Debug)]
pub struct Reconnect {
    /// The receiver's address (`send --to`).
    pub to: String,
    /// How long to keep trying after each drop (`--reconnect-wait`).
    pub wait: Duration,
    /// Requested pages over a second connection to `to`, the urgent
    /// channel (`--postcopy-preempt`; `preempt.rs`).
    pub preempt: bool,
}

/// A send's plan with `--postcopy-after N`: the dump's options (at most
/// N pre-copy passes, the source left stopped), the capability its hello
/// requires, and the stash of the stopped pass. Without it: the options
/// as they are. Refused without `--object` (`object`).
pub(in crate::transfer) fn plan(
    opts: &SendOptions,
    object: bool,
) -> Result<(DumpOptions, u64, Option<Arc<Stash>>), TransferError> {
    match opts.postcopy_after {
        None => Ok((opts.dump.clone(), 0, None)),
        Some(_) if !object => Err(TransferError::new(
            Class::Handshake,
            "",
            "post-copy sends one shared object: --postcopy-after needs --object",
        )),
        Some(n) => Ok((
            DumpOptions {
                max_iterations: n.min(opts.dump.max_iterations),
                stop_when_stalled: true,
                leave_stopped: true,
                ..opts.dump.clone()
            },
            super::wire::CAP_POSTCOPY,
            Some(Arc::new(Stash {
                link: opts
                    .postcopy_reconnect
                    .clone()
                    .map(|r| super::reconnect::Link {
                        to: r,
                        psk: opts.psk.clone(),
                    }),
                ..Stash::default()
            })),
        )),
    }
}

/// The sink a send writes into: `sink` itself, or with a stash, `sink`
/// behind the post-copy layer.
pub(in crate::transfer) fn wrap(sink: StreamSink, stash: Option<&Arc<Stash>>) -> Box<dyn PageSink> {
    match stash {
        Some(stash) => Box::new(PostcopySink {
            inner: sink,
            stash: Arc::clone(stash),
        }),
        None => Box::new(sink),
    }
}

/// The stream sink with the stopped pass kept back and served at the
/// commit.
struct PostcopySink {
    inner: StreamSink,
    stash: Arc<Stash>,
}

impl PageSink for PostcopySink {
    fn begin_pass(&self, pass: PassStart) -> Result<(), DumpError> {
        self.stash.begin_pass(pass.stopped);
        self.inner.begin_pass(pass)
    }

    fn open_store(&self, owner: StoreOwner, pages: u64) -> Result<StoreRef, DumpError> {
        self.inner.open_store(owner, pages)
    }

    fn grow_store(&self, store: &StoreRef, pages: u64) -> Result<(), DumpError> {
        self.inner.grow_store(store, pages)
    }

    fn write(&self, store: &StoreRef, first: u64, bytes: &[u8]) -> Result<(), DumpError> {
        let page = self.inner.page;
        let sent = self.inner.wire(store).is_some();
        if sent && self.stash.put(store, first, bytes, page) {
            self.inner
                .mark(store, first, (bytes.len() / page) as u64, true);
            return Ok(());
        }
        self.inner.write(store, first, bytes)
    }

    fn not_stored(&self, store: &StoreRef, first: u64, count: u64, why: NotStored) {
        if self.inner.wire(store).is_some() {
            self.stash.forget(first, count);
        }
        self.inner.not_stored(store, first, count, why);
    }

    fn read_back(&self, store: &StoreRef, page: u64, buf: &mut [u8]) -> bool {
        self.inner.read_back(store, page, buf)
    }

    fn stored(&self, store: &StoreRef) -> u64 {
        self.inner.stored(store)
    }

    fn end_pass(&self, pass: PassStart) -> Result<(), DumpError> {
        self.inner.end_pass(pass)?;
        let mut records = self.stash.switch(pass.stopped, 0);
        let start = records.pop();
        for r in &records {
            self.inner.record(r)?;
        }
        if let Some(start) = start {
            let inner = &self.inner;
            let announce = || inner.record(&Record::Postcopy(PostcopyRecord::Preempt));
            self.stash
                .open_urgent(&inner.acks, &announce, &|| inner.flush())?;
            inner.record(&start)?;
        }
        self.inner.flush()
    }

    fn commit(self: Box<Self>, meta: Meta) -> Result<Committed, DumpError> {
        let Self { inner, stash } = *self;
        let shared = inner.shared();
        let mut send = |s: &StoreRef, first: u64, b: &[u8]| {
            inner.write(s, first, b).and_then(|()| inner.flush())
        };
        let served = stash.serve(&mut send, &inner.acks, &|m| inner.lost(m));
        let failed = match served {
            Ok(()) => match Box::new(inner).commit(meta.clone()) {
                Ok(c) => return Ok(c),
                Err(e) => e,
            },
            Err(e) => e,
        };
        stash.rejoin(&shared, &meta, failed)
    }

    fn abort(self: Box<Self>, why: &DumpError) {
        Box::new(self.inner).abort(why);
    }
}

/// The pages of the stopped pass, kept until the receiver acknowledged.
#[derive(Debug, Default)]
pub(crate) struct Stash {
    active: AtomicBool,
    pub(super) pages: Mutex<BTreeMap<u64, Box<[u8]>>>,
    /// The kept pages still to send on this connection.
    pub(super) unsent: Mutex<BTreeSet<u64>>,
    pub(super) store: Mutex<Option<StoreRef>>,
    pub(super) stats: Mutex<PostcopySendStats>,
    /// The transfer's id from the receiver's `RESUMABLE`, if it sent one.
    pub(super) id: Mutex<Option<u64>>,
    /// Where to reconnect after a drop.
    pub(super) link: Option<super::reconnect::Link>,
    /// The capabilities of the receiver's hello.
    pub(super) peer_caps: AtomicU64,
    /// The urgent channel, from the switch until it is served.
    pub(super) urgent: Mutex<Option<crate::transfer::frame::FrameWriter>>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Stash {
    /// The receiver's hello named `caps`.
    pub(crate) fn peer_caps(&self, caps: u64) {
        self.peer_caps.store(caps, Ordering::Relaxed);
    }

    /// A pass begins: the stopped one is kept, not sent.
    fn begin_pass(&self, stopped: bool) {
        self.active.store(stopped, Ordering::Relaxed);
    }

    /// Keeps pages `first..` of `store` (`bytes`, whole pages of `page`
    /// bytes) if this is the stopped pass; whether it took them.
    fn put(&self, store: &StoreRef, first: u64, bytes: &[u8], page: usize) -> bool {
        if !self.active.load(Ordering::Relaxed) {
            return false;
        }
        lock(&self.store).get_or_insert_with(|| store.clone());
        let mut pages = lock(&self.pages);
        for (i, p) in bytes.chunks(page).enumerate() {
            pages.insert(first + i as u64, p.into());
        }
        true
    }

    /// Pages `first..first + count` are zero or holes now: not kept.
    fn forget(&self, first: u64, count: u64) {
        if self.active.load(Ordering::Relaxed) {
            let mut pages = lock(&self.pages);
            for p in first..first + count {
                pages.remove(&p);
            }
        }
    }

    /// At the end of the stopped pass: the records of the switch (the
    /// pending ranges of store `wire`, then `START`). None for other
    /// passes.
    fn switch(&self, stopped: bool, wire: u32) -> Vec<Record> {
        if !stopped {
            return Vec::new();
        }
        self.active.store(false, Ordering::Relaxed);
        let pages = lock(&self.pages);
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for &p in pages.keys() {
            match ranges.last_mut() {
                Some((first, count)) if *first + *count == p => *count += 1,
                _ => ranges.push((p, 1)),
            }
        }
        let mut out: Vec<Record> = ranges
            .chunks(MAX_RANGES)
            .map(|c| {
                Record::Postcopy(PostcopyRecord::Pending {
                    store: wire,
                    ranges: c.to_vec(),
                })
            })
            .collect();
        out.push(Record::Postcopy(PostcopyRecord::Start {
            pending: pages.len() as u64,
        }));
        lock(&self.stats).pending_at_switch = pages.len() as u64;
        *lock(&self.unsent) = pages.keys().copied().collect();
        out
    }

    /// Sends every kept page through `send` (asked-for ones first,
    /// requests read from `requests`), a run at a time.
    pub(super) fn serve(
        &self,
        send: &mut SendRun<'_>,
        requests: &Mutex<Receiver<Record>>,
        lost: &dyn Fn(String) -> DumpError,
    ) -> Result<(), DumpError> {
        let Some(store) = lock(&self.store).clone() else {
            return Ok(());
        };
        if let Some(w) = lock(&self.urgent).take() {
            return self.serve_preempted(&store, w, send, requests, lost);
        }
        let t0 = Instant::now();
        let mut queue = VecDeque::new();
        let mut chunk = FIRST_CHUNK;
        loop {
            while let Some(r) = self.next_request(&lock(requests)).map_err(&lost)? {
                lock(&self.stats).requests += 1;
                queue.push_back(r);
            }
            let (run, asked) = match queue.pop_front() {
                Some((first, count)) => (self.take(first, count, usize::MAX), true),
                None => {
                    let run = self.take(0, u64::MAX, chunk);
                    if run.is_empty() {
                        break;
                    }
                    chunk = (chunk * 2).min(MAX_CHUNK);
                    (run, false)
                }
            };
            self.send_runs(&store, run, asked, send)?;
        }
        lock(&self.stats).seconds = t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// Takes up to `max` unsent pages in `first..first + count`, in
    /// order (a copy: the page stays kept until the `ACK`).
    pub(super) fn take(&self, first: u64, count: u64, max: usize) -> Vec<(u64, Box<[u8]>)> {
        let mut unsent = lock(&self.unsent);
        let pages = lock(&self.pages);
        let end = first.saturating_add(count);
        let keys: Vec<u64> = unsent.range(first..end).copied().take(max).collect();
        keys.into_iter()
            .filter_map(|k| {
                unsent.remove(&k);
                pages.get(&k).map(|v| (k, v.clone()))
            })
            .collect()
    }

    /// After a drop: the receiver lacks `lack` (ranges); they become the
    /// pages to send. How many of them had been sent already; an error
    /// names a page this sender never kept.
    pub(super) fn lacking(&self, lack: &[(u64, u64)]) -> Result<u64, String> {
        let pages = lock(&self.pages);
        let mut unsent = lock(&self.unsent);
        let mut again = 0;
        let mut next = BTreeSet::new();
        for &(first, count) in lack {
            for p in first..first.saturating_add(count) {
                if !pages.contains_key(&p) {
                    return Err(format!(
                        "the receiver lacks page {p}, which was final at the switch"
                    ));
                }
                again += u64::from(!unsent.contains(&p));
                next.insert(p);
            }
        }
        *unsent = next;
        Ok(again)
    }

    /// Sends `pages` as runs of consecutive pages, counted as `asked`
    /// or not as each goes; on a failure the pages not sent are unsent
    /// again.
    pub(super) fn send_runs(
        &self,
        store: &StoreRef,
        pages: Vec<(u64, Box<[u8]>)>,
        asked: bool,
        send: &mut SendRun<'_>,
    ) -> Result<(), DumpError> {
        let mut runs: Vec<(u64, u64, Vec<u8>)> = Vec::new();
        for (p, data) in pages {
            match runs.last_mut() {
                Some((first, count, buf)) if *first + *count == p => {
                    buf.extend_from_slice(&data);
                    *count += 1;
                }
                _ => runs.push((p, 1, data.into_vec())),
            }
        }
        for (i, (first, count, buf)) in runs.iter().enumerate() {
            if let Err(e) = send(store, *first, buf) {
                let mut unsent = lock(&self.unsent);
                for (first, count, _) in &runs[i..] {
                    unsent.extend(*first..*first + *count);
                }
                return Err(e);
            }
            let mut st = lock(&self.stats);
            if asked {
                st.pages_requested += count;
            } else {
                st.pages_background += count;
            }
        }
        Ok(())
    }

    /// What the post-copy phase did.
    pub(crate) fn stats(&self) -> PostcopySendStats {
        lock(&self.stats).clone()
    }
}

impl Stash {
    /// The receiver's next request, if one is waiting: `(first, count)`
    /// (its `RESUMABLE` is kept on the way).
    pub(super) fn next_request(&self, rx: &Receiver<Record>) -> Result<Option<(u64, u64)>, String> {
        loop {
            match rx.recv_timeout(Duration::ZERO) {
                Ok(Record::Postcopy(PostcopyRecord::Request { first, count, .. })) => {
                    return Ok(Some((first, count)));
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
                Err(RecvTimeoutError::Timeout) => return Ok(None),
                Err(RecvTimeoutError::Disconnected) => {
                    return Err("the receiver closed the connection during post-copy".into());
                }
            }
        }
    }
}
