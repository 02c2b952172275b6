//! A resumable receive's state on disk (`receive --resume`): the partial
//! data where the commit will find it (`DIR/data/NAME.pages`, or
//! `FILE.partial`) and, per store, a sums sidecar (`DIR/.partial-sums/
//! NAME.sums`, or `FILE.partial.sums`): a 4 KiB header (magic, page size,
//! the sender's identity, the store's name) then one `u64` page sum per
//! page (0: not held), written as pages arrive. The data is `fsync`ed
//! before its sidecar at the end of each pass, every 64 MiB and when the
//! connection drops; correctness does not rest on that order: a resumed
//! receiver reads every page its sidecar names and keeps only those whose
//! bytes still match their sum. Plain files through `std` and `fallocate`.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::output::partial;
use super::receive::Target;
use crate::image::StoreName;
use crate::image::format::{self, DATA_DIR, HEADER_FILE, META_FILE};

/// The sidecars' directory inside an image directory.
pub const SIDECARS: &str = ".partial-sums";
const MAGIC: [u8; 8] = *b"PGSCPART";
const VERSION: u32 = 1;
/// Bytes before the first sum.
const HEAD: u64 = 4096;

/// The sidecar of store `name`.
fn sidecar(into: &Target, name: &str) -> PathBuf {
    match into {
        Target::Image(dir) => dir.join(SIDECARS).join(format!("{name}.sums")),
        Target::File(path) | Target::InPlace(path) => {
            let mut p = partial(path).into_os_string();
            p.push(".sums");
            PathBuf::from(p)
        }
    }
}

/// The partial data of store `name`.
fn data(into: &Target, name: &str) -> Option<PathBuf> {
    match into {
        Target::Image(dir) => StoreName::new(name).map(|n| n.pages_path(dir)),
        Target::File(path) | Target::InPlace(path) => Some(partial(path)),
    }
}

/// What an interrupted receive left, checked page by page.
#[derive(Debug, Default)]
pub struct Held {
    /// The sender it came from (its `RESUME` line).
    pub identity: String,
    /// Per store name, the sum of each page whose bytes are there (0: none).
    pub stores: BTreeMap<String, Vec<u64>>,
    /// Pages a sidecar named whose bytes did not match (lost in a crash).
    pub dropped: u64,
}

impl Held {
    /// Pages held in all.
    pub fn pages(&self) -> u64 {
        let held = self.stores.values().flatten().filter(|&&s| s != 0).count();
        held as u64
    }
}

/// Whether `into` holds an interrupted receive's state.
pub fn exists(into: &Target) -> bool {
    match into {
        Target::Image(dir) => {
            let any = std::fs::read_dir(dir.join(SIDECARS)).is_ok_and(|mut d| d.next().is_some());
            any && !dir.join(HEADER_FILE).exists()
        }
        Target::File(_) | Target::InPlace(_) => sidecar(into, "").exists(),
    }
}

/// Whether `dir` holds only what a resumable receive writes before its
/// commit (no `HEADER`): such a directory may be resumed or discarded.
pub fn is_leftover(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    let allowed = [DATA_DIR, SIDECARS, META_FILE, "meta.tmp", "HEADER.tmp"];
    let names: Vec<String> = entries
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.iter().any(|n| n == SIDECARS) && names.iter().all(|n| allowed.contains(&n.as_str()))
}

/// Removes an interrupted receive's state (only the names it writes).
pub fn discard(into: &Target) {
    match into {
        Target::Image(dir) => {
            let _ = std::fs::remove_dir_all(dir.join(SIDECARS));
            if !dir.join(HEADER_FILE).exists() {
                let _ = std::fs::remove_dir_all(dir.join(DATA_DIR));
                for f in [META_FILE, "meta.tmp", "HEADER.tmp"] {
                    let _ = std::fs::remove_file(dir.join(f));
                }
            }
        }
        Target::File(path) | Target::InPlace(path) => {
            let _ = std::fs::remove_file(sidecar(into, ""));
            let _ = std::fs::remove_file(partial(path));
        }
    }
}

