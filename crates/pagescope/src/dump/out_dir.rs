//! The image directory's life around a dump: a directory an interrupted
//! dump left (never committed: no `HEADER`, only what a dump writes) is
//! emptied and reused with a note; anything else non-empty is refused by
//! the writer. A dump that fails or is interrupted removes what it wrote.

use std::path::Path;

use crate::image::format::{DATA_DIR, HEADER_FILE, META_FILE};

/// What [`prepare`] found.
#[derive(Debug, Default)]
pub(super) struct Prepared {
    /// The directory did not exist: a failed dump removes it whole.
    pub created: bool,
    /// The note to report (a leftover directory was reused).
    pub note: Option<String>,
}

/// Empties `dir` if an interrupted dump left it.
pub(super) fn prepare(dir: &Path) -> Prepared {
    if !dir.exists() {
        return Prepared {
            created: true,
            note: None,
        };
    }
    if !is_leftover(dir) {
        return Prepared::default();
    }
    discard_contents(dir);
    Prepared {
        created: false,
        note: Some(format!(
            "{} held an image an interrupted dump never committed (no {HEADER_FILE}): reused",
            dir.display()
        )),
    }
}

/// Removes what a failed dump wrote into `dir` (and `dir` itself if the
/// dump created it). Only names a dump writes are removed.
pub(super) fn discard(dir: &Path, prepared: &Prepared) {
    if dir.join(HEADER_FILE).exists() {
        return;
    }
    discard_contents(dir);
    if prepared.created {
        let _ = std::fs::remove_dir(dir);
    }
}

/// The top-level names a dump writes before its commit.
const UNCOMMITTED: [&str; 3] = [DATA_DIR, META_FILE, "meta.tmp"];

/// No `HEADER`; at the top only `data/` and `meta.json` (or their
/// temporaries); in `data/` only store files (`.pages`, `.sums`, `.tmp`).
fn is_leftover(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    let mut saw_data = false;
    for e in entries {
        let Ok(e) = e else { return false };
        let name = e.file_name();
        let Some(name) = name.to_str() else {
            return false;
        };
        if name == "HEADER.tmp" {
            continue;
        }
        if !UNCOMMITTED.contains(&name) {
            return false;
        }
        saw_data |= name == DATA_DIR;
    }
    saw_data && data_holds_only_stores(&dir.join(DATA_DIR))
}

fn data_holds_only_stores(data: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(data) else {
        return false;
    };
    entries.into_iter().all(|e| {
        e.is_ok_and(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            e.file_type().is_ok_and(|t| t.is_file())
                && [".pages", ".sums", ".tmp"]
                    .iter()
                    .any(|ext| name.ends_with(ext))
        })
    })
}

fn discard_contents(dir: &Path) {
    let data = dir.join(DATA_DIR);
    if data_holds_only_stores(&data) {
        let _ = std::fs::remove_dir_all(&data);
    }
    for name in [META_FILE, "meta.tmp", "HEADER.tmp"] {
        let _ = std::fs::remove_file(dir.join(name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_dumps_own_leftovers_are_reused() {
        let base = std::env::temp_dir().join(format!("pagescope-outdir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let left = base.join("left");
        std::fs::create_dir_all(left.join("data")).unwrap();
        std::fs::write(left.join("data/p1-1000.pages"), b"x").unwrap();
        std::fs::write(left.join("data/p1-1000.sums"), b"x").unwrap();
        let p = prepare(&left);
        assert!(p.note.is_some() && !p.created);
        assert_eq!(std::fs::read_dir(&left).unwrap().count(), 0);
        let other = base.join("other");
        std::fs::create_dir_all(other.join("data")).unwrap();
        std::fs::write(other.join("notes.txt"), b"mine").unwrap();
        assert!(prepare(&other).note.is_none());
        assert!(other.join("notes.txt").exists());
        let committed = base.join("committed");
        std::fs::create_dir_all(committed.join("data")).unwrap();
        std::fs::write(committed.join(HEADER_FILE), b"h").unwrap();
        assert!(prepare(&committed).note.is_none());
        discard(&committed, &Prepared::default());
        assert!(committed.join(HEADER_FILE).exists());
        let _ = std::fs::remove_dir_all(&base);
    }
}
