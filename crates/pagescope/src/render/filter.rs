//! `--state`, `--backing` and `--path GLOB`: which mappings, runs and
//! objects a listing keeps.

use crate::page::{PageRun, PageState};
use crate::report::{Counts, VmaReport};
use crate::vma::Backing;

/// A shell-style pattern: `*` any run of characters (`/` included), `?`
/// one character, `[abc]`/`[a-z]`/`[!a]` one of a set; everything else
/// itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob(Vec<char>);

impl Glob {
    /// The pattern `text`.
    pub fn new(text: &str) -> Self {
        Self(text.chars().collect())
    }

    /// Whether all of `s` matches.
    pub fn matches(&self, s: &str) -> bool {
        let s: Vec<char> = s.chars().collect();
        glob_match(&self.0, &s)
    }
}

fn glob_match(p: &[char], s: &[char]) -> bool {
    match p.first() {
        None => s.is_empty(),
        Some('*') => (0..=s.len()).any(|i| glob_match(&p[1..], &s[i..])),
        Some('?') => !s.is_empty() && glob_match(&p[1..], &s[1..]),
        Some('[') => match (class_end(p), s.first()) {
            (Some(end), Some(&c)) => in_class(&p[1..end], c) && glob_match(&p[end + 1..], &s[1..]),
            (Some(_), None) => false,
            (None, _) => s.first() == Some(&'[') && glob_match(&p[1..], &s[1..]),
        },
        Some(&c) => s.first() == Some(&c) && glob_match(&p[1..], &s[1..]),
    }
}

/// The index of the `]` closing the class that starts at `p[0]`.
fn class_end(p: &[char]) -> Option<usize> {
    let first = if matches!(p.get(1), Some('!' | '^')) {
        2
    } else {
        1
    };
    // A `]` right after `[` or `[!` is a member, not the end.
    (first + 1..p.len()).find(|&i| p[i] == ']')
}

fn in_class(class: &[char], c: char) -> bool {
    let (negate, class) = match class.first() {
        Some('!' | '^') => (true, &class[1..]),
        _ => (false, class),
    };
    let mut i = 0;
    let mut hit = false;
    while i < class.len() {
        if i + 2 < class.len() && class[i + 1] == '-' {
            hit |= (class[i]..=class[i + 2]).contains(&c);
            i += 3;
        } else {
            hit |= class[i] == c;
            i += 1;
        }
    }
    hit != negate
}

/// What a listing keeps; empty parts keep everything.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Keep mappings and objects with pages in any of these states, and
    /// only runs in these states.
    pub states: Vec<PageState>,
    /// Keep mappings and objects with one of these backings.
    pub backings: Vec<Backing>,
    /// Keep mappings and objects whose path matches.
    pub path: Option<Glob>,
}

impl Filter {
    /// Whether the filter keeps everything.
    pub fn is_empty(&self) -> bool {
        self.states.is_empty() && self.backings.is_empty() && self.path.is_none()
    }

    /// Whether a mapping (or object) with this backing, path and page
    /// counts is kept.
    pub fn keeps(&self, backing: Backing, path: &str, counts: &Counts) -> bool {
        (self.backings.is_empty() || self.backings.contains(&backing))
            && self.path.as_ref().is_none_or(|g| g.matches(path))
            && (self.states.is_empty() || self.states.iter().any(|&s| counts.get(s) > 0))
    }

    /// Whether the mapping is kept.
    pub fn keeps_vma(&self, v: &VmaReport) -> bool {
        self.keeps(v.vma.backing, &v.vma.path.display(), &v.counts())
    }

    /// Drops the mappings the filter does not keep from `r` (and, with
    /// `runs`, the runs of other states), so every form of the report
    /// (text, JSON, totals) shows the same selection.
    pub fn apply(&self, r: &mut crate::report::ProcessReport, runs: bool) {
        r.vmas.retain(|v| self.keeps_vma(v));
        if runs {
            for v in &mut r.vmas {
                v.runs.retain(|run| self.keeps_run(run));
            }
        }
    }

    /// Drops the objects the filter does not keep.
    pub fn apply_objects(&self, r: &mut crate::object::view::ObjectsReport) {
        r.objects
            .retain(|o| self.keeps(o.backing, &o.path, &o.counts));
    }

    /// Whether a run of a kept mapping is listed.
    pub fn keeps_run(&self, run: &PageRun) -> bool {
        self.states.is_empty() || self.states.contains(&run.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_the_shell() {
        let m = |p: &str, s: &str| Glob::new(p).matches(s);
        assert!(m("*libc*", "/usr/lib/x86_64-linux-gnu/libc.so.6"));
        assert!(m("/memfd:*", "/memfd:guest-ram (deleted)"));
        assert!(!m("/memfd:*", "[heap]"));
        assert!(m("[[]heap]", "[heap]"));
        assert!(m("lib?.so", "libc.so"));
        assert!(!m("lib?.so", "libcc.so"));
        assert!(m("[a-c]x", "bx") && !m("[!a-c]x", "bx") && m("[!a-c]x", "dx"));
        assert!(m("", "") && !m("", "x") && m("*", ""));
        assert!(m("[unclosed", "[unclosed"));
    }

    #[test]
    fn an_empty_filter_keeps_everything() {
        let f = Filter::default();
        assert!(f.is_empty());
        assert!(f.keeps(Backing::Anon, "", &Counts::default()));
        let mut c = Counts::default();
        c.add(PageState::Swapped, 3);
        let swapped = Filter {
            states: vec![PageState::Swapped],
            ..Filter::default()
        };
        assert!(swapped.keeps(Backing::Shmem, "/dev/shm/x", &c));
        assert!(!swapped.keeps(Backing::Shmem, "/dev/shm/x", &Counts::default()));
    }
}
