//! The stream's rate: `--bandwidth` pacing ([`Pacer`]: never above the
//! cap over any stretch longer than one frame) and the measured rate
//! ([`Meter`]: bytes pushed into the connection per second of the
//! passes, smoothed) that pre-copy's downtime prediction uses. Pure: the
//! caller passes the clock.

use std::time::{Duration, Instant};

/// A measurement window: the rate is sampled at most this often.
pub(super) const WINDOW: Duration = Duration::from_millis(200);
/// The smoothing's time constant: a sample `s` seconds long weighs
/// `1 - e^(-s/TAU_S)` (or more while less than that was measured: the
/// first seconds are a plain time-weighted mean).
const TAU_S: f64 = 1.0;
/// A frame of pages carries at most this many milliseconds of a capped
/// stream, so the pacing stays smooth at low rates.
const FRAME_MS: u64 = 50;

/// `--bandwidth`: each write is followed by a pause until the bytes so
/// far fit the cap (a token bucket with one frame of burst; time spent
/// idle between passes is not saved up for a burst).
#[derive(Debug)]
pub(super) struct Pacer {
    /// Bytes per second at most.
    rate: Option<u64>,
    /// When the link is free again at the cap.
    free_at: Option<Instant>,
}

impl Pacer {
    /// At most `rate` bytes/s (`None` or 0: no cap).
    pub fn new(rate: Option<u64>) -> Self {
        Self {
            rate: rate.filter(|&r| r > 0),
            free_at: None,
        }
    }

    /// The cap, bytes/s.
    pub fn cap(&self) -> Option<u64> {
        self.rate
    }

    /// `bytes` were written at `now`: how long to wait before the next
    /// write.
    pub fn wrote(&mut self, bytes: u64, now: Instant) -> Duration {
        let Some(rate) = self.rate else {
            return Duration::ZERO;
        };
        let from = self.free_at.filter(|&f| f > now).unwrap_or(now);
        let free = from + Duration::from_secs_f64(bytes as f64 / rate as f64);
        self.free_at = Some(free);
        free - now
    }

    /// Pages per frame of pages: the wire's bound, and with a cap at
    /// most [`FRAME_MS`] of it (at least one page).
    pub fn frame_pages(&self, page: usize, max_payload: usize) -> usize {
        let bound = (max_payload / page).max(1);
        match self.rate {
            Some(r) => {
                let per_frame = r / (1000 / FRAME_MS);
                let pages = usize::try_from(per_frame).unwrap_or(usize::MAX) / page;
                bound.min(pages.max(1))
            }
            None => bound,
        }
    }
}

/// The measured rate: bytes pushed per second while a pass runs (the
/// time between passes, when the dump collects and plans, is not the
/// stream's), sampled every [`WINDOW`] and at the end of each pass,
/// smoothed; never above the cap.
#[derive(Debug)]
pub(super) struct Meter {
    /// Start of the window being measured (`None`: between passes).
    since: Option<Instant>,
    /// Bytes pushed in it.
    bytes: u64,
    /// Seconds sampled so far.
    sampled_s: f64,
    /// The smoothed rate, bytes/s (0: nothing measured yet).
    rate: f64,
    cap: Option<f64>,
}

impl Meter {
    /// A meter of a stream capped at `cap` bytes/s.
    pub fn new(cap: Option<u64>) -> Self {
        Self {
            since: None,
            bytes: 0,
            sampled_s: 0.0,
            rate: 0.0,
            cap: cap.map(|c| c as f64),
        }
    }

    /// A pass begins at `now`.
    pub fn begin(&mut self, now: Instant) {
        self.since = Some(now);
        self.bytes = 0;
    }

    /// `bytes` went into the connection at `now`.
    pub fn pushed(&mut self, bytes: u64, now: Instant) {
        let since = *self.since.get_or_insert(now);
        self.bytes += bytes;
        if now.duration_since(since) >= WINDOW {
            self.close(now);
            self.since = Some(now);
        }
    }

