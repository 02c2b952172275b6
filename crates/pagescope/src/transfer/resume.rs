//! Resuming a transfer after a dropped connection (`send --resume`,
//! `receive --resume`; `docs/stream-format.md`, "Resume").
//!
//! Right after the handshake, when the receiver's hello has capability
//! `RESUME` (it keeps partial state), the sender says who it is and
//! whether it continues (`RESUME`); the receiver refuses a partial state
//! of another sender, discards it for a fresh transfer, or answers with
//! the sums of every page it holds (`HAVE` ... `HAVE_END`). The sender
//! then sends `KEEP` (the sums only) instead of `PAGES` for every page of
//! its full pass whose sum the receiver holds for that store and page;
//! a page the stream neither sends, keeps nor clears is not in the
//! result. The receiver's side of the records is [`Resuming`]; its files
//! are `partial.rs`'s.
//!
//! No kernel interface of its own (`/proc/sys/kernel/random/boot_id`
//! names the sender's boot).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::handshake::{CAP_RESUME, Session, expect, send, unexpected};
use super::partial::{self, Held, Keep, Track};
use super::receive::Target as Into;
use super::wire::{self, Record, kind};
use super::{Class, TransferError};
use crate::image::format::MAX_STORE_PAGES;
use crate::proc::Target;
use crate::vma::ObjectId;

/// Sums in one `HAVE` record at most (512 KiB).
const HAVE_CHUNK: usize = 1 << 16;
/// An identity line at most.
const MAX_IDENTITY: usize = 512;
/// Bytes received between two syncs of the partial state.
const SYNC_EVERY: u64 = 64 << 20;

/// Who a sender is: the boot of its host, and the process (its pid and
/// start time) or, with `--object`, the shared object (which may outlive
/// any process). A partial state of another identity is never merged.
fn identity(target: &Target, object: Option<ObjectId>) -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|b| b.trim().to_owned())
        .unwrap_or_default();
    match object {
        Some(id) => format!("boot {boot} object {}:{}", id.dev, id.inode),
        None => {
            let started = target.stat().map(|s| s.start_time).unwrap_or(0);
            format!("boot {boot} process {} started {started}", target.pid())
        }
    }
}

/// What `send --resume` spared.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Resumed {
    /// Pages the receiver held from the interrupted transfer.
    pub pages_held: u64,
    /// Pages not sent because the receiver held them, unchanged.
    pub pages_kept: u64,
    /// Why nothing was resumed although `--resume` asked for it.
    pub note: Option<String>,
}

/// What the receiver holds, by store name (the sender's side).
#[derive(Debug, Default)]
pub(super) struct Have {
    stores: std::sync::Mutex<HashMap<String, Arc<HaveStore>>>,
    /// By wire store index, once the stream opened them.
    bound: std::sync::RwLock<Vec<Option<Arc<HaveStore>>>>,
    /// Pages kept (not sent) thanks to the receiver's partial state.
    kept: AtomicU64,
    /// Pages the receiver held.
    held: u64,
    /// Why nothing was resumed although `--resume` asked for it.
    note: Option<String>,
}

/// One store's sums at the receiver; each is used once (the first record
/// of a page in this stream replaces what the receiver held).
#[derive(Debug)]
struct HaveStore(Vec<AtomicU64>);

/// A run of a chunk of pages: kept (`KEEP`) or sent (`PAGES`).
struct Part {
    /// Whether the receiver holds these pages already.
    keep: bool,
    /// Their index in the chunk.
    range: std::ops::Range<usize>,
}

/// One frame for a run of a chunk of pages.
pub(super) struct Frame {
    /// `KEEP` or `PAGES`.
    pub kind: u8,
    /// The record up to its page data.
    pub head: Vec<u8>,
    /// The chunk's bytes it carries (none for `KEEP`).
    pub data: std::ops::Range<usize>,
}

impl Have {
    /// The report of what was spared.
    pub fn report(&self) -> Resumed {
        Resumed {
            pages_held: self.held,
            pages_kept: self.kept.load(Ordering::Relaxed),
            note: self.note.clone(),
        }
    }

