//! `receive`: the records of one stream checked one by one (store
//! indices, page ranges against the store's size, each page's sum
//! recomputed, the totals before the commit) and written into an
//! [`Output`]; any fault ends it with one line, an `ERROR` frame to the
//! sender, and everything written removed. The last frame is the `ACK`.

use std::path::PathBuf;

use super::frame::{Frame, FrameReader};
use super::handshake::{self, CAP_RESUME};
use super::output::Output;
use super::resume::Resuming;
use super::wire::{Mode, Record, Why};
use super::{Class, Conn, TransferError};
use crate::image::format::{self, MAX_META_BYTES, MAX_STORE_PAGES};

/// What a receiver makes.
#[derive(Clone, Debug)]
pub enum Target {
    /// An image directory (new or empty).
    Image(PathBuf),
    /// One shared object's pages into this file.
    File(PathBuf),
    /// One shared object's pages into this existing file itself, which a
    /// destination already maps (`in_place.rs`).
    InPlace(PathBuf),
}

/// How to receive.
#[derive(Clone, Debug)]
pub struct ReceiveOptions {
    /// What to make.
    pub into: Target,
    /// The pre-shared key the sender must prove.
    pub psk: Option<Vec<u8>>,
    /// Keep the partial state when the connection drops, and resume from
    /// what an interrupted receive kept (`--resume`).
    pub resume: bool,
}

/// What a receive made.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ReceiveReport {
    /// What was committed (a line).
    pub committed: String,
    /// Pages received (each time one was sent).
    pub pages: u64,
    /// Records received.
    pub records: u64,
    /// Passes seen.
    pub passes: u32,
    /// Pages held from an interrupted transfer when this one began.
    pub held: u64,
    /// Pages the sender kept instead of sending them (resumed).
    pub kept: u64,
    /// What became of an earlier partial state, if anything.
    pub note: Option<String>,
}

/// Checks that pages `first..first + count` fall inside `store`, which
/// holds `held` pages (a record's range, before anything is written).
pub(crate) fn in_store(store: u32, held: u64, first: u64, count: u64) -> Result<(), TransferError> {
    match first.checked_add(count) {
        Some(end) if end <= held => Ok(()),
        _ => Err(bad(format!(
            "pages {first}+{count} outside store {store} of {held} pages"
        ))),
    }
}

/// Receives one stream from `conn` (see the module doc).
pub fn receive(conn: Conn, opts: &ReceiveOptions) -> Result<ReceiveReport, TransferError> {
    let mode = match opts.into {
        Target::Image(_) => Mode::Image,
        Target::File(_) | Target::InPlace(_) => Mode::Object,
    };
    let extra = if opts.resume { CAP_RESUME } else { 0 };
    let mut s = handshake::server(conn, opts.psk.as_deref(), mode, extra, 0)?;
    let resume = match opts.resume.then(|| Resuming::server(&mut s, &opts.into)) {
        Some(Err(e)) if e.class == Class::Connection => return Err(e),
        Some(Err(e)) => return Err(s.refuse(e)),
        Some(Ok(r)) => Some(r),
        None => None,
    };
    let output = match &opts.into {
        Target::Image(dir) => Output::image(dir, s.page_size, opts.resume),
        Target::File(path) => Ok(Output::file(path, s.page_size, opts.resume)),
        Target::InPlace(path) => Ok(Output::file_in_place(path, s.page_size)),
    };
    let output = match output {
        Ok(o) => o,
        Err(m) => return Err(s.refuse(TransferError::new(Class::Output, "", m))),
    };
    let mut r = Receiving {
        page: u64::from(s.page_size),
        output,
        meta: Vec::new(),
        pages: 0,
        records: 0,
        passes: 0,
        resume,
    };
    match r.run(&mut s.reader) {
        Ok(committed) => {
            let _ = s.writer.record(&Record::Ack(true, committed.clone()));
            let _ = s.writer.flush();
            let resumed = r.resume.as_ref();
            Ok(ReceiveReport {
                committed,
                pages: r.pages,
                records: r.records,
                passes: r.passes,
                held: resumed.map_or(0, |x| x.held),
                kept: resumed.map_or(0, |x| x.kept),
                note: resumed.and_then(|x| x.note.clone()),
            })
        }
        Err(e) => {
            let e = TransferError {
                peer: s.peer.clone(),
                ..r.interrupted(e)
            };
            Err(match e.class {
                Class::Aborted => {
                    let _ = s.writer.record(&Record::Ack(false, e.what.clone()));
                    let _ = s.writer.flush();
                    e
                }
                Class::Connection => e,
                _ => s.refuse(e),
            })
        }
    }
}

