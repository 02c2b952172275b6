//! What a dump does with swapped-out pages (`--swap`), and what it did.
//!
//! * `read` (default, what CRIU does): read them; the kernel swaps them in.
//! * `skip`: record them as swapped-not-copied (a destination that shares
//!   the swap device); nothing is read.
//! * `keep-cold`: read them, then page exactly those pages back out
//!   (anonymous: `process_madvise(MADV_PAGEOUT)` on the target; shmem:
//!   through pagescope's own mapping of the object, where the page is
//!   mapped once) and re-check that they left RAM.
//! * `direct`: read anonymous pages straight from the swap device at the
//!   offset the page table names (root), so nothing is swapped in; the
//!   entry is re-read afterwards and the page read normally if it changed.
//!   shmem swap entries live in the object (no offset is visible), so shmem
//!   pages are handled as with `keep-cold`.
//!
//! See `KERNEL.md` ("Swap policies") for the devices `direct` is valid on.
//!
//! The policies in one place: this file decides per page of the process's
//! own memory ([`SwapIo::action`], used by the reader in `remote.rs`) and
//! reads the swap device; `shmem.rs` classifies shared memory pages
//! (`mincore`/`cachestat` on the object); `cold.rs` pages back out what
//! was read and reports it.

mod cold;
mod shmem;

pub(super) use cold::page_back_out;
pub(super) use shmem::swapped_object_pages;

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::addr::PageSize;
use crate::pagemap::{PagemapEntry, SwapEntryKind};
use crate::proc::swaps::SwapTable;

/// What to do with swapped-out pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SwapPolicy {
    /// Read them (swapping them in).
    #[default]
    Read,
    /// Record them as swapped-not-copied.
    Skip,
    /// Read them, then page them back out and verify.
    KeepCold,
    /// Read them from the swap device (anonymous; root).
    Direct,
}

impl SwapPolicy {
    /// The policy's name (as `--swap` spells it).
    pub fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Skip => "skip",
            Self::KeepCold => "keep-cold",
            Self::Direct => "direct",
        }
    }
}

/// What a policy did to one class of pages (anonymous or shmem).
#[derive(Clone, Debug, Default, Serialize)]
pub struct SwapClassReport {
    /// Swapped-out pages the dump met.
    pub swapped: u64,
    /// Read through the process or object (swapped in).
    pub read: u64,
    /// Recorded as swapped-not-copied.
    pub skipped: u64,
    /// Read from the swap device.
    pub direct: u64,
    /// `direct` not possible (entry changed, device busy or unknown): read.
    pub direct_fallback: u64,
    /// Paged back out afterwards and confirmed out of RAM.
    pub paged_out: u64,
    /// Paged back out but still in RAM (in the swap cache of an
    /// asynchronous device, or refused by the kernel).
    pub still_in_ram: u64,
}

/// What the swap policy did, per class of page.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SwapReport {
    /// The policy.
    pub policy: SwapPolicy,
    /// Private anonymous pages (and private copies of file pages).
    pub anon: SwapClassReport,
    /// Pages of shared memory objects.
    pub shmem: SwapClassReport,
    /// What limited the policy.
    pub notes: Vec<String>,
}

/// Counters shared by copy workers.
#[derive(Debug, Default)]
pub struct Counters {
    swapped: AtomicU64,
    read: AtomicU64,
    skipped: AtomicU64,
    direct: AtomicU64,
    fallback: AtomicU64,
}

impl Counters {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Into a report.
    pub fn report(&self) -> SwapClassReport {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SwapClassReport {
            swapped: g(&self.swapped),
            read: g(&self.read),
            skipped: g(&self.skipped),
            direct: g(&self.direct),
            direct_fallback: g(&self.fallback),
            paged_out: 0,
            still_in_ram: 0,
        }
    }
}

/// What to do with one page whose pagemap entry is a swap entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwapAction {
    /// Not a (known) swap entry: read it normally.
    Normal,
    /// Read it, remembering it was swapped.
    Read,
    /// Record it as swapped-not-copied.
    Skip,
    /// Try the swap device at this slot.
    Direct {
        /// Swap type (index in `/proc/swaps`).
        ty: u8,
        /// Page offset on the device.
        offset: u64,
    },
}

/// The swap devices, opened for `direct` reads.
#[derive(Debug)]
struct Device {
    /// `O_RDONLY | O_DIRECT` (bypasses the device's page cache, which
    /// swap I/O does not go through).
    fd: OwnedFd,
    /// `/sys/dev/block/MAJ:MIN/inflight` of the block device holding it.
    inflight: Option<std::path::PathBuf>,
}

