//! The names of an image's stores: `data/NAME.pages` and `data/NAME.sums`.
//!
//! A dump names the store of a mapping's own pages after the process and
//! the mapping's first address (`p1234-7f12a0000000`), and the store of a
//! shared object after its device and inode (`o00_01-5678`); a mapping
//! replaced at the same address during the dump gets the next free
//! `.N` (`p1234-7f12a0000000.1`). The reader accepts any name that stays
//! inside `data/` ([`StoreName::new`]): an image is checked by its
//! checksums and bounds, not by how its stores are called.

use std::fmt;
use std::path::{Path, PathBuf};

use super::format::DATA_DIR;
use crate::addr::VirtAddr;
use crate::proc::maps::DevId;
use crate::vma::ObjectId;

/// The longest store name an image may use.
const MAX_LEN: usize = 200;

/// The name of a store of page data.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StoreName(String);

/// What a store holds, as its name says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreOwner {
    /// The own pages of the mapping of process `pid` starting at `start`.
    Mapping {
        /// The process.
        pid: u32,
        /// The mapping's first address.
        start: VirtAddr,
    },
    /// The pages of a shared object.
    Object(ObjectId),
}

impl StoreName {
    /// `name` if an image may use it: a plain file name under `data/` (not
    /// empty, no `/` or NUL, not hidden, so not `.` or `..`, at most 200
    /// bytes).
    pub fn new(name: &str) -> Option<Self> {
        let plain = !name.is_empty()
            && !name.starts_with('.')
            && !name.contains(['/', '\0'])
            && name.len() <= MAX_LEN;
        plain.then(|| Self(name.to_owned()))
    }

    /// The store of the own pages of `pid`'s mapping at `start`.
    pub fn mapping(pid: u32, start: VirtAddr) -> Self {
        Self(format!("p{pid}-{:x}", start.get()))
    }

    /// The store of the pages of object `id`.
    pub fn object(id: ObjectId) -> Self {
        Self(format!(
            "o{:02x}_{:02x}-{}",
            id.dev.major, id.dev.minor, id.inode
        ))
    }

    /// The name of the `n`th store with this name's owner (`n` ≥ 1: a
    /// mapping replaced at the same address during the dump); `n` = 0 is
    /// the name itself.
    pub fn nth(&self, n: u32) -> Self {
        match n {
            0 => self.clone(),
            n => Self(format!("{}.{n}", self.0)),
        }
    }

    /// What the store holds, for names a dump gives ([`mapping`],
    /// [`object`], [`nth`]); `None` for any other name.
    ///
    /// [`mapping`]: Self::mapping
    /// [`object`]: Self::object
    /// [`nth`]: Self::nth
    pub fn owner(&self) -> Option<StoreOwner> {
        let base = match self.0.rsplit_once('.') {
            Some((base, n)) if canonical_number(n) && n != "0" => base,
            Some(_) => return None,
            None => &self.0,
        };
        let owner = parse_owner(base)?;
        let again = match owner {
            StoreOwner::Mapping { pid, start } => Self::mapping(pid, start),
            StoreOwner::Object(id) => Self::object(id),
        };
        (again.0 == base).then_some(owner)
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The file of its pages in the image directory `dir`.
    pub fn pages_path(&self, dir: &Path) -> PathBuf {
        dir.join(DATA_DIR).join(format!("{}.pages", self.0))
    }

    /// The file of its per-page checksums in the image directory `dir`.
    pub fn sums_path(&self, dir: &Path) -> PathBuf {
        self.pages_path(dir).with_extension("sums")
    }
}

impl fmt::Display for StoreName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn parse_owner(base: &str) -> Option<StoreOwner> {
    if let Some(rest) = base.strip_prefix('p') {
        let (pid, start) = rest.split_once('-')?;
        return Some(StoreOwner::Mapping {
            pid: pid.parse().ok()?,
            start: VirtAddr::new(u64::from_str_radix(start, 16).ok()?),
        });
    }
    let (dev, inode) = base.strip_prefix('o')?.split_once('-')?;
    let (major, minor) = dev.split_once('_')?;
    Some(StoreOwner::Object(ObjectId {
        dev: DevId {
            major: u32::from_str_radix(major, 16).ok()?,
            minor: u32::from_str_radix(minor, 16).ok()?,
        },
        inode: inode.parse().ok()?,
    }))
}

/// Decimal digits without a leading zero (`0` itself allowed).
fn canonical_number(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()) && (s == "0" || !s.starts_with('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_a_dump_gives_round_trip() {
        let start = VirtAddr::new(0x7f12_a000_0000);
        let m = StoreName::mapping(1234, start);
        assert_eq!(m.as_str(), "p1234-7f12a0000000");
        let own = StoreOwner::Mapping { pid: 1234, start };
        assert_eq!(m.owner(), Some(own));
        assert_eq!(m.nth(0), m);
        assert_eq!(m.nth(2).as_str(), "p1234-7f12a0000000.2");
        assert_eq!(m.nth(2).owner(), Some(own));
        let id = ObjectId {
            dev: DevId {
                major: 0,
                minor: 0x1f,
            },
            inode: 5678,
        };
        let o = StoreName::object(id);
        assert_eq!(o.as_str(), "o00_1f-5678");
        assert_eq!(o.owner(), Some(StoreOwner::Object(id)));
        for n in [&m, &m.nth(3), &o] {
            assert_eq!(StoreName::new(n.as_str()).as_ref(), Some(n));
        }
        assert_eq!(
            o.pages_path(Path::new("/img")),
            Path::new("/img/data/o00_1f-5678.pages")
        );
        assert_eq!(
            o.sums_path(Path::new("/img")),
            Path::new("/img/data/o00_1f-5678.sums")
        );
    }

    #[test]
    fn other_names_are_plain_or_refused() {
        // Any plain name is a store name; only a dump's own have an owner.
        for plain in [
            "pid-1-1000",
            "object-0_1-7",
            "p1-1000.0",
            "p1-01000",
            "o0_1-7",
        ] {
            let n = StoreName::new(plain).unwrap();
            assert_eq!(n.owner(), None, "{plain}");
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "a\0b", &"x".repeat(201)] {
            assert_eq!(StoreName::new(bad), None, "{bad:?}");
        }
    }
}