    /// Wire store `store` is named `name`: it takes that name's sums (a
    /// later store of that name holds none).
    pub fn bind(&self, store: u32, name: &str) {
        let mut stores = self.stores.lock().unwrap_or_else(|p| p.into_inner());
        let held = stores.remove(name);
        let mut bound = self.bound.write().unwrap_or_else(|p| p.into_inner());
        if bound.len() <= store as usize {
            bound.resize(store as usize + 1, None);
        }
        bound[store as usize] = held;
    }

    fn held(&self, store: u32) -> Option<Arc<HaveStore>> {
        let bound = self.bound.read().unwrap_or_else(|p| p.into_inner());
        bound.get(store as usize).cloned().flatten()
    }

    /// Pages `first..first + count` of wire store `store` were cleared in
    /// this stream.
    pub fn forget(&self, store: u32, first: u64, count: u64) {
        if let Some(h) = self.held(store) {
            h.forget(first, count);
        }
    }

    /// The frames for pages `first..` of wire store `store` (their bytes
    /// a chunk of `page`-byte pages, their sums `sums`): `KEEP` for runs
    /// the receiver holds, `PAGES` for the others.
    pub fn frames(&self, (store, first): (u32, u64), sums: &[u64], page: usize) -> Vec<Frame> {
        let frame = |p: Part| {
            let (r, at) = (p.range.clone(), first + p.range.start as u64);
            let head = wire::pages_header(store, at, &sums[r.clone()]);
            match p.keep {
                true => Frame {
                    kind: kind::KEEP,
                    head,
                    data: 0..0,
                },
                false => Frame {
                    kind: kind::PAGES,
                    head,
                    data: r.start * page..r.end * page,
                },
            }
        };
        let held = self.held(store);
        self.parts(held.as_deref(), first, sums)
            .into_iter()
            .map(frame)
            .collect()
    }

    /// Splits pages `first..` with `sums` of a store into runs kept and
    /// sent.
    fn parts(&self, store: Option<&HaveStore>, first: u64, sums: &[u64]) -> Vec<Part> {
        let Some(st) = store else {
            return vec![Part {
                keep: false,
                range: 0..sums.len(),
            }];
        };
        let mut parts: Vec<Part> = Vec::new();
        for (i, s) in sums.iter().enumerate() {
            let held =
                st.0.get(first as usize + i)
                    .map_or(0, |h| h.swap(0, Ordering::Relaxed));
            let keep = held == *s;
            match parts.last_mut() {
                Some(p) if p.keep == keep && p.range.end == i => p.range.end = i + 1,
                _ => parts.push(Part {
                    keep,
                    range: i..i + 1,
                }),
            }
            if keep {
                self.kept.fetch_add(1, Ordering::Relaxed);
            }
        }
        parts
    }
}

impl HaveStore {
    fn forget(&self, first: u64, count: u64) {
        for h in self.0.iter().skip(first as usize).take(count as usize) {
            h.store(0, Ordering::Relaxed);
        }
    }
}