struct Receiving {
    page: u64,
    output: Output,
    meta: Vec<u8>,
    pages: u64,
    records: u64,
    passes: u32,
    resume: Option<Resuming>,
}

pub(super) fn bad(what: impl Into<String>) -> TransferError {
    TransferError::new(Class::BadStream, "", what)
}

/// What a record that cannot come here says: the sender aborted or gave
/// up, or the stream broke its order (both receivers, plain and
/// post-copy).
pub(super) fn out_of_place(r: Record) -> TransferError {
    match r {
        Record::Abort(why) => {
            TransferError::new(Class::Aborted, "", format!("the sender aborted: {why}"))
        }
        Record::Error(class, msg) => {
            TransferError::new(class, "", format!("the sender gave up: {msg}"))
        }
        r => bad(format!(
            "record of kind {} in the middle of a stream",
            r.kind()
        )),
    }
}

impl Receiving {
    /// Every record up to the commit: what was committed.
    fn run(&mut self, reader: &mut FrameReader) -> Result<String, TransferError> {
        loop {
            let rec = match reader.next_frame()? {
                None => {
                    return Err(TransferError::new(
                        Class::Connection,
                        "",
                        "the stream ended before its commit: nothing was committed",
                    ));
                }
                // Checked and written from the frame's buffer: no copy.
                Some(Frame::Pages(p)) => {
                    self.records += 1;
                    self.pages(p.store, p.first, &p.sums, p.data)?;
                    continue;
                }
                Some(Frame::Record(rec)) => rec,
            };
            if let Record::Commit {
                meta_len,
                meta_sum,
                pages,
                records,
            } = rec
            {
                return self.commit(meta_len, meta_sum, pages, records);
            }
            self.records += 1;
            self.apply(rec)?;
        }
    }

    fn apply(&mut self, rec: Record) -> Result<(), TransferError> {
        match rec {
            Record::BeginPass(..) => self.passes += 1,
            Record::EndPass(_) => self.resumed(|r| r.sync())?,
            Record::OpenStore {
                store,
                object,
                pages,
                name,
            } => {
                let next = (0..).find(|&i| self.output.pages(i).is_none()).unwrap_or(0);
                if store != next {
                    return Err(bad(format!(
                        "store {store} opened where store {next} was due"
                    )));
                }
                if pages > MAX_STORE_PAGES {
                    return Err(bad(format!(
                        "store {name}: {pages} pages, more than {MAX_STORE_PAGES}"
                    )));
                }
                if crate::image::StoreName::new(&name).is_none() {
                    return Err(bad(format!("{name:?} is not a store name")));
                }
                if matches!(self.output, Output::File { .. }) && (!object || store > 0) {
                    return Err(bad("--into FILE takes exactly one shared object's pages"));
                }
                self.output.open(object, &name, pages).map_err(out)?;
                self.resumed(|r| r.opened(&name, pages))?;
            }
            Record::GrowStore(store, pages) => {
                let held = self.held(store)?;
                if pages < held || pages > MAX_STORE_PAGES {
                    return Err(bad(format!(
                        "store {store} cannot grow from {held} to {pages} pages"
                    )));
                }
                self.output.grow(store, pages).map_err(out)?;
                self.resumed(|r| r.grew(store, pages))?;
            }
            Record::Pages {
                store,
                first,
                sums,
                data,
            } => self.pages(store, first, &sums, &data)?,
            Record::NotStored {
                store,
                first,
                count,
                why,
            } => {
                self.range(store, first, count)?;
                if matches!(self.output, Output::File { .. })
                    && !matches!(why, Why::Zero | Why::Hole)
                {
                    return Err(bad(format!(
                        "pages {first}..{} of the object were left out ({why:?}): a file needs every page",
                        first + count
                    )));
                }
                self.output.clear(store, first, count).map_err(out)?;
                self.resumed(|r| r.cleared(store, first, count))?;
            }
            Record::Keep { store, first, sums } => self.keep(store, first, &sums)?,
            Record::Meta(part) => {
                if (self.meta.len() + part.len()) as u64 > MAX_META_BYTES {
                    return Err(bad("metadata larger than an image's bound"));
                }
                self.meta.extend_from_slice(&part);
            }
            r => return Err(out_of_place(r)),
        }
        Ok(())
    }

