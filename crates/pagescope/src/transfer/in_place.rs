//! `receive --into FILE --in-place`: one shared object's pages written
//! straight into an existing FILE, for a destination that already maps it.
//!
//! Why a second mode: a destination QEMU (`memory-backend-file,mem-path=
//! FILE,share=on`, `-incoming defer`) opens and maps FILE when it starts,
//! and it must be running and listening before the source's `migrate`,
//! which `send --qmp` runs right after the final pass is acknowledged. The
//! default commit (`FILE.partial` renamed over FILE) would leave that QEMU
//! mapping the old inode. So the pages go into FILE itself, at their
//! offsets (`pwrite`; zero pages punched out).
//!
//! The commit cannot be a rename, so it is stated two ways instead:
//!
//! * a marker, `FILE.incomplete`, created (and synced, with its directory)
//!   before FILE is touched and removed only at commit, after FILE is
//!   synced: while it exists, FILE is not a complete copy, whatever it
//!   holds; an interrupted transfer leaves it there;
//! * the receiver's `ACK` to the sender and its exit status 0, both only
//!   after that commit; `send --qmp` runs `migrate` only after the `ACK`,
//!   so a destination guest never runs on RAM that was not committed.
//!
//! At the start every page of FILE is punched out (zero, as a fresh file;
//! no truncate, so a mapping of it stays valid), and FILE grows to the
//! object's size if it is smaller (it is never shrunk under a mapping).
//! No kernel interface of its own: `std` files and `fallocate`.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The marker beside `path` that says it is not complete.
pub fn marker(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".incomplete");
    PathBuf::from(p)
}

/// Opens the existing `path` for `pages` pages of `page` bytes: marker
/// first, then every page punched out, then grown if it is smaller.
pub fn open(path: &Path, pages: u64, page: u64) -> Result<File, String> {
    let shown = path.display();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| {
            format!("cannot open {shown} to write in place (it must exist, made by the destination that maps it): {e}")
        })?;
    let len = f
        .metadata()
        .map_err(|e| format!("cannot stat {shown}: {e}"))?
        .len();
    write_marker(path)?;
    if len > 0 {
        let flags = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
        rustix::fs::fallocate(&f, flags, 0, len)
            .map_err(|e| format!("cannot clear {shown}: {e}"))?;
    }
    let want = pages.saturating_mul(page);
    if len < want {
        f.set_len(want)
            .map_err(|e| format!("cannot size {shown}: {e}"))?;
    }
    Ok(f)
}

fn write_marker(path: &Path) -> Result<(), String> {
    let m = marker(path);
    let mut f = File::create(&m).map_err(|e| format!("cannot create {}: {e}", m.display()))?;
    writeln!(
        f,
        "pagescope receive (process {}) is writing {}: not complete while this file exists",
        std::process::id(),
        path.display()
    )
    .and_then(|()| f.sync_all())
    .map_err(|e| format!("cannot write {}: {e}", m.display()))?;
    sync_dir(path);
    Ok(())
}

/// Commits `file` (at `path`): synced, then the marker removed.
pub fn commit(path: &Path, file: &File) -> Result<(), String> {
    file.sync_all()
        .map_err(|e| format!("cannot fsync {}: {e}", path.display()))?;
    let m = marker(path);
    std::fs::remove_file(&m).map_err(|e| format!("cannot remove {}: {e}", m.display()))?;
    sync_dir(path);
    Ok(())
}

fn sync_dir(path: &Path) {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        let _ = File::open(parent).and_then(|d| d.sync_all());
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    const PAGE: u64 = 4096;

    fn scratch(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("pagescope-in-place-{}-{name}", std::process::id()))
    }

    #[test]
    fn the_marker_lasts_from_open_to_commit_and_old_pages_are_cleared() {
        let path = scratch("ram");
        std::fs::write(&path, vec![0xa5; 4 * PAGE as usize]).unwrap();
        let f = open(&path, 6, PAGE).unwrap();
        assert!(marker(&path).is_file(), "marker before the first page");
        let mut all = vec![1u8; 6 * PAGE as usize];
        f.read_exact_at(&mut all, 0).unwrap();
        assert!(
            all.iter().all(|&b| b == 0),
            "old pages punched, grown to 6 pages"
        );
        f.write_all_at(&[7; PAGE as usize], 2 * PAGE).unwrap();
        commit(&path, &f).unwrap();
        assert!(!marker(&path).exists(), "marker removed at commit");
        let got = std::fs::read(&path).unwrap();
        assert_eq!(got.len() as u64, 6 * PAGE);
        assert!(
            got[2 * PAGE as usize..3 * PAGE as usize]
                .iter()
                .all(|&b| b == 7)
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_missing_file_is_refused_without_a_marker() {
        let path = scratch("missing");
        let e = open(&path, 1, PAGE).unwrap_err();
        assert!(e.contains("must exist"), "{e}");
        assert!(!marker(&path).exists());
    }

    #[test]
    fn a_larger_file_is_not_shrunk() {
        let path = scratch("larger");
        std::fs::write(&path, vec![1; 8 * PAGE as usize]).unwrap();
        let f = open(&path, 2, PAGE).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 8 * PAGE);
        drop(f);
        std::fs::remove_file(&path).unwrap();
        std::fs::remove_file(marker(&path)).unwrap();
    }
}