/// Makes sure an image directory shows it holds a resumable receive's
/// state, even before any store opened.
pub fn mark(into: &Target) -> Result<(), String> {
    match into {
        Target::Image(dir) => std::fs::create_dir_all(dir.join(SIDECARS))
            .map_err(|e| format!("cannot create {}: {e}", dir.join(SIDECARS).display())),
        Target::File(_) | Target::InPlace(_) => Ok(()),
    }
}

/// Removes store `name`'s partial data and sidecar (a store the resumed
/// stream never opened).
pub fn remove_store(into: &Target, name: &str) {
    if let Some(d) = data(into, name) {
        let _ = std::fs::remove_file(d);
    }
    let _ = std::fs::remove_file(sidecar(into, name));
}

/// Removes the sidecars after a commit.
pub fn committed(into: &Target) {
    match into {
        Target::Image(dir) => {
            let _ = std::fs::remove_dir_all(dir.join(SIDECARS));
        }
        Target::File(_) | Target::InPlace(_) => {
            let _ = std::fs::remove_file(sidecar(into, ""));
        }
    }
}

/// Reads what an interrupted receive into `into` left, with pages of
/// `page` bytes: every page its sidecar names is read and checked.
/// `None`: nothing usable (no state, another page size).
pub fn load(into: &Target, page: u32) -> Option<Held> {
    let sidecars: Vec<PathBuf> = match into {
        Target::Image(dir) => std::fs::read_dir(dir.join(SIDECARS))
            .ok()?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "sums"))
            .collect(),
        Target::File(_) | Target::InPlace(_) => vec![sidecar(into, "")],
    };
    let mut held = Held::default();
    for path in sidecars {
        let Some((identity, name, sums)) = read_sidecar(&path, page) else {
            continue;
        };
        if held.stores.is_empty() {
            held.identity = identity;
        } else if identity != held.identity {
            continue;
        }
        let Some(data) = data(into, &name) else {
            continue;
        };
        let (sums, dropped) = check_pages(&data, u64::from(page), sums);
        held.dropped += dropped;
        held.stores.insert(name, sums);
    }
    (!held.stores.is_empty()).then_some(held)
}

/// A sidecar's identity, store name and sums (`None`: not one, or pages
/// of another size).
fn read_sidecar(path: &Path, page: u32) -> Option<(String, String, Vec<u64>)> {
    let bytes = std::fs::read(path).ok()?;
    let head = bytes.get(..HEAD as usize)?;
    if head[..8] != MAGIC || head[8..12] != VERSION.to_le_bytes()[..] {
        return None;
    }
    if head[12..16] != page.to_le_bytes()[..] {
        return None;
    }
    let mut at = 16;
    let mut text = || {
        let len = u16::from_le_bytes(head.get(at..at + 2)?.try_into().ok()?) as usize;
        let s = String::from_utf8(head.get(at + 2..at + 2 + len)?.to_vec()).ok()?;
        at += 2 + len;
        Some(s)
    };
    let (identity, name) = (text()?, text()?);
    StoreName::new(&name)?;
    let sums = bytes[HEAD as usize..]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect();
    Some((identity, name, sums))
}

/// The sums whose pages in `data` still match (the others zeroed), and
/// how many did not.
fn check_pages(data: &Path, page: u64, mut sums: Vec<u64>) -> (Vec<u64>, u64) {
    let file = File::open(data).ok();
    let mut buf = vec![0u8; page as usize];
    let mut dropped = 0;
    for (i, s) in sums.iter_mut().enumerate().filter(|(_, s)| **s != 0) {
        let ok = file.as_ref().is_some_and(|f| {
            f.read_exact_at(&mut buf, i as u64 * page).is_ok() && format::page_sum(0, &buf) == *s
        });
        if !ok {
            *s = 0;
            dropped += 1;
        }
    }
    (sums, dropped)
}

