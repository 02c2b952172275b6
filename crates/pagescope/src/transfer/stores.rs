//! The stores as a sender knows them: which are sent at all (`--object`:
//! the one shared object the choice names, resolved through the process's
//! maps or the file's identity), each one's index on the wire, the pages
//! it last sent as data; and the reasons pages are not stored, as the
//! wire spells them.

use std::path::PathBuf;
use std::sync::Mutex;

use super::pageout_sent::SentStore;
use super::wire::Why;
use crate::dump::DumpError;
use crate::dump::sink::{NotStored, StoreOwner};
use crate::image::ImageError;
use crate::proc::Target;
use crate::proc::maps::DevId;
use crate::vma::ObjectId;

/// The one shared object `--object` sends.
#[derive(Clone, Debug)]
pub enum ObjectChoice {
    /// A file (tmpfs, hugetlbfs, /dev/shm) by path.
    Path(PathBuf),
    /// A memfd the process maps, by name (`memfd:NAME`).
    Memfd(String),
}

/// The object `choice` names, as the process maps it.
pub(super) fn resolve(target: &Target, choice: &ObjectChoice) -> Result<ObjectId, DumpError> {
    use std::os::unix::fs::MetadataExt;
    let not_found = |what: String| DumpError::Image(ImageError::NotFound { what });
    match choice {
        ObjectChoice::Path(p) => {
            let m =
                std::fs::metadata(p).map_err(|_| not_found(format!("object {}", p.display())))?;
            Ok(ObjectId {
                dev: DevId::from_st_dev(m.dev()),
                inode: m.ino(),
            })
        }
        ObjectChoice::Memfd(name) => {
            let want = format!("/memfd:{name}");
            let maps = target.maps()?;
            maps.iter()
                .find(|e| {
                    let p = e.path.display();
                    p == want || p == format!("{want} (deleted)")
                })
                .map(|e| ObjectId {
                    dev: e.dev,
                    inode: e.inode,
                })
                .ok_or_else(|| {
                    not_found(format!("memfd:{name} mapped by process {}", target.pid()))
                })
        }
    }
}

/// A store as the stream knows it.
pub(super) struct StoreState {
    /// Its index on the wire; `None`: not sent (not the chosen object).
    pub wire: Option<u32>,
    /// Which pages were sent last as data (for `PageSink::stored`).
    stored: Mutex<Vec<u64>>,
    /// Whose pages.
    pub owner: StoreOwner,
}

impl StoreState {
    /// A store sent as `wire` (`None`: not sent).
    pub fn new(wire: Option<u32>, owner: StoreOwner) -> Self {
        Self {
            wire,
            stored: Mutex::new(Vec::new()),
            owner,
        }
    }

    /// The pages sent last as data, for `--pageout-sent`.
    pub fn sent(&self) -> SentStore {
        SentStore::new(self.owner, &self.stored)
    }

    /// Pages `first..first + count` were sent as data (`on`) or not.
    pub fn mark(&self, first: u64, count: u64, on: bool) {
        let mut bits = self.stored.lock().unwrap_or_else(|p| p.into_inner());
        for p in first..first + count {
            let (w, b) = ((p / 64) as usize, p % 64);
            if w >= bits.len() {
                bits.resize(w + 1, 0);
            }
            if on {
                bits[w] |= 1 << b;
            } else {
                bits[w] &= !(1 << b);
            }
        }
    }

    /// Pages sent last as data.
    pub fn stored(&self) -> u64 {
        let bits = self.stored.lock().unwrap_or_else(|p| p.into_inner());
        bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// `w` on the wire.
pub(super) fn why(w: NotStored) -> Why {
    match w {
        NotStored::Zero => Why::Zero,
        NotStored::Hole => Why::Hole,
        NotStored::InParent => Why::InParent,
        NotStored::Swapped => Why::Swapped,
        NotStored::Object => Why::Object,
        NotStored::Dedup(d) => Why::Dedup(d.pid, d.vma_start, d.page),
    }
}
