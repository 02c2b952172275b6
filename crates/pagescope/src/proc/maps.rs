//! Pure parser for `/proc/PID/maps` (no I/O).
//!
//! Lines look like
//! `7f12a0000000-7f12a0400000 rw-s 00000000 00:01 1234    /memfd:guest (deleted)`.
//! Paths are bytes, not UTF-8: file names may hold any byte but `/` and NUL
//! (the kernel escapes a newline as `\012`), may contain spaces, and get
//! ` (deleted)` appended once unlinked.
//!
//! # References
//! - `proc_pid_maps(5)`; `show_map_vma()` in `fs/proc/task_mmu.c`

use std::fmt;

use crate::addr::{VirtAddr, VirtRange};

/// One line of `/proc/PID/maps`: a VMA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapsEntry {
    /// Address range of the VMA.
    pub range: VirtRange,
    /// Protection and sharing.
    pub perms: Perms,
    /// Offset into the backing file, in bytes (`vm_pgoff * PAGE_SIZE`).
    pub offset: u64,
    /// Device of the backing file (`0:0` for anonymous memory).
    pub dev: DevId,
    /// Inode of the backing file (0 for anonymous memory).
    pub inode: u64,
    /// Path or pseudo-path (`[heap]`, `[vdso]`, ...); empty for anonymous.
    pub path: MapsPath,
}

/// What identifies a mapping across two reads of maps
/// ([`MapsEntry::same_mapping`]): the range, the backing object (device
/// and inode) and the offset into it, and whether it is shared.
///
/// Left out on purpose:
/// * the `rwx` protection: `mprotect` over a whole VMA keeps its pages
///   (one over part of it splits the VMA, which changes the range);
/// * the path: a file unlinked meanwhile gains ` (deleted)`, a renamed one
///   shows its new name, `prctl(PR_SET_VMA_ANON_NAME)` renames anonymous
///   memory; device and inode still name the same object.
///
/// Anonymous private memory has no object (device `0:0`, inode 0); its
/// offset is the `vm_pgoff` the kernel gave it at `mmap` (its first
/// address in pages, kept by `mremap`). A mapping unmapped and mapped
/// again with the same range, offset and object therefore reads as the
/// same: maps cannot tell, a dirty tracker can (it reports a new mapping).
/// Shared anonymous memory and SysV segments have an inode of their own,
/// so a new one differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MappingKey {
    /// Address range.
    pub range: VirtRange,
    /// Offset into the backing object, bytes.
    pub offset: u64,
    /// Device of the backing object.
    pub dev: DevId,
    /// Inode of the backing object.
    pub inode: u64,
    /// `MAP_SHARED` (no `mprotect` changes it).
    pub shared: bool,
}

impl MapsEntry {
    /// What identifies this mapping across two reads of maps.
    pub fn mapping_key(&self) -> MappingKey {
        MappingKey {
            range: self.range,
            offset: self.offset,
            dev: self.dev,
            inode: self.inode,
            shared: self.perms.shared,
        }
    }

    /// Whether `other` (from another read of maps) is the same mapping:
    /// equal [`MappingKey`]s (range, offset, device, inode, shared), the
    /// protection and the path left out (see [`MappingKey`] for why).
    pub fn same_mapping(&self, other: &MapsEntry) -> bool {
        self.mapping_key() == other.mapping_key()
    }
}

/// The `rwxp`/`rwxs` column.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Perms {
    /// `r`: readable.
    pub read: bool,
    /// `w`: writable.
    pub write: bool,
    /// `x`: executable.
    pub exec: bool,
    /// `s` (shared) rather than `p` (private, copy-on-write).
    pub shared: bool,
}

impl Perms {
    /// From the four characters of the column (`rw-p`).
    pub fn parse(b: &[u8]) -> Option<Self> {
        let [r, w, x, s] = <[u8; 4]>::try_from(b).ok()?;
        Some(Self {
            read: r == b'r',
            write: w == b'w',
            exec: x == b'x',
            shared: s == b's',
        })
    }
}