/// One store of a resumable receive: its sidecar, an fd of its data, the
/// pages held from the interrupted transfer that this stream has not
/// confirmed yet, and the pages this stream wrote, kept or cleared.
#[derive(Debug)]
pub struct Track {
    sidecar: File,
    data: File,
    held: Vec<u64>,
    touched: Vec<bool>,
    page: u64,
}

impl Track {
    /// Tracks store `name` of `pages` pages in `into`, whose data file
    /// exists; `held`: its pages kept from the interrupted transfer.
    pub fn open(
        into: &Target,
        name: &str,
        identity: &str,
        page: u64,
        pages: u64,
        mut held: Vec<u64>,
    ) -> Result<Self, String> {
        let path = sidecar(into, name);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let data_path = data(into, name).ok_or("not a store name")?;
        let data = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&data_path)
            .map_err(|e| format!("cannot open {}: {e}", data_path.display()))?;
        held.resize(usize::try_from(pages).unwrap_or(0), 0);
        let mut bytes = header(identity, name, page);
        bytes.resize(HEAD as usize, 0);
        bytes.extend(held.iter().flat_map(|s| s.to_le_bytes()));
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &bytes)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        let sidecar = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let touched = vec![false; held.len()];
        Ok(Self {
            sidecar,
            data,
            held,
            touched,
            page,
        })
    }

    /// The store now holds `pages` pages.
    pub fn grow(&mut self, pages: u64) -> Result<(), String> {
        let n = usize::try_from(pages).unwrap_or(0);
        if n > self.held.len() {
            self.held.resize(n, 0);
            self.touched.resize(n, false);
            self.sidecar
                .set_len(HEAD + pages * 8)
                .map_err(|e| format!("cannot grow a sums sidecar: {e}"))?;
        }
        Ok(())
    }

    /// Pages `first..` were written with `sums` (0 for pages cleared).
    pub fn wrote(&mut self, first: u64, sums: &[u64]) -> Result<(), String> {
        let at = first as usize;
        for (i, _) in sums.iter().enumerate() {
            self.held[at + i] = 0;
            self.touched[at + i] = true;
        }
        let bytes: Vec<u8> = sums.iter().flat_map(|s| s.to_le_bytes()).collect();
        self.sidecar
            .write_all_at(&bytes, HEAD + first * 8)
            .map_err(|e| format!("cannot write a sums sidecar: {e}"))
    }

    /// Pages `first..` are kept: their held sums must be `sums`. The
    /// pages' bytes (checked again).
    pub fn keep(&mut self, first: u64, sums: &[u64]) -> Result<Vec<u8>, Keep> {
        let at = first as usize;
        for (i, s) in sums.iter().enumerate() {
            if self.held[at + i] != *s {
                return Err(Keep::NotHeld(first + i as u64));
            }
        }
        let mut bytes = vec![0u8; sums.len() * self.page as usize];
        self.data
            .read_exact_at(&mut bytes, first * self.page)
            .map_err(|e| Keep::Io(format!("cannot read back kept pages: {e}")))?;
        for (i, (p, s)) in bytes.chunks_exact(self.page as usize).zip(sums).enumerate() {
            if format::page_sum(0, p) != *s {
                return Err(Keep::Io(format!(
                    "kept page {} changed on disk",
                    first + i as u64
                )));
            }
            self.held[at + i] = 0;
            self.touched[at + i] = true;
        }
        Ok(bytes)
    }

    /// Data, then sums, to stable storage.
    pub fn sync(&self) -> Result<(), String> {
        self.data
            .sync_data()
            .and_then(|()| self.sidecar.sync_data())
            .map_err(|e| format!("cannot fsync the partial state: {e}"))
    }

    /// Before the commit: every page this stream did not write, keep or
    /// clear is punched out (an uninterrupted transfer never had it).
    pub fn finish(&self) -> Result<(), String> {
        let flags = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
        let mut i = 0;
        while i < self.touched.len() {
            if self.touched[i] {
                i += 1;
                continue;
            }
            let end = (i..self.touched.len())
                .find(|&j| self.touched[j])
                .unwrap_or(self.touched.len());
            let (at, len) = (i as u64 * self.page, (end - i) as u64 * self.page);
            rustix::fs::fallocate(&self.data, flags, at, len)
                .map_err(|e| format!("cannot punch stale pages: {e}"))?;
            i = end;
        }
        Ok(())
    }
}

