//! The on-disk records of an image (see `docs/image-format.md`): the
//! `HEADER` file, `meta.json` and the per-page checksums. Reading and
//! writing live in [`read`](super::read) and [`write`](super::write); this
//! module only says what the bytes are.
//!
//! ```text
//! DIR/HEADER      "PGSCIMG\n" | u32 LE version | u32 LE body length |
//!                 body (JSON Header) | u64 LE xxh3(body)
//! DIR/meta.json   JSON Meta (length and xxh3 in the header)
//! DIR/data/N.pages  page i of store N at byte i * page_size (sparse),
//!                   then one trailer page naming the image and store
//! DIR/data/N.sums   u64 LE per page: the page's checksum if this
//!                   generation stores it, else 0 (length and xxh3 in meta)
//! ```

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::addr::{VirtAddr, VirtRange};
use crate::proc::maps::{DevId, MappingKey, Perms};
use crate::vma::ObjectId;

/// The first bytes of `HEADER`.
pub const MAGIC: [u8; 8] = *b"PGSCIMG\n";
/// The format version this code writes and reads.
pub const VERSION: u32 = 2;
/// The header file's name.
pub const HEADER_FILE: &str = "HEADER";
/// The metadata file's name.
pub const META_FILE: &str = "meta.json";
/// The folder holding page data and checksums.
pub const DATA_DIR: &str = "data";

/// Largest `HEADER` read.
pub const MAX_HEADER_BYTES: u64 = 64 << 10;
/// Largest `meta.json` read.
pub const MAX_META_BYTES: u64 = 1 << 30;
/// Largest store (pages) a reader accepts: 2^40 bytes of 4 KiB pages.
pub const MAX_STORE_PAGES: u64 = 1 << 28;

/// The body of `HEADER`: what the image is and how to check the rest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Format version (equal to the binary one).
    pub format_version: u32,
    /// Base page size of the machine the image was taken on.
    pub page_size: u64,
    /// A random 128-bit id, hex.
    pub image_id: String,
    /// 0 for a full image, parent's + 1 for an incremental one.
    pub generation: u32,
    /// The image this one builds on.
    pub parent: Option<ParentRef>,
    /// When it was committed (Unix time, ns).
    pub created_unix_ns: u64,
    /// `meta.json`: its length and xxh3.
    pub meta_len: u64,
    /// xxh3-64 of `meta.json`.
    pub meta_xxh3: u64,
}

/// A link to the parent image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    /// Its image id (must match the parent's header).
    pub image_id: String,
    /// Where it was (as given to `--parent`; relative paths are taken
    /// from this image's directory).
    pub path: String,
}

/// `meta.json`: the processes, their mappings, the shared objects, and
/// the stores of page data.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// The dumped processes (the target first).
    pub processes: Vec<ProcessRec>,
    /// Shared objects, each once.
    pub objects: Vec<ObjectRec>,
    /// Page data files.
    pub stores: Vec<StoreRec>,
    /// A userfaultfd left in the target (`--keep-tracking`).
    pub kept_tracking: Option<KeptTracking>,
    /// The active swap devices at dump time, by swap type (what
    /// `SwapSlotRec::ty` indexes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub swap_devices: Vec<String>,
}

/// One process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRec {
    /// PID at dump time.
    pub pid: u32,
    /// Parent PID at dump time.
    pub ppid: u32,
    /// Command name.
    pub comm: String,
    /// Its mappings, in address order.
    pub vmas: Vec<VmaRec>,
    /// The rseq area of every thread that registered one (read at the
    /// stopped final pass): fields the kernel rewrites whenever the thread
    /// runs (`RSEQ_KERNEL_FIELDS`) may differ from the image afterwards.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rseq: Vec<RseqRec>,
}

/// One thread's registered rseq area (`rseq(2)`,
/// `PTRACE_GET_RSEQ_CONFIGURATION`, Linux 5.13+).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RseqRec {
    /// The thread.
    pub tid: u32,
    /// Address of its `struct rseq`.
    pub address: u64,
    /// Registered length in bytes.
    pub length: u32,
    /// The abort signature.
    pub signature: u32,
}