/// The sender's side of the exchange, right after the handshake: what
/// the receiver holds (nothing unless both sides resume) for this
/// sender of `target`'s memory (or `object`'s).
pub(super) fn client(
    s: &mut Session,
    target: &Target,
    object: Option<ObjectId>,
    resume: bool,
) -> Result<Have, TransferError> {
    let mut have = Have::default();
    if s.peer_caps & CAP_RESUME == 0 {
        have.note = resume.then(|| {
            "the receiver keeps no partial state (start it with --resume): everything is sent"
                .to_owned()
        });
        return Ok(have);
    }
    send(s, &Record::Resume(resume, identity(target, object)))?;
    let mut sums: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let (mut total, mut entries) = (0u64, 0u64);
    loop {
        match expect(s, "the receiver's pages")? {
            Record::Have {
                first,
                sums: got,
                name,
            } => {
                let end = first
                    .checked_add(got.len() as u64)
                    .filter(|&e| e <= MAX_STORE_PAGES);
                let Some(end) = end else {
                    let e = bad(
                        &s.peer,
                        format!("pages held past a store's bound in {name}"),
                    );
                    return Err(s.refuse(e));
                };
                total += got.iter().filter(|&&x| x != 0).count() as u64;
                let v = sums.entry(name).or_default();
                entries += end.saturating_sub(v.len() as u64);
                if entries > MAX_STORE_PAGES {
                    let e = bad(&s.peer, "more pages held than a transfer holds".into());
                    return Err(s.refuse(e));
                }
                if v.len() < end as usize {
                    v.resize(end as usize, 0);
                }
                v[first as usize..end as usize].copy_from_slice(&got);
            }
            Record::HaveEnd(n) if n == total => break,
            Record::HaveEnd(n) => {
                let e = bad(&s.peer, format!("{n} pages held announced, {total} listed"));
                return Err(s.refuse(e));
            }
            r => return Err(s.refuse(unexpected(&s.peer, &r, "the receiver's pages"))),
        }
    }
    have.held = total;
    have.stores = std::sync::Mutex::new(
        sums.into_iter()
            .map(|(n, v)| {
                (
                    n,
                    Arc::new(HaveStore(v.into_iter().map(AtomicU64::new).collect())),
                )
            })
            .collect(),
    );
    if resume && total == 0 {
        have.note = Some("the receiver holds no pages of this sender: everything is sent".into());
    }
    Ok(have)
}

fn bad(peer: &str, what: String) -> TransferError {
    TransferError::new(Class::BadStream, peer, what)
}

/// The receiver's side of a resumable receive: the exchange, then every
/// record's effect on the partial state.
#[derive(Debug)]
pub(super) struct Resuming {
    into: Into,
    identity: String,
    /// Held pages of stores this stream has not opened yet.
    leftover: BTreeMap<String, Vec<u64>>,
    /// Tracks by wire store index.
    tracks: Vec<Track>,
    unsynced: u64,
    page: u64,
    /// Pages the sender kept.
    pub kept: u64,
    /// Pages held when the stream began.
    pub held: u64,
    /// What happened to an earlier partial state.
    pub note: Option<String>,
}

impl Resuming {
    /// The exchange after the handshake (see the module doc): the
    /// receiver's partial state checked, kept or discarded, and
    /// announced.
    pub fn server(s: &mut Session, into: &Into) -> Result<Self, TransferError> {
        let (resume, identity) = if s.peer_caps & CAP_RESUME != 0 {
            match expect(s, "the sender's resume record")? {
                Record::Resume(r, id) if id.len() <= MAX_IDENTITY => (r, id),
                Record::Resume(..) => return Err(bad(&s.peer, "identity too long".into())),
                r => return Err(unexpected(&s.peer, &r, "the sender's resume record")),
            }
        } else {
            (false, String::new())
        };
        let found = partial::exists(into);
        let loaded = if found {
            partial::load(into, s.page_size)
        } else {
            None
        };
        let mut note = None;
        let held = match loaded {
            Some(h) if resume && h.identity == identity && !identity.is_empty() => {
                if h.dropped > 0 {
                    note = Some(format!(
                        "{} pages of the partial state did not match their sums (lost in a crash): sent again",
                        h.dropped
                    ));
                }
                h
            }
            Some(h) if resume => {
                let what = format!(
                    "{} holds a partial transfer from another sender ({}), not from this one ({identity}): refused; receive without --resume to discard it",
                    shown(into),
                    h.identity
                );
                return Err(TransferError::new(Class::Handshake, &s.peer, what));
            }
            _ => {
                if found {
                    partial::discard(into);
                    note = Some(if resume {
                        "the partial state was unusable (another page size, or damaged): discarded"
                            .into()
                    } else {
                        "the sender did not ask to resume: the partial state was discarded".into()
                    });
                }
                Held::default()
            }
        };
        partial::mark(into).map_err(|m| TransferError::new(Class::Output, &s.peer, m))?;
        let total = held.pages();
        if s.peer_caps & CAP_RESUME != 0 {
            announce(s, &held.stores)?;
            send(s, &Record::HaveEnd(total))?;
        }
        Ok(Self {
            into: into.clone(),
            identity,
            leftover: held.stores,
            tracks: Vec::new(),
            unsynced: 0,
            page: u64::from(s.page_size),
            kept: 0,
            held: total,
            note,
        })
    }

