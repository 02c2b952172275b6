//! Pure parsers for `/proc/PID/smaps_rollup` and `/proc/meminfo` (no
//! I/O): `Name:   value kB` lines.
//!
//! `smaps_rollup` (Linux 4.14+) is smaps summed over every VMA: one walk
//! of the target's page tables, the cost floor of any smaps-based
//! exporter. `/proc/meminfo` gives the machine totals the exporter
//! reconciles with (`Shmem`, `SwapCached`, `SwapTotal`, `SwapFree`).
//!
//! # References
//! - `proc_pid_smaps_rollup` in `proc(5)`; `show_smaps_rollup()` in
//!   `fs/proc/task_mmu.c`; `meminfo_proc_show()` in `fs/proc/meminfo.c`

/// The value of the `field:` line of `text` in bytes (the kernel writes
/// kB), or `None` if there is no such line.
pub fn field_bytes(text: &[u8], field: &str) -> Option<u64> {
    text.split(|&b| b == b'\n').find_map(|line| {
        let rest = line.strip_prefix(field.as_bytes())?.strip_prefix(b":")?;
        let mut words = rest
            .split(u8::is_ascii_whitespace)
            .filter(|w| !w.is_empty());
        let value: u64 = std::str::from_utf8(words.next()?).ok()?.parse().ok()?;
        match words.next() {
            Some(b"kB") => value.checked_mul(1024),
            None => Some(value),
            Some(_) => None,
        }
    })
}

/// The sizes of `/proc/PID/smaps_rollup` pagescope exports, bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rollup {
    /// `Rss:` (every VMA, the kernel's `[vdso]` included).
    pub rss: u64,
    /// `Pss:`.
    pub pss: u64,
    /// `Swap:`: swap entries in private mappings plus shmem swap inside
    /// shared ones, each charged in full to every process holding it.
    pub swap: u64,
    /// `SwapPss:`: the private swap divided by the swap count (shmem swap
    /// is not in it).
    pub swap_pss: u64,
}

impl Rollup {
    /// Parses `smaps_rollup` text; `None` if it has no `Rss:` line (the
    /// file of a process without an address space is empty).
    pub fn parse(text: &[u8]) -> Option<Self> {
        Some(Self {
            rss: field_bytes(text, "Rss")?,
            pss: field_bytes(text, "Pss").unwrap_or(0),
            swap: field_bytes(text, "Swap").unwrap_or(0),
            swap_pss: field_bytes(text, "SwapPss").unwrap_or(0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROLLUP: &[u8] =
        b"55d0c0a8e000-7ffd4a5f6000 ---p 00000000 00:00 0                          [rollup]
Rss:               10240 kB
Pss:                5120 kB
Pss_Dirty:          2048 kB
Pss_Anon:           1024 kB
Swap:               8192 kB
SwapPss:            4096 kB
Locked:                0 kB
";

    #[test]
    fn rollup_fields_are_bytes() {
        let r = Rollup::parse(ROLLUP).unwrap();
        assert_eq!(r.rss, 10240 * 1024);
        assert_eq!(r.pss, 5120 * 1024);
        assert_eq!(r.swap, 8192 * 1024);
        assert_eq!(r.swap_pss, 4096 * 1024);
        assert_eq!(Rollup::parse(b""), None);
    }

    #[test]
    fn meminfo_fields_and_prefixes_are_not_confused() {
        let m = b"MemTotal:       24684000 kB\nSwapCached:          12 kB\nVmRSS:\t    5412 kB\nSwapTotal:       2097148 kB\nHugePages_Total:       0\n";
        assert_eq!(field_bytes(m, "SwapCached"), Some(12 * 1024));
        assert_eq!(field_bytes(m, "SwapTotal"), Some(2097148 * 1024));
        assert_eq!(field_bytes(m, "Swap"), None);
        assert_eq!(field_bytes(m, "HugePages_Total"), Some(0));
        assert_eq!(field_bytes(m, "VmRSS"), Some(5412 * 1024));
    }
}