    fn held(&self, store: u32) -> Result<u64, TransferError> {
        self.output
            .pages(store)
            .ok_or_else(|| bad(format!("store {store} was never opened")))
    }

    /// Checks that pages `first..first + count` are inside `store`.
    fn range(&self, store: u32, first: u64, count: u64) -> Result<(), TransferError> {
        in_store(store, self.held(store)?, first, count)
    }

    fn pages(
        &mut self,
        store: u32,
        first: u64,
        sums: &[u64],
        data: &[u8],
    ) -> Result<(), TransferError> {
        let count = sums.len() as u64;
        self.range(store, first, count)?;
        if data.len() as u64 != count * self.page {
            return Err(bad(format!(
                "{count} pages announced, {} bytes of data (page size {})",
                data.len(),
                self.page
            )));
        }
        for (i, (page, sum)) in data.chunks_exact(self.page as usize).zip(sums).enumerate() {
            if format::page_sum(0, page) != *sum {
                return Err(bad(format!(
                    "page {} of store {store} does not match its checksum",
                    first + i as u64
                )));
            }
        }
        self.output.write(store, first, data).map_err(out)?;
        self.resumed(|r| r.wrote(store, first, sums))?;
        self.pages += count;
        Ok(())
    }

    /// Pages the sender kept: checked against what this receiver holds,
    /// and taken into the output.
    fn keep(&mut self, store: u32, first: u64, sums: &[u64]) -> Result<(), TransferError> {
        self.range(store, first, sums.len() as u64)?;
        let Some(resume) = self.resume.as_mut() else {
            return Err(bad("pages kept, but this receiver resumes nothing"));
        };
        let bytes = resume.keep(store, first, sums)?;
        self.output.write(store, first, &bytes).map_err(out)
    }

    /// Applies `f` to the partial state of a resumable receive.
    fn resumed(
        &mut self,
        f: impl FnOnce(&mut Resuming) -> Result<(), String>,
    ) -> Result<(), TransferError> {
        self.resume.as_mut().map_or(Ok(()), f).map_err(out)
    }

    /// After a failure: a resumable receive whose stream was cut (closed,
    /// or stopped mid-record: a connection failure) or that the sender
    /// aborted (interrupted, say) keeps its partial state (synced) and
    /// says so; anything else is removed.
    fn interrupted(&mut self, e: TransferError) -> TransferError {
        let cut =
            e.class == Class::Connection || e.what.starts_with("the stream stopped mid-record");
        let keep = cut || e.class == Class::Aborted;
        let kept = keep && self.resume.as_mut().is_some_and(|r| r.sync().is_ok());
        if kept {
            return TransferError {
                class: if cut { Class::Connection } else { e.class },
                what: format!("{}; the partial state is kept for --resume", e.what),
                ..e
            };
        }
        self.output.discard();
        e
    }

    fn commit(
        &mut self,
        meta_len: u64,
        meta_sum: u64,
        pages: u64,
        records: u64,
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
        self.resumed(Resuming::finish)?;
        let made = self.output.commit(&self.meta).map_err(out)?;
        if let Some(r) = self.resume.as_mut() {
            r.committed();
        }
        Ok(made)
    }
}

