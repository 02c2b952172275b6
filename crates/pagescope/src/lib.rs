//! # pagescope
//!
//! The truth about every page of a Linux process: which pages are present,
//! zero, huge, swapped, in the swap cache, resident but unmapped, holes,
//! fallocated, guard regions or write-protected, for anonymous, shared and
//! file memory, without disturbing the process.
//!
//! `/proc/PID/pagemap` alone misleads: PTE markers read as swap entries,
//! the huge zero page carries the file bit, shmem that is swapped out reads
//! like a hole. pagescope combines pagemap, the `PAGEMAP_SCAN` ioctl, smaps
//! and the backing objects (`SEEK_DATA`, `mincore`, `cachestat`) into one
//! state per page.
//!
//! # Overview
//!
//! * [`Target`] pins a process (pidfd + `/proc/PID` directory fd).
//! * [`KernelCaps::probe`] finds out what this kernel and caller can use.
//! * [`scan_process`] produces a [`ProcessReport`]: every VMA with runs of
//!   pages of equal [`PageState`] and [`PageFlags`].
//!
//! # Example
//!
//! ```no_run
//! use pagescope::{KernelCaps, ScanOptions, Target, scan_process};
//!
//! let caps = KernelCaps::probe();
//! let target = Target::open(1234)?;
//! let report = scan_process(&target, &caps, &ScanOptions::default())?;
//! for (vma, run) in report.runs() {
//!     println!("{} {} pages {}", vma.vma.path.display(), run.pages, run.state);
//! }
//! # Ok::<(), pagescope::ScanError>(())
//! ```
//!
//! # Kernel support
//!
//! See `KERNEL.md` in the repository: per feature the minimum kernel,
//! config and privileges, and what pagescope falls back to.

#![deny(unsafe_code)]
#![deny(missing_docs)]
// Every public type can be named: re-exported where users reach it.
#![deny(unnameable_types)]

pub(crate) mod addr;
pub mod dirty;
pub mod dump;
pub(crate) mod error;
pub mod exporter;
pub mod image;
pub(crate) mod inspect;
pub(crate) mod kernel;
pub mod object;
pub(crate) mod page;
pub(crate) mod pagemap;
pub mod pageout;
mod parallel;
pub(crate) mod proc;
pub(crate) mod rangeset;
pub mod render;
pub(crate) mod report;
pub(crate) mod scan;
pub(crate) mod sys;
pub(crate) mod uffd;
pub(crate) mod vma;

pub use addr::{PageSize, PageSpan, ParseAddrError, VirtAddr, VirtRange};
pub use error::ErrorKind;
pub use inspect::{objects_view, scan_process};
pub use kernel::{Feature, KernelCaps, UffdSupport};
pub use page::{PageFlags, PageInfo, PageRun, PageState, SwapSlot, UnknownReason};
pub use proc::maps::{DevId, MappingKey, MapsEntry, MapsPath, Perms};
pub use proc::swaps::{SwapDevice, SwapTable};
pub use proc::{ProcError, Target, pids};
pub use rangeset::{Interval, RangeSet};
pub use report::{Counts, ProcessReport, SkipReason, Skipped, VmaReport};
pub use scan::{BackendChoice, ScanError, ScanOptions, ScanStrategy};
pub use uffd::UffdError;

/// The raw kernel interfaces (`sys`) and the pagemap decoding, for
/// pagescope's own benchmarks, fixture and tests: the benches' baselines
/// are the bare system calls, the fixture maps memory and checks its own
/// pagemap and the swap devices. Not a stable API.
#[doc(hidden)]
pub mod raw {
    pub use crate::dirty::target_uffd::Step as InjectStep;
    pub use crate::dump::stop::Stopped;
    pub use crate::image::write::{ImageWriter, Store};
    pub use crate::page::RunBuilder;
    pub use crate::pagemap::{PagemapEntry, PagemapFlags, SwapEntryKind};
    pub use crate::proc::read_swaps;
    pub use crate::proc::rollup::field_bytes;
    pub use crate::proc::smaps::{SmapsEntry, VmFlags};
    pub use crate::sys::mm::{Advice, OwnedMapping};
    pub use crate::sys::pagemap_scan::ScanCategories;
    pub use crate::sys::uffd::FaultMsg;
    pub use crate::sys::{cachestat, mincore, pagemap, pagemap_scan};
    pub use crate::uffd::{SyncUserfaultfd, Userfaultfd, wp_arm, wp_get_and_reset};

    /// The image format's header codec and checksum, for the fuzz test
    /// that rewrites a header around a mutated metadata file.
    pub mod image_format {
        pub use crate::image::format::{decode_header, encode_header, file_sum};
    }
}
pub use vma::{Backing, ObjectId, Vma, VmaKind};

/// The [`ErrorKind`] of a pagescope error (any layer's), or `None` if `e`
/// is not one of pagescope's error types: walk a source chain and take the
/// first answer (what the CLI does to pick its exit code).
pub fn error_kind(e: &(dyn std::error::Error + 'static)) -> Option<ErrorKind> {
    e.downcast_ref::<ScanError>()
        .map(ScanError::kind)
        .or_else(|| e.downcast_ref::<ProcError>().map(ProcError::kind))
        .or_else(|| {
            e.downcast_ref::<dirty::TrackError>()
                .map(dirty::TrackError::kind)
        })
        .or_else(|| {
            e.downcast_ref::<uffd::UffdError>()
                .map(uffd::UffdError::kind)
        })
        .or_else(|| {
            e.downcast_ref::<object::ObjectError>()
                .map(object::ObjectError::kind)
        })
        .or_else(|| {
            e.downcast_ref::<dump::DumpError>()
                .map(dump::DumpError::kind)
        })
        .or_else(|| {
            e.downcast_ref::<image::ImageError>()
                .map(image::ImageError::kind)
        })
        .or_else(|| {
            e.downcast_ref::<pageout::PageoutError>()
                .map(pageout::PageoutError::kind)
        })
}
