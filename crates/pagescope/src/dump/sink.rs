//! Where a dump's pages and metadata go: the [`PageSink`] every pass (the
//! full pass, pre-copy passes, the stopped final pass, the swap policies,
//! the tree dedup, the copy-before-write snapshot) writes through, and
//! its first implementation, [`ImageSink`], the image directory
//! ([`ImageWriter`]: one sparse store file per mapping or object, page
//! `i` at byte `i * page_size`, committed atomically).
//!
//! The records a sink receives, in order:
//!
//! 1. per pass, [`PageSink::begin_pass`];
//! 2. [`PageSink::open_store`] the first time a mapping's own pages or a
//!    shared object's pages are copied (its [`StoreOwner`] says whose
//!    pages they are and how many: enough for a receiver to place them,
//!    e.g. one object's pages into a file at their offsets),
//!    [`PageSink::grow_store`] when an object grows;
//! 3. page data by store and page index ([`PageSink::write`]), and pages
//!    that are not stored and why ([`PageSink::not_stored`]: zero, hole,
//!    as in the parent, left swapped, a dedup reference to another
//!    store's page); a later pass may rewrite or un-store a page: the
//!    last record of a page wins;
//! 4. [`PageSink::end_pass`];
//! 5. once, [`PageSink::commit`] with the whole layout (processes,
//!    mappings, objects, runs of page kinds: [`Meta`]), or
//!    [`PageSink::abort`] with the reason.
//!
//! Concurrency: a sink is `Sync` and written through `&self`. The copy
//! workers of one mapping run in parallel and call `write`/`not_stored`
//! for *different* pages of the same store at once, in any order; every
//! other record (`begin_pass`, `open_store`, `grow_store`, `end_pass`,
//! `commit`, `abort`) comes from the passes' thread with no write in
//! flight. A sink that must serialise (a stream) takes a lock or hands
//! records to one writer thread; the image directory needs neither
//! (`pwrite` at fixed offsets, atomic checksum slots).

use std::sync::{Arc, RwLock};

use super::DumpError;
use crate::image::ImageError;
use crate::image::format::{DedupRef, Header, Meta};
use crate::image::store_name::StoreName;
pub(crate) use crate::image::store_name::StoreOwner;
use crate::image::write::{ImageWriter, Store};

/// A store a sink opened: its index (what records refer to) and name
/// (what the image's metadata calls it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct StoreRef {
    index: usize,
    name: Arc<str>,
}

impl StoreRef {
    /// Store `index` of a sink, called `name`.
    pub(crate) fn new(index: usize, name: Arc<str>) -> Self {
        Self { index, name }
    }

    /// Its index among the stores its sink opened.
    pub(crate) fn index(&self) -> usize {
        self.index
    }

    /// The store's name, as the metadata refers to it.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }
}

/// Whose pages a store holds, and the name it gets from that
/// ([`StoreName::mapping`] or [`StoreName::object`]; a suffix is added if
/// it is taken: a mapping replaced at the same address during the dump).
pub(crate) fn store_name(owner: StoreOwner) -> StoreName {
    match owner {
        StoreOwner::Mapping { pid, start } => StoreName::mapping(pid, start),
        StoreOwner::Object(id) => StoreName::object(id),
    }
}

/// Why a page is not stored (the receiver's copy of it must not keep
/// bytes an earlier pass sent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NotStored {
    /// All zeros.
    Zero,
    /// Nothing there (unmapped meanwhile, or captured as a hole).
    Hole,
    /// The same bytes as the parent image's page.
    InParent,
    /// Left swapped out (`--swap skip`).
    Swapped,
    /// The page is its object's (a private file page not copied).
    Object,
    /// The same bytes as this page of another store (`--tree`).
    Dedup(DedupRef),
}

/// The start of a pass.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PassStart {
    /// 0: the full pass (or the snapshot); then pre-copy passes; the
    /// stopped one last.
    pub n: u32,
    /// Whether the processes are stopped during it.
    pub stopped: bool,
}

/// What a committed sink says about what it made.
#[derive(Clone, Debug)]
pub(crate) struct Committed {
    /// The image's id.
    pub image_id: String,
    /// Its generation (0: full).
    pub generation: u32,
}

impl From<Header> for Committed {
    fn from(h: Header) -> Self {
        Self {
            image_id: h.image_id,
            generation: h.generation,
        }
    }
}

/// Where the dump's passes write pages and metadata (see the module doc
/// for the order of records and who calls what concurrently).
pub(crate) trait PageSink: Send + Sync {
    /// A pass begins.
    fn begin_pass(&self, _pass: PassStart) -> Result<(), DumpError> {
        Ok(())
    }

    /// Opens a store for `owner`'s pages `0..pages`.
    fn open_store(&self, owner: StoreOwner, pages: u64) -> Result<StoreRef, DumpError>;

    /// `store` now covers pages `0..pages` (an object grew).
    fn grow_store(&self, store: &StoreRef, pages: u64) -> Result<(), DumpError>;

    /// The bytes of pages `first..` of `store` (whole pages).
    fn write(&self, store: &StoreRef, first: u64, bytes: &[u8]) -> Result<(), DumpError>;

    /// Pages `first..first + count` of `store` are not stored, for `why`.
    fn not_stored(&self, store: &StoreRef, first: u64, count: u64, why: NotStored);

    /// Reads back stored page `page` of `store` into `buf` (the tree dedup
    /// compares a COW-shared page with the copy stored first). `false`:
    /// not stored, or the sink cannot read back (a stream): the page is
    /// then stored again rather than deduplicated.
    fn read_back(&self, store: &StoreRef, page: u64, buf: &mut [u8]) -> bool;

