//! What `receive` writes into: an image directory through the
//! [`ImageWriter`] (atomic commit, header last), or one shared object's
//! pages into `FILE.partial` at their offsets (sparse; zero pages are
//! holes), renamed to `FILE` at commit. Either way an interrupted
//! transfer leaves nothing that passes for complete, and nothing is
//! written outside the directory or those two files.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::addr::PageSize;
use crate::image::format::Meta;
use crate::image::write::{ImageWriter, Store};

/// Where received pages go.
pub enum Output {
    /// An image directory being written.
    Image {
        /// The directory.
        dir: PathBuf,
        /// Whether it existed before (then only its contents are removed).
        existed: bool,
        /// The writer (taken at commit).
        writer: Option<ImageWriter>,
        /// Stores by wire index.
        stores: Vec<Arc<Store>>,
        /// A resumable receive (its sidecars go too on a discard).
        resume: bool,
    },
    /// One object's pages into a file.
    File {
        /// The final file.
        path: PathBuf,
        /// `FILE.partial`, once the store opened.
        file: Option<File>,
        /// Page size.
        page: u64,
        /// Pages it holds.
        pages: u64,
        /// A resumable receive: `FILE.partial` is kept as found.
        resume: bool,
        /// Written into FILE itself (`in_place.rs`), not `FILE.partial`.
        in_place: bool,
    },
}

/// The partial file beside `path`.
pub fn partial(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".partial");
    PathBuf::from(p)
}

impl Output {
    /// An image in `dir` with pages of `page` bytes (`resume`: the store
    /// files an interrupted receive left in it are reopened).
    pub fn image(dir: &Path, page: u32, resume: bool) -> Result<Self, String> {
        let existed = dir.exists();
        let page = PageSize::new(u64::from(page)).ok_or("bad page size")?;
        let writer = if resume {
            ImageWriter::resume(dir, page)
        } else {
            ImageWriter::create(dir, page, None)
        };
        Ok(Self::Image {
            dir: dir.to_owned(),
            existed,
            writer: Some(writer.map_err(|e| e.to_string())?),
            stores: Vec::new(),
            resume,
        })
    }

    /// One object into `path` (`resume`: `FILE.partial` kept as found).
    pub fn file(path: &Path, page: u32, resume: bool) -> Self {
        Self::File {
            path: path.to_owned(),
            file: None,
            page: u64::from(page),
            pages: 0,
            resume,
            in_place: false,
        }
    }

    /// One object into the existing `path` itself (`in_place.rs`).
    pub fn file_in_place(path: &Path, page: u32) -> Self {
        Self::File {
            path: path.to_owned(),
            file: None,
            page: u64::from(page),
            pages: 0,
            resume: false,
            in_place: true,
        }
    }

    /// Opens the next store.
    pub fn open(&mut self, object: bool, name: &str, pages: u64) -> Result<(), String> {
        match self {
            Self::Image { writer, stores, .. } => {
                let w = writer.as_ref().ok_or("committed")?;
                if w.existing(name).is_some() {
                    return Err(format!("store {name} opened twice"));
                }
                stores.push(w.store(name, pages).map_err(|e| e.to_string())?);
                Ok(())
            }
            Self::File {
                path,
                file,
                page,
                pages: held,
                resume,
                in_place,
            } => {
                if !object || file.is_some() {
                    return Err("--into FILE takes exactly one shared object's pages".into());
                }
                if *in_place {
                    *file = Some(super::in_place::open(path, pages, *page)?);
                    *held = pages;
                    return Ok(());
                }
                let p = partial(path);
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(!*resume)
                    .open(&p)
                    .map_err(|e| format!("cannot create {}: {e}", p.display()))?;
                f.set_len(pages * *page)
                    .map_err(|e| format!("cannot size {}: {e}", p.display()))?;
                *file = Some(f);
                *held = pages;
                Ok(())
            }
        }
    }

    /// Pages store `store` holds (`None`: no such store).
    pub fn pages(&self, store: u32) -> Option<u64> {
        match self {
            Self::Image { stores, .. } => stores.get(store as usize).map(|s| s.pages()),
            Self::File { file, pages, .. } => (store == 0 && file.is_some()).then_some(*pages),
        }
    }

