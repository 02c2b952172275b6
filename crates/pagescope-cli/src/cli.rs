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
    /// One line per mapping, like pmap -X: Size, Rss, Pss, Swap and the
    /// page states pmap cannot see (swap cache, in RAM but not mapped
    /// here, file pages not in RAM), totals last.
    #[command(disable_help_flag = true)]
    Map {
        #[command(flatten)]
        targets: Targets,
        #[command(flatten)]
        view: ViewArgs,
        /// Size and state columns to show, comma-separated (`all`: every
        /// one). Names: size, rss, pss, swap and the page states.
        #[arg(long, value_delimiter = ',', value_parser = parse_map_column)]
        columns: Vec<ColumnArg>,
        /// Sort mappings by this column (numbers largest first).
        #[arg(long, value_parser = parse_sort_column)]
        sort: Option<pagescope::render::MapColumn>,
        /// Do not shorten paths to fit 120 columns.
        #[arg(long)]
        wide: bool,
        /// Draw the address space as an SVG picture into FILE.
        #[arg(long, value_name = "FILE")]
        svg: Option<std::path::PathBuf>,
        #[command(flatten)]
        scan: ScanArgs,
    },
    /// One line per process: Rss, Pss, and swap and shared memory divided
    /// among the processes that hold them (which process holds my swap,
    /// my shmem).
    #[command(disable_help_flag = true)]
    Top {
        /// Only these processes (all are scanned, so shared pages are
        /// divided among every holder).
        pids: Vec<u32>,
        /// Only processes whose command name matches this glob.
        #[arg(long, value_name = "COMM")]
        name: Option<String>,
        /// Sort by this column (numbers largest first).
        #[arg(long, default_value = "swap", value_parser = parse_top_column)]
        sort: pagescope::render::TopColumn,
        /// Show only the first N lines.
        #[arg(long, short = 'n', value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
        #[command(flatten)]
        units: UnitArgs,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// One line per run of pages with equal state and flags.
    #[command(disable_help_flag = true)]
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
        view: ViewArgs,
        #[command(flatten)]
        scan: ScanArgs,
    },
    /// Each shared object (memfd, tmpfs, SysV, shared anonymous, shared
    /// files) once: its page states and which processes map which parts.
    #[command(disable_help_flag = true)]
    Objects {
        #[command(flatten)]
        targets: Targets,
        /// Also list regular files mapped only privately (libraries).
        #[arg(long)]
        files: bool,
        /// Include every object's page runs (JSON).
        #[arg(long)]
        ranges: bool,
        #[command(flatten)]
        view: ViewArgs,
        /// Machine-readable output (see docs/json.md).
        #[arg(long)]
        json: bool,
    },
    /// Live view of the pages a process writes per interval: dirty rate,
    /// hottest mappings, and whether pre-copy migration would converge.
    #[command(disable_help_flag = true)]
    Watch(WatchArgs),
    /// Copy a live process's memory into an image directory: a full
    /// pass, pre-copy rounds of what it writes meanwhile, and a final pass
    /// with its threads briefly stopped (no signal its parent sees).
    Dump(DumpArgs),
    /// Serve Prometheus metrics of true page states: per process (swap
    /// and shared memory divided among holders, beside smaps), per shared
    /// object, machine totals against /proc/meminfo.
    Exporter(crate::exporter_cmd::ExporterArgs),
    /// Send a live process's memory (full pass, pre-copy, stopped final
    /// pass) to `pagescope receive` over TCP or stdout.
    Send(crate::transfer_cmd::SendArgs),
    /// Receive one `pagescope send` stream into an image directory, or one
    /// shared object's pages into a file.
    Receive(crate::transfer_cmd::ReceiveArgs),
    /// Decode an image (and its parent chain).
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Compare an image with the memory of a stopped or idle process and
    /// name the ranges that differ (exit 1 if any), without swapping
    /// anything in.
    Verify {
        /// The image directory.
        dir: std::path::PathBuf,
        /// The process (the PID the image recorded).
        pid: u32,
        /// List at most N differing ranges (all are counted).
        #[arg(long, value_name = "N", default_value_t = 16)]
        limit: usize,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Write an image's memory as sparse files, one per mapping
    /// (`pid-PID-START-END.mem`) and per shared object
    /// (`object-DEV-INODE.mem`), holes kept as holes.
    Restore {
        /// The image directory.
        dir: std::path::PathBuf,
        /// A new directory for the files.
        #[arg(long)]
        to: std::path::PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Page out a process's memory now (process_madvise MADV_PAGEOUT, and
    /// shmem pages no one maps through pagescope's own mapping), then
    /// re-scan and report which pages left RAM and why the others stayed.
    Pageout {
        /// Target process.
        pid: u32,
        /// Only this address range (hex START-END, page aligned).
        #[arg(long, value_name = "START-END")]
        range: Option<String>,
        /// Only pages in these states (present: mapped by the process;
        /// resident: shmem in the page cache the process does not map).
        #[arg(long, value_delimiter = ',', default_value = "present,resident",
              value_parser = parse_pageout_state)]
        state: Vec<pagescope::PageState>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish,
    /// powershell) generated from these definitions.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), generated from these definitions:
    /// `pagescope manpage > pagescope.1`.
    Manpage,
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
        /// Also draw the fixture's address space as an SVG picture.
        #[arg(long, value_name = "FILE")]
        svg: Option<std::path::PathBuf>,
    },
}

