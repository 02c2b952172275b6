//! Pure parser for `/proc/swaps`.
//!
//! Swap entries in pagemap carry a *type*, the index of the device in the
//! kernel's `swap_info[]` table. `/proc/swaps` lists the devices in that
//! order but skips free slots, so the line number equals the type unless an
//! earlier device was swapped off while a later one stayed active
//! ([`SwapTable::device`] reports that ambiguity instead of guessing).
//!
//! # References
//! - `proc(5)` (`/proc/swaps`); `swap_show()` in `mm/swapfile.c`

/// One active swap area.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwapDevice {
    /// Path of the device or file (octal escapes undone).
    pub path: Vec<u8>,
    /// `partition` or `file`.
    pub kind: String,
    /// Size in kB.
    pub size_kb: u64,
    /// Used space in kB.
    pub used_kb: u64,
    /// Priority (higher is used first).
    pub priority: i64,
}

impl SwapDevice {
    /// The path for display (lossy UTF-8 with `\xNN` escapes).
    pub fn display_path(&self) -> String {
        super::maps::escape_bytes(&self.path)
    }

    /// Size in pages of `page_size` bytes.
    pub fn size_pages(&self, page_size: u64) -> u64 {
        self.size_kb * 1024 / page_size
    }
}

/// The active swap areas, in swap-type order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SwapTable {
    devices: Vec<SwapDevice>,
}

impl SwapTable {
    /// Wraps parsed devices.
    pub fn new(devices: Vec<SwapDevice>) -> Self {
        Self { devices }
    }

    /// All active devices.
    pub fn devices(&self) -> &[SwapDevice] {
        &self.devices
    }

    /// Whether any swap is active.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// The device for swap type `ty` holding `offset`, if the mapping from
    /// type to device is certain: the type indexes an active line and the
    /// offset fits that device. `None` otherwise.
    pub fn device(&self, ty: u8, offset: u64, page_size: u64) -> Option<&SwapDevice> {
        let d = self.devices.get(usize::from(ty))?;
        (offset < d.size_pages(page_size).max(1)).then_some(d)
    }

    /// Whether `ty` can be a real swap device at all: any type below the
    /// number of active devices is, and so may be a higher one when an
    /// earlier device was swapped off. PTE markers and migration entries use
    /// the top types (27..=31 on common configs).
    pub fn is_plausible_device(&self, ty: u8) -> bool {
        usize::from(ty) < self.devices.len()
            || (!self.devices.is_empty() && ty < FIRST_SPECIAL_TYPE)
    }
}

/// Lowest swap type the kernel uses for non-swap entries on any common
/// config: `MAX_SWAPFILES` is 32 minus device-private (0 or 3), migration
/// (3), hwpoison (1) and PTE-marker (1) types, so 24 or 27.
pub const FIRST_SPECIAL_TYPE: u8 = 24;

/// `SWP_PTE_MARKER`: the last swap type, used for PTE markers.
pub const PTE_MARKER_TYPE: u8 = 31;

/// Parses `/proc/swaps`.
pub fn parse_swaps(buf: &[u8]) -> SwapTable {
    let devices = buf
        .split(|&b| b == b'\n')
        .skip(1)
        .filter_map(parse_line)
        .collect();
    SwapTable { devices }
}

fn parse_line(line: &[u8]) -> Option<SwapDevice> {
    let mut it = line
        .split(|&b| b == b' ' || b == b'\t')
        .filter(|f| !f.is_empty());
    let path = unescape_octal(it.next()?);
    let kind = String::from_utf8_lossy(it.next()?).into_owned();
    let num = |f: Option<&[u8]>| -> Option<i64> { std::str::from_utf8(f?).ok()?.parse().ok() };
    let size_kb = u64::try_from(num(it.next())?).ok()?;
    let used_kb = u64::try_from(num(it.next())?).ok()?;
    let priority = num(it.next())?;
    Some(SwapDevice {
        path,
        kind,
        size_kb,
        used_kb,
        priority,
    })
}

/// Undoes the kernel's `\040`-style escapes (seq_file_path escapes space,
/// tab, newline and backslash).
pub fn unescape_octal(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_captured_swaps() {
        let t = parse_swaps(
            b"Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n\
/swap\\040file\t\t\t\tfile\t\t2097148\t\t0\t\t-2\n\
/dev/zram0                              partition\t1048572\t\t12\t\t100\n",
        );
        assert_eq!(t.devices().len(), 2);
        assert_eq!(t.devices()[0].path, b"/swap file");
        assert_eq!(t.devices()[0].priority, -2);
        assert_eq!(t.devices()[1].kind, "partition");
        assert_eq!(t.devices()[1].used_kb, 12);
        assert_eq!(t.device(1, 10, 4096).unwrap().path, b"/dev/zram0");
        assert!(t.device(1, 1 << 40, 4096).is_none());
        assert!(t.device(2, 0, 4096).is_none());
        assert!(!t.is_plausible_device(PTE_MARKER_TYPE));
        assert!(parse_swaps(b"Filename Type Size Used Priority\n").is_empty());
    }
}
