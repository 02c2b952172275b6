//! `/proc` access: a pinned [`Target`] handle and pure byte parsers for the
//! files pagescope reads (`maps`, `smaps`, `smaps_rollup`, `meminfo`, `stat`,
//! `mountinfo`, `swaps`).
//!
//! Parsers never do I/O and are tested on captured text; the [`Target`]
//! opens files relative to the pinned `/proc/PID` directory and hands the
//! bytes to them.

pub mod maps;
pub mod mountinfo;
pub mod rollup;
pub mod smaps;
pub mod stat;
pub mod swaps;
mod target;

pub use target::{ProcError, Target};

/// Reads `/proc/swaps` (global, not per process).
pub fn read_swaps() -> std::io::Result<swaps::SwapTable> {
    Ok(swaps::parse_swaps(&std::fs::read("/proc/swaps")?))
}

/// The PIDs of every process visible in `/proc` (threads excluded), in
/// ascending order.
pub fn pids() -> Vec<u32> {
    let mut out: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect();
    out.sort_unstable();
    out
}
