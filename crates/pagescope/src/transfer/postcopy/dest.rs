//! The destination of post-copy: a process that maps `FILE` (shared), a
//! userfaultfd created inside it by the injection helper
//! (`dirty::target_uffd`, the one `watch` uses; the process keeps its own
//! copy of the fd), its mappings of `FILE` registered for missing-page
//! faults (`UFFDIO_REGISTER_MODE_MISSING`, `UFFD_FEATURE_MISSING_SHMEM`),
//! and pages installed with `UFFDIO_COPY` (raw calls: `sys/uffd.rs`).
//!
//! Mappings of `FILE` the destination makes later (a VMM mapping more, or
//! again) are found by reading its maps again ([`Destination::rescan`],
//! every 50 ms and on a fault outside the known ones) and registered then.
//!
//! A page that is already present is never overwritten: `EEXIST` wakes the
//! waiters and counts it. Pages no registered mapping covers are written
//! into `FILE` with `pwrite`; so are pages whose mapping or process went
//! away (`ENOENT`, `ESRCH`).

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard};

use rustix::io::Errno;

use crate::dirty::target_uffd;
use crate::proc::Target;
use crate::proc::maps::DevId;
use crate::sys::uffd;

/// One registered mapping of `FILE` in the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Mapped {
    start: u64,
    end: u64,
    /// Byte offset into `FILE` of `start`.
    offset: u64,
}

/// How a page got in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Installed {
    /// `UFFDIO_COPY` filled it (and woke its waiters).
    Copied,
    /// It was already present (`EEXIST`): its waiters woken, not
    /// overwritten.
    Existed,
    /// Written into `FILE` (no registered mapping covers it, or the
    /// mapping or the process is gone).
    Written,
}

/// The destination process and its registered mappings of `FILE`.
#[derive(Debug)]
pub struct Destination {
    target: Target,
    uffd: OwnedFd,
    target_fd: Option<i32>,
    file: File,
    path: PathBuf,
    page: u64,
    maps: RwLock<Vec<Mapped>>,
    /// `FILE`'s device and inode, to find its mappings.
    id: (DevId, u64),
    /// Mappings registered after the first ones.
    added: AtomicU64,
    /// The process's memory is gone: every page goes to `FILE`.
    gone: AtomicBool,
    /// Bytes of pre-copy pages held in memory at most (`spill.rs`).
    hold: u64,
}