    /// The pass ended at `now` (its bytes flushed).
    pub fn end(&mut self, now: Instant) {
        self.close(now);
        self.since = None;
    }

    /// The smoothed rate, bytes/s (0: not measured yet).
    pub fn rate(&self) -> f64 {
        match self.cap {
            Some(c) => self.rate.min(c),
            None => self.rate,
        }
    }

    fn close(&mut self, now: Instant) {
        let Some(since) = self.since else { return };
        let secs = now.duration_since(since).as_secs_f64();
        if secs > 0.0 && self.bytes > 0 {
            self.sample(self.bytes as f64 / secs, secs);
        }
        self.bytes = 0;
    }

    /// Adds a sample of `rate` bytes/s over `secs`.
    fn sample(&mut self, rate: f64, secs: f64) {
        let rate = self.cap.map_or(rate, |c| rate.min(c));
        self.sampled_s += secs;
        let weight = (secs / self.sampled_s).max(1.0 - (-secs / TAU_S).exp());
        self.rate += weight * (rate - self.rate);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_pacer_holds_the_cap_and_saves_no_idle_time() {
        let t0 = Instant::now();
        let mut p = Pacer::new(Some(1000));
        assert_eq!(p.wrote(500, t0), ms(500));
        // Written early (at 100 ms): it waits for the first 500 bytes too.
        assert_eq!(p.wrote(500, t0 + ms(100)), ms(900));
        // After 10 s idle, 1000 bytes take a full second: no burst.
        assert_eq!(p.wrote(1000, t0 + ms(11_000)), ms(1000));
        assert_eq!(Pacer::new(None).wrote(1 << 30, t0), Duration::ZERO);
        assert_eq!(Pacer::new(Some(0)).cap(), None);
    }

    #[test]
    fn a_capped_stream_sends_small_frames() {
        let page = 4096;
        assert_eq!(Pacer::new(None).frame_pages(page, 8 << 20), 2048);
        // 4 MiB/s: 50 ms is 51 pages.
        assert_eq!(Pacer::new(Some(4 << 20)).frame_pages(page, 8 << 20), 51);
        assert_eq!(Pacer::new(Some(10)).frame_pages(page, 8 << 20), 1);
    }

    #[test]
    fn the_meter_measures_passes_only_and_smooths() {
        let t0 = Instant::now();
        let mut m = Meter::new(None);
        assert_eq!(m.rate(), 0.0);
        // A pass: 1 MB per 100 ms for a second (10 MB/s).
        m.begin(t0);
        for k in 1..=10 {
            m.pushed(1_000_000, t0 + ms(100 * k));
        }
        m.end(t0 + ms(1000));
        assert!((m.rate() - 10e6).abs() < 1.0, "{}", m.rate());
        // Ten idle seconds, then a short pass at 5 MB/s: a small step
        // towards it, the idle time not counted.
        let t1 = t0 + ms(11_000);
        m.begin(t1);
        m.pushed(50_000, t1 + ms(10));
        m.end(t1 + ms(10));
        let r = m.rate();
        assert!(r < 10e6 && r > 9.8e6, "{r}");
        // A long pass at 5 MB/s: the rate follows.
        let t2 = t1 + ms(1000);
        m.begin(t2);
        for k in 1..=50 {
            m.pushed(1_000_000, t2 + ms(200 * k));
        }
        m.end(t2 + ms(10_000));
        assert!((m.rate() - 5e6).abs() < 0.01e6, "{}", m.rate());
    }

    #[test]
    fn the_measured_rate_never_exceeds_the_cap() {
        let t0 = Instant::now();
        let mut m = Meter::new(Some(1_000_000));
        m.begin(t0);
        // 4 MB pushed at once into the socket's buffer.
        m.pushed(4_000_000, t0 + ms(250));
        m.end(t0 + ms(250));
        assert_eq!(m.rate(), 1_000_000.0);
    }
}