/// Options of `pagescope watch`.
///
/// Attaching briefly stops one thread of the target (about a millisecond)
/// to create a userfaultfd inside it; while watched, the first write to
/// each page after every interval takes a minor fault. Other processes
/// that map the target's shared memory writable are tracked the same way
/// (`--no-sharers` keeps pagescope out of them).
#[derive(Debug, clap::Args)]
pub struct WatchArgs {
    /// Target process.
    pub pid: u32,
    /// Sampling interval (e.g. 1s, 500ms, 2.5s; at least 10ms).
    #[arg(long, default_value = "1s", value_parser = parse_interval)]
    pub interval: std::time::Duration,
    /// Stop after this many intervals (default: until Ctrl-C, q, or the
    /// process exits).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// One JSON object per interval (NDJSON; see docs/json.md).
    #[arg(long)]
    pub json: bool,
    /// One line per interval even on a terminal (instead of the live
    /// full-screen view).
    #[arg(long, conflicts_with = "json")]
    pub lines: bool,
    /// Link bandwidth for the pre-copy convergence estimate, MiB/s.
    #[arg(long, default_value = "1250", value_parser = parse_bandwidth)]
    pub bandwidth: f64,
    /// Tracking mechanism (default: the best available).
    #[arg(long, value_enum)]
    pub tracker: Option<Tracker>,
    /// Watch even if the kernel or privileges only allow reporting every
    /// page as written (otherwise exit code 10).
    #[arg(long)]
    pub allow_fallback: bool,
    #[command(flatten)]
    pub units: UnitArgs,
    /// Do not track other processes that map the target's shared memory
    /// writable; report such objects whole every interval instead.
    #[arg(long)]
    pub no_sharers: bool,
    /// Also attach to the children the process forks and report their
    /// writes.
    #[arg(long)]
    pub follow_forks: bool,
    /// Report every shared object as written on every interval.
    #[arg(long)]
    pub strict_shared: bool,
}

/// `pagescope image ...`.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Header, chain, processes, mappings, objects and page kinds.
    Show {
        /// The image directory.
        dir: std::path::PathBuf,
        /// The whole metadata as JSON (docs/image-format.md).
        #[arg(long)]
        json: bool,
        /// Also read every stored page and check its checksum.
        #[arg(long)]
        check_data: bool,
    },
}

/// `--snapshot`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SnapshotArg {
    /// Pre-copy, then a stopped final pass.
    Stop,
    /// Copy-before-write from one moment (userfaultfd write-protect).
    Cow,
}

/// `--swap`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum SwapArg {
    /// Read swapped pages (swaps them in).
    Read,
    /// Record swapped pages as swapped-not-copied.
    Skip,
    /// Read them, then page them back out and verify.
    KeepCold,
    /// Read anonymous pages from the swap device (root).
    Direct,
}