    /// Pages `store` holds now.
    fn stored(&self, store: &StoreRef) -> u64;

    /// The rate the sink takes bytes at, if it measures one (a stream:
    /// bytes pushed into the connection per second, smoothed): what
    /// pre-copy's downtime prediction uses instead of the copy's rate.
    fn bandwidth(&self) -> Option<f64> {
        None
    }

    /// A pass ended.
    fn end_pass(&self, _pass: PassStart) -> Result<(), DumpError> {
        Ok(())
    }

    /// Makes what was written a whole: `meta` is the layout of everything
    /// (its `stores` are filled in by the sink).
    fn commit(self: Box<Self>, meta: Meta) -> Result<Committed, DumpError>;

    /// The dump failed or was interrupted: nothing written may pass for
    /// complete.
    fn abort(self: Box<Self>, _why: &DumpError) {}
}

/// The image directory as a [`PageSink`]: one sparse file per store.
/// An aborted image is removed by the dump (`out_dir::discard`), which
/// knows whether the directory existed before.
pub(crate) struct ImageSink {
    writer: ImageWriter,
    stores: RwLock<Vec<Arc<Store>>>,
}

impl ImageSink {
    /// Writes into `writer`'s directory.
    pub(crate) fn new(writer: ImageWriter) -> Self {
        Self {
            writer,
            stores: RwLock::new(Vec::new()),
        }
    }

    fn store(&self, s: &StoreRef) -> Option<Arc<Store>> {
        let stores = self.stores.read().unwrap_or_else(|p| p.into_inner());
        stores.get(s.index).cloned()
    }

    fn with<T>(&self, s: &StoreRef, f: impl FnOnce(&Store) -> T) -> Option<T> {
        let stores = self.stores.read().unwrap_or_else(|p| p.into_inner());
        stores.get(s.index).map(|st| f(st))
    }
}

impl PageSink for ImageSink {
    fn open_store(&self, owner: StoreOwner, pages: u64) -> Result<StoreRef, DumpError> {
        let store = self.writer.new_store_named(&store_name(owner), pages)?;
        let name: Arc<str> = store.name().into();
        let mut stores = self.stores.write().unwrap_or_else(|p| p.into_inner());
        stores.push(store);
        Ok(StoreRef {
            index: stores.len() - 1,
            name,
        })
    }

    fn grow_store(&self, store: &StoreRef, pages: u64) -> Result<(), DumpError> {
        match self.store(store) {
            Some(s) => Ok(s.grow(pages)?),
            None => Err(unknown(store)),
        }
    }

    fn write(&self, store: &StoreRef, first: u64, bytes: &[u8]) -> Result<(), DumpError> {
        self.with(store, |s| s.write(first, bytes))
            .ok_or_else(|| unknown(store))?
            .map_err(DumpError::from)
    }

    fn not_stored(&self, store: &StoreRef, first: u64, count: u64, _why: NotStored) {
        self.with(store, |s| s.forget(first, count));
    }

    fn read_back(&self, store: &StoreRef, page: u64, buf: &mut [u8]) -> bool {
        self.with(store, |s| s.holds(page) && s.read(page, buf).is_ok())
            .unwrap_or(false)
    }

    fn stored(&self, store: &StoreRef) -> u64 {
        self.with(store, Store::stored).unwrap_or(0)
    }

    fn commit(self: Box<Self>, meta: Meta) -> Result<Committed, DumpError> {
        drop(self.stores);
        Ok(self.writer.commit(meta)?.into())
    }
}

/// A store this sink did not open.
fn unknown(store: &StoreRef) -> DumpError {
    DumpError::Image(ImageError::Corrupt {
        path: store.name().into(),
        offset: 0,
        what: "a store the image did not open".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::{PageSize, VirtAddr};
    use crate::proc::maps::DevId;
    use crate::vma::ObjectId;

    #[test]
    fn the_image_sink_stores_what_is_written_last_and_reads_it_back() {
        let page = PageSize::new(4096).expect("4 KiB");
        let dir = std::env::temp_dir().join(format!("pagescope-sink-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let sink = ImageSink::new(ImageWriter::create(&dir, page, None).expect("a writer"));
        let vma = StoreOwner::Mapping {
            pid: 7,
            start: VirtAddr::new(0x1000),
        };
        let a = sink.open_store(vma, 4).expect("a store");
        let b = sink.open_store(vma, 4).expect("another store");
        assert_eq!((a.name(), b.name()), ("p7-1000", "p7-1000.1"));
        let object = StoreOwner::Object(ObjectId {
            dev: DevId::from_st_dev(0),
            inode: 9,
        });
        assert_eq!(store_name(object).as_str(), "o00_00-9");
        sink.write(&a, 1, &[1; 8192]).expect("written");
        sink.not_stored(&a, 2, 1, NotStored::Zero);
        assert_eq!(sink.stored(&a), 1);
        let mut buf = vec![0; 4096];
        assert!(sink.read_back(&a, 1, &mut buf));
        assert!(buf.iter().all(|&x| x == 1));
        assert!(!sink.read_back(&a, 2, &mut buf), "un-stored");
        assert!(!sink.read_back(&b, 0, &mut buf), "never written");
        sink.grow_store(&a, 8).expect("grown");
        sink.write(&a, 7, &[2; 4096])
            .expect("written past the old end");
        assert_eq!(sink.stored(&a), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
