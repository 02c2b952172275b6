//! Writing an image: stores of page data at fixed offsets, then an atomic
//! commit.
//!
//! A page goes to byte `page * page_size` of its store, whenever it is
//! (re)written, and its checksum to slot `page` of the store's sums; so a
//! page written in every pre-copy round takes its place once, workers may
//! write different pages of one store at once (`pwrite`, atomic sums), and
//! an image is never larger than the memory it covers. [`ImageWriter::commit`]
//! makes it an image: sums files written, every file `fsync`ed,
//! `meta.json` renamed into place, and the `HEADER` (which checksums the
//! metadata, which checksums the sums) renamed last. A directory without a
//! `HEADER` is no image.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use super::ImageError;
use super::format::{
    self, DATA_DIR, HEADER_FILE, Header, META_FILE, Meta, ParentRef, StoreRec, VERSION,
};
use super::read::Image;
use super::store_name::StoreName;
use crate::addr::PageSize;

/// One file of page data being written.
#[derive(Debug)]
pub struct Store {
    name: StoreName,
    path: PathBuf,
    file: File,
    sums: RwLock<Vec<AtomicU64>>,
    page: PageSize,
    seed: u64,
    image_id: String,
}

impl Store {
    /// The store's name (under `data/`).
    pub fn name(&self) -> &str {
        self.name.as_str()
    }

    /// The store's name, typed.
    pub fn store_name(&self) -> &StoreName {
        &self.name
    }

    /// Writes whole pages from `first` on.
    pub fn write(&self, first: u64, bytes: &[u8]) -> Result<(), ImageError> {
        let p = self.page.as_usize();
        let pages = (bytes.len() / p) as u64;
        let sums = self.sums();
        if !bytes.len().is_multiple_of(p) || first + pages > sums.len() as u64 {
            return Err(ImageError::Corrupt {
                path: self.path.clone(),
                offset: self.page.bytes(first),
                what: "write outside the store".into(),
            });
        }
        self.file
            .write_all_at(bytes, self.page.bytes(first))
            .map_err(ImageError::io("write", &self.path))?;
        for (i, chunk) in bytes.chunks_exact(p).enumerate() {
            sums[first as usize + i].store(format::page_sum(self.seed, chunk), Ordering::Relaxed);
        }
        Ok(())
    }

    /// Pages `first..first+count` are no longer stored here (they became
    /// zero, a hole, or unchanged since the parent).
    pub fn forget(&self, first: u64, count: u64) {
        for s in self.sums().iter().skip(first as usize).take(count as usize) {
            s.store(0, Ordering::Relaxed);
        }
    }

    /// Whether page `p` is stored here.
    pub fn holds(&self, p: u64) -> bool {
        self.sums()
            .get(p as usize)
            .is_some_and(|s| s.load(Ordering::Relaxed) != 0)
    }

    /// The checksum of page `p`, if stored.
    pub fn sum(&self, p: u64) -> Option<u64> {
        self.sums()
            .get(p as usize)
            .map(|s| s.load(Ordering::Relaxed))
            .filter(|&s| s != 0)
    }

    /// Reads back stored page `p` into `buf` (one page).
    pub fn read(&self, p: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        self.file
            .read_exact_at(buf, self.page.bytes(p))
            .map_err(ImageError::io("read", &self.path))
    }

    /// Pages stored.
    pub fn stored(&self) -> u64 {
        self.sums()
            .iter()
            .filter(|s| s.load(Ordering::Relaxed) != 0)
            .count() as u64
    }

    /// Pages it can hold.
    pub fn pages(&self) -> u64 {
        self.sums().len() as u64
    }

    /// Makes room for `pages` pages (a shared object that grew).
    pub fn grow(&self, pages: u64) -> Result<(), ImageError> {
        let mut sums = self.sums.write().unwrap_or_else(|p| p.into_inner());
        if pages <= sums.len() as u64 {
            return Ok(());
        }
        self.file
            .set_len(self.page.bytes(pages + 1))
            .map_err(ImageError::io("size", &self.path))?;
        let more = usize::try_from(pages).unwrap_or(0) - sums.len();
        sums.extend((0..more).map(|_| AtomicU64::new(0)));
        self.write_trailer(pages)
    }

    /// The identity page after the last page.
    fn write_trailer(&self, pages: u64) -> Result<(), ImageError> {
        let p = self.page.as_usize();
        let t = format::data_trailer(&self.image_id, self.name.as_str(), p);
        self.file
            .write_all_at(&t, self.page.bytes(pages))
            .map_err(ImageError::io("write", &self.path))
    }