/// The fields of `struct rseq` (`linux/rseq.h`) the kernel writes when the
/// thread runs, as (name, byte offset, length): they follow the CPU the
/// thread last ran on, not the program.
pub const RSEQ_KERNEL_FIELDS: [(&str, u64, u64); 4] = [
    ("cpu_id_start", 0, 4),
    ("cpu_id", 4, 4),
    ("node_id", 20, 4),
    ("mm_cid", 24, 4),
];

/// One mapping.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmaRec {
    /// First address.
    pub start: u64,
    /// First address after it.
    pub end: u64,
    /// `rwxp` / `rwxs`.
    pub perms: String,
    /// Offset into the backing object, bytes.
    pub offset: u64,
    /// Backing device, `major:minor`.
    pub dev: String,
    /// Backing inode (0: anonymous).
    pub inode: u64,
    /// Path as in maps.
    pub path: String,
    /// `anon`, `shmem`, `file`, `hugetlb`, `special`.
    pub backing: String,
    /// Index in [`Meta::objects`] of the object behind it, if it has one.
    pub object: Option<usize>,
    /// Name of the store holding its own pages, if any.
    pub store: Option<String>,
    /// Every page, in runs (page indices from the VMA's start).
    pub runs: Vec<Run>,
    /// Where each `swapped` page is on the swap device (`--swap skip`, as
    /// root): for a destination that shares the device.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub swap_slots: Vec<SwapSlotRec>,
}

impl VmaRec {
    /// What identifies the recorded mapping in a process's maps (see
    /// `MappingKey`); `None` if the record is malformed.
    pub(crate) fn mapping_key(&self) -> Option<MappingKey> {
        Some(MappingKey {
            range: VirtRange::new(VirtAddr::new(self.start), VirtAddr::new(self.end))?,
            offset: self.offset,
            dev: DevId::parse(self.dev.as_bytes(), 16)?,
            inode: self.inode,
            shared: Perms::parse(self.perms.as_bytes())?.shared,
        })
    }
}

/// A page left on the swap device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwapSlotRec {
    /// Page index in the VMA.
    pub page: u64,
    /// Swap type (the device's index in `/proc/swaps` at dump time).
    pub ty: u8,
    /// Page offset on that device.
    pub offset: u64,
}

/// A shared object (shmem or file), stored once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRec {
    /// Device, `major:minor`.
    pub dev: String,
    /// Inode.
    pub inode: u64,
    /// A path it is mapped under.
    pub path: String,
    /// `memfd`, `tmpfs`, `sysv`, `shared_anon`, `file`, ...
    pub kind: String,
    /// Pages covered (object pages `0..pages`).
    pub pages: u64,
    /// Name of the store holding its pages, if any.
    pub store: Option<String>,
    /// For regular files not copied: what the file was.
    pub file: Option<FileIdentity>,
    /// Its pages, in runs (object page indices).
    pub runs: Vec<Run>,
}

/// A regular file whose pages are read from the file itself at restore
/// (see `image/identity.rs`): opened by its raw path only if device,
/// inode, size, modification time (and the content hash, when recorded)
/// all match.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    /// Path, for people (non-UTF-8 bytes as `\xNN`).
    pub path: String,
    /// The path's raw bytes, hex: what is opened.
    pub path_hex: String,
    /// Device (`st_dev`), `major:minor` in hex as in maps.
    pub dev: String,
    /// Inode.
    pub inode: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time (ns since the epoch).
    pub mtime_ns: i128,
    /// xxh3-64 of the whole content, for files of at most
    /// `HASHED_FILE_BYTES`.
    pub content_xxh3: Option<u64>,
}

impl FileIdentity {
    /// The device and inode recorded (`None` if the device is malformed).
    pub fn object_id(&self) -> Option<ObjectId> {
        object_id(&self.dev, self.inode)
    }
}

