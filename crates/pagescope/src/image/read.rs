//! Reading an image: [`Image::open`] checks the header, the metadata, every
//! store's sums file and the whole parent chain before anything is used,
//! with every size bounded; [`Image::verify_data`] reads every stored page
//! and checks its sum. Pages are then read through the chain
//! ([`Image::vma_page`], [`Image::object_page`]).

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::ImageError;
use super::format::{
    self, HEADER_FILE, Header, MAX_HEADER_BYTES, MAX_META_BYTES, MAX_STORE_PAGES, META_FILE, Meta,
    ObjectRec, PageKind, ProcessRec, Run, VmaRec,
};
use super::store_name::StoreName;

/// Parent chains longer than this are refused (a loop, or a mistake).
const MAX_CHAIN: usize = 256;

/// A store of page data, open for reading.
#[derive(Debug)]
struct StoreReader {
    path: PathBuf,
    file: File,
    sums: Vec<u64>,
}

/// What a page is, once looked up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageFill {
    /// Its bytes were copied into the buffer.
    Data,
    /// All zeros.
    Zero,
    /// Nothing there (zeros, left a hole by a restore).
    Hole,
    /// Swapped out and not copied at dump time: not in the image.
    NotCopied,
}

/// An opened, checked image (and its parents).
#[derive(Debug)]
pub struct Image {
    dir: PathBuf,
    header: Header,
    meta: Meta,
    seed: u64,
    stores: HashMap<String, StoreReader>,
    parent: Option<Box<Image>>,
    /// Files recorded by identity, opened and checked once.
    files: std::sync::Mutex<HashMap<String, std::sync::Arc<File>>>,
}

impl Image {
    /// Opens the image in `dir` and its parent chain, checking every
    /// checksum and bound except the page data's (see
    /// [`Image::verify_data`]).
    pub fn open(dir: &Path) -> Result<Self, ImageError> {
        Self::open_depth(dir, 0)
    }