impl fmt::Display for Perms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = |on: bool, ch: char| if on { ch } else { '-' };
        write!(
            f,
            "{}{}{}{}",
            c(self.read, 'r'),
            c(self.write, 'w'),
            c(self.exec, 'x'),
            if self.shared { 's' } else { 'p' }
        )
    }
}

/// A `major:minor` device number as printed in maps and mountinfo.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct DevId {
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
}

impl DevId {
    /// Parses `MAJ:MIN` (hex in maps, decimal in mountinfo).
    pub fn parse(b: &[u8], radix: u32) -> Option<Self> {
        let s = std::str::from_utf8(b).ok()?;
        let (a, b) = s.split_once(':')?;
        Some(Self {
            major: u32::from_str_radix(a, radix).ok()?,
            minor: u32::from_str_radix(b, radix).ok()?,
        })
    }

    /// From a `stat` `st_dev` value (glibc/kernel "new" encoding).
    pub fn from_st_dev(dev: u64) -> Self {
        Self {
            major: rustix::fs::major(dev),
            minor: rustix::fs::minor(dev),
        }
    }
}

impl fmt::Display for DevId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}", self.major, self.minor)
    }
}

/// The path column, as raw bytes, with the ` (deleted)` suffix split off.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct MapsPath {
    bytes: Vec<u8>,
    deleted: bool,
}

const DELETED: &[u8] = b" (deleted)";

impl MapsPath {
    /// From the column's raw bytes (including any ` (deleted)`).
    pub fn from_raw(raw: &[u8]) -> Self {
        match raw.strip_suffix(DELETED) {
            Some(p) if p.starts_with(b"/") => Self {
                bytes: p.to_vec(),
                deleted: true,
            },
            _ => Self {
                bytes: raw.to_vec(),
                deleted: false,
            },
        }
    }

    /// The path without the ` (deleted)` suffix.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Whether the kernel marked the file as unlinked.
    pub fn is_deleted(&self) -> bool {
        self.deleted
    }

    /// Whether the column was empty (anonymous memory).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// A pseudo-path such as `[heap]`, `[stack]`, `[vdso]`, `[anon:name]`.
    pub fn is_pseudo(&self) -> bool {
        self.bytes.starts_with(b"[") && self.bytes.ends_with(b"]")
    }

    /// The path as the kernel printed it, with ` (deleted)` and with bytes
    /// that are not UTF-8 written as `\xNN`.
    pub fn display(&self) -> String {
        let mut s = escape_bytes(&self.bytes);
        if self.deleted {
            s.push_str(" (deleted)");
        }
        s
    }
}

/// UTF-8 text with every invalid byte written as `\xNN` (and `\` as `\\`,
/// so the escaping is reversible).
pub fn escape_bytes(b: &[u8]) -> String {
    let mut out = String::with_capacity(b.len());
    for chunk in b.utf8_chunks() {
        for ch in chunk.valid().chars() {
            if ch == '\\' {
                out.push_str("\\\\");
            } else {
                out.push(ch);
            }
        }
        for byte in chunk.invalid() {
            out.push_str(&format!("\\x{byte:02x}"));
        }
    }
    out
}

/// A maps line that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {what}")]
pub struct MapsParseError {
    /// 1-based line number.
    pub line: usize,
    /// What was wrong.
    pub what: &'static str,
}

/// Column at which the kernel starts the path (`seq_setwidth(m, 25 + 6 *
/// sizeof(void *) - 1)` then `seq_pad(m, ' ')` on 64-bit kernels).
const PATH_COLUMN: usize = 73;

/// Parses the whole of `/proc/PID/maps`.
pub fn parse_maps(buf: &[u8]) -> Result<Vec<MapsEntry>, MapsParseError> {
    buf.split(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, l)| !l.is_empty())
        .map(|(i, l)| {
            parse_line(l).ok_or(MapsParseError {
                line: i + 1,
                what: "malformed maps line",
            })
        })
        .collect()
}

