//! Sizes in one unit per command: KiB (the default, as `pmap -X`),
//! human-readable binary units (`-h`), or bytes (`--bytes`).

/// How sizes are printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SizeUnit {
    /// Kibibytes, integers (what `pmap -X` and smaps print as "kB").
    #[default]
    Kib,
    /// `512 KiB`, `1.5 MiB`, `12 GiB`: the largest binary unit that keeps
    /// the number at least 1; one decimal below 10.
    Human,
    /// Bytes, integers.
    Bytes,
}

const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];

impl SizeUnit {
    /// `bytes` in this unit (without the unit for `Kib` and `Bytes`, whose
    /// unit the header names).
    pub fn format(self, bytes: u64) -> String {
        match self {
            Self::Kib => (bytes / 1024).to_string(),
            Self::Bytes => bytes.to_string(),
            Self::Human => human(bytes as f64, ""),
        }
    }

    /// A rate in this unit per second.
    pub fn format_rate(self, bytes_per_sec: f64) -> String {
        match self {
            Self::Kib => format!("{:.0} KiB/s", bytes_per_sec / 1024.0),
            Self::Bytes => format!("{bytes_per_sec:.0} B/s"),
            Self::Human => human(bytes_per_sec, "/s"),
        }
    }

    /// The words a header uses for this unit: "KiB", "bytes" or
    /// "KiB/MiB/GiB".
    pub fn name(self) -> &'static str {
        match self {
            Self::Kib => "KiB",
            Self::Bytes => "bytes",
            Self::Human => "KiB/MiB/GiB",
        }
    }
}

fn human(bytes: f64, suffix: &str) -> String {
    if bytes < 1024.0 {
        return if bytes == 0.0 {
            "0".to_owned()
        } else {
            format!("{bytes:.0} B{suffix}")
        };
    }
    let mut v = bytes / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    // Round first, so 1023.96 KiB prints as 1 MiB, not "1024 KiB".
    if v >= 10.0 && v.round() >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if v < 9.95 {
        format!("{v:.1} {}{suffix}", UNITS[unit])
    } else {
        format!("{v:.0} {}{suffix}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_unit_formats_sizes() {
        assert_eq!(SizeUnit::Kib.format(8192), "8");
        assert_eq!(SizeUnit::Bytes.format(8192), "8192");
        let h = |b| SizeUnit::Human.format(b);
        assert_eq!(h(0), "0");
        assert_eq!(h(100), "100 B");
        assert_eq!(h(4096), "4.0 KiB");
        assert_eq!(h(512 * 1024), "512 KiB");
        assert_eq!(h(1536 * 1024), "1.5 MiB");
        assert_eq!(h(1024 * 1024 - 20), "1.0 MiB");
        assert_eq!(h(12 << 30), "12 GiB");
        assert_eq!(SizeUnit::Human.format_rate(3.0 * 1048576.0), "3.0 MiB/s");
        assert_eq!(SizeUnit::Kib.format_rate(2048.0), "2 KiB/s");
    }
}