/// The policy in force for one dump: decides per page, reads the swap
/// device, counts.
#[derive(Debug)]
pub struct SwapIo {
    policy: SwapPolicy,
    privileged: bool,
    table: SwapTable,
    devices: Vec<Option<Device>>,
    page: PageSize,
    /// Anonymous pages.
    pub anon: Counters,
    /// Shmem pages.
    pub shmem: Counters,
    notes: Mutex<Vec<String>>,
    /// `verify`: a swapped page is read from the device or not at all
    /// (never swapped in).
    never_swap_in: bool,
}

/// Reads are done in blocks of this size (the largest logical block size
/// of a swap device; `O_DIRECT` needs aligned buffers and offsets).
const BLOCK: usize = 4096;

/// Blocks per `preadv` of consecutive slots (256 KiB).
const READ_BLOCKS: usize = 64;

/// One `O_DIRECT`-aligned block.
#[repr(C, align(4096))]
struct Block([u8; BLOCK]);

impl SwapIo {
    /// The policy for a dump on a kernel whose pagemap shows swap entries
    /// iff `privileged`.
    pub fn new(policy: SwapPolicy, privileged: bool, page: PageSize) -> Self {
        let table = crate::proc::read_swaps().unwrap_or_default();
        let mut io = Self {
            policy,
            privileged,
            devices: Vec::new(),
            table,
            page,
            anon: Counters::default(),
            shmem: Counters::default(),
            notes: Mutex::new(Vec::new()),
            never_swap_in: false,
        };
        if policy == SwapPolicy::Direct {
            io.open_devices();
        }
        if policy != SwapPolicy::Read && !privileged {
            io.note(format!(
                "--swap {}: swap entries are hidden without CAP_SYS_ADMIN; swapped anonymous pages are read (swapped in) and not paged back out",
                policy.name()
            ));
        }
        io
    }

    /// For `verify`, which must not swap anything in: swapped pages are
    /// read from the swap device where it can be (root, see `direct`),
    /// else left alone ([`SwapAction::Skip`]: not compared).
    pub fn never_swapping_in(privileged: bool, page: PageSize) -> Self {
        // Without CAP_SYS_ADMIN no slot is visible: nothing to open.
        let policy = if privileged {
            SwapPolicy::Direct
        } else {
            SwapPolicy::Skip
        };
        let mut io = Self::new(policy, privileged, page);
        let notes = io.notes.get_mut().unwrap_or_else(|p| p.into_inner());
        notes.retain(|n| !n.contains("hidden without CAP_SYS_ADMIN"));
        for n in notes.iter_mut() {
            *n = n
                .replace("--swap direct: ", "swap device: ")
                .replace("are read normally", "are not compared");
        }
        io.never_swap_in = true;
        io
    }

    /// Whether swapped pages must never be swapped in (`verify`).
    pub fn never_swap_in(&self) -> bool {
        self.never_swap_in
    }

    /// The policy.
    pub fn policy(&self) -> SwapPolicy {
        self.policy
    }

    fn note(&self, s: String) {
        let s = if self.never_swap_in {
            s.replace("--swap direct: ", "swap device: ")
                .replace("were read normally", "were not compared")
        } else {
            s
        };
        let mut n = self.notes.lock().unwrap_or_else(|p| p.into_inner());
        if !n.contains(&s) {
            n.push(s);
        }
    }