    /// Store `name` of `pages` pages was opened (its data file exists).
    pub fn opened(&mut self, name: &str, pages: u64) -> Result<(), String> {
        let held = self.leftover.remove(name).unwrap_or_default();
        let t = Track::open(&self.into, name, &self.identity, self.page, pages, held)?;
        self.tracks.push(t);
        Ok(())
    }

    /// Store `store` grew to `pages` pages.
    pub fn grew(&mut self, store: u32, pages: u64) -> Result<(), String> {
        self.tracks[store as usize].grow(pages)
    }

    /// Pages `first..` of `store` were written with `sums`.
    pub fn wrote(&mut self, store: u32, first: u64, sums: &[u64]) -> Result<(), String> {
        self.tracks[store as usize].wrote(first, sums)?;
        self.unsynced += sums.len() as u64 * self.page;
        if self.unsynced >= SYNC_EVERY {
            self.sync()?;
        }
        Ok(())
    }

    /// Pages `first..first + count` of `store` were cleared.
    pub fn cleared(&mut self, store: u32, first: u64, count: u64) -> Result<(), String> {
        let zeros = vec![0u64; HAVE_CHUNK];
        let mut at = first;
        while at < first + count {
            let n = (first + count - at).min(HAVE_CHUNK as u64);
            self.tracks[store as usize].wrote(at, &zeros[..n as usize])?;
            at += n;
        }
        Ok(())
    }

    /// Pages `first..` of `store` are kept: their bytes, to write again
    /// where the commit takes them.
    pub fn keep(&mut self, store: u32, first: u64, sums: &[u64]) -> Result<Vec<u8>, TransferError> {
        let bytes = self.tracks[store as usize].keep(first, sums).map_err(|k| match k {
            Keep::NotHeld(p) => TransferError::new(
                Class::BadStream,
                "",
                format!("page {p} of store {store} kept by the sender is not one this receiver holds"),
            ),
            Keep::Io(m) => TransferError::new(Class::Output, "", m),
        })?;
        self.kept += sums.len() as u64;
        Ok(bytes)
    }

    /// Everything written so far to stable storage (end of a pass, a
    /// dropped connection).
    pub fn sync(&mut self) -> Result<(), String> {
        self.unsynced = 0;
        self.tracks.iter().try_for_each(Track::sync)
    }

    /// Before the commit: stale pages punched, stores of the interrupted
    /// transfer this stream never opened removed.
    pub fn finish(&mut self) -> Result<(), String> {
        self.tracks.iter().try_for_each(Track::finish)?;
        for name in std::mem::take(&mut self.leftover).into_keys() {
            partial::remove_store(&self.into, &name);
        }
        Ok(())
    }

    /// After the commit: the sidecars go.
    pub fn committed(&mut self) {
        self.tracks.clear();
        partial::committed(&self.into);
    }
}

/// `HAVE` records for every chunk of sums that holds a page.
fn announce(s: &mut Session, stores: &BTreeMap<String, Vec<u64>>) -> Result<(), TransferError> {
    for (name, sums) in stores {
        for (i, chunk) in sums.chunks(HAVE_CHUNK).enumerate() {
            if chunk.iter().all(|&x| x == 0) {
                continue;
            }
            let r = Record::Have {
                first: (i * HAVE_CHUNK) as u64,
                sums: chunk.to_vec(),
                name: name.clone(),
            };
            send(s, &r)?;
        }
    }
    Ok(())
}

fn shown(into: &Into) -> String {
    match into {
        Into::Image(d) => d.display().to_string(),
        Into::File(f) | Into::InPlace(f) => f.display().to_string(),
    }
}
