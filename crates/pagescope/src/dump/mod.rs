//! Dumping a live process (or a forked tree of them) into an image:
//! a full pass, pre-copy rounds of the pages the dirty tracker reports
//! written, and a final pass with the process stopped (ptrace interrupt of
//! every thread: no signal anyone sees) so the image is consistent.
//!
//! One pinned [`Target`] per process serves the scan (the inspection
//! driver says what every page is), the tracker (which pages changed) and
//! the copy. Zero pages are recorded, not copied; shared memory is read
//! through the object (`pread`), never mapped into the target; regular
//! files mapped are recorded by identity unless `copy_files`; with a
//! parent image, only pages that differ from it are stored (or, with a
//! userfaultfd the previous dump left in the target, only pages written
//! since).
//!
//! Every pass writes through one page sink (`sink.rs`); the image
//! directory is the one [`dump`] uses. This file holds the public
//! vocabulary (options, errors, report, events) and [`dump`]; the rest:
//!
//! * `attach.rs`: the pinned processes and their trackers;
//! * `passes.rs`: the pre-copy engine (full, pre-copy and stopped passes);
//! * `planner.rs`: what a pass copies, layout reconciliation (pure);
//! * `objects.rs`: the shared objects, opened once, grown, `SEEK_DATA`;
//! * `copy/`: the copy of a pass (own pages on worker threads, objects);
//! * `remote.rs`: reading the target's memory without unsharing pages;
//! * `swap/`: the `--swap` policies; `stop.rs`, `sharers.rs`: the stop;
//! * `cow/`: `--snapshot cow`; `commit.rs`: the records and the commit;
//! * `abort.rs`, `out_dir.rs`: a failed or interrupted dump;
//! * `model.rs`, `unopened.rs`: what each page is, objects not opened;
//! * `scope.rs`: a dump limited to one shared object (`only_object`);
//! * `verify/`: an image against the live process.

mod abort;
mod attach;
mod commit;
mod converge;
mod copy;
mod cow;
mod model;
mod objects;
mod out_dir;
mod passes;
mod planner;
mod remote;
mod scope;
mod sharers;
pub(crate) mod sink;
pub(crate) mod stop;
pub(crate) mod swap;
mod unopened;
mod verify;

pub use converge::PrecopyEnd;
pub use cow::CowStats;
pub use sharers::{InconsistentObject, SharedWriter, SharedWriters};
pub use swap::{SwapClassReport, SwapPolicy, SwapReport};
pub use verify::{
    KernelOwned, Memory, Mismatch, NotCompared, OtherWriters, VerifyOptions, VerifyReport, verify,
    verify_with,
};

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use self::attach::Pinned;
use self::passes::Dump;
use self::sink::{ImageSink, PageSink};
use crate::dirty::TrackError;
use crate::error::ErrorKind;
use crate::image::format::KeptTracking;
use crate::image::{Image, ImageError, ImageWriter};
use crate::kernel::KernelCaps;
use crate::object::ObjectError;
use crate::proc::{ProcError, Target};
use crate::scan::ScanError;