    fn sums(&self) -> std::sync::RwLockReadGuard<'_, Vec<AtomicU64>> {
        self.sums.read().unwrap_or_else(|p| p.into_inner())
    }

    fn finish(&self) -> Result<StoreRec, ImageError> {
        let sums = self.sums();
        let mut bytes = Vec::with_capacity(sums.len() * 8);
        for s in sums.iter() {
            bytes.extend_from_slice(&s.load(Ordering::Relaxed).to_le_bytes());
        }
        let sums_path = self.path.with_extension("sums");
        write_synced(&sums_path, &bytes)?;
        self.file
            .sync_all()
            .map_err(ImageError::io("fsync", &self.path))?;
        Ok(StoreRec {
            name: self.name.to_string(),
            pages: sums.len() as u64,
            sums_xxh3: format::file_sum(&bytes),
        })
    }
}

/// An image being written.
#[derive(Debug)]
pub struct ImageWriter {
    dir: PathBuf,
    page: PageSize,
    image_id: String,
    generation: u32,
    parent: Option<ParentRef>,
    stores: Mutex<BTreeMap<StoreName, Arc<Store>>>,
    /// Store files an interrupted receive left are opened again, their
    /// bytes kept ([`resume`](Self::resume)).
    reopen: bool,
}

impl ImageWriter {
    /// Starts an image in `dir` (created; it must not exist or be empty),
    /// a full one, or the next generation of `parent` (found at
    /// `parent_path` as given by the user).
    pub fn create(
        dir: &Path,
        page: PageSize,
        parent: Option<(&Image, &str)>,
    ) -> Result<Self, ImageError> {
        if dir.exists() {
            let mut entries = std::fs::read_dir(dir).map_err(ImageError::io("list", dir))?;
            if entries.next().is_some() {
                return Err(ImageError::NotEmpty {
                    path: dir.to_owned(),
                });
            }
        }
        std::fs::create_dir_all(dir.join(DATA_DIR)).map_err(ImageError::io("create", dir))?;
        let image_id = new_image_id();
        Ok(Self {
            dir: dir.to_owned(),
            page,
            generation: parent.map_or(0, |(p, _)| p.header().generation + 1),
            parent: parent.map(|(p, path)| ParentRef {
                image_id: p.header().image_id.clone(),
                path: path.to_owned(),
            }),
            image_id,
            stores: Mutex::new(BTreeMap::new()),
            reopen: false,
        })
    }

    /// A full image in `dir`, which may hold the store files of an
    /// interrupted `receive --resume` (the caller checked it holds nothing
    /// else): they are opened again with their bytes kept, every page
    /// unstored until written.
    pub fn resume(dir: &Path, page: PageSize) -> Result<Self, ImageError> {
        std::fs::create_dir_all(dir.join(DATA_DIR)).map_err(ImageError::io("create", dir))?;
        Ok(Self {
            dir: dir.to_owned(),
            page,
            image_id: new_image_id(),
            generation: 0,
            parent: None,
            stores: Mutex::new(BTreeMap::new()),
            reopen: true,
        })
    }

    /// The image's id.
    pub fn image_id(&self) -> &str {
        &self.image_id
    }

    /// The generation (0: full).
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// The store `name` holding up to `pages` pages (created, sparse, on
    /// first use); `name` must be a [`StoreName`].
    pub fn store(&self, name: &str, pages: u64) -> Result<Arc<Store>, ImageError> {
        self.store_named(&self.checked_name(name)?, pages)
    }

    /// [`store`](Self::store), typed.
    pub fn store_named(&self, name: &StoreName, pages: u64) -> Result<Arc<Store>, ImageError> {
        let mut stores = self.stores.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = stores.get(name) {
            return Ok(Arc::clone(s));
        }
        let path = name.pages_path(&self.dir);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(!self.reopen)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(ImageError::io("create", &path))?;
        file.set_len(self.page.bytes(pages + 1))
            .map_err(ImageError::io("size", &path))?;
        let s = Arc::new(Store {
            name: name.clone(),
            path,
            file,
            sums: RwLock::new((0..pages).map(|_| AtomicU64::new(0)).collect()),
            page: self.page,
            seed: format::seed_of(&self.image_id),
            image_id: self.image_id.clone(),
        });
        s.write_trailer(pages)?;
        stores.insert(name.clone(), Arc::clone(&s));
        Ok(s)
    }

    /// A new store named after `prefix` (a [`StoreName`]; with a suffix
    /// if that name is taken: a mapping replaced at the same address
    /// during the dump).
    pub fn new_store(&self, prefix: &str, pages: u64) -> Result<Arc<Store>, ImageError> {
        self.new_store_named(&self.checked_name(prefix)?, pages)
    }