impl From<SwapArg> for pagescope::dump::SwapPolicy {
    fn from(a: SwapArg) -> Self {
        match a {
            SwapArg::Read => Self::Read,
            SwapArg::Skip => Self::Skip,
            SwapArg::KeepCold => Self::KeepCold,
            SwapArg::Direct => Self::Direct,
        }
    }
}

/// Options of `pagescope dump`.
#[derive(Debug, clap::Args)]
pub struct DumpArgs {
    /// Target process.
    pub pid: u32,
    /// The image directory (new or empty).
    #[arg(short = 'o', long = "out")]
    pub out: std::path::PathBuf,
    /// The previous image: store only what changed since it.
    #[arg(long)]
    pub parent: Option<std::path::PathBuf>,
    /// Leave write tracking in the process for the next `--parent` dump.
    #[arg(long)]
    pub keep_tracking: bool,
    /// Also the process's descendants (COW-shared pages stored once).
    #[arg(long)]
    pub tree: bool,
    #[command(flatten)]
    pub passes: PassArgs,
    /// Stop pre-copy once what is left should copy within this.
    #[arg(long, value_parser = parse_interval)]
    pub max_downtime: Option<std::time::Duration>,
    /// How the image is made consistent: stop (pre-copy, then a short
    /// stopped final pass) or cow (a point-in-time snapshot: stop only to
    /// write-protect, then copy each page before the process writes it).
    #[arg(long, value_enum, default_value = "stop")]
    pub snapshot: SnapshotArg,
    /// The report as JSON on stdout (statistics still on stderr).
    #[arg(long)]
    pub json: bool,
}

/// The pass options `dump` and `send` share.
#[derive(Debug, clap::Args)]
pub struct PassArgs {
    /// Pre-copy rounds at most (0: a single stopped pass after the full one).
    #[arg(long, default_value_t = 8)]
    pub max_iterations: u32,
    /// Pre-copy time at most (e.g. 60s, 500ms).
    #[arg(long, default_value = "60s", value_parser = parse_interval)]
    pub max_time: std::time::Duration,
    /// Copy mapped regular files too (default: recorded by identity).
    #[arg(long)]
    pub copy_files: bool,
    /// Leave the process stopped (SIGSTOP) after the dump, and every other
    /// writer of its shared memory stopped for the final pass with it.
    #[arg(long)]
    pub leave_stopped: bool,
    /// Do not stop the other processes that map the dumped shared memory
    /// writable for the final pass (they are by default, so the image is a
    /// consistent snapshot); the objects they could write are then named
    /// as not consistent.
    #[arg(long)]
    pub no_stop_sharers: bool,
    /// Swapped-out pages: read (swaps them in), skip (recorded as
    /// swapped-not-copied), keep-cold (read, then paged back out and
    /// checked), direct (read from the swap device, root; nothing swapped in).
    #[arg(long, value_enum, default_value = "read")]
    pub swap: SwapArg,
}

impl PassArgs {
    /// These options over `base` (the rest of the dump's options).
    pub fn apply(&self, base: pagescope::dump::DumpOptions) -> pagescope::dump::DumpOptions {
        pagescope::dump::DumpOptions {
            max_iterations: self.max_iterations,
            max_time: self.max_time,
            copy_files: self.copy_files,
            leave_stopped: self.leave_stopped,
            stop_sharers: !self.no_stop_sharers,
            swap: self.swap.into(),
            ..base
        }
    }
}

/// Which processes: PIDs, a command name, or all.
#[derive(Debug, clap::Args)]
pub struct Targets {
    /// Target processes.
    #[arg(required_unless_present_any = ["name", "all"])]
    pub pids: Vec<u32>,
    /// Processes whose command name (/proc/PID/comm) matches this glob.
    #[arg(long, value_name = "COMM", conflicts_with_all = ["all", "pids"])]
    pub name: Option<String>,
    /// Every process on the machine (kernel threads and processes that
    /// exit meanwhile are left out).
    #[arg(long, conflicts_with = "pids")]
    pub all: bool,
}