/// Parses one maps line (without its newline).
pub fn parse_line(line: &[u8]) -> Option<MapsEntry> {
    let mut fields = Fields { line, pos: 0 };
    let range = fields.next()?;
    let perms = Perms::parse(fields.next()?)?;
    let offset = hex_u64(fields.next()?)?;
    let dev = DevId::parse(fields.next()?, 16)?;
    let inode = std::str::from_utf8(fields.next()?).ok()?.parse().ok()?;
    let (start, end) = split_range(range)?;
    let path = path_column(line, fields.pos);
    Some(MapsEntry {
        range: VirtRange::new(VirtAddr::new(start), VirtAddr::new(end))?,
        perms,
        offset,
        dev,
        inode,
        path: MapsPath::from_raw(path),
    })
}

/// The path column: after padding to [`PATH_COLUMN`], or after the single
/// space that follows an over-long prefix. Anything shorter is trimmed.
fn path_column(line: &[u8], prefix_end: usize) -> &[u8] {
    let start = prefix_end.max(PATH_COLUMN - 1) + 1;
    if line.len() >= start && line[prefix_end..start - 1].iter().all(|&b| b == b' ') {
        &line[start..]
    } else {
        let rest = line.get(prefix_end..).unwrap_or(&[]);
        let skip = rest.iter().take_while(|&&b| b == b' ').count();
        &rest[skip..]
    }
}

struct Fields<'a> {
    line: &'a [u8],
    pos: usize,
}

impl<'a> Iterator for Fields<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let rest = &self.line[self.pos..];
        let skip = rest.iter().take_while(|&&b| b == b' ').count();
        let len = rest[skip..].iter().take_while(|&&b| b != b' ').count();
        if len == 0 {
            return None;
        }
        let field = &rest[skip..skip + len];
        self.pos += skip + len;
        Some(field)
    }
}

fn hex_u64(b: &[u8]) -> Option<u64> {
    u64::from_str_radix(std::str::from_utf8(b).ok()?, 16).ok()
}

