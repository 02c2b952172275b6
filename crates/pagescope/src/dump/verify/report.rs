//! What a verify found: every differing range counted (the first `limit`
//! listed, the rest summed), private memory apart from shared objects,
//! pages not compared and why, kernel-owned rseq fields that moved, and
//! what makes differences expected (a running process, other writers).

use serde::Serialize;

/// The ranges listed by default (`--limit`).
pub const DEFAULT_LIMIT: usize = 16;

/// Which memory a difference is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Memory {
    /// The process's own pages (anonymous, private copies of file pages).
    Private,
    /// A shared object's pages (memfd, tmpfs, SysV, shared anonymous,
    /// shared file mappings).
    Shared,
}

/// A range where an image and the live memory differ.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    /// `pid 123 0x7f..-0x7f.. pages A..B` or `object DEV inode N (PATH)
    /// pages A..B`.
    pub what: String,
    /// Pages that differ in it.
    pub pages: u64,
    /// Private memory or a shared object.
    pub memory: Memory,
}

/// Pages that were not compared, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NotCompared {
    /// The mapping or object.
    pub what: String,
    /// How many of its pages.
    pub pages: u64,
    /// Why.
    pub reason: String,
}

/// An rseq area whose kernel-owned fields differ from the image: expected
/// (the kernel rewrites them whenever the thread runs), never a mismatch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KernelOwned {
    /// The process.
    pub pid: u32,
    /// The thread whose area it is.
    pub tid: u32,
    /// The area's address.
    pub address: u64,
    /// The fields that differ (`cpu_id_start`, `cpu_id`, `node_id`,
    /// `mm_cid`).
    pub fields: Vec<String>,
}

/// A shared object of the image that other processes map writable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OtherWriters {
    /// The object.
    pub object: String,
    /// The processes (not the target) mapping it shared and writable.
    pub pids: Vec<u32>,
}

/// The result of a verify.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    /// Pages compared byte for byte.
    pub compared: u64,
    /// Pages that differ: the sum over every range, listed or not.
    pub mismatched_pages: u64,
    /// Of them, in the process's own (private) memory.
    pub private_mismatched_pages: u64,
    /// Of them, in shared objects.
    pub shared_mismatched_pages: u64,
    /// Differing ranges in all.
    pub mismatched_ranges: u64,
    /// Ranges listed in `mismatches` (at most the limit).
    pub listed_ranges: u64,
    /// Ranges not listed, and their pages.
    pub omitted_ranges: u64,
    /// Pages of the ranges not listed.
    pub omitted_pages: u64,
    /// The first differing ranges, in the image's order.
    pub mismatches: Vec<Mismatch>,
    /// Mappings of the image the process no longer has (or has changed).
    pub missing: Vec<String>,
    /// Pages the image does not hold (swapped, not copied).
    pub not_copied: u64,
    /// Pages not compared (sum of `not_compared`).
    pub not_compared_pages: u64,
    /// Pages not compared, per mapping or object and reason.
    pub not_compared: Vec<NotCompared>,
    /// rseq areas whose kernel-owned fields moved (not mismatches).
    pub kernel_owned: Vec<KernelOwned>,
    /// Whether the process was stopped (`T`/`t` in `/proc/PID/stat`) when
    /// verified; a running process's later writes show as differences.
    pub process_stopped: bool,
    /// Shared objects other processes map writable: their writes show as
    /// differences too.
    pub other_writers: Vec<OtherWriters>,
    /// What limited the verify.
    pub notes: Vec<String>,
    #[serde(skip)]
    limit: usize,
}

impl Default for VerifyReport {
    fn default() -> Self {
        Self::new(DEFAULT_LIMIT)
    }
}

impl VerifyReport {
    /// An empty report listing at most `limit` ranges.
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            compared: 0,
            mismatched_pages: 0,
            private_mismatched_pages: 0,
            shared_mismatched_pages: 0,
            mismatched_ranges: 0,
            listed_ranges: 0,
            omitted_ranges: 0,
            omitted_pages: 0,
            mismatches: Vec::new(),
            missing: Vec::new(),
            not_copied: 0,
            not_compared_pages: 0,
            not_compared: Vec::new(),
            kernel_owned: Vec::new(),
            process_stopped: false,
            other_writers: Vec::new(),
            notes: Vec::new(),
            limit,
        }
    }

    /// Whether every page compared matched and no mapping is missing
    /// (pages not compared do not count against it).
    pub fn matches(&self) -> bool {
        self.mismatched_pages == 0 && self.missing.is_empty()
    }

    /// Records the differing pages `bad` (sorted page indices) of one
    /// mapping or object, in runs.
    pub(super) fn record(&mut self, what: impl FnOnce() -> String, memory: Memory, bad: &[u64]) {
        if bad.is_empty() {
            return;
        }
        let n = bad.len() as u64;
        self.mismatched_pages += n;
        match memory {
            Memory::Private => self.private_mismatched_pages += n,
            Memory::Shared => self.shared_mismatched_pages += n,
        }
        let prefix = what();
        for (a, n) in runs(bad) {
            self.mismatched_ranges += 1;
            if self.mismatches.len() < self.limit {
                self.listed_ranges += 1;
                self.mismatches.push(Mismatch {
                    what: format!("{prefix} pages {a}..{}", a + n),
                    pages: n,
                    memory,
                });
            } else {
                self.omitted_ranges += 1;
                self.omitted_pages += n;
            }
        }
    }

    /// Counts `pages` pages of `what` as not compared, for `reason`.
    pub(super) fn not_compared(&mut self, what: &str, pages: u64, reason: &str) {
        if pages == 0 {
            return;
        }
        self.not_compared_pages += pages;
        match self
            .not_compared
            .iter_mut()
            .find(|n| n.what == what && n.reason == reason)
        {
            Some(n) => n.pages += pages,
            None => self.not_compared.push(NotCompared {
                what: what.to_owned(),
                pages,
                reason: reason.to_owned(),
            }),
        }
    }

    /// Adds a note once.
    pub(super) fn note(&mut self, s: String) {
        if !self.notes.contains(&s) {
            self.notes.push(s);
        }
    }
}

/// Sorted page indices as (first, count) runs.
fn runs(pages: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &p in pages {
        match out.last_mut() {
            Some((a, n)) if *a + *n == p => *n += 1,
            _ => out.push((p, 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_range_is_counted_and_only_limit_listed() {
        let mut r = VerifyReport::new(2);
        r.record(|| "a".into(), Memory::Private, &[1, 2, 5, 9, 10, 11]);
        r.record(|| "b".into(), Memory::Shared, &[0]);
        assert_eq!(r.mismatched_pages, 7);
        assert_eq!(r.private_mismatched_pages, 6);
        assert_eq!(r.shared_mismatched_pages, 1);
        assert_eq!(r.mismatched_ranges, 4);
        assert_eq!(r.listed_ranges, 2);
        assert_eq!((r.omitted_ranges, r.omitted_pages), (2, 4));
        let listed: u64 = r.mismatches.iter().map(|m| m.pages).sum();
        assert_eq!(listed + r.omitted_pages, r.mismatched_pages);
        assert_eq!(r.mismatches[1].what, "a pages 5..6");
    }

    #[test]
    fn not_compared_merges_by_place_and_reason() {
        let mut r = VerifyReport::default();
        r.not_compared("x", 2, "swapped");
        r.not_compared("x", 3, "swapped");
        r.not_compared("x", 1, "other");
        r.not_compared("x", 0, "none");
        assert_eq!(r.not_compared_pages, 6);
        assert_eq!(r.not_compared.len(), 2);
        assert!(r.matches());
    }
}
