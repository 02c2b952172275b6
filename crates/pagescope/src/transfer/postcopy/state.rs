//! What the post-copy receiver knows about each page, under one lock:
//! the pre-copy pages it holds (not final until the switch), which pages
//! are still to come after it, which are installed, which threads wait on
//! which page, and the counts the report gives. Every install goes
//! through here, so no page is filled twice.

use std::collections::HashMap;
use std::time::Instant;

use super::dest::{Destination, Installed};

use super::spill::HeldPages;

/// A set of page indices.
#[derive(Default)]
pub(super) struct Bits(Vec<u64>);

impl Bits {
    pub(super) fn get(&self, p: u64) -> bool {
        self.0
            .get((p / 64) as usize)
            .is_some_and(|w| w & (1 << (p % 64)) != 0)
    }

    pub(super) fn set(&mut self, p: u64, on: bool) {
        let w = (p / 64) as usize;
        if w >= self.0.len() {
            self.0.resize(w + 1, 0);
        }
        if on {
            self.0[w] |= 1 << (p % 64);
        } else {
            self.0[w] &= !(1 << (p % 64));
        }
    }
}

/// One thread waiting on a page: where it faulted, since when.
struct Waiter {
    addr: u64,
    since: Instant,
}

/// How many already-present pages the report lists.
pub const MAX_LISTED: usize = 32;

/// The report's counts.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PostcopyStats {
    /// Pages installed because a thread of the destination waited on them.
    pub pages_by_fault: u64,
    /// Pages installed in the background (nobody waited).
    pub pages_background: u64,
    /// Of those, pages written into the file (no registered mapping).
    pub pages_written: u64,
    /// Pages found already present (`EEXIST`): woken, not overwritten.
    /// Something other than the receiver filled them (a mapping of FILE
    /// not registered yet, a write to FILE): the destination may have
    /// read zeros there, so a non-zero count fails the receive.
    pub pages_already_present: u64,
    /// The first 32 of those pages (page offsets in FILE).
    pub already_present_pages: Vec<u64>,
    /// Pages that arrived again after they were final (dropped, never
    /// installed twice).
    pub pages_duplicate: u64,
    /// The most bytes of pre-copy pages held in memory at once.
    pub held_peak_bytes: u64,
    /// Pre-copy pages held in the spill file instead (past the bound).
    pub pages_spilled: u64,
    /// Fault messages read.
    pub faults: u64,
    /// Pages the sender was asked for.
    pub requests: u64,
    /// How long faulting threads waited, from the later of the fault and
    /// the switch to post-copy, to the install: median, microseconds.
    pub fault_latency_p50_us: f64,
    /// The same, 99th percentile.
    pub fault_latency_p99_us: f64,
}

/// Pages to ask the sender for first: `(first, count)`.
pub(super) type Ask = (u64, u64);

/// Every page's state.
pub(super) struct Pages {
    pages: u64,
    pub(super) held: HeldPages,
    pending: Bits,
    started: Option<Instant>,
    installed: Bits,
    installed_count: u64,
    requested: Bits,
    waiters: HashMap<u64, Vec<Waiter>>,
    /// Pages of the last neighbourhood asked for, and how many to ask next.
    streak: (u64, u64),
    latencies: Vec<f64>,
    pub(super) stats: PostcopyStats,
    zero: Box<[u8]>,
}

/// Neighbourhood requests grow from this many pages ...
const FIRST_CHUNK: u64 = 16;
/// ... up to this many.
const MAX_CHUNK: u64 = 1024;

impl Pages {
    pub(super) fn new(page: usize, held: HeldPages) -> Self {
        Self {
            pages: 0,
            held,
            pending: Bits::default(),
            started: None,
            installed: Bits::default(),
            installed_count: 0,
            requested: Bits::default(),
            waiters: HashMap::new(),
            streak: (u64::MAX, FIRST_CHUNK),
            latencies: Vec::new(),
            stats: PostcopyStats::default(),
            zero: vec![0u8; page].into_boxed_slice(),
        }
    }

    /// The object's size in pages.
    pub(super) fn pages(&self) -> u64 {
        self.pages
    }

    pub(super) fn grow(&mut self, pages: u64) {
        self.pages = self.pages.max(pages);
    }