/// Why kept pages cannot be taken.
#[derive(Debug)]
pub enum Keep {
    /// The sender kept a page this receiver does not hold with that sum.
    NotHeld(u64),
    /// Reading it back failed.
    Io(String),
}

fn header(identity: &str, name: &str, page: u64) -> Vec<u8> {
    let mut b = MAGIC.to_vec();
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&(page as u32).to_le_bytes());
    for t in [identity, name] {
        let t = &t.as_bytes()[..t.len().min(1900)];
        b.extend_from_slice(&(t.len() as u16).to_le_bytes());
        b.extend_from_slice(t);
    }
    b
}

/// Before a receive into `into`: an image directory must be new, empty,
/// or hold only an interrupted resumable receive's state, which is kept
/// with `resume` and discarded without (as a leftover `FILE.partial`
/// state is). A note says what became of a leftover.
pub fn prepare(into: &Target, resume: bool) -> Result<Option<String>, String> {
    let leftover = match into {
        Target::Image(dir) => {
            let busy = std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some());
            if busy && !is_leftover(dir) {
                return Err(format!(
                    "{} is not empty; an image is written only into a new or empty directory",
                    dir.display()
                ));
            }
            busy
        }
        Target::File(_) | Target::InPlace(_) => exists(into),
    };
    if resume || !leftover {
        return Ok(None);
    }
    discard(into);
    Ok(Some(
        "an interrupted receive's partial state was discarded (receive --resume keeps it)".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_file_resumes_only_pages_whose_bytes_match_their_sums() {
        let dir = std::env::temp_dir().join(format!("pagescope-partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let into = Target::File(dir.join("ram"));
        let page = 4096u64;
        let data = partial(&dir.join("ram"));
        std::fs::write(&data, vec![0u8; 4 * page as usize]).unwrap();
        let mut t = Track::open(&into, "o1-2", "boot b object 1:2", page, 4, Vec::new()).unwrap();
        let pages: Vec<Vec<u8>> = (1..=3u8).map(|b| vec![b; page as usize]).collect();
        let sums: Vec<u64> = pages.iter().map(|p| format::page_sum(0, p)).collect();
        let f = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
        f.write_all_at(&pages.concat(), 0).unwrap();
        t.wrote(0, &sums).unwrap();
        t.sync().unwrap();
        drop(t);
        // A page whose bytes did not reach the disk (a crash).
        f.write_all_at(&vec![9u8; page as usize], page).unwrap();
        assert!(exists(&into));
        let held = load(&into, page as u32).unwrap();
        assert_eq!(held.identity, "boot b object 1:2");
        assert_eq!(held.dropped, 1);
        assert_eq!(held.stores["o1-2"], vec![sums[0], 0, sums[2], 0]);
        assert!(load(&into, 8192).is_none(), "another page size");
        // Kept pages are checked against what is held.
        let held = held.stores["o1-2"].clone();
        let mut t = Track::open(&into, "o1-2", "boot b object 1:2", page, 4, held).unwrap();
        assert!(matches!(t.keep(1, &[sums[1]]), Err(Keep::NotHeld(1))));
        assert_eq!(t.keep(2, &[sums[2]]).unwrap(), pages[2]);
        t.finish().unwrap();
        let after = std::fs::read(&data).unwrap();
        let (kept, rest) = (2 * page as usize..3 * page as usize, 3 * page as usize..);
        assert!(
            after[..kept.start].iter().all(|&b| b == 0),
            "untouched: punched"
        );
        assert!(after[rest].iter().all(|&b| b == 0));
        assert_eq!(&after[kept], &pages[2][..]);
        discard(&into);
        assert!(!exists(&into) && !data.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
