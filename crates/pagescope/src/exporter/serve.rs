//! The exporter behind an HTTP server: collections run on their own
//! thread, so a process whose `/proc` files are slow to read (a huge
//! address space, an mmap lock held for long) delays the next snapshot,
//! never a scrape. A scrape asks for a fresh snapshot and waits for it at
//! most `deadline`; past that it is served the last one (its age in
//! `pagescope_snapshot_age_seconds`, the wait counted in
//! `pagescope_late_scrapes_total`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::watch::WrittenCounter;
use super::{Exporter, ExporterOptions, Format, Snapshot, Totals, metrics};

/// What the collector thread last published.
#[derive(Debug, Default)]
struct Published {
    snapshot: Arc<Snapshot>,
    at: Option<Instant>,
    written: Vec<WrittenCounter>,
    watch_failed: usize,
    totals: Totals,
    generation: u64,
}

/// An [`Exporter`] on a collector thread, scraped from any thread.
#[derive(Debug)]
pub struct Background {
    published: Arc<(Mutex<Published>, Condvar)>,
    wake: Mutex<mpsc::Sender<()>>,
    deadline: Duration,
    scrapes: AtomicU64,
    late: AtomicU64,
}

impl Background {
    /// Starts the collector thread (it collects when a scrape asks).
    pub fn start(opts: ExporterOptions, deadline: Duration) -> Self {
        let published = Arc::new((Mutex::new(Published::default()), Condvar::new()));
        let (wake, asked) = mpsc::channel::<()>();
        let shared = Arc::clone(&published);
        std::thread::spawn(move || {
            // Trackers are not Send: the exporter lives on this thread.
            let mut exporter = Exporter::new(opts);
            while asked.recv().is_ok() {
                while asked.try_recv().is_ok() {}
                let snapshot = exporter.snapshot();
                let (lock, ready) = &*shared;
                let Ok(mut p) = lock.lock() else { return };
                p.snapshot = snapshot;
                p.at = exporter.cached.as_ref().map(|c| c.0);
                p.written = exporter.watches.counters();
                p.watch_failed = exporter.watches.failed();
                p.totals = exporter.totals;
                p.generation += 1;
                ready.notify_all();
            }
        });
        Self {
            published,
            wake: Mutex::new(wake),
            deadline,
            scrapes: AtomicU64::new(0),
            late: AtomicU64::new(0),
        }
    }

    /// One scrape: asks for a fresh snapshot, waits for it at most the
    /// deadline, and encodes the newest one there is.
    pub fn scrape(&self, format: Format) -> String {
        let scrapes = self.scrapes.fetch_add(1, Ordering::Relaxed) + 1;
        let (lock, ready) = &*self.published;
        let Ok(p) = lock.lock() else {
            return String::new();
        };
        let asked_at = p.generation;
        if let Ok(w) = self.wake.lock() {
            let _ = w.send(());
        }
        let (p, timeout) =
            match ready.wait_timeout_while(p, self.deadline, |p| p.generation == asked_at) {
                Ok(r) => r,
                Err(_) => return String::new(),
            };
        let late = if timeout.timed_out() {
            self.late.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.late.load(Ordering::Relaxed)
        };
        let state = metrics::State {
            snapshot: &p.snapshot,
            totals: Totals {
                scrapes,
                late,
                ..p.totals
            },
            age_seconds: p.at.map_or(0.0, |at| at.elapsed().as_secs_f64()),
            written: p.written.clone(),
            watch_failed: p.watch_failed,
        };
        metrics::encode(&state, format)
    }
}