fn out(m: String) -> TransferError {
    TransferError::new(Class::Output, "", m)
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;
    use crate::transfer::frame::FrameWriter;

    const PAGE: usize = 4096;

    /// A stream that gives at most 5 bytes per read: every frame, header
    /// and payload is split across reads.
    struct Trickle(std::io::Cursor<Vec<u8>>);

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(5);
            self.0.read(&mut buf[..n])
        }
    }

    /// The frames of `recs`, and a receiver of one object into `path`.
    fn setup(recs: &[Record], path: &std::path::Path) -> (FrameReader, Receiving) {
        let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        struct W(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for W {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                // Partial writes: the frame writer must go on.
                let n = b.len().min(3);
                self.0.lock().unwrap().extend_from_slice(&b[..n]);
                Ok(n)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut w = FrameWriter::new(Box::new(W(buf.clone())));
        for r in recs {
            w.record(r).unwrap();
        }
        let bytes = buf.lock().unwrap().clone();
        let reader = FrameReader::new(Box::new(Trickle(std::io::Cursor::new(bytes))), "test");
        let r = Receiving {
            page: PAGE as u64,
            output: Output::file(path, PAGE as u32, false),
            meta: Vec::new(),
            pages: 0,
            records: 0,
            passes: 0,
            resume: None,
        };
        (reader, r)
    }

    fn pages(first: u64, data: Vec<u8>) -> Record {
        let sums = data.chunks(PAGE).map(|p| format::page_sum(0, p)).collect();
        Record::Pages {
            store: 0,
            first,
            sums,
            data,
        }
    }

    fn stream(body: Vec<Record>) -> Vec<Record> {
        let open = Record::OpenStore {
            store: 0,
            object: true,
            pages: 8,
            name: "o1-2".into(),
        };
        let n = body
            .iter()
            .filter(|r| matches!(r, Record::Pages { .. }))
            .count();
        let data: u64 = body
            .iter()
            .map(|r| match r {
                Record::Pages { sums, .. } => sums.len() as u64,
                _ => 0,
            })
            .sum();
        let mut recs = vec![open];
        recs.extend(body);
        recs.push(Record::Commit {
            meta_len: 0,
            meta_sum: format::file_sum(&[]),
            pages: data,
            records: n as u64 + 1,
        });
        recs
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("pagescope-receive-{}-{name}", std::process::id()))
    }

    #[test]
    fn pages_split_across_reads_land_at_their_offsets() {
        let path = scratch("offsets");
        let three: Vec<u8> = (0..3 * PAGE).map(|i| (i / PAGE + 1) as u8).collect();
        let recs = stream(vec![pages(5, three), pages(1, vec![9; PAGE])]);
        let (mut reader, mut r) = setup(&recs, &path);
        r.run(&mut reader).unwrap();
        let got = std::fs::read(&path).unwrap();
        assert_eq!(got.len(), 8 * PAGE);
        let page = |i: usize| &got[i * PAGE..(i + 1) * PAGE];
        assert!(page(1).iter().all(|&b| b == 9));
        for (i, want) in [(5, 1), (6, 2), (7, 3)] {
            assert!(page(i).iter().all(|&b| b == want), "page {i}");
        }
        for i in [0, 2, 3, 4] {
            assert!(page(i).iter().all(|&b| b == 0), "page {i}");
        }
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_corrupted_payload_is_refused_before_the_commit() {
        let path = scratch("corrupt");
        let mut bad = pages(2, vec![7; 2 * PAGE]);
        if let Record::Pages { data, .. } = &mut bad {
            data[PAGE + 100] ^= 1; // the second page, after its sum
        }
        let recs = stream(vec![pages(0, vec![1; PAGE]), bad]);
        let (mut reader, mut r) = setup(&recs, &path);
        let e = r.run(&mut reader).unwrap_err();
        assert_eq!(e.class, Class::BadStream);
        assert!(
            e.what.contains("page 3 of store 0 does not match"),
            "{}",
            e.what
        );
        r.interrupted(e);
        assert!(!path.exists(), "nothing committed");
        assert!(
            !crate::transfer::output::partial(&path).exists(),
            "nothing left"
        );
    }
}