impl ObjectRec {
    /// The device and inode recorded (`None` if the device is malformed).
    pub fn object_id(&self) -> Option<ObjectId> {
        object_id(&self.dev, self.inode)
    }
}

/// A recorded device (`major:minor` in hex, as maps prints it) and inode.
fn object_id(dev: &str, inode: u64) -> Option<ObjectId> {
    Some(ObjectId {
        dev: DevId::parse(dev.as_bytes(), 16)?,
        inode,
    })
}

/// Files up to this size get a content hash in their identity.
pub const HASHED_FILE_BYTES: u64 = 4 << 20;

/// A file of page data and its checksums.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreRec {
    /// File name stem under `data/` (`.pages`, `.sums`).
    pub name: String,
    /// Pages it can hold.
    pub pages: u64,
    /// xxh3-64 of its `.sums` file.
    pub sums_xxh3: u64,
}

/// A userfaultfd left in the target for the next incremental dump.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptTracking {
    /// The target.
    pub pid: u32,
    /// The target's start time (`/proc/PID/stat` field 22), so a recycled
    /// PID is not mistaken for it.
    pub start_time: u64,
    /// The fd number in the target.
    pub fd: i32,
}

/// A run of pages in one state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    /// First page (index in the VMA or object).
    pub first: u64,
    /// Pages.
    pub count: u64,
    /// Their state.
    pub kind: PageKind,
    /// For [`PageKind::Dedup`]: where the first page's content is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<DedupRef>,
}

/// Where a deduplicated page's content is stored: another process's VMA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DedupRef {
    /// Its PID.
    pub pid: u32,
    /// The VMA's start address.
    pub vma_start: u64,
    /// The page index in that VMA.
    pub page: u64,
}

/// What an image holds for a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PageKind {
    /// Its bytes are in this image's store.
    Data,
    /// All zeros (not stored).
    Zero,
    /// Nothing there (reads as zeros; a restore leaves a hole).
    Hole,
    /// Unchanged since the parent image.
    InParent,
    /// Swapped out and not copied (`--swap skip`): not restorable from the
    /// image.
    Swapped,
    /// A mapping's page that is its object's page (see the object record).
    Object,
    /// An unchanged page of a regular file: read from the file.
    File,
    /// The same bytes as another process's page (a COW-shared page of a
    /// forked tree, stored once).
    Dedup,
}

/// The checksum of one page stored by an image with `seed`; never 0 (0
/// marks a page the store does not hold).
pub fn page_sum(seed: u64, page: &[u8]) -> u64 {
    xxh3_64_with_seed(page, seed) | 1
}

/// The checksum of a whole file's bytes (headers, metadata, sums).
pub fn file_sum(bytes: &[u8]) -> u64 {
    xxh3_64(bytes)
}

/// The last page of every `.pages` file (after its `pages` pages): which
/// image and store it belongs to, so a data file copied from another
/// image is rejected even where its pages happen to be equal.
pub fn data_trailer(image_id: &str, store: &str, page_size: usize) -> Vec<u8> {
    let mut t = format!("PGSCDATA {image_id} {store}\n").into_bytes();
    t.resize(page_size, 0);
    t
}

/// The page-checksum seed of image `id` (its first 16 hex digits): sums
/// from another image do not verify here.
pub fn seed_of(image_id: &str) -> u64 {
    u64::from_str_radix(image_id.get(..16).unwrap_or("0"), 16).unwrap_or(0)
}

/// Encodes `HEADER`.
pub fn encode_header(h: &Header) -> Vec<u8> {
    let body = serde_json::to_vec(h).unwrap_or_default();
    let mut out = Vec::with_capacity(body.len() + 24);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(&file_sum(&body).to_le_bytes());
    out
}

/// Why `HEADER` bytes did not decode: the offset and what was wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderFault {
    /// Byte offset of the problem.
    pub offset: u64,
    /// What.
    pub what: String,
}

