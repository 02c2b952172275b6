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
//! The vocabulary: [`Target`] pins a process (pidfd + `/proc/PID`
//! directory fd); [`KernelCaps::probe`] finds out what this kernel and
//! caller can use; [`VirtAddr`], [`VirtRange`], [`PageSize`], [`PageState`],
//! [`PageFlags`] and [`ObjectId`] name memory; every layer has one error
//! enum with a `kind()` ([`ErrorKind`]; [`error_kind`] finds it anywhere in
//! a chain of sources).
//!
//! | capability | entry point | example |
//! |---|---|---|
//! | every page of a process | [`scan_process`] → [`ProcessReport`] | [below](#scanning) |
//! | shared objects and their sharers | [`objects_view`] → [`object::ObjectsReport`] | [below](#the-objects-view) |
//! | pages written since last time | [`dirty::track_self`] (own memory), [`dirty::attach`] (another process) → [`dirty::DirtyReport`] | [below](#dirty-tracking) |
//! | a consistent copy of a live process | [`dump::dump`] → [`image`] directory | [below](#dump-and-verify) |
//! | an image against the live process | [`dump::verify`] → [`dump::VerifyReport`] | [below](#dump-and-verify) |
//! | reading and restoring an image | [`image::Image`] | [below](#image-reading-and-restore) |
//! | paging memory out, with reasons for what stays | [`pageout::pageout`] | [below](#pageout) |
//! | Prometheus metrics | [`exporter::Exporter`] | |
//!
//! [`render`] holds the text renderings the `pagescope` CLI prints.
//!
//! # Scanning
//!
//! Every mapping of a process with runs of pages of equal [`PageState`]
//! and [`PageFlags`]; here the calling process.
//!
//! ```
//! use pagescope::{KernelCaps, PageState, ScanOptions, Target, scan_process};
//!
//! let caps = KernelCaps::probe();
//! let target = Target::current()?; // or Target::open(pid)
//! let report = scan_process(&target, &caps, &ScanOptions::default())?;
//! for (vma, run) in report.runs().take(5) {
//!     println!("{} {} pages {}", vma.vma.path.display(), run.pages, run.state);
//! }
//! assert!(report.totals().get(PageState::Present) > 0);
//! # Ok::<(), pagescope::ScanError>(())
//! ```
//!
//! # The objects view
//!
//! The shared memory and files a set of processes map, each object
//! classified once, with every process that maps it.
//!
//! ```
//! use pagescope::KernelCaps;
//! use pagescope::object::ObjectsOptions;
//!
//! let caps = KernelCaps::probe();
//! let opts = ObjectsOptions { private_files: true }; // our executable too
//! let view = pagescope::objects_view(&[std::process::id()], &caps, &opts);
//! for o in &view.objects {
//!     println!("{} {} pages, {} sharers", o.path, o.size_pages, o.sharers.len());
//! }
//! assert!(view.skipped.is_empty() && !view.objects.is_empty());
//! ```
//!
//! # Dirty tracking
//!
//! The pages of the calling process's own memory written between two
//! collects (a write-protect userfaultfd where the kernel has one, else
//! soft-dirty, else everything: [`dirty::DirtyTracker::degraded`] says so).
//!
//! ```
//! use pagescope::{KernelCaps, VirtAddr, VirtRange};
//!
//! let caps = KernelCaps::probe();
//! let page = caps.page_size.as_usize();
//! let mut buf = vec![1u8; 32 * page];
//! // The whole pages inside the buffer.
//! let first = buf.as_ptr() as usize;
//! let start = VirtAddr::new(first as u64).align_up(caps.page_size.get());
//! let range = VirtRange::from_start_len(start, 16 * page as u64).unwrap();
//! let mut tracker = pagescope::dirty::track_self(&[range], &caps)?;
//! tracker.collect()?; // from now on
//! let at = usize::try_from(start.get()).unwrap() - first + 3 * page;
//! buf[at] = 2;
//! let report = tracker.collect()?;
//! assert!(report.contains(VirtAddr::new((first + at) as u64)));
//! println!("{} pages written ({:?})", report.pages(), tracker.backend());
//! # Ok::<(), pagescope::dirty::TrackError>(())
//! ```
//!
//! Another process: [`dirty::attach`] creates the userfaultfd inside it
//! (ptrace: root, or the same user with the ptrace scope allowing it).
//!
//! ```
//! use pagescope::dirty::{TrackOptions, attach};
//! use pagescope::{KernelCaps, Target};
//!
//! let caps = KernelCaps::probe();
//! if !caps.privileged_pagemap {
//!     return Ok(()); // attaching to another process: run as root
//! }
//! let mut child = std::process::Command::new("sleep").arg("30").spawn()?;
//! let target = Target::open(child.id())?;
//! let mut tracker = attach(&target, &caps, &TrackOptions::default())?;
//! let report = tracker.collect()?;
//! println!("{} pages written since attaching", report.pages());
//! drop(tracker);
//! child.kill()?;
//! child.wait()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Dump and verify
//!
//! A process copied while it runs (pre-copy passes, then a short stop)
//! into an image directory, then compared page by page with the live
//! process. Here a child it spawns.
//!
//! ```
//! use pagescope::dump::{DumpOptions, dump, verify};
//! use pagescope::image::Image;
//! use pagescope::{KernelCaps, Target};
//!
//! let caps = KernelCaps::probe();
//! if !caps.privileged_pagemap {
//!     return Ok(()); // stopping and reading another process: run as root
//! }
//! let mut child = std::process::Command::new("sleep").arg("30").spawn()?;
//! let target = Target::open(child.id())?;
//! let dir = std::env::temp_dir().join(format!("pagescope-doc-dump-{}", std::process::id()));
//! let report = dump(&target, &caps, &DumpOptions::new(&dir), &mut |_| {})?;
//! println!("{} pages in {} passes", report.stored_pages, report.iterations.len());
//! let check = verify(&target, &caps, &Image::open(&dir)?)?;
//! assert!(check.matches());
//! child.kill()?;
//! child.wait()?;
//! std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Image reading and restore
//!
//! An image's processes and mappings, and its memory written back: one
//! mapping into a memfd, everything into a directory of sparse files.
//!
//! ```
//! use pagescope::image::Image;
//! # use pagescope::{KernelCaps, Target};
//! # let caps = KernelCaps::probe();
//! # if !caps.privileged_pagemap {
//! #     return Ok(()); // needs an image: dumping needs root
//! # }
//! # let mut child = std::process::Command::new("sleep").arg("30").spawn()?;
//! # let dir = std::env::temp_dir().join(format!("pagescope-doc-image-{}", std::process::id()));
//! # let opts = pagescope::dump::DumpOptions::new(&dir);
//! # pagescope::dump::dump(&Target::open(child.id())?, &caps, &opts, &mut |_| {})?;
//! # child.kill()?;
//! # child.wait()?;
//! // `dir` holds an image (`pagescope dump`, or pagescope::dump::dump).
//! let image = Image::open(&dir)?; // checks every checksum of the chain
//! for p in &image.meta().processes {
//!     println!("{} {}: {} mappings", p.pid, p.comm, p.vmas.len());
//! }
//! let (name, region) = image.regions().into_iter().next().unwrap();
//! let memfd = rustix::fs::memfd_create(&name, rustix::fs::MemfdFlags::CLOEXEC)?;
//! let one = image.apply_to_fd(region, std::os::fd::AsFd::as_fd(&memfd), 0)?;
//! println!("{name}: {} pages, {} holes", one.pages, one.holes);
//! let all = image.restore_to_dir(&dir.join("restored"))?;
//! assert!(!all.files.is_empty());
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Pageout
//!
//! Pages of a process asked to leave memory (`MADV_PAGEOUT`), re-scanned,
//! and a reason for every page that stayed; here part of our own heap.
//!
//! ```
//! use pagescope::pageout::{PageoutOptions, pageout};
//! use pagescope::{KernelCaps, Target, VirtAddr, VirtRange};
//!
//! let caps = KernelCaps::probe();
//! let page = caps.page_size.get();
//! let buf = vec![7u8; 64 * page as usize];
//! let start = VirtAddr::new(buf.as_ptr() as u64).align_up(caps.page_size.get());
//! let opts = PageoutOptions {
//!     range: VirtRange::from_start_len(start, 32 * page),
//!     ..PageoutOptions::default()
//! };
//! let report = pageout(&Target::current()?, &caps, &opts)?;
//! // Without swap, anonymous pages stay, with that reason.
//! println!("{} asked, {} left", report.total.requested, report.total.left_ram);
//! for (reason, pages) in &report.reasons {
//!     println!("  stayed: {pages} pages: {}", reason.describe());
//! }
//! assert_eq!(buf[0], 7); // paged out or not, the memory is intact
//! # Ok::<(), pagescope::pageout::PageoutError>(())
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
pub mod qemu;
pub(crate) mod rangeset;
pub mod render;
pub(crate) mod report;
pub(crate) mod scan;
pub(crate) mod sys;
pub mod transfer;
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
        .or_else(|| e.downcast_ref::<qemu::QmpError>().map(qemu::QmpError::kind))
}