    fn open_depth(dir: &Path, depth: usize) -> Result<Self, ImageError> {
        let header_path = dir.join(HEADER_FILE);
        let bytes = read_bounded(&header_path, MAX_HEADER_BYTES)?;
        let header = format::decode_header(&bytes).map_err(|f| ImageError::Corrupt {
            path: header_path.clone(),
            offset: f.offset,
            what: f.what,
        })?;
        let meta_path = dir.join(META_FILE);
        let meta_bytes = read_bounded(&meta_path, MAX_META_BYTES.min(header.meta_len))?;
        if meta_bytes.len() as u64 != header.meta_len {
            return Err(corrupt(
                &meta_path,
                meta_bytes.len() as u64,
                "shorter than the header says (truncated)",
            ));
        }
        if format::file_sum(&meta_bytes) != header.meta_xxh3 {
            return Err(corrupt(&meta_path, 0, "checksum mismatch"));
        }
        let meta: Meta = serde_json::from_slice(&meta_bytes)
            .map_err(|e| corrupt(&meta_path, e.column() as u64, &e.to_string()))?;
        validate(&meta_path, &meta)?;
        let seed = format::seed_of(&header.image_id);
        let stores = open_stores(dir, &header, &meta)?;
        let parent = open_parent(dir, &header, depth)?;
        Ok(Self {
            dir: dir.to_owned(),
            header,
            meta,
            seed,
            stores,
            parent,
            files: std::sync::Mutex::default(),
        })
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The metadata.
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parent image, if this is an incremental one.
    pub fn parent(&self) -> Option<&Image> {
        self.parent.as_deref()
    }

    /// Base page size.
    pub fn page_size(&self) -> usize {
        usize::try_from(self.header.page_size).unwrap_or(4096)
    }

    /// Reads every stored page of this image and its parents and checks
    /// its sum. Returns the pages checked.
    pub fn verify_data(&self) -> Result<u64, ImageError> {
        let p = self.page_size();
        let mut buf = vec![0u8; p];
        let mut n = 0;
        for s in self.stores.values() {
            for (i, &sum) in s.sums.iter().enumerate().filter(|(_, s)| **s != 0) {
                let off = (i * p) as u64;
                s.file
                    .read_exact_at(&mut buf, off)
                    .map_err(|_| corrupt(&s.path, off, "page missing (truncated)"))?;
                if format::page_sum(self.seed, &buf) != sum {
                    return Err(corrupt(&s.path, off, "page checksum mismatch"));
                }
                n += 1;
            }
        }
        Ok(n + self.parent.as_ref().map_or(Ok(0), |p| p.verify_data())?)
    }

    /// The process record of `pid`.
    pub fn process(&self, pid: u32) -> Option<&ProcessRec> {
        self.meta.processes.iter().find(|p| p.pid == pid)
    }

    /// Page `page` of the VMA starting at `start` in process `pid`, into
    /// `buf` (one page).
    pub fn vma_page(
        &self,
        pid: u32,
        start: u64,
        page: u64,
        buf: &mut [u8],
    ) -> Result<PageFill, ImageError> {
        let v = self
            .process(pid)
            .and_then(|p| p.vmas.iter().find(|v| v.start == start))
            .ok_or_else(|| ImageError::NotFound {
                what: format!("mapping at {start:#x} of process {pid}"),
            })?;
        match run_at(&v.runs, page).map(|r| (r.kind, r)) {
            Some((PageKind::InParent, _)) => match &self.parent {
                Some(parent) => parent.vma_page(pid, start, page, buf),
                None => Err(corrupt(
                    &self.dir.join(META_FILE),
                    0,
                    "in-parent page without a parent",
                )),
            },
            Some((PageKind::Object, _)) => {
                let o = v.object.ok_or_else(|| {
                    corrupt(
                        &self.dir.join(META_FILE),
                        0,
                        "object page of a mapping without an object",
                    )
                })?;
                let first = v.offset / self.header.page_size;
                self.object_page(o, first + page, buf)
            }
            Some((PageKind::Dedup, r)) => {
                let from = r.from.ok_or_else(|| {
                    corrupt(&self.dir.join(META_FILE), 0, "dedup run without a source")
                })?;
                self.vma_page(from.pid, from.vma_start, from.page + (page - r.first), buf)
            }
            Some((kind, _)) => self.fill(kind, v.store.as_deref(), page, buf),
            None => Ok(PageFill::Hole),
        }
    }

    /// Page `page` of object `index` (in [`Meta::objects`]), into `buf`.
    pub fn object_page(
        &self,
        index: usize,
        page: u64,
        buf: &mut [u8],
    ) -> Result<PageFill, ImageError> {
        let o = self
            .meta
            .objects
            .get(index)
            .ok_or_else(|| ImageError::NotFound {
                what: format!("object {index}"),
            })?;
        match run_at(&o.runs, page).map(|r| r.kind) {
            Some(PageKind::InParent) => {
                let parent = self.parent.as_ref().ok_or_else(|| {
                    corrupt(
                        &self.dir.join(META_FILE),
                        0,
                        "in-parent page without a parent",
                    )
                })?;
                let i = parent
                    .meta
                    .objects
                    .iter()
                    .position(|p| p.dev == o.dev && p.inode == o.inode)
                    .ok_or_else(|| {
                        corrupt(
                            &parent.dir.join(META_FILE),
                            0,
                            "object missing from the parent",
                        )
                    })?;
                parent.object_page(i, page, buf)
            }
            Some(PageKind::File) => self.read_file_page(o, page, buf),
            Some(kind) => self.fill(kind, o.store.as_deref(), page, buf),
            None => Ok(PageFill::Hole),
        }
    }

    /// A page of a store (for `Data`), or what its kind reads as.
    fn fill(
        &self,
        kind: PageKind,
        store: Option<&str>,
        page: u64,
        buf: &mut [u8],
    ) -> Result<PageFill, ImageError> {
        match kind {
            PageKind::Zero => Ok(PageFill::Zero),
            PageKind::Hole => Ok(PageFill::Hole),
            PageKind::Swapped => Ok(PageFill::NotCopied),
            PageKind::Data => {
                let s = store.and_then(|n| self.stores.get(n)).ok_or_else(|| {
                    corrupt(&self.dir.join(META_FILE), 0, "data page without a store")
                })?;
                let off = page * self.header.page_size;
                let sum = s.sums.get(page as usize).copied().unwrap_or(0);
                if sum == 0 {
                    return Err(corrupt(
                        &s.path,
                        off,
                        "page recorded as data is not in the store",
                    ));
                }
                s.file
                    .read_exact_at(buf, off)
                    .map_err(|_| corrupt(&s.path, off, "page missing (truncated)"))?;
                if format::page_sum(self.seed, buf) != sum {
                    return Err(corrupt(&s.path, off, "page checksum mismatch"));
                }
                Ok(PageFill::Data)
            }
            _ => Err(corrupt(
                &self.dir.join(META_FILE),
                0,
                "page kind not valid here",
            )),
        }
    }
}

/// The run holding page `p`.
fn run_at(runs: &[Run], p: u64) -> Option<&Run> {
    let i = runs.partition_point(|r| r.first + r.count <= p);
    runs.get(i).filter(|r| r.first <= p)
}

fn corrupt(path: &Path, offset: u64, what: &str) -> ImageError {
    ImageError::Corrupt {
        path: path.to_owned(),
        offset,
        what: what.to_owned(),
    }
}

/// The whole of `path`, refusing more than `limit` bytes.
fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, ImageError> {
    let f = File::open(path).map_err(ImageError::unreadable("open", path))?;
    let size = f
        .metadata()
        .map_err(ImageError::unreadable("stat", path))?
        .len();
    if size > limit {
        return Err(ImageError::TooLarge {
            path: path.to_owned(),
            size,
            limit,
        });
    }
    let mut out = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    f.take(limit)
        .read_to_end(&mut out)
        .map_err(ImageError::unreadable("read", path))?;
    Ok(out)
}

/// Checks the metadata's structure: runs sorted, disjoint and inside
/// their mapping or object; references in range; stores bounded.
fn validate(path: &Path, meta: &Meta) -> Result<(), ImageError> {
    let bad = |what: String| corrupt(path, 0, &what);
    let stores: Vec<&str> = meta.stores.iter().map(|s| s.name.as_str()).collect();
    for s in &meta.stores {
        if s.pages > MAX_STORE_PAGES || StoreName::new(&s.name).is_none() {
            return Err(bad(format!("store {:?} out of bounds", s.name)));
        }
    }
    let has_store = |n: &Option<String>| n.as_deref().is_none_or(|n| stores.contains(&n));
    for p in &meta.processes {
        for v in &p.vmas {
            if v.end <= v.start
                || !has_store(&v.store)
                || v.object.is_some_and(|o| o >= meta.objects.len())
            {
                return Err(bad(format!(
                    "mapping {:#x}-{:#x} of process {} malformed",
                    v.start, v.end, p.pid
                )));
            }
            check_runs(&v.runs, u64::MAX)
                .map_err(|w| bad(format!("process {} mapping {:#x}: {w}", p.pid, v.start)))?;
        }
    }
    for o in &meta.objects {
        let dev_ok = dev_name(&o.dev) && o.file.as_ref().is_none_or(|f| dev_name(&f.dev));
        if !has_store(&o.store) || o.pages > MAX_STORE_PAGES || !dev_ok {
            return Err(bad(format!("object {} malformed", o.inode)));
        }
        check_runs(&o.runs, o.pages).map_err(|w| bad(format!("object {}: {w}", o.inode)))?;
    }
    Ok(())
}

/// `major:minor` in hex, as maps prints a device (restore names files
/// after it).
fn dev_name(d: &str) -> bool {
    d.split_once(':').is_some_and(|(a, b)| {
        [a, b]
            .iter()
            .all(|x| !x.is_empty() && x.len() <= 8 && x.bytes().all(|c| c.is_ascii_hexdigit()))
    })
}

fn check_runs(runs: &[Run], limit: u64) -> Result<(), String> {
    let mut end = 0;
    for r in runs {
        if r.count == 0 || r.first < end || r.first.checked_add(r.count).is_none_or(|e| e > limit) {
            return Err(format!(
                "run at page {} overlaps or exceeds its bounds",
                r.first
            ));
        }
        end = r.first + r.count;
    }
    Ok(())
}

/// Opens every store: its pages file (no larger than the store) and its
/// sums file (exactly 8 bytes a page, checksum as recorded).
fn open_stores(
    dir: &Path,
    header: &Header,
    meta: &Meta,
) -> Result<HashMap<String, StoreReader>, ImageError> {
    let mut out = HashMap::new();
    for s in &meta.stores {
        let name = StoreName::new(&s.name)
            .ok_or_else(|| corrupt(&dir.join(META_FILE), 0, &format!("store {:?}", s.name)))?;
        let path = name.pages_path(dir);
        let file = File::open(&path).map_err(ImageError::unreadable("open", &path))?;
        let size = file
            .metadata()
            .map_err(ImageError::unreadable("stat", &path))?
            .len();
        let limit = (s.pages + 1) * header.page_size;
        if size > limit {
            return Err(ImageError::TooLarge { path, size, limit });
        }
        if size < limit {
            return Err(corrupt(&path, size, "shorter than the store (truncated)"));
        }
        let p = usize::try_from(header.page_size).unwrap_or(4096);
        let mut trailer = vec![0u8; p];
        file.read_exact_at(&mut trailer, s.pages * header.page_size)
            .map_err(ImageError::unreadable("read", &path))?;
        if trailer != format::data_trailer(&header.image_id, &s.name, p) {
            return Err(corrupt(
                &path,
                s.pages * header.page_size,
                "data file of another image or store",
            ));
        }
        let sums_path = name.sums_path(dir);
        let bytes = read_bounded(&sums_path, s.pages * 8)?;
        if bytes.len() as u64 != s.pages * 8 {
            return Err(corrupt(
                &sums_path,
                bytes.len() as u64,
                "shorter than the store (truncated)",
            ));
        }
        if format::file_sum(&bytes) != s.sums_xxh3 {
            return Err(corrupt(&sums_path, 0, "checksum mismatch"));
        }
        let sums = bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        out.insert(s.name.clone(), StoreReader { path, file, sums });
    }
    Ok(out)
}

fn open_parent(
    dir: &Path,
    header: &Header,
    depth: usize,
) -> Result<Option<Box<Image>>, ImageError> {
    let Some(p) = &header.parent else {
        return Ok(None);
    };
    let path = dir.join(&p.path);
    if depth >= MAX_CHAIN {
        return Err(corrupt(
            &dir.join(HEADER_FILE),
            0,
            "parent chain too long (a loop?)",
        ));
    }
    if !path.join(HEADER_FILE).exists() {
        return Err(ImageError::ParentMissing {
            path,
            image_id: p.image_id.clone(),
        });
    }
    let parent = Image::open_depth(&path, depth + 1)?;
    if parent.header.image_id != p.image_id {
        return Err(ImageError::ParentMismatch {
            path,
            expected: p.image_id.clone(),
            found: parent.header.image_id.clone(),
        });
    }
    if parent.header.page_size != header.page_size {
        return Err(corrupt(
            &path.join(HEADER_FILE),
            0,
            "parent has another page size",
        ));
    }
    Ok(Some(Box::new(parent)))
}

impl Image {
    /// Opens and checks every file recorded by identity in this image and
    /// its parents (a restore does this before writing anything).
    pub fn check_files(&self) -> Result<(), ImageError> {
        for o in self.meta.objects.iter().filter(|o| o.file.is_some()) {
            self.checked_file(o)?;
        }
        self.parent.as_ref().map_or(Ok(()), |p| p.check_files())
    }