impl Destination {
    /// Registers process `pid`'s shared mappings of `path` for
    /// missing-page faults and empties `path` (every page punched out, so
    /// each first touch faults until its page arrives). `page`: the page
    /// size.
    pub fn attach(path: &Path, pid: u32, page: u64) -> Result<Self, String> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let meta = file
            .metadata()
            .map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
        let target = Target::open(pid).map_err(|e| format!("process {pid}: {e}"))?;
        let id = (DevId::from_st_dev(meta.dev()), meta.ino());
        let maps = mappings_of(&target, id.0, id.1)?;
        if maps.is_empty() {
            return Err(format!(
                "process {pid} has no shared mapping of {}",
                path.display()
            ));
        }
        let made = target_uffd::userfaultfd_in(&target, true)
            .map_err(|e| format!("cannot create a userfaultfd in process {pid}: {e}"))?;
        let dest = Self {
            target,
            uffd: made.fd,
            target_fd: made.target_fd,
            file,
            path: path.to_owned(),
            page,
            maps: RwLock::new(Vec::new()),
            id,
            added: AtomicU64::new(0),
            gone: AtomicBool::new(false),
            hold: u64::MAX,
        };
        if let Err(e) = dest.api().and_then(|()| dest.register(maps)) {
            dest.finish();
            return Err(e);
        }
        let len = meta.len();
        if len > 0 {
            let flags =
                rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
            if let Err(e) = rustix::fs::fallocate(&dest.file, flags, 0, len) {
                dest.finish();
                return Err(format!("cannot empty {}: {e}", path.display()));
            }
        }
        Ok(dest)
    }

    fn api(&self) -> Result<(), String> {
        let pid = self.target.pid();
        let features = uffd::uffdio_api(self.uffd.as_fd(), uffd::UFFD_FEATURE_MISSING_SHMEM)
            .map_err(|e| format!("userfaultfd of process {pid}: missing-page faults of shared memory refused: {e}"))?;
        if features & uffd::UFFD_FEATURE_MISSING_SHMEM == 0 {
            return Err("the kernel has no missing-page faults for shared memory".into());
        }
        Ok(())
    }

    /// Registers `maps` (those not registered yet) and makes them the
    /// known mappings.
    fn register(&self, maps: Vec<Mapped>) -> Result<(), String> {
        let pid = self.target.pid();
        let mut known = self.maps.write().unwrap_or_else(|p| p.into_inner());
        for m in maps.iter().filter(|m| !known.contains(m)) {
            uffd::uffdio_register(
                self.uffd.as_fd(),
                m.start,
                m.end - m.start,
                uffd::UFFDIO_REGISTER_MODE_MISSING,
            )
            .map_err(|e| {
                format!(
                    "cannot register {:#x}..{:#x} of process {pid} for missing pages: {e}",
                    m.start, m.end
                )
            })?;
            if !known.is_empty() {
                self.added.fetch_add(1, Ordering::Relaxed);
            }
        }
        *known = maps;
        Ok(())
    }

    /// Reads the destination's mappings of `FILE` again and registers
    /// the new ones (a mapping made after the start). A page touched
    /// through such a mapping before this found it was filled by the
    /// kernel (zero) and is found present later: counted, not
    /// overwritten.
    pub(crate) fn rescan(&self) -> Result<(), String> {
        if self.gone.load(Ordering::Relaxed) {
            return Ok(());
        }
        match mappings_of(&self.target, self.id.0, self.id.1) {
            Ok(maps) if maps == *self.known() => Ok(()),
            Ok(maps) => self.register(maps),
            Err(_) => Ok(()), // the process is gone: `install` sees it
        }
    }

    /// Mappings registered after the first ones.
    pub(crate) fn mappings_added(&self) -> u64 {
        self.added.load(Ordering::Relaxed)
    }

    fn known(&self) -> RwLockReadGuard<'_, Vec<Mapped>> {
        self.maps.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds at most `bytes` of pre-copy pages in memory until the
    /// switch, the rest in a temporary file next to `FILE` (default: no
    /// bound).
    pub fn hold_in_memory(mut self, bytes: u64) -> Self {
        self.hold = bytes;
        self
    }

    /// The bound of [`hold_in_memory`](Self::hold_in_memory).
    pub(crate) fn hold_bound(&self) -> u64 {
        self.hold
    }

    /// The userfaultfd (for reading faults).
    pub(crate) fn uffd(&self) -> BorrowedFd<'_> {
        self.uffd.as_fd()
    }

    /// The destination's PID.
    pub fn pid(&self) -> u32 {
        self.target.pid()
    }

    /// The fd number of the userfaultfd the destination keeps.
    pub(crate) fn target_fd(&self) -> Option<i32> {
        self.target_fd
    }

    /// `FILE`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Grows `FILE` to `pages` pages if it is smaller (never shrinks it:
    /// the destination maps it).
    pub(crate) fn size_at_least(&self, pages: u64) -> Result<(), String> {
        let want = pages * self.page;
        let len = self.file.metadata().map(|m| m.len()).unwrap_or(0);
        if len < want {
            self.file
                .set_len(want)
                .map_err(|e| format!("cannot size {}: {e}", self.path.display()))?;
        }
        Ok(())
    }

    /// The page of `FILE` a fault address is on.
    pub(crate) fn page_of(&self, addr: u64) -> Option<u64> {
        self.known()
            .iter()
            .find(|m| (m.start..m.end).contains(&addr))
            .map(|m| (addr - m.start + m.offset) / self.page)
    }

    /// An address of page `page` in the destination (its first mapping).
    fn addr_of(&self, page: u64) -> Option<u64> {
        let off = page * self.page;
        self.known()
            .iter()
            .find(|m| off >= m.offset && off - m.offset < m.end - m.start)
            .map(|m| m.start + off - m.offset)
    }

    /// Puts `data` (one page) in as page `page`, through the fault
    /// address `at` if a thread waits there. Never overwrites.
    pub(crate) fn install(
        &self,
        page: u64,
        at: Option<u64>,
        data: &[u8],
    ) -> Result<Installed, String> {
        let addr = at
            .map(|a| a & !(self.page - 1))
            .or_else(|| self.addr_of(page));
        let Some(addr) = addr.filter(|_| !self.gone.load(Ordering::Relaxed)) else {
            return self.write(page, data);
        };
        let mut tries = 0;
        loop {
            match uffd::uffdio_copy(self.uffd.as_fd(), addr, data) {
                Ok(()) => return Ok(Installed::Copied),
                Err(Errno::EXIST) => {
                    self.wake(addr);
                    return Ok(Installed::Existed);
                }
                Err(Errno::AGAIN | Errno::INTR) if tries < 1000 => {
                    tries += 1;
                    std::thread::yield_now();
                }
                Err(Errno::SRCH) => {
                    self.gone.store(true, Ordering::Relaxed);
                    return self.write(page, data);
                }
                Err(Errno::NOENT) => return self.write(page, data),
                Err(e) => {
                    return Err(format!(
                        "cannot fill page {page} at {addr:#x} of process {}: {e}",
                        self.pid()
                    ));
                }
            }
        }
    }

    /// Wakes the threads waiting on a fault at `addr` (its page).
    pub(crate) fn wake(&self, addr: u64) {
        let _ = uffd::uffdio_wake(self.uffd.as_fd(), addr & !(self.page - 1), self.page);
    }

    fn write(&self, page: u64, data: &[u8]) -> Result<Installed, String> {
        if data.iter().any(|&b| b != 0) {
            self.file
                .write_all_at(data, page * self.page)
                .map_err(|e| format!("cannot write {}: {e}", self.path.display()))?;
        }
        Ok(Installed::Written)
    }

    /// Every page is in: unregisters the mappings and closes the
    /// userfaultfd (ours and the destination's copy).
    pub(crate) fn finish(self) {
        for m in self.known().iter() {
            let _ = uffd::uffdio_unregister(self.uffd.as_fd(), m.start, m.end - m.start);
        }
        if let Some(fd) = self.target_fd {
            let _ = target_uffd::close_in_target(&self.target, fd);
        }
    }

    /// Gives up without the missing pages: the registration stays and the
    /// destination keeps its copy of the userfaultfd (fd
    /// [`target_fd`](Self::target_fd)), so its threads that touch a page
    /// that never arrived block (they can be killed) instead of reading
    /// zeros. Only our copy is closed.
    pub(crate) fn abandon(self) {}
}

/// The shared mappings of object `dev:ino` in `target`.
fn mappings_of(target: &Target, dev: DevId, ino: u64) -> Result<Vec<Mapped>, String> {
    let maps = target
        .maps()
        .map_err(|e| format!("process {}: {e}", target.pid()))?;
    Ok(maps
        .into_iter()
        .filter(|e| e.dev == dev && e.inode == ino && e.perms.shared)
        .map(|e| Mapped {
            start: e.range.start().get(),
            end: e.range.end().get(),
            offset: e.offset,
        })
        .collect())
}