impl Targets {
    /// Whether one explicit PID was named (errors are then the command's).
    pub fn single(&self) -> Option<u32> {
        match (self.pids.as_slice(), &self.name, self.all) {
            ([pid], None, false) => Some(*pid),
            _ => None,
        }
    }
}

/// `-h/--human`, `--bytes` (and `--help`, which gives up `-h`).
#[derive(Debug, clap::Args)]
pub struct UnitArgs {
    /// Sizes in KiB, MiB, GiB as fits (default: KiB).
    #[arg(short = 'h', long, conflicts_with = "bytes")]
    pub human: bool,
    /// Sizes in bytes.
    #[arg(long)]
    pub bytes: bool,
    /// Print help.
    #[arg(long, action = clap::ArgAction::Help)]
    help: Option<bool>,
}

impl UnitArgs {
    /// The chosen unit.
    pub fn unit(&self) -> pagescope::render::SizeUnit {
        use pagescope::render::SizeUnit;
        match (self.human, self.bytes) {
            (true, _) => SizeUnit::Human,
            (_, true) => SizeUnit::Bytes,
            _ => SizeUnit::Kib,
        }
    }
}

/// Units and filters of the listings.
#[derive(Debug, clap::Args)]
pub struct ViewArgs {
    #[command(flatten)]
    pub units: UnitArgs,
    /// Only mappings (objects) with pages in one of these states; `pages`
    /// lists only runs in them.
    #[arg(long, value_delimiter = ',', value_parser = parse_state)]
    pub state: Vec<pagescope::PageState>,
    /// Only mappings (objects) with one of these backings.
    #[arg(long, value_delimiter = ',', value_enum)]
    pub backing: Vec<BackingArg>,
    /// Only mappings (objects) whose path matches this glob (`*libc*`,
    /// `/memfd:*`).
    #[arg(long, value_name = "GLOB")]
    pub path: Option<String>,
}

impl ViewArgs {
    /// The library filter.
    pub fn filter(&self) -> pagescope::render::Filter {
        pagescope::render::Filter {
            states: self.state.clone(),
            backings: self.backing.iter().map(|&b| b.into()).collect(),
            path: self.path.as_deref().map(pagescope::render::Glob::new),
        }
    }
}

/// `--backing`.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BackingArg {
    /// Private anonymous memory.
    Anon,
    /// memfd, tmpfs, SysV and shared anonymous memory.
    Shmem,
    /// Regular files.
    File,
    /// hugetlbfs.
    Hugetlb,
    /// [vdso], [vvar], [vsyscall], device mappings.
    Special,
}

impl From<BackingArg> for pagescope::Backing {
    fn from(b: BackingArg) -> Self {
        match b {
            BackingArg::Anon => Self::Anon,
            BackingArg::Shmem => Self::Shmem,
            BackingArg::File => Self::File,
            BackingArg::Hugetlb => Self::Hugetlb,
            BackingArg::Special => Self::Special,
        }
    }
}

/// One `--columns` entry: a column, or `all`.
#[derive(Clone, Debug)]
pub enum ColumnArg {
    /// One column.
    One(pagescope::render::MapColumn),
    /// Every selectable column.
    All,
}

fn parse_state(s: &str) -> Result<pagescope::PageState, String> {
    pagescope::PageState::from_name(s.trim()).ok_or_else(|| {
        let names: Vec<_> = pagescope::PageState::ALL.iter().map(|s| s.name()).collect();
        format!("no page state {s:?} (one of: {})", names.join(", "))
    })
}

fn parse_top_column(s: &str) -> Result<pagescope::render::TopColumn, String> {
    use pagescope::render::TopColumn;
    TopColumn::from_name(s.trim()).ok_or_else(|| {
        let names: Vec<_> = TopColumn::ALL.iter().map(|c| c.name()).collect();
        format!("no column {s:?} (one of: {})", names.join(", "))
    })
}

/// A page state `pageout` can act on: the ones in RAM (`present`,
/// `resident`); any other name is refused with the list.
fn parse_pageout_state(s: &str) -> Result<pagescope::PageState, String> {
    use pagescope::PageState::{Present, Resident};
    match parse_state(s)? {
        st @ (Present | Resident) => Ok(st),
        st => Err(format!(
            "pageout acts on pages in RAM: {} is not one (one of: present, resident)",
            st.name()
        )),
    }
}