    fn open_devices(&mut self) {
        if zswap_enabled() {
            self.note(
                "--swap direct: zswap is enabled, so a swapped page may be held compressed in RAM with nothing on the device; pages are read normally".into(),
            );
            return;
        }
        let devs = self.table.devices().to_vec();
        for d in devs {
            let path = std::path::PathBuf::from(
                <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&d.path),
            );
            let opened = rustix::fs::open(
                &path,
                rustix::fs::OFlags::RDONLY
                    | rustix::fs::OFlags::DIRECT
                    | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            );
            match opened {
                Ok(fd) => {
                    let inflight = inflight_path(fd.as_fd());
                    self.devices.push(Some(Device { fd, inflight }));
                }
                Err(e) => {
                    self.note(format!(
                        "--swap direct: cannot open swap device {} ({e}); its pages are read normally",
                        d.display_path()
                    ));
                    self.devices.push(None);
                }
            }
        }
    }

    /// What to do with a page of the process's own memory whose pagemap
    /// entry is `e`. Without CAP_SYS_ADMIN swap entries and PTE markers
    /// look alike: such pages are read normally (and not counted).
    pub fn action(&self, e: PagemapEntry) -> SwapAction {
        let typed = match e.swap_kind(self.privileged) {
            Some(SwapEntryKind::Typed { ty, offset }) if self.table.is_plausible_device(ty) => {
                Some((ty, offset))
            }
            _ => None,
        };
        let Some((ty, offset)) = typed else {
            // `verify`: a swap entry it cannot read from the device (slot
            // hidden without CAP_SYS_ADMIN, or a marker) is not read.
            if self.never_swap_in && e.is_swap() {
                return SwapAction::Skip;
            }
            return SwapAction::Normal;
        };
        Counters::add(&self.anon.swapped, 1);
        match self.policy {
            SwapPolicy::Read | SwapPolicy::KeepCold => SwapAction::Read,
            SwapPolicy::Skip => SwapAction::Skip,
            SwapPolicy::Direct => SwapAction::Direct { ty, offset },
        }
    }

    /// Counts a swapped anonymous page read through the process.
    pub fn count_read(&self) {
        Counters::add(&self.anon.read, 1);
    }

    /// Counts an anonymous page read from the swap device.
    pub fn count_direct(&self) {
        Counters::add(&self.anon.direct, 1);
    }

    /// Counts an anonymous page `direct` could not read from the device.
    pub fn count_fallback(&self) {
        Counters::add(&self.anon.fallback, 1);
    }

    /// Counts shmem pages: `swapped` met, of which `skipped` were left
    /// alone and the rest read.
    pub fn count_shmem(&self, swapped: u64, skipped: u64) {
        Counters::add(&self.shmem.swapped, swapped);
        Counters::add(&self.shmem.skipped, skipped);
        Counters::add(&self.shmem.read, swapped - skipped);
    }

    /// Counts a skipped anonymous page.
    pub fn count_skipped(&self) {
        Counters::add(&self.anon.skipped, 1);
    }

    /// Reads swap slots from `offset` of device `ty` into `out` (one page
    /// per slot, consecutive slots).
    /// `false`: not possible (device unknown or busy writing, which could
    /// mean the slot's write is still in flight); the caller reads
    /// normally.
    pub fn read_slot(&self, ty: u8, offset: u64, out: &mut [u8]) -> bool {
        let page = self.page.get();
        let pages = (out.len() as u64).div_ceil(page).max(1);
        if self.table.device(ty, offset + pages - 1, page).is_none() {
            return false;
        }
        let Some(Some(dev)) = self.devices.get(usize::from(ty)) else {
            return false;
        };
        if !wait_writes_idle(dev.inflight.as_deref()) {
            self.note(
                "--swap direct: the swap device kept writing; some pages were read normally".into(),
            );
            return false;
        }
        // Consecutive slots in one `preadv` of aligned blocks.
        let mut blocks: Vec<Block> = (0..READ_BLOCKS).map(|_| Block([0; BLOCK])).collect();
        let mut at = offset * page;
        for chunk in out.chunks_mut(BLOCK * READ_BLOCKS) {
            let n = chunk.len().div_ceil(BLOCK);
            let mut iov: Vec<std::io::IoSliceMut<'_>> = blocks[..n]
                .iter_mut()
                .map(|b| std::io::IoSliceMut::new(&mut b.0))
                .collect();
            match rustix::io::preadv(&dev.fd, &mut iov, at) {
                Ok(got) if got == n * BLOCK => {}
                _ => return false,
            }
            for (dst, b) in chunk.chunks_mut(BLOCK).zip(&blocks) {
                dst.copy_from_slice(&b.0[..dst.len()]);
            }
            at += (n * BLOCK) as u64;
        }
        true
    }

    /// The swap devices' paths, by swap type.
    pub fn device_paths(&self) -> Vec<String> {
        self.table
            .devices()
            .iter()
            .map(|d| d.display_path())
            .collect()
    }

    /// The notes so far.
    pub fn notes(&self) -> Vec<String> {
        self.notes.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Whether zswap may hold swapped pages instead of the device.
fn zswap_enabled() -> bool {
    std::fs::read_to_string("/sys/module/zswap/parameters/enabled").is_ok_and(|s| s.trim() == "Y")
}

/// The `inflight` file of the block device behind `fd`: the device itself
/// (zram, a partition) or the one holding a swap file.
fn inflight_path(fd: std::os::fd::BorrowedFd<'_>) -> Option<std::path::PathBuf> {
    let st = rustix::fs::fstat(fd).ok()?;
    let is_block =
        rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::BlockDevice;
    let dev = if is_block { st.st_rdev } else { st.st_dev };
    let p = std::path::PathBuf::from(format!(
        "/sys/dev/block/{}:{}/inflight",
        rustix::fs::major(dev),
        rustix::fs::minor(dev)
    ));
    p.exists().then_some(p)
}

/// Waits (up to 100 ms) until the device has no write in flight. Reclaim
/// sets a page's swap entry before it writes the page, so a slot read
/// while the device is writing may not hold the page yet; once no write is
/// in flight, every entry seen before is backed by its data (a device
/// without an `inflight` file, such as an NFS swap file, is trusted).
fn wait_writes_idle(inflight: Option<&std::path::Path>) -> bool {
    let Some(p) = inflight else {
        return true;
    };
    let start = Instant::now();
    loop {
        let writes = std::fs::read_to_string(p)
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok());
        match writes {
            Some(0) | None => return true,
            Some(_) if start.elapsed() > Duration::from_millis(100) => return false,
            Some(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}