    /// Store `store` now holds `pages` pages.
    pub fn grow(&mut self, store: u32, pages: u64) -> Result<(), String> {
        match self {
            Self::Image { stores, .. } => stores[store as usize]
                .grow(pages)
                .map_err(|e| e.to_string()),
            Self::File {
                file,
                page,
                pages: held,
                path,
                ..
            } => {
                let f = file.as_ref().ok_or("no store")?;
                if pages > *held {
                    f.set_len(pages * *page)
                        .map_err(|e| format!("cannot grow {}: {e}", path.display()))?;
                    *held = pages;
                }
                Ok(())
            }
        }
    }

    /// Writes checked pages `first..` of `store`.
    pub fn write(&self, store: u32, first: u64, data: &[u8]) -> Result<(), String> {
        match self {
            Self::Image { stores, .. } => stores[store as usize]
                .write(first, data)
                .map_err(|e| e.to_string()),
            Self::File {
                file, page, path, ..
            } => file
                .as_ref()
                .ok_or("no store")?
                .write_all_at(data, first * page)
                .map_err(|e| format!("cannot write {}: {e}", partial(path).display())),
        }
    }

    /// Pages `first..first + count` of `store` are zero or not there.
    pub fn clear(&self, store: u32, first: u64, count: u64) -> Result<(), String> {
        match self {
            Self::Image { stores, .. } => {
                stores[store as usize].forget(first, count);
                Ok(())
            }
            Self::File {
                file, page, path, ..
            } => {
                let f = file.as_ref().ok_or("no store")?;
                let flags =
                    rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
                rustix::fs::fallocate(f, flags, first * page, count * page)
                    .map_err(|e| format!("cannot punch {}: {e}", partial(path).display()))
            }
        }
    }

    /// Makes it whole: the image committed with `meta`, or the file
    /// synced and renamed into place. A line saying what was made.
    pub fn commit(&mut self, meta: &[u8]) -> Result<String, String> {
        match self {
            Self::Image {
                writer,
                stores,
                dir,
                ..
            } => {
                let meta: Meta =
                    serde_json::from_slice(meta).map_err(|e| format!("metadata: {e}"))?;
                stores.clear();
                let w = writer.take().ok_or("committed twice")?;
                let h = w.commit(meta).map_err(|e| e.to_string())?;
                Ok(format!("image {} (id {})", dir.display(), h.image_id))
            }
            Self::File {
                file,
                path,
                pages,
                in_place,
                ..
            } => {
                let f = file.take().ok_or("no object was sent")?;
                if *in_place {
                    super::in_place::commit(path, &f)?;
                    return Ok(format!("{} in place ({pages} pages)", path.display()));
                }
                f.sync_all().map_err(|e| format!("cannot fsync: {e}"))?;
                std::fs::rename(partial(path), &*path)
                    .map_err(|e| format!("cannot rename into {}: {e}", path.display()))?;
                if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    let _ = File::open(parent).and_then(|d| d.sync_all());
                }
                Ok(format!("{} ({pages} pages)", path.display()))
            }
        }
    }

    /// Removes whatever was written (nothing committed).
    pub fn discard(&mut self) {
        match self {
            Self::Image {
                dir,
                existed,
                writer,
                stores,
                resume,
            } => {
                stores.clear();
                if writer.take().is_none() {
                    return; // committed: keep it
                }
                if *resume {
                    let _ = std::fs::remove_dir_all(dir.join(super::partial::SIDECARS));
                }
                if *existed {
                    let _ = std::fs::remove_dir_all(dir.join(crate::image::format::DATA_DIR));
                    for f in [crate::image::format::META_FILE, "meta.tmp", "HEADER.tmp"] {
                        let _ = std::fs::remove_file(dir.join(f));
                    }
                } else {
                    let _ = std::fs::remove_dir_all(&*dir);
                }
            }
            Self::File {
                path,
                file,
                resume,
                in_place,
                ..
            } => {
                if *resume {
                    super::partial::discard(&super::ReceiveInto::File(path.clone()));
                }
                // In place: FILE stays, partly written, with its marker.
                if file.take().is_some() && !*in_place {
                    let _ = std::fs::remove_file(partial(path));
                }
            }
        }
    }
}