fn column_names() -> String {
    let names: Vec<_> = pagescope::render::MapColumn::selectable()
        .iter()
        .map(|c| c.name().to_ascii_lowercase())
        .collect();
    names.join(", ")
}

fn parse_map_column(s: &str) -> Result<ColumnArg, String> {
    use pagescope::render::MapColumn;
    if s.trim().eq_ignore_ascii_case("all") {
        return Ok(ColumnArg::All);
    }
    match MapColumn::parse(s) {
        Some(c) if MapColumn::selectable().contains(&c) => Ok(ColumnArg::One(c)),
        _ => Err(format!("no column {s:?} (one of: all, {})", column_names())),
    }
}

fn parse_sort_column(s: &str) -> Result<pagescope::render::MapColumn, String> {
    pagescope::render::MapColumn::parse(s).ok_or_else(|| {
        format!(
            "no column {s:?} (one of: address, perm, backing, path, {})",
            column_names()
        )
    })
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
    /// How the PAGEMAP_SCAN backend covers memory (same result, different
    /// cost): walk with the ioctl where memory is sparse and read pagemap
    /// directly where it is dense (adaptive), or always one way.
    #[arg(long, value_enum, default_value_t = Strategy::Adaptive)]
    pub strategy: Strategy,
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

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Strategy {
    /// Decide per 32 MiB step from how populated the last step was.
    Adaptive,
    /// Always walk with PAGEMAP_SCAN first.
    Walk,
    /// Always read pagemap directly (walking only ambiguous 2 MiB blocks).
    Read,
}

impl From<Strategy> for pagescope::ScanStrategy {
    fn from(s: Strategy) -> Self {
        match s {
            Strategy::Adaptive => Self::Adaptive,
            Strategy::Walk => Self::Walk,
            Strategy::Read => Self::Read,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Tracker {
    /// userfaultfd write-protect (async) + PAGEMAP_SCAN (Linux 6.7+).
    Uffd,
    /// Soft-dirty bits (CONFIG_MEM_SOFT_DIRTY).
    SoftDirty,
    /// Report everything as written.
    All,
}

impl From<Tracker> for pagescope::dirty::TrackerBackend {
    fn from(t: Tracker) -> Self {
        match t {
            Tracker::Uffd => Self::UffdWpAsync,
            Tracker::SoftDirty => Self::SoftDirty,
            Tracker::All => Self::AllDirty,
        }
    }
}

/// Parses `1s`, `500ms`, `2.5s` or plain seconds; at least 10 ms.
pub(crate) fn parse_interval(s: &str) -> Result<std::time::Duration, String> {
    let (num, scale) = if let Some(ms) = s.strip_suffix("ms") {
        (ms, 1e-3)
    } else if let Some(sec) = s.strip_suffix('s') {
        (sec, 1.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("not an interval: {s:?} (try 1s or 500ms)"))?;
    let secs = v * scale;
    if !secs.is_finite() || !(0.01..=86_400.0).contains(&secs) {
        return Err(format!("interval {s:?} out of range (10ms to 24h)"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

/// A finite, positive bandwidth in MiB/s.
fn parse_bandwidth(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("not a number of MiB/s: {s:?}"))?;
    if !v.is_finite() || v <= 0.0 {
        return Err(format!(
            "bandwidth {s:?} must be a finite number above 0 (MiB/s)"
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_and_bandwidths_are_validated() {
        assert_eq!(parse_interval("500ms").unwrap().as_millis(), 500);
        assert_eq!(parse_interval("2.5s").unwrap().as_millis(), 2500);
        assert_eq!(parse_interval("10ms").unwrap().as_millis(), 10);
        for bad in ["9ms", "0", "-1s", "nan", "inf", "1e9", "x"] {
            assert!(parse_interval(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_bandwidth("1250").unwrap(), 1250.0);
        for bad in ["0", "-3", "nan", "inf", "fast"] {
            assert!(parse_bandwidth(bad).is_err(), "{bad}");
        }
    }
}