/// Errors of a dump.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DumpError {
    /// Scanning failed.
    #[error(transparent)]
    Scan(#[from] ScanError),
    /// Tracking failed.
    #[error(transparent)]
    Track(#[from] TrackError),
    /// Writing or reading an image failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A `/proc` file failed.
    #[error(transparent)]
    Proc(#[from] ProcError),
    /// A shared object could not be opened.
    #[error(transparent)]
    Object(#[from] ObjectError),
    /// Reading the process's memory failed.
    #[error("cannot read the memory of process {pid}")]
    Read {
        /// The process.
        pid: u32,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Reading a shared object failed.
    #[error("cannot read object inode {inode}")]
    ObjectRead {
        /// The object's inode.
        inode: u64,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The options cannot be combined, or the snapshot cannot be taken.
    #[error("process {pid}: {what}")]
    Snapshot {
        /// The process.
        pid: u32,
        /// Why.
        what: String,
    },
    /// Write-protecting the process failed.
    #[error("process {pid}: write protection for the snapshot failed")]
    Protect {
        /// The process.
        pid: u32,
        /// The error.
        #[source]
        source: crate::uffd::UffdError,
    },
    /// Stopping the process failed.
    #[error("cannot stop process {pid} for the final pass")]
    Stop {
        /// The process.
        pid: u32,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The process exited during the dump.
    #[error("process {pid} exited during the dump")]
    Exited {
        /// The process.
        pid: u32,
    },
    /// The request needs a privilege the caller or the process lacks.
    #[error("process {pid}: {what}")]
    Refused {
        /// The process.
        pid: u32,
        /// What is missing and what would help.
        what: String,
    },
    /// [`DumpOptions::cancel`] was set (a signal): the process was let go
    /// as it was, the incomplete image removed.
    #[error("dump of process {pid} interrupted by signal {signal}")]
    Interrupted {
        /// The process.
        pid: u32,
        /// The value [`DumpOptions::cancel`] was set to (a signal number).
        signal: usize,
    },
}

impl DumpError {
    /// The broad class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Scan(e) => e.kind(),
            Self::Track(e) => e.kind(),
            Self::Image(e) => e.kind(),
            Self::Proc(e) => e.kind(),
            Self::Object(e) => e.kind(),
            Self::Exited { .. } => ErrorKind::TargetExited,
            Self::Refused { .. } => ErrorKind::PermissionDenied,
            Self::Snapshot { .. } => ErrorKind::BadInput,
            Self::Protect { source, .. } => source.kind(),
            Self::Read { source, .. } | Self::Stop { source, .. }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                ErrorKind::PermissionDenied
            }
            _ => ErrorKind::Other,
        }
    }
}

/// How to dump.
#[derive(Clone, Debug)]
pub struct DumpOptions {
    /// The image directory (new or empty).
    pub out: PathBuf,
    /// The parent image (an incremental dump).
    pub parent: Option<PathBuf>,
    /// Leave the userfaultfd in the target for the next incremental dump.
    pub keep_tracking: bool,
    /// Also the process's descendants, COW-shared pages stored once.
    pub tree: bool,
    /// Pre-copy rounds at most (0: stop at once, one stopped pass).
    pub max_iterations: u32,
    /// Pre-copy time at most.
    pub max_time: Duration,
    /// Pre-copy goes on while the rest is predicted to take longer than
    /// this (pages left / the measured bandwidth), within the bounds above;
    /// `None`: until the written set stops shrinking.
    pub max_downtime: Option<Duration>,
    /// With `max_downtime` too, pre-copy stops once the written set
    /// shrinks by less than a tenth from one pass to the next (it cannot
    /// converge at the measured bandwidth: post-copy switches then).
    pub stop_when_stalled: bool,
    /// Copy the pages of mapped regular files too (default: recorded by
    /// identity and read from the file at restore).
    pub copy_files: bool,
    /// Leave the process stopped (a `SIGSTOP`) after the dump (and every
    /// other writer stopped for the final pass, see `stop_sharers`).
    pub leave_stopped: bool,
    /// Stop every other process that maps a dumped shared object writable
    /// for the final pass too, so the image of shared memory is a
    /// consistent snapshot (default). Off: such objects and their writers
    /// are named in [`DumpReport::shared_writers`].
    pub stop_sharers: bool,
    /// What to do with swapped-out pages.
    pub swap: SwapPolicy,
    /// A point-in-time copy-before-write snapshot (`--snapshot cow`)
    /// instead of pre-copy and a stopped final pass.
    pub cow: bool,
    /// Set to non-zero (e.g. by a signal handler, to the signal's number)
    /// to stop the dump at its next step: the process is resumed and
    /// released, the incomplete image removed, and the dump fails with
    /// [`DumpError::Interrupted`].
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicUsize>>,
    /// Only this shared object: the process's shared mappings of it are
    /// the only ones modelled, read and recorded (`send --object`: a VM's
    /// guest RAM, nothing of the VMM's own memory).
    pub only_object: Option<crate::vma::ObjectId>,
}

impl DumpOptions {
    /// Defaults: up to 8 pre-copy rounds in 60 s.
    pub fn new(out: impl Into<PathBuf>) -> Self {
        Self {
            out: out.into(),
            parent: None,
            keep_tracking: false,
            tree: false,
            max_iterations: 8,
            max_time: Duration::from_secs(60),
            max_downtime: None,
            stop_when_stalled: false,
            copy_files: false,
            leave_stopped: false,
            stop_sharers: true,
            swap: SwapPolicy::Read,
            cow: false,
            cancel: None,
            only_object: None,
        }
    }
}

/// One pass of a dump.
#[derive(Clone, Debug, Serialize)]
pub struct Iteration {
    /// 0: the full pass; then pre-copy rounds; the last is the stopped one.
    pub n: u32,
    /// Whether the process was stopped during it.
    pub stopped: bool,
    /// Pages read.
    pub pages: u64,
    /// Pages stored (not zero, not as in the parent).
    pub stored: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Seconds it took.
    pub seconds: f64,
    /// Pages reported written since the previous pass.
    pub written_pages: u64,
    /// Their rate, MiB/s.
    pub dirty_rate_mib_s: f64,
    /// Sending what it copied (the pages written since the pass before)
    /// would take this long at `bandwidth_bytes_s`, stopped: what
    /// pre-copy compares with `max_downtime` (0 while no bandwidth is
    /// measured).
    pub predicted_downtime_s: f64,
    /// The bandwidth the prediction used, bytes/s: the sink's measured
    /// rate (a stream's: bytes pushed into the connection per second,
    /// smoothed), else the copy's rate of the full pass.
    pub bandwidth_bytes_s: f64,
}

/// What a dump did.
#[derive(Clone, Debug, Serialize)]
pub struct DumpReport {
    /// The image directory.
    pub dir: PathBuf,
    /// Its id.
    pub image_id: String,
    /// Its generation.
    pub generation: u32,
    /// The processes dumped.
    pub pids: Vec<u32>,
    /// Every pass.
    pub iterations: Vec<Iteration>,
    /// How long the processes were stopped.
    pub stopped_s: f64,
    /// Why pre-copy ended: converged, or a bound reached.
    pub precopy_end: PrecopyEnd,
    /// Whether pre-copy converged ([`PrecopyEnd::converged`]).
    pub converged: bool,
    /// Pages stored in this image.
    pub stored_pages: u64,
    /// Pages of memory it covers (all kinds).
    pub covered_pages: u64,
    /// The userfaultfd left in the target (`keep_tracking`).
    pub kept_tracking: Option<KeptTracking>,
    /// What the swap policy did, per class of page.
    pub swap: SwapReport,
    /// The copy-before-write snapshot's stop and stalls (`cow`).
    pub snapshot: Option<CowStats>,
    /// What limited the dump (a degraded tracker, tracking not kept).
    pub notes: Vec<String>,
    /// Other processes writing the dumped shared memory during the final
    /// pass: stopped with the dumped ones, or named with the objects that
    /// are therefore not a consistent snapshot.
    pub shared_writers: SharedWriters,
}

/// Something a dump tells its caller as it goes.
#[derive(Clone, Copy, Debug)]
pub enum DumpEvent<'a> {
    /// Pages read so far in pass `pass`, of about `total`.
    Progress {
        /// The pass (0: full).
        pass: u32,
        /// Pages read.
        done: u64,
        /// Pages the pass will read.
        total: u64,
    },
    /// A pass ended.
    Iteration(&'a Iteration),
}

/// Dumps `target` (and, with `tree`, its descendants) into `opts.out`;
/// `progress` sees every pass as it goes.
///
/// Needs ptrace access to every process (`process_vm_readv`, the final
/// stop) and a write-protect userfaultfd in it (root here: see
/// `KERNEL.md`) for pre-copy; without one, the dump is one stopped pass.
pub fn dump(
    target: &Target,
    caps: &KernelCaps,
    opts: &DumpOptions,
    progress: &mut dyn FnMut(DumpEvent<'_>),
) -> Result<DumpReport, DumpError> {
    require_live(target)?;
    cow::validate(target, opts)?;
    let parent = opts.parent.as_deref().map(Image::open).transpose()?;
    let parent_arg = opts.parent.as_ref().map(|p| relative_to(p, &opts.out));
    let prepared = out_dir::prepare(&opts.out);
    let result = ImageWriter::create(
        &opts.out,
        caps.page_size,
        parent.as_ref().zip(parent_arg.as_deref()),
    )
    .map_err(DumpError::from)
    .and_then(|writer| {
        let sink = Box::new(ImageSink::new(writer));
        let mut notes: Vec<String> = prepared.note.iter().cloned().collect();
        let with = Start {
            parent,
            notes: &mut notes,
            hooks: Hooks::default(),
        };
        dump_into(target, caps, opts, sink, with, progress)
    });
    result.map_err(|e| {
        if !matches!(e, DumpError::Image(ImageError::NotEmpty { .. })) {
            out_dir::discard(&opts.out, &prepared);
        }
        exited_or(e, target)
    })
}

/// Called once, right before the stopped final pass (after pre-copy):
/// `send --qmp` pauses the VM there. An error fails the dump.
pub(crate) type BeforeStop<'a> = &'a mut dyn FnMut() -> Result<(), DumpError>;

/// Called once, right after the sink committed and before the swap
/// policy pages back out what the dump read in (`keep-cold`): `send
/// --qmp` migrates the paused VM there, so the paging out is not part of
/// its pause.
pub(crate) type AfterCommit<'a> = &'a mut dyn FnMut();

/// What a dump's caller runs at its two moments (`send --qmp`).
#[derive(Default)]
pub(crate) struct Hooks<'p> {
    /// Right before the stopped final pass.
    pub before_stop: Option<BeforeStop<'p>>,
    /// Right after the commit.
    pub after_commit: Option<AfterCommit<'p>>,
}

/// [`dump`] into another [`PageSink`] than an image directory (a stream:
/// `transfer`); `opts.out` only names it in the report; `hooks` run right
/// before the final pass and right after the commit. On failure the sink
/// is aborted.
pub(crate) fn dump_to<'p>(
    target: &Target,
    caps: &KernelCaps,
    opts: &DumpOptions,
    sink: Box<dyn PageSink>,
    hooks: Hooks<'p>,
    progress: &'p mut dyn FnMut(DumpEvent<'_>),
) -> Result<DumpReport, DumpError> {
    require_live(target)?;
    cow::validate(target, opts)?;
    let mut notes = Vec::new();
    let with = Start {
        parent: None,
        notes: &mut notes,
        hooks,
    };
    dump_into(target, caps, opts, sink, with, progress).map_err(|e| exited_or(e, target))
}

/// Where a dump's passes start from besides the options: the parent
/// image, notes for the report, the caller's hooks.
struct Start<'n, 'p> {
    parent: Option<Image>,
    notes: &'n mut Vec<String>,
    hooks: Hooks<'p>,
}

/// The dump's passes writing into `sink` (the image directory, or another
/// [`PageSink`]); `with.notes` come first in the report's notes. On
/// failure the sink is aborted.
fn dump_into<'p>(
    target: &Target,
    caps: &KernelCaps,
    opts: &DumpOptions,
    sink: Box<dyn PageSink>,
    with: Start<'_, 'p>,
    progress: &'p mut dyn FnMut(DumpEvent<'_>),
) -> Result<DumpReport, DumpError> {
    let pinned = Pinned::pin(target, opts.tree);
    let cancel = abort::Cancel::new(opts.cancel.clone(), target.pid());
    let mut d = Dump::new(caps, opts.clone(), sink, with.parent, progress, cancel);
    d.hooks = with.hooks;
    d.notes.append(with.notes);
    match passes(&mut d, &pinned) {
        Ok((iterations, stopped_s, cow)) => d.finish(iterations, stopped_s, cow),
        Err(e) => {
            let gone = d.gone();
            d.abandon(&e);
            match gone {
                Some(pid) if !matches!(e, DumpError::Interrupted { .. }) => {
                    Err(DumpError::Exited { pid })
                }
                _ => Err(e),
            }
        }
    }
}

