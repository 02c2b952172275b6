//! Pure parser for `/proc/PID/smaps` (no I/O): per-VMA size fields and the
//! `VmFlags` line.
//!
//! Reading smaps walks every page table of the target, so pagescope reads it
//! only when it needs what nothing else provides: VmFlags for unprivileged
//! marker disambiguation, and the `Swap:` oracle for cross-checks.
//!
//! # References
//! - `proc_pid_smaps(5)`; `show_smap_vma_flags()` in `fs/proc/task_mmu.c`

use bitflags::bitflags;

use super::maps::{self, MapsEntry};

bitflags! {
    /// The `VmFlags:` codes pagescope uses (others are ignored).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct VmFlags: u32 {
        /// `sh`: shared mapping.
        const SHARED = 1 << 0;
        /// `io`: memory-mapped I/O.
        const IO = 1 << 1;
        /// `pf`: pure PFN range (no struct page).
        const PFNMAP = 1 << 2;
        /// `ht`: hugetlb.
        const HUGETLB = 1 << 3;
        /// `sd`: soft-dirty (only on kernels with `CONFIG_MEM_SOFT_DIRTY`).
        const SOFT_DIRTY = 1 << 4;
        /// `um`: userfaultfd missing-page tracking.
        const UFFD_MISSING = 1 << 5;
        /// `uw`: userfaultfd write-protect tracking.
        const UFFD_WP = 1 << 6;
        /// `ui`: userfaultfd minor-fault tracking.
        const UFFD_MINOR = 1 << 7;
        /// `gu`: the VMA has guard regions (6.15+).
        const GUARD = 1 << 8;
        /// `hg`: `MADV_HUGEPAGE`.
        const HUGEPAGE = 1 << 9;
        /// `nh`: `MADV_NOHUGEPAGE`.
        const NOHUGEPAGE = 1 << 10;
        /// `mg`: `MADV_MERGEABLE` (KSM).
        const MERGEABLE = 1 << 11;
        /// `lo`: pages locked in memory.
        const LOCKED = 1 << 12;
        /// `dd`: excluded from core dumps.
        const DONTDUMP = 1 << 13;
    }
}

impl VmFlags {
    fn from_code(code: &[u8]) -> Self {
        match code {
            b"sh" => Self::SHARED,
            b"io" => Self::IO,
            b"pf" => Self::PFNMAP,
            b"ht" => Self::HUGETLB,
            b"sd" => Self::SOFT_DIRTY,
            b"um" => Self::UFFD_MISSING,
            b"uw" => Self::UFFD_WP,
            b"ui" => Self::UFFD_MINOR,
            b"gu" => Self::GUARD,
            b"hg" => Self::HUGEPAGE,
            b"nh" => Self::NOHUGEPAGE,
            b"mg" => Self::MERGEABLE,
            b"lo" => Self::LOCKED,
            b"dd" => Self::DONTDUMP,
            _ => Self::empty(),
        }
    }

    /// Parses the value of a `VmFlags:` line (space-separated codes).
    pub fn parse(value: &[u8]) -> Self {
        value
            .split(|&b| b == b' ')
            .filter(|c| !c.is_empty())
            .fold(Self::empty(), |acc, c| acc | Self::from_code(c))
    }
}

/// One VMA of `/proc/PID/smaps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmapsEntry {
    /// The header line, parsed like a maps line.
    pub vma: MapsEntry,
    /// Every `Name: N kB` field, in file order.
    pub fields_kb: Vec<(String, u64)>,
    /// The `VmFlags:` line.
    pub vm_flags: VmFlags,
}

impl SmapsEntry {
    /// A size field in kB (`"Swap"`, `"Rss"`, `"AnonHugePages"`, ...).
    pub fn field_kb(&self, name: &str) -> Option<u64> {
        self.fields_kb
            .iter()
            .find(|(n, _)| n == name)
            .map(|&(_, v)| v)
    }
}

/// An smaps line that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {what}")]
pub struct SmapsParseError {
    /// 1-based line number.
    pub line: usize,
    /// What was wrong.
    pub what: &'static str,
}

/// Parses the whole of `/proc/PID/smaps`.
pub fn parse_smaps(buf: &[u8]) -> Result<Vec<SmapsEntry>, SmapsParseError> {
    let mut out: Vec<SmapsEntry> = Vec::new();
    for (i, line) in buf.split(|&b| b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let err = |what| SmapsParseError { line: i + 1, what };
        if let Some((name, value)) = field_line(line) {
            let cur = out
                .last_mut()
                .ok_or(err("field before the first VMA header"))?;
            if name == "VmFlags" {
                cur.vm_flags = VmFlags::parse(value);
            } else if let Some(kb) = kb_value(value) {
                cur.fields_kb.push((name.to_owned(), kb));
            }
            // Other fields (THPeligible: 0, ProtectionKey: 0) are ignored.
        } else {
            let vma = maps::parse_line(line).ok_or(err("malformed VMA header"))?;
            out.push(SmapsEntry {
                vma,
                fields_kb: Vec::new(),
                vm_flags: VmFlags::empty(),
            });
        }
    }
    Ok(out)
}

/// `Name:   value` lines; a VMA header never has a colon right after its
/// first word (it starts with a hex range).
fn field_line(line: &[u8]) -> Option<(&str, &[u8])> {
    let colon = line.iter().position(|&b| b == b':')?;
    let name = std::str::from_utf8(&line[..colon]).ok()?;
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return None;
    }
    if name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some((name, trim(&line[colon + 1..])))
}

fn kb_value(value: &[u8]) -> Option<u64> {
    let digits = value.strip_suffix(b" kB").unwrap_or(value);
    std::str::from_utf8(trim(digits)).ok()?.parse().ok()
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|&c| c != b' ' && c != b'\t')
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|&c| c != b' ' && c != b'\t')
        .map_or(start, |e| e + 1);
    &b[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &[u8] = b"\
7f2c3c000000-7f2c3c100000 rw-s 00000000 00:01 2050                       /memfd:t (deleted)
Size:               1024 kB
KernelPageSize:        4 kB
Rss:                 512 kB
Swap:                512 kB
SwapPss:               0 kB
THPeligible:           0
VmFlags: rd wr sh mr mw me ms uw 
7f2c3c100000-7f2c3c200000 rw-p 00000000 00:00 0 
Size:               1024 kB
AnonHugePages:      2048 kB
VmFlags: rd wr mr mw me ac gu hg
";

    #[test]
    fn parses_fields_and_flags() {
        let v = parse_smaps(SAMPLE).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].field_kb("Swap"), Some(512));
        assert_eq!(v[0].field_kb("SwapPss"), Some(0));
        assert_eq!(v[0].field_kb("THPeligible"), Some(0));
        assert_eq!(v[0].vm_flags, VmFlags::SHARED | VmFlags::UFFD_WP);
        assert_eq!(v[0].vma.path.as_bytes(), b"/memfd:t");
        assert_eq!(v[1].vm_flags, VmFlags::GUARD | VmFlags::HUGEPAGE);
        assert_eq!(v[1].field_kb("AnonHugePages"), Some(2048));
        assert_eq!(v[1].field_kb("Nope"), None);
    }

    #[test]
    fn header_with_hex_only_name_is_not_a_field() {
        assert!(field_line(b"00400000-00401000 r-xp 00000000 08:01 1 /bin/x").is_none());
        assert!(parse_smaps(b"Rss: 4 kB\n").is_err());
    }
}
