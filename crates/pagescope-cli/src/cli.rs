//! Command-line definition (clap derive). Nothing here does work.

use clap::{Parser, Subcommand, ValueEnum};

/// The truth about every page of a Linux process.
#[derive(Debug, Parser)]
#[command(name = "pagescope", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// One line per mapping (like pmap -X): page counts per state, totals.
    Map {
        /// Target process.
        pid: u32,
        #[command(flatten)]
        scan: ScanArgs,
    },
    /// One line per run of pages with equal state and flags.
    Pages {
        /// Target process.
        pid: u32,
        /// Only this address range (hex START-END, page aligned).
        #[arg(long, value_name = "START-END")]
        range: Option<String>,
        /// Add swap type, offset and device to swapped ranges (root).
        #[arg(long)]
        swap_detail: bool,
        #[command(flatten)]
        scan: ScanArgs,
    },
    /// Each shared object (memfd, tmpfs, SysV, shared anonymous, shared
    /// files) once: its page states and which processes map which parts.
    Objects {
        /// Processes whose objects to list.
        pids: Vec<u32>,
        /// Every process on the machine.
        #[arg(long, conflicts_with = "pids")]
        all: bool,
        /// Also list regular files mapped only privately (libraries).
        #[arg(long)]
        files: bool,
        /// Include every object's page runs (JSON).
        #[arg(long)]
        ranges: bool,
        /// Machine-readable output (see docs/json.md).
        #[arg(long)]
        json: bool,
    },
    /// Which kernel interfaces and privileges are available here.
    Kernel {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Start the built-in fixture target and show its memory map.
    Demo {
        /// Print the fixture's `pages --json` document instead.
        #[arg(long)]
        json: bool,
        /// Scan backend.
        #[arg(long, value_enum, default_value_t = Backend::Auto)]
        backend: Backend,
    },
    /// The fixture target (used by tests, benchmarks and demo).
    #[command(hide = true)]
    Fixture {
        /// Scenario names and options.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Debug, clap::Args)]
pub struct ScanArgs {
    /// Machine-readable output (see docs/json.md).
    #[arg(long)]
    pub json: bool,
    /// Scan backend.
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    pub backend: Backend,
    /// Also read smaps (VmFlags, Swap:) even where not needed.
    #[arg(long)]
    pub smaps: bool,
    /// Do not examine backing objects of shared and file mappings.
    #[arg(long)]
    pub no_objects: bool,
    /// Do not read pagemap just for the exclusive flag (faster on large,
    /// dense address spaces; reports say "exclusive_known": false).
    #[arg(long)]
    pub no_exclusive: bool,
    /// Worker threads for large address spaces (0: one per CPU, up to 8).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Backend {
    /// PAGEMAP_SCAN when available, else pagemap reads.
    Auto,
    /// The PAGEMAP_SCAN ioctl (Linux 6.7+).
    Scan,
    /// Plain pagemap reads.
    Pagemap,
}

impl From<Backend> for pagescope::BackendChoice {
    fn from(b: Backend) -> Self {
        match b {
            Backend::Auto => Self::Auto,
            Backend::Scan => Self::PagemapScan,
            Backend::Pagemap => Self::Pagemap,
        }
    }
}