    /// [`new_store`](Self::new_store), typed: the first of `name`,
    /// `name.nth(1)`, ... not taken yet.
    pub fn new_store_named(&self, name: &StoreName, pages: u64) -> Result<Arc<Store>, ImageError> {
        let free = (0..)
            .map(|n| name.nth(n))
            .find(|n| self.existing(n.as_str()).is_none())
            .unwrap_or_else(|| name.clone());
        self.store_named(&free, pages)
    }

    /// The store `name`, if it was created.
    pub fn existing(&self, name: &str) -> Option<Arc<Store>> {
        let name = StoreName::new(name)?;
        let stores = self.stores.lock().unwrap_or_else(|p| p.into_inner());
        stores.get(&name).cloned()
    }

    /// `name` as a [`StoreName`], or an error naming the file it would be.
    fn checked_name(&self, name: &str) -> Result<StoreName, ImageError> {
        StoreName::new(name).ok_or_else(|| ImageError::Io {
            what: "name a store",
            path: self.dir.join(DATA_DIR).join(name),
            source: std::io::ErrorKind::InvalidInput.into(),
        })
    }

    /// Makes it an image: writes the sums and `meta` (whose `stores` are
    /// filled in here), syncs everything, renames the header into place
    /// last. Returns the header.
    pub fn commit(self, mut meta: Meta) -> Result<Header, ImageError> {
        let stores = self.stores.into_inner().unwrap_or_else(|p| p.into_inner());
        let used = referenced(&meta);
        let mut kept = Vec::new();
        for (name, s) in &stores {
            if used.contains(name.as_str()) {
                kept.push(s.finish()?);
            } else {
                // A mapping that went away during the dump.
                let _ = std::fs::remove_file(&s.path);
            }
        }
        meta.stores = kept;
        let meta_bytes = serde_json::to_vec(&meta).map_err(|e| ImageError::Io {
            what: "encode",
            path: self.dir.join(META_FILE),
            source: e.into(),
        })?;
        let header = Header {
            format_version: VERSION,
            page_size: self.page.get(),
            image_id: self.image_id,
            generation: self.generation,
            parent: self.parent,
            created_unix_ns: now_ns(),
            meta_len: meta_bytes.len() as u64,
            meta_xxh3: format::file_sum(&meta_bytes),
        };
        let meta_path = self.dir.join(META_FILE);
        rename_into_place(&meta_path, &meta_bytes)?;
        sync_dir(&self.dir.join(DATA_DIR))?;
        rename_into_place(&self.dir.join(HEADER_FILE), &format::encode_header(&header))?;
        sync_dir(&self.dir)?;
        Ok(header)
    }
}

/// The stores `meta` refers to.
fn referenced(meta: &Meta) -> std::collections::BTreeSet<&str> {
    let vmas = meta
        .processes
        .iter()
        .flat_map(|p| p.vmas.iter().map(|v| v.store.as_deref()));
    let objects = meta.objects.iter().map(|o| o.store.as_deref());
    vmas.chain(objects).flatten().collect()
}

/// Writes `bytes` to `path` and syncs it.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let mut f = File::create(path).map_err(ImageError::io("create", path))?;
    f.write_all(bytes).map_err(ImageError::io("write", path))?;
    f.sync_all().map_err(ImageError::io("fsync", path))
}

/// Writes `bytes` under a temporary name next to `path`, syncs, renames.
fn rename_into_place(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let tmp = path.with_extension("tmp");
    write_synced(&tmp, bytes)?;
    std::fs::rename(&tmp, path).map_err(ImageError::io("rename into place", path))
}

fn sync_dir(dir: &Path) -> Result<(), ImageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(ImageError::io("fsync", dir))
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// 128 random bits, hex (`getrandom`).
fn new_image_id() -> String {
    let mut b = [0u8; 16];
    if rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty()).is_err() {
        let t = now_ns() ^ u64::from(std::process::id()).rotate_left(32);
        b[..8].copy_from_slice(&t.to_le_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::VirtAddr;

    #[test]
    fn a_replaced_mapping_gets_the_next_store_name() {
        let dir = std::env::temp_dir().join(format!("pagescope-stores-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let w = ImageWriter::create(&dir, PageSize::new(4096).unwrap(), None).unwrap();
        let name = StoreName::mapping(7, VirtAddr::new(0x1000));
        let first = w.new_store_named(&name, 2).unwrap();
        let again = w.new_store_named(&name, 2).unwrap();
        assert_eq!(first.name(), "p7-1000");
        assert_eq!(again.name(), "p7-1000.1");
        assert!(name.nth(1).pages_path(&dir).exists());
        assert_eq!(w.new_store("p7-1000", 1).unwrap().name(), "p7-1000.2");
        for bad in ["../x", ".hidden", "a/b"] {
            assert!(w.store(bad, 1).is_err(), "{bad}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
