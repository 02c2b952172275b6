//! The frames a sender writes, under the sink's one lock: `--bandwidth`
//! pacing and the measured rate (`pace.rs`), the live counters the
//! progress reads without the lock (`progress.rs`), and runs merged: the
//! copy reports pages not stored page by page, and writes a shared
//! object's pages one at a time; a run of consecutive pages of one store
//! not stored for one reason is one `NOT_STORED` record, and consecutive
//! small writes of one store are one `PAGES` frame (up to a frame's
//! pages). A run is held back until a record that does not extend it is
//! due, so the order of records never changes. A write of at least
//! [`DIRECT_BYTES`] (the copy's batches of up to 4 MiB) goes out as its
//! own frame straight from the caller's buffer: holding it would copy
//! every byte once more into a freshly allocated run.

use std::sync::Arc;
use std::time::Instant;

use super::frame::FrameWriter;
use super::pace::{Meter, Pacer};
use super::progress::{Counters, PassSent};
use super::wire::{self, Record, Why, kind};

/// Writes of at least this many bytes are sent as their own frame, never
/// held back to be merged (merging pays for itself only for small writes:
/// a shared object's pages one at a time).
pub(super) const DIRECT_BYTES: usize = 256 << 10;

/// A run of pages not stored, waiting to be sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Run {
    pub store: u32,
    pub first: u64,
    pub count: u64,
    pub why: Why,
}

impl Run {
    /// `self` with `next` appended, if `next` continues it (a dedup
    /// reference names one page: never merged).
    fn extended(self, next: Self) -> Option<Self> {
        let continues = next.store == self.store
            && next.why == self.why
            && !matches!(self.why, Why::Dedup(..))
            && self.first.checked_add(self.count) == Some(next.first);
        continues.then(|| Self {
            count: self.count + next.count,
            ..self
        })
    }

    fn record(self) -> Record {
        Record::NotStored {
            store: self.store,
            first: self.first,
            count: self.count,
            why: self.why,
        }
    }
}

/// Consecutive pages of one store written, not sent yet.
#[derive(Debug)]
struct PagesRun {
    store: u32,
    first: u64,
    sums: Vec<u64>,
    data: Vec<u8>,
}

/// What is held back: at most one run.
#[derive(Debug)]
enum Held {
    NotStored(Run),
    Pages(PagesRun),
}

/// Where a pass started, to count what it sent.
#[derive(Clone, Copy, Debug)]
struct PassMark {
    n: u32,
    stopped: bool,
    at: Instant,
    bytes: u64,
    pages: u64,
}

/// The frames going out.
pub(super) struct Out {
    writer: FrameWriter,
    /// Frames written (after the handshake).
    pub records: u64,
    /// Pages sent in `PAGES` frames.
    pub pages: u64,
    pacer: Pacer,
    meter: Meter,
    held: Option<Held>,
    pass: Option<PassMark>,
    counters: Arc<Counters>,
}

impl Out {
    /// Frames onto `writer`, at most `bandwidth` bytes/s.
    pub fn new(writer: FrameWriter, bandwidth: Option<u64>, counters: Arc<Counters>) -> Self {
        let pacer = Pacer::new(bandwidth);
        Self {
            writer,
            records: 0,
            pages: 0,
            meter: Meter::new(pacer.cap()),
            pacer,
            held: None,
            pass: None,
            counters,
        }
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.writer.bytes
    }

    /// Pages per `PAGES` frame of `page`-byte pages, at most `max_payload`.
    pub fn frame_pages(&self, page: usize, max_payload: usize) -> usize {
        self.pacer.frame_pages(page, max_payload)
    }

    /// Writes one frame (after the run held back).
    pub fn frame(&mut self, kind: u8, parts: &[&[u8]]) -> std::io::Result<()> {
        self.send_held()?;
        self.put(kind, parts, 0)
    }

    /// Pages not stored: merged into the run held back, or sent.
    pub fn not_stored(&mut self, run: Run) -> std::io::Result<()> {
        if let Some(Held::NotStored(held)) = &mut self.held
            && let Some(merged) = held.extended(run)
        {
            *held = merged;
            return Ok(());
        }
        self.send_held()?;
        self.held = Some(Held::NotStored(run));
        Ok(())
    }

