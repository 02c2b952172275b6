//! The frames a sender writes, under the sink's one lock: `--bandwidth`
//! pacing and the measured rate (`pace.rs`), the live counters the
//! progress reads without the lock (`progress.rs`), and runs of pages not
//! stored merged into one `NOT_STORED` record: the copy reports them page
//! by page, a run of consecutive pages of one store for one reason is one
//! record on the wire (held back until a record that does not extend it
//! is due, so the order of records never changes).

use std::sync::Arc;
use std::time::Instant;

use super::frame::FrameWriter;
use super::pace::{Meter, Pacer};
use super::progress::{Counters, PassSent};
use super::wire::{Record, Why};

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
    pending: Option<Run>,
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
            pending: None,
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

    /// Writes one frame carrying `pages` pages (after the run held back).
    pub fn frame(&mut self, kind: u8, parts: &[&[u8]], pages: u64) -> std::io::Result<()> {
        self.send_pending()?;
        self.put(kind, parts, pages)
    }

    /// Pages not stored: merged into the run held back, or sent.
    pub fn not_stored(&mut self, run: Run) -> std::io::Result<()> {
        if let Some(merged) = self.pending.and_then(|p| p.extended(run)) {
            self.pending = Some(merged);
            return Ok(());
        }
        self.send_pending()?;
        self.pending = Some(run);
        Ok(())
    }

    /// Sends the run held back, if any.
    fn send_pending(&mut self) -> std::io::Result<()> {
        match self.pending.take() {
            Some(run) => {
                let r = run.record();
                self.put(r.kind(), &[&r.encode()], 0)
            }
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
        self.send_pending()?;
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
    fn runs_go_out_merged_and_in_order() {
        let buf = Shared::default();
        let counters = Arc::new(Counters::default());
        let mut out = Out::new(FrameWriter::new(Box::new(buf.clone())), None, counters);
        for p in 0..100 {
            out.not_stored(run(0, p, 1, Why::Zero)).unwrap();
        }
        let end = Record::EndPass(0);
        out.frame(end.kind(), &[&end.encode()], 0).unwrap();
        out.not_stored(run(0, 100, 1, Why::Zero)).unwrap();
        out.not_stored(run(0, 101, 1, Why::Hole)).unwrap();
        out.flush().unwrap();
        let got = records(&buf.0.lock().unwrap());
        assert_eq!(
            got,
            vec![
                run(0, 0, 100, Why::Zero).record(),
                end,
                run(0, 100, 1, Why::Zero).record(),
                run(0, 101, 1, Why::Hole).record(),
            ]
        );
        assert_eq!(out.records, 4);
    }
}