    fn checked_file(&self, o: &ObjectRec) -> Result<std::sync::Arc<File>, ImageError> {
        let id = o.file.as_ref().ok_or_else(|| ImageError::NotFound {
            what: format!("file identity of object {}", o.inode),
        })?;
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let key = format!("{id:?}");
        if let Some(f) = files.get(&key) {
            return Ok(std::sync::Arc::clone(f));
        }
        let f = std::sync::Arc::new(super::identity::open_checked(id)?);
        files.insert(key, std::sync::Arc::clone(&f));
        Ok(f)
    }

    /// A page of a regular file recorded by identity, read from the file
    /// (opened once, and only if it is that file: `identity.rs`).
    fn read_file_page(
        &self,
        o: &ObjectRec,
        page: u64,
        buf: &mut [u8],
    ) -> Result<PageFill, ImageError> {
        let f = self.checked_file(o)?;
        let id = o.file.as_ref().ok_or_else(|| ImageError::NotFound {
            what: format!("file identity of object {}", o.inode),
        })?;
        read_page_at(&f, id, page, buf)
    }
}

fn read_page_at(
    f: &File,
    id: &super::format::FileIdentity,
    page: u64,
    buf: &mut [u8],
) -> Result<PageFill, ImageError> {
    buf.fill(0);
    let off = page * buf.len() as u64;
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ImageError::io("read", &id.path)(e)),
        }
    }
    Ok(PageFill::Data)
}

/// A mapping's length in pages.
pub fn vma_pages(v: &VmaRec, page: u64) -> u64 {
    (v.end - v.start) / page
}