/// Every pass of the dump: the iterations, how long the process was
/// stopped, the snapshot's statistics.
type Passes = (Vec<Iteration>, f64, Option<CowStats>);

fn passes<'t>(d: &mut Dump<'t, '_, '_>, pinned: &'t Pinned<'_>) -> Result<Passes, DumpError> {
    d.attach_all(pinned)?;
    if d.opts.cow {
        let (it, stats) = d.cow_snapshot()?;
        d.cancel.check()?;
        let stopped_s = stats.stop_s;
        return Ok((vec![it], stopped_s, Some(stats)));
    }
    let (iterations, stopped_s) = d.precopy_and_stop()?;
    Ok((iterations, stopped_s, None))
}

/// The process has user memory to dump: a zombie (it exited before the
/// dump began, not yet reaped) is [`DumpError::Exited`], as one that exits
/// mid-dump; a kernel thread is refused as such.
fn require_live(target: &Target) -> Result<(), DumpError> {
    match target.require_address_space() {
        Err(_) if target.stat().is_ok_and(|s| s.is_zombie()) => {
            Err(DumpError::Exited { pid: target.pid() })
        }
        r => Ok(r?),
    }
}

/// A failure caused by the process exiting (or becoming a zombie) mid-run
/// is reported as that, whatever step noticed it first.
fn exited_or(e: DumpError, target: &Target) -> DumpError {
    let pid = target.pid();
    match e.kind() {
        ErrorKind::TargetExited | ErrorKind::NoAddressSpace => DumpError::Exited { pid },
        _ if matches!(e, DumpError::Interrupted { .. }) => e,
        _ if target.require_address_space().is_err() => DumpError::Exited { pid },
        _ => e,
    }
}

/// `parent` as seen from `out` (absolute paths stay absolute).
fn relative_to(parent: &Path, out: &Path) -> String {
    if parent.is_absolute() {
        return parent.display().to_string();
    }
    let abs = |p: &Path| {
        std::env::current_dir()
            .map(|c| c.join(p))
            .unwrap_or_else(|_| p.to_owned())
    };
    let (p, o) = (abs(parent), abs(out));
    let depth = o.components().count();
    let common = p
        .components()
        .zip(o.components())
        .take_while(|(a, b)| a == b)
        .count();
    let mut rel = PathBuf::new();
    for _ in common..depth {
        rel.push("..");
    }
    for c in p.components().skip(common) {
        rel.push(c);
    }
    rel.display().to_string()
}