    pub(super) fn started(&self) -> bool {
        self.started.is_some()
    }

    fn is_final(&self, p: u64) -> bool {
        self.started.is_some() && !self.pending.get(p)
    }

    /// Page `p`'s bytes arrived (`None`: zero or a hole).
    pub(super) fn arrived(
        &mut self,
        dest: &Destination,
        p: u64,
        data: Option<&[u8]>,
    ) -> Result<(), String> {
        if self.started.is_none() {
            return self.held.put(p, data);
        }
        if !self.pending.get(p) || self.installed.get(p) {
            self.stats.pages_duplicate += 1;
            return Ok(()); // final already: never filled twice
        }
        self.pending.set(p, false);
        self.held.forget(p);
        self.install(dest, p, data)
    }

    /// Pages `first..first + count` will come after the switch.
    pub(super) fn pend(&mut self, first: u64, count: u64) -> u64 {
        let mut n = 0;
        for p in first..first + count {
            if !self.pending.get(p) {
                self.pending.set(p, true);
                n += 1;
            }
        }
        n
    }

    /// The switch: pages not pending are final. Faults that waited for it
    /// on final pages are resolved; the others are returned to ask for.
    pub(super) fn start(&mut self, dest: &Destination) -> Result<Vec<Ask>, String> {
        self.started = Some(Instant::now());
        let waited: Vec<u64> = self.waiters.keys().copied().collect();
        let mut asks = Vec::new();
        for p in waited {
            if self.is_final(p) {
                self.install_held(dest, p)?;
            } else {
                asks.extend(self.ask(p));
            }
        }
        Ok(asks)
    }

    /// Installs up to `max` final pages nobody asked for, from `from`
    /// on; the next page to look at (`None`: all done).
    pub(super) fn fill(
        &mut self,
        dest: &Destination,
        from: u64,
        max: u64,
    ) -> Result<Option<u64>, String> {
        let mut p = from;
        let mut done = 0;
        while p < self.pages && done < max {
            if self.is_final(p) && !self.installed.get(p) {
                self.install_held(dest, p)?;
                done += 1;
            }
            p += 1;
        }
        Ok((p < self.pages).then_some(p))
    }

    fn install_held(&mut self, dest: &Destination, p: u64) -> Result<(), String> {
        let data = self.held.take(p)?;
        self.install(dest, p, data.as_deref())
    }

    /// A thread faulted at `addr`: resolved at once if its page is final,
    /// else it waits; what to ask the sender for.
    pub(super) fn fault(&mut self, dest: &Destination, addr: u64) -> Result<Vec<Ask>, String> {
        self.stats.faults += 1;
        let Some(p) = dest.page_of(addr) else {
            return Ok(Vec::new());
        };
        if self.installed.get(p) {
            dest.wake(addr);
            return Ok(Vec::new());
        }
        self.waiters.entry(p).or_default().push(Waiter {
            addr,
            since: Instant::now(),
        });
        if self.is_final(p) {
            self.install_held(dest, p)?;
            return Ok(Vec::new());
        }
        Ok(if self.started() {
            self.ask(p)
        } else {
            Vec::new()
        })
    }

    /// The pages still to come, as ranges `(first, count)` (`LACK`).
    pub(super) fn lacking(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for p in (0..self.pages).filter(|&p| self.pending.get(p)) {
            match out.last_mut() {
                Some((first, count)) if *first + *count == p => *count += 1,
                _ => out.push((p, 1)),
            }
        }
        out
    }

    /// A new connection: requests made before it are forgotten; the
    /// pages threads wait on are asked for again.
    pub(super) fn reask(&mut self) -> Vec<Ask> {
        self.requested = Bits::default();
        self.streak = (u64::MAX, FIRST_CHUNK);
        let mut waited: Vec<u64> = self.waiters.keys().copied().collect();
        waited.retain(|&p| self.pending.get(p));
        waited.sort_unstable();
        let mut asks = Vec::new();
        for p in waited {
            asks.extend(self.ask(p));
        }
        asks
    }