/// Decodes `HEADER`.
pub fn decode_header(bytes: &[u8]) -> Result<Header, HeaderFault> {
    let fault = |offset: usize, what: &str| HeaderFault {
        offset: offset as u64,
        what: what.to_owned(),
    };
    if bytes.len() < 24 || bytes[..8] != MAGIC {
        return Err(fault(0, "not a pagescope image (bad magic)"));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap_or_default());
    if version != VERSION {
        return Err(fault(
            8,
            &format!("format version {version}, this pagescope reads {VERSION}"),
        ));
    }
    let len = u32::from_le_bytes(bytes[12..16].try_into().unwrap_or_default()) as usize;
    if bytes.len() != 16 + len + 8 {
        return Err(fault(
            12,
            "header length does not match the file (truncated?)",
        ));
    }
    let body = &bytes[16..16 + len];
    let sum = u64::from_le_bytes(bytes[16 + len..].try_into().unwrap_or_default());
    if sum != file_sum(body) {
        return Err(fault(16 + len, "header checksum mismatch"));
    }
    let h: Header = serde_json::from_slice(body)
        .map_err(|e| fault(16 + e.column(), &format!("header: {e}")))?;
    if h.format_version != VERSION || !h.page_size.is_power_of_two() {
        return Err(fault(16, "header fields out of range"));
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            format_version: VERSION,
            page_size: 4096,
            image_id: "0123456789abcdef0123456789abcdef".into(),
            generation: 2,
            parent: Some(ParentRef {
                image_id: "ff".into(),
                path: "../g1".into(),
            }),
            created_unix_ns: 1,
            meta_len: 10,
            meta_xxh3: 7,
        }
    }

    #[test]
    fn headers_round_trip_and_every_bit_flip_is_caught() {
        let bytes = encode_header(&header());
        assert_eq!(decode_header(&bytes).unwrap(), header());
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert!(
                    decode_header(&b).is_err(),
                    "flip at byte {i} bit {bit} accepted"
                );
            }
        }
        for n in 0..bytes.len() {
            assert!(
                decode_header(&bytes[..n]).is_err(),
                "truncated to {n} accepted"
            );
        }
    }

    #[test]
    fn page_sums_are_never_zero_and_depend_on_the_seed() {
        let p = vec![0u8; 4096];
        assert_ne!(page_sum(1, &p), 0);
        assert_ne!(page_sum(1, &p), page_sum(2, &p));
        assert_eq!(seed_of("0123456789abcdefXX"), 0x0123_4567_89ab_cdef);
    }

    #[test]
    fn a_recorded_mapping_is_the_same_mapping_as_its_maps_line() {
        let line = b"7f00-8f00 rw-s 00002000 00:1f 77 /memfd:x (deleted)";
        let e = crate::proc::maps::parse_line(line).unwrap();
        // As the dump records it (dump/model.rs).
        let rec = VmaRec {
            start: e.range.start().get(),
            end: e.range.end().get(),
            perms: e.perms.to_string(),
            offset: e.offset,
            dev: e.dev.to_string(),
            inode: e.inode,
            path: e.path.display(),
            backing: "shmem".into(),
            object: None,
            store: None,
            runs: Vec::new(),
            swap_slots: Vec::new(),
        };
        assert_eq!(rec.mapping_key(), Some(e.mapping_key()));
        let other = VmaRec {
            perms: "rw-p".into(),
            ..rec.clone()
        };
        assert_ne!(other.mapping_key(), Some(e.mapping_key()));
        let malformed = VmaRec {
            dev: "x".into(),
            ..rec
        };
        assert_eq!(malformed.mapping_key(), None);
    }

    #[test]
    fn a_file_identity_names_its_object() {
        let id = FileIdentity {
            path: "/f".into(),
            path_hex: "2f66".into(),
            dev: "fd:01".into(),
            inode: 9,
            size: 1,
            mtime_ns: 0,
            content_xxh3: None,
        };
        let want = ObjectId {
            dev: DevId {
                major: 0xfd,
                minor: 1,
            },
            inode: 9,
        };
        assert_eq!(id.object_id(), Some(want));
    }
}