fn split_range(b: &[u8]) -> Option<(u64, u64)> {
    let dash = b.iter().position(|&c| c == b'-')?;
    Some((hex_u64(&b[..dash])?, hex_u64(&b[dash + 1..])?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &[u8] = b"\
55d0c8a00000-55d0c8a21000 rw-p 00000000 00:00 0                          [heap]
7f12a0000000-7f12a0400000 rw-s 00000000 00:01 1234                       /memfd:guest (deleted)
7f12a0400000-7f12a0500000 rw-s 00000000 00:01 5                          /dev/zero (deleted)
7f12a0500000-7f12a0600000 rw-s 00000000 00:01 32769                      /SYSV00000000 (deleted)
7f12a0600000-7f12a0700000 r--p 00002000 fd:00 131  /home/u/with space/f\xff\xfe.bin
7f12a0700000-7f12a0800000 rw-p 00000000 00:00 0 
7ffd1a5e0000-7ffd1a601000 rw-p 00000000 00:00 0                          [stack]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
";

    fn entry(line: &str) -> MapsEntry {
        parse_line(line.as_bytes()).unwrap()
    }

    #[test]
    fn same_mapping_ignores_protection_and_path() {
        let a = entry("7f00-8f00 rw-p 00002000 fd:00 131 /usr/lib/x.so");
        // mprotect of the whole VMA; the file unlinked, then renamed.
        assert!(a.same_mapping(&entry("7f00-8f00 r--p 00002000 fd:00 131 /usr/lib/x.so")));
        assert!(a.same_mapping(&entry(
            "7f00-8f00 rw-p 00002000 fd:00 131 /usr/lib/x.so (deleted)"
        )));
        assert!(a.same_mapping(&entry("7f00-8f00 rw-p 00002000 fd:00 131 /usr/lib/y.so")));
        // Another range (a split), offset, file, device or sharing: another mapping.
        assert!(!a.same_mapping(&entry("7f00-8000 rw-p 00002000 fd:00 131 /usr/lib/x.so")));
        assert!(!a.same_mapping(&entry("7f00-8f00 rw-p 00003000 fd:00 131 /usr/lib/x.so")));
        assert!(!a.same_mapping(&entry("7f00-8f00 rw-p 00002000 fd:00 132 /usr/lib/x.so")));
        assert!(!a.same_mapping(&entry("7f00-8f00 rw-p 00002000 fd:01 131 /usr/lib/x.so")));
        assert!(!a.same_mapping(&entry("7f00-8f00 rw-s 00002000 fd:00 131 /usr/lib/x.so")));
    }

    #[test]
    fn same_mapping_of_anonymous_memory() {
        let anon = entry("7f00-8f00 rw-p 0007f000 00:00 0 ");
        assert!(anon.same_mapping(&entry("7f00-8f00 rw-p 0007f000 00:00 0 [anon:cache]")));
        // Moved by mremap to where it is now: another offset.
        assert!(!anon.same_mapping(&entry("7f00-8f00 rw-p 00010000 00:00 0 ")));
        // A new shared anonymous region has an inode of its own.
        let shared = entry("7f00-8f00 rw-s 00000000 00:01 5 /dev/zero (deleted)");
        assert!(!shared.same_mapping(&entry(
            "7f00-8f00 rw-s 00000000 00:01 6 /dev/zero (deleted)"
        )));
        assert!(!shared.same_mapping(&anon));
    }

    #[test]
    fn parses_captured_maps() {
        let v = parse_maps(SAMPLE).unwrap();
        assert_eq!(v.len(), 8);
        assert_eq!(v[0].path.as_bytes(), b"[heap]");
        assert!(v[0].path.is_pseudo());
        assert_eq!(v[1].path.as_bytes(), b"/memfd:guest");
        assert!(v[1].path.is_deleted());
        assert_eq!(v[1].path.display(), "/memfd:guest (deleted)");
        assert!(v[1].perms.shared);
        assert_eq!(v[1].dev, DevId { major: 0, minor: 1 });
        assert_eq!(v[1].inode, 1234);
        assert_eq!(v[4].offset, 0x2000);
        assert_eq!(
            v[4].dev,
            DevId {
                major: 0xfd,
                minor: 0
            }
        );
        // Short prefix without padding (hand-written): path still found.
        assert_eq!(v[4].path.as_bytes(), b"/home/u/with space/f\xff\xfe.bin");
        assert_eq!(v[4].path.display(), "/home/u/with space/f\\xff\\xfe.bin");
        assert!(v[5].path.is_empty());
        assert_eq!(v[7].range.start().get(), 0xffff_ffff_ff60_0000);
        assert_eq!(v[7].perms.to_string(), "--xp");
    }

    #[test]
    fn path_with_leading_spaces_uses_kernel_padding() {
        // The kernel pads to column 72, then one space: a name starting with
        // spaces keeps them.
        let prefix = b"7f0000000000-7f0000001000 r--p 00000000 08:01 42";
        let mut line = prefix.to_vec();
        line.resize(PATH_COLUMN - 1, b' ');
        line.extend_from_slice(b"   /odd");
        // "   /odd" does not start at column 73 with '/', but the column rule
        // takes everything after the padding.
        let e = parse_line(&line).unwrap();
        assert_eq!(e.path.as_bytes(), b"  /odd");
    }

    #[test]
    fn long_prefix_gets_one_space() {
        let line = b"ffffffffff600000-ffffffffff601000 r--p 00000000 103:02 12345678901234567890 /x (deleted)";
        let e = parse_line(line).unwrap();
        assert_eq!(e.inode, 12345678901234567890);
        assert_eq!(e.path.as_bytes(), b"/x");
        assert!(e.path.is_deleted());
    }

    #[test]
    fn deleted_suffix_only_on_paths() {
        assert!(!MapsPath::from_raw(b"[anon: (deleted)]").is_deleted());
        assert!(MapsPath::from_raw(b"/a (deleted)").is_deleted());
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_maps(b"hello world\n").is_err());
        assert!(parse_maps(b"1000-2000 rw-p zz 00:00 0\n").is_err());
    }
}