    /// Pages `first..` of `store` (`data`, their `sums`), at most
    /// `per_frame` of them: appended to the pages held back if they
    /// continue them and fit one frame, else sent (a full frame, or a
    /// write of at least [`DIRECT_BYTES`]) or held.
    pub fn pages(
        &mut self,
        store: u32,
        first: u64,
        sums: &[u64],
        data: &[u8],
        per_frame: usize,
    ) -> std::io::Result<()> {
        if let Some(Held::Pages(h)) = &mut self.held
            && data.len() < DIRECT_BYTES
            && h.store == store
            && h.first + h.sums.len() as u64 == first
            && h.sums.len() + sums.len() <= per_frame
        {
            h.sums.extend_from_slice(sums);
            h.data.extend_from_slice(data);
            if h.sums.len() == per_frame {
                self.send_held()?;
            }
            return Ok(());
        }
        self.send_held()?;
        if sums.len() >= per_frame || data.len() >= DIRECT_BYTES {
            return self.put_pages(store, first, sums, data);
        }
        self.held = Some(Held::Pages(PagesRun {
            store,
            first,
            sums: sums.to_vec(),
            data: data.to_vec(),
        }));
        Ok(())
    }

    fn put_pages(
        &mut self,
        store: u32,
        first: u64,
        sums: &[u64],
        data: &[u8],
    ) -> std::io::Result<()> {
        let head = wire::pages_header(store, first, sums);
        self.put(kind::PAGES, &[&head, data], sums.len() as u64)
    }

    /// Sends the run held back, if any.
    fn send_held(&mut self) -> std::io::Result<()> {
        match self.held.take() {
            Some(Held::NotStored(run)) => {
                let r = run.record();
                self.put(r.kind(), &[&r.encode()], 0)
            }
            Some(Held::Pages(p)) => self.put_pages(p.store, p.first, &p.sums, &p.data),
            None => Ok(()),
        }
    }

    fn put(&mut self, kind: u8, parts: &[&[u8]], pages: u64) -> std::io::Result<()> {
        let before = self.writer.bytes;
        self.writer.frame(kind, parts)?;
        self.records += 1;
        self.pages += pages;
        let bytes = self.writer.bytes - before;
        let now = Instant::now();
        let wait = self.pacer.wrote(bytes, now);
        if !wait.is_zero() {
            self.writer.flush()?;
            std::thread::sleep(wait);
        }
        self.meter.pushed(bytes, Instant::now());
        self.counters
            .update(self.writer.bytes, self.pages, self.meter.rate());
        Ok(())
    }

    /// Pass `n` begins (its `BEGIN_PASS` frame is next).
    pub fn begin_pass(&mut self, n: u32, stopped: bool) {
        let at = Instant::now();
        self.meter.begin(at);
        self.pass = Some(PassMark {
            n,
            stopped,
            at,
            bytes: self.writer.bytes,
            pages: self.pages,
        });
    }

    /// The pass ended (its `END_PASS` written): pushes it out, samples
    /// the rate, and counts what it sent.
    pub fn end_pass(&mut self) -> std::io::Result<()> {
        self.writer.flush()?;
        let now = Instant::now();
        self.meter.end(now);
        let rate = self.meter.rate();
        self.counters.update(self.writer.bytes, self.pages, rate);
        if let Some(m) = self.pass.take() {
            self.counters.pass_sent(PassSent {
                n: m.n,
                stopped: m.stopped,
                pages_sent: self.pages - m.pages,
                bytes_sent: self.writer.bytes - m.bytes,
                seconds: now.duration_since(m.at).as_secs_f64(),
                bandwidth_bytes_s: rate,
            });
        }
        Ok(())
    }

    /// The measured rate, bytes/s (0: not measured yet).
    pub fn rate(&self) -> f64 {
        self.meter.rate()
    }

    /// Sends what is held back and buffered.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.send_held()?;
        self.writer.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(store: u32, first: u64, count: u64, why: Why) -> Run {
        Run {
            store,
            first,
            count,
            why,
        }
    }