    /// Page `p` first, then its neighbourhood, growing while faults come
    /// in order.
    fn ask(&mut self, p: u64) -> Vec<Ask> {
        let mut asks = Vec::new();
        if !self.requested.get(p) {
            self.requested.set(p, true);
            asks.push((p, 1));
        }
        let (last_end, size) = self.streak;
        let size = if p < last_end && p + MAX_CHUNK >= last_end {
            (size * 2).min(MAX_CHUNK)
        } else {
            FIRST_CHUNK
        };
        let end = (p + 1 + size).min(self.pages);
        if p + 1 < end {
            asks.push((p + 1, end - p - 1));
            self.streak = (end, size);
        }
        self.stats.requests += asks.iter().map(|a| a.1).sum::<u64>();
        asks
    }

    /// Puts page `p` in, wakes whoever waits on it, counts it.
    fn install(&mut self, dest: &Destination, p: u64, data: Option<&[u8]>) -> Result<(), String> {
        let waiters = self.waiters.remove(&p).unwrap_or_default();
        let data = data.unwrap_or(&self.zero);
        let how = dest.install(p, waiters.first().map(|w| w.addr), data)?;
        for w in waiters.iter().skip(1) {
            dest.wake(w.addr);
        }
        self.installed.set(p, true);
        self.installed_count += 1;
        match how {
            Installed::Existed => {
                self.stats.pages_already_present += 1;
                if self.stats.already_present_pages.len() < MAX_LISTED {
                    self.stats.already_present_pages.push(p);
                }
            }
            Installed::Written => self.stats.pages_written += 1,
            Installed::Copied => {}
        }
        if waiters.is_empty() {
            self.stats.pages_background += 1;
        } else {
            self.stats.pages_by_fault += 1;
            let now = Instant::now();
            let switch = self.started.unwrap_or(now);
            for w in &waiters {
                let from = w.since.max(switch);
                self.latencies
                    .push(now.saturating_duration_since(from).as_secs_f64() * 1e6);
            }
        }
        Ok(())
    }

    /// Whether every page is in.
    pub(super) fn complete(&self) -> bool {
        self.started.is_some() && self.installed_count >= self.pages
    }

    /// The pages that are not in, as ranges `first..=last`.
    pub(super) fn missing(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for p in (0..self.pages).filter(|&p| !self.installed.get(p)) {
            match out.last_mut() {
                Some((_, last)) if *last + 1 == p => *last = p,
                _ => out.push((p, p)),
            }
        }
        out
    }

    /// The final counts, latencies summarised.
    pub(super) fn report(&mut self) -> PostcopyStats {
        self.latencies.sort_by(f64::total_cmp);
        // The q-th percentile: the value at rank ceil(n * q / 100).
        let at = |q: usize| {
            let n = self.latencies.len();
            if n == 0 {
                return 0.0;
            }
            let rank = (n * q).div_ceil(100);
            self.latencies[rank.clamp(1, n) - 1]
        };
        let mut s = self.stats.clone();
        s.held_peak_bytes = self.held.peak;
        s.pages_spilled = self.held.spilled;
        s.fault_latency_p50_us = at(50);
        s.fault_latency_p99_us = at(99);
        s
    }
}

/// The error's line, with the pages that never arrived and what happens
/// to the destination's threads.
pub(super) fn lost(state: &Pages, dest: &Destination, what: &str) -> String {
    let fd = dest
        .target_fd()
        .map_or(String::new(), |fd| format!(" (its fd {fd})"));
    let which = if state.started() {
        let m = state.missing();
        let n: u64 = m.iter().map(|(a, b)| b - a + 1).sum();
        format!("{n} pages never arrived: {}", show_ranges(&m))
    } else {
        format!(
            "post-copy had not begun: none of the {} pages is final",
            state.pages()
        )
    };
    format!(
        "{what}; {which}; process {} keeps the userfaultfd{fd}: its threads that touch those pages block until it is killed",
        dest.pid()
    )
}

/// `first-last,…` for a message.
pub(super) fn show_ranges(r: &[(u64, u64)]) -> String {
    r.iter()
        .map(|&(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_and_ranges() {
        let mut b = Bits::default();
        for p in [0, 1, 2, 64, 130] {
            b.set(p, true);
        }
        b.set(1, false);
        let on: Vec<u64> = (0..200).filter(|&p| b.get(p)).collect();
        assert_eq!(on, [0, 2, 64, 130]);
        assert_eq!(show_ranges(&[(0, 0), (2, 5), (9, 9)]), "0,2-5,9");
    }
}