    #[test]
    fn consecutive_pages_of_one_store_for_one_reason_are_one_run() {
        let a = run(0, 10, 1, Why::Zero);
        assert_eq!(
            a.extended(run(0, 11, 3, Why::Zero)),
            Some(run(0, 10, 4, Why::Zero))
        );
        assert_eq!(a.extended(run(0, 12, 1, Why::Zero)), None, "a gap");
        assert_eq!(a.extended(run(0, 9, 1, Why::Zero)), None, "backwards");
        assert_eq!(a.extended(run(1, 11, 1, Why::Zero)), None, "another store");
        assert_eq!(a.extended(run(0, 11, 1, Why::Hole)), None, "another reason");
        let d = run(0, 10, 1, Why::Dedup(1, 0x1000, 5));
        assert_eq!(d.extended(run(0, 11, 1, Why::Dedup(1, 0x1000, 6))), None);
    }

    /// A writer whose bytes a test can read afterwards.
    #[derive(Clone, Default)]
    struct Shared(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn records(bytes: &[u8]) -> Vec<Record> {
        let mut r = super::super::frame::FrameReader::new(
            Box::new(std::io::Cursor::new(bytes.to_vec())),
            "test",
        );
        std::iter::from_fn(|| r.next().unwrap()).collect()
    }

    #[test]
    fn a_large_write_goes_out_at_once_and_small_ones_still_merge() {
        let buf = Shared::default();
        let counters = Arc::new(Counters::default());
        let mut out = Out::new(FrameWriter::new(Box::new(buf.clone())), None, counters);
        let page = 4096;
        let per_frame = 2048;
        out.pages(0, 0, &[1], &vec![1; page], per_frame).unwrap();
        assert_eq!(out.records, 0, "a small write is held");
        let big = DIRECT_BYTES / page;
        let sums = vec![2; big];
        out.pages(0, 1, &sums, &vec![2; DIRECT_BYTES], per_frame)
            .unwrap();
        assert_eq!(
            out.records, 2,
            "the held page, then the large write as it came"
        );
        out.pages(0, 1 + big as u64, &[3], &vec![3; page], per_frame)
            .unwrap();
        out.pages(0, 2 + big as u64, &[4], &vec![4; page], per_frame)
            .unwrap();
        out.flush().unwrap();
        let got = records(&buf.0.lock().unwrap());
        let firsts: Vec<(u64, usize)> = got
            .iter()
            .map(|r| match r {
                Record::Pages { first, sums, .. } => (*first, sums.len()),
                r => panic!("{r:?}"),
            })
            .collect();
        assert_eq!(firsts, [(0, 1), (1, big), (1 + big as u64, 2)]);
    }

    #[test]
    fn runs_go_out_merged_and_in_order() {
        let buf = Shared::default();
        let counters = Arc::new(Counters::default());
        let mut out = Out::new(FrameWriter::new(Box::new(buf.clone())), None, counters);
        for p in 0..100 {
            out.not_stored(run(0, p, 1, Why::Zero)).unwrap();
        }
        let end = Record::EndPass(0);
        out.frame(end.kind(), &[&end.encode()]).unwrap();
        out.not_stored(run(0, 100, 1, Why::Zero)).unwrap();
        out.not_stored(run(0, 101, 1, Why::Hole)).unwrap();
        // Pages one at a time: frames of 3, a gap or another store ends one.
        let page = |b: u8| vec![b; 8];
        for p in [102, 103, 104, 105, 107] {
            out.pages(0, p, &[p], &page(p as u8), 3).unwrap();
        }
        out.pages(1, 108, &[108], &page(108), 3).unwrap();
        out.pages(1, 109, &[1, 2, 3], &[page(1), page(2), page(3)].concat(), 3)
            .unwrap();
        out.flush().unwrap();
        let got = records(&buf.0.lock().unwrap());
        let pages = |store: u32, first: u64, sums: &[u64], data: Vec<u8>| Record::Pages {
            store,
            first,
            sums: sums.to_vec(),
            data,
        };
        let want = vec![
            run(0, 0, 100, Why::Zero).record(),
            end,
            run(0, 100, 1, Why::Zero).record(),
            run(0, 101, 1, Why::Hole).record(),
            pages(
                0,
                102,
                &[102, 103, 104],
                [page(102), page(103), page(104)].concat(),
            ),
            pages(0, 105, &[105], page(105)),
            pages(0, 107, &[107], page(107)),
            pages(1, 108, &[108], page(108)),
            pages(1, 109, &[1, 2, 3], [page(1), page(2), page(3)].concat()),
        ];
        assert_eq!(got.len(), want.len(), "{got:?}");
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g, w);
        }
        assert_eq!(out.records, 9);
        assert_eq!(out.pages, 9);
    }
}
