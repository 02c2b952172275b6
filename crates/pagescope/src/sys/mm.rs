//! Mappings owned by the calling process: `mmap`, `madvise`, `munmap`.
//!
//! [`OwnedMapping`] is a safe handle to a region of *our own* address space.
//! pagescope uses it to probe the kernel (zero-page PFNs, guard-region and
//! soft-dirty support) and the fixture uses it to build known layouts. It is
//! never used on a target's objects for reading (see [`super::mincore`]).
//!
//! # References
//! - `mmap(2)`, `madvise(2)`, `munmap(2)`

use std::os::fd::BorrowedFd;
use std::ptr::NonNull;

use rustix::io::Errno;
use rustix::mm::{MapFlags, ProtFlags};

/// `madvise` advice values (`<asm-generic/mman-common.h>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Advice {
    /// `MADV_DONTNEED` (4): drop the pages (anon: zero on next touch).
    DontNeed,
    /// `MADV_REMOVE` (9): free the backing store (shmem: punch a hole).
    Remove,
    /// `MADV_WILLNEED` (3): read ahead / swap in asynchronously.
    WillNeed,
    /// `MADV_DONTFORK` (10): a forked child does not inherit the range.
    DontFork,
    /// `MADV_DOFORK` (11): undo `MADV_DONTFORK`.
    DoFork,
    /// `MADV_HUGEPAGE` (14).
    HugePage,
    /// `MADV_NOHUGEPAGE` (15).
    NoHugePage,
    /// `MADV_COLD` (20, 5.4+).
    Cold,
    /// `MADV_PAGEOUT` (21, 5.4+): reclaim now (swap out / write back).
    PageOut,
    /// `MADV_POPULATE_READ` (22, 5.14+).
    PopulateRead,
    /// `MADV_POPULATE_WRITE` (23, 5.14+).
    PopulateWrite,
    /// `MADV_COLLAPSE` (25, 6.1+): collapse into a THP now, whatever the
    /// THP sysfs mode (not in `MADV_NOHUGEPAGE` VMAs).
    Collapse,
    /// `MADV_GUARD_INSTALL` (102, 6.13+).
    GuardInstall,
    /// `MADV_GUARD_REMOVE` (103, 6.13+).
    GuardRemove,
}

impl Advice {
    /// The raw `MADV_*` value.
    pub fn raw(self) -> i32 {
        match self {
            Self::DontNeed => 4,
            Self::Remove => 9,
            Self::WillNeed => 3,
            Self::DontFork => 10,
            Self::DoFork => 11,
            Self::HugePage => 14,
            Self::NoHugePage => 15,
            Self::Cold => 20,
            Self::PageOut => 21,
            Self::PopulateRead => 22,
            Self::PopulateWrite => 23,
            Self::Collapse => 25,
            Self::GuardInstall => 102,
            Self::GuardRemove => 103,
        }
    }
}

/// A mapping in the calling process, unmapped on drop.
#[derive(Debug)]
pub struct OwnedMapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this handle; all access goes
// through volatile reads/writes or syscalls, which are fine from any thread.
unsafe impl Send for OwnedMapping {}
// SAFETY: as above; `&self` methods only perform volatile byte accesses and
// syscalls, which do not create Rust references into the mapping.
unsafe impl Sync for OwnedMapping {}

impl OwnedMapping {
    /// `mmap(NULL, len, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE)`,
    /// with the start aligned to `align` bytes (a power of two; use 2 MiB
    /// for THP).
    pub fn anonymous(len: usize, align: usize) -> Result<Self, Errno> {
        Self::anonymous_with(len, align, MapFlags::PRIVATE | MapFlags::NORESERVE)
    }

    /// Like [`Self::anonymous`] but `MAP_SHARED|MAP_ANONYMOUS` (shmem
    /// behind the scenes, shown as `/dev/zero (deleted)`). The shmem object
    /// is exactly `len` bytes.
    pub fn shared_anonymous(len: usize, align: usize) -> Result<Self, Errno> {
        // The object's size is the length of the first mmap, so reserve an
        // aligned private window and map exactly `len` shared bytes over it.
        let window = Self::anonymous(len, align)?;
        let at = window.ptr.as_ptr();
        std::mem::forget(window);
        let flags = MapFlags::SHARED | MapFlags::NORESERVE | MapFlags::FIXED;
        // SAFETY: MAP_FIXED over the reservation made just above, which we
        // own and which nothing refers to.
        let p = unsafe {
            rustix::mm::mmap_anonymous(at.cast(), len, ProtFlags::READ | ProtFlags::WRITE, flags)
        }?;
        let ptr = NonNull::new(p.cast::<u8>()).ok_or(Errno::NOMEM)?;
        Ok(Self { ptr, len })
    }

    fn anonymous_with(len: usize, align: usize, flags: MapFlags) -> Result<Self, Errno> {
        let align = align.max(rustix::param::page_size());
        let total = len.checked_add(align).ok_or(Errno::NOMEM)?;
        // SAFETY: a fresh kernel-chosen mapping (null hint) aliases nothing.
        // It is trimmed to the aligned window below and owned by `Self`.
        let base = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                total,
                ProtFlags::READ | ProtFlags::WRITE,
                flags,
            )
        }?;
        let start = (base as usize).next_multiple_of(align);
        let head = start - base as usize;
        let tail = total - head - len;
        // SAFETY: the head and tail trimmed here lie inside the mapping just
        // created and nothing refers to them.
        unsafe {
            if head > 0 {
                rustix::mm::munmap(base, head)?;
            }
            if tail > 0 {
                rustix::mm::munmap(base.cast::<u8>().add(head + len).cast(), tail)?;
            }
        }
        let ptr = NonNull::new(start as *mut u8).ok_or(Errno::NOMEM)?;
        Ok(Self { ptr, len })
    }

    /// `mmap(NULL, len, prot, MAP_SHARED or MAP_PRIVATE, fd, offset)`.
    pub fn file(
        fd: BorrowedFd<'_>,
        offset: u64,
        len: usize,
        writable: bool,
        shared: bool,
    ) -> Result<Self, Errno> {
        Self::file_aligned(fd, offset, len, writable, shared, 0)
    }

    /// Like [`Self::file`], at an address aligned to `align` bytes (a power
    /// of two; 0 for any). Fault-around and huge-page decisions depend on
    /// the virtual address, so layouts that must be reproducible need it.
    pub fn file_aligned(
        fd: BorrowedFd<'_>,
        offset: u64,
        len: usize,
        writable: bool,
        shared: bool,
        align: usize,
    ) -> Result<Self, Errno> {
        let prot = if writable {
            ProtFlags::READ | ProtFlags::WRITE
        } else {
            ProtFlags::READ
        };
        let mut flags = if shared {
            MapFlags::SHARED
        } else {
            MapFlags::PRIVATE
        };
        let hint = if align > rustix::param::page_size() {
            // Reserve an aligned window, then map the file over it.
            let window = Self::anonymous(len, align)?;
            let at = window.ptr.as_ptr();
            std::mem::forget(window);
            flags |= MapFlags::FIXED;
            at.cast()
        } else {
            std::ptr::null_mut()
        };
        // SAFETY: either a null hint (a fresh kernel-chosen mapping that
        // aliases nothing) or MAP_FIXED over the reservation made just above,
        // which we own and which nothing refers to. The mapping is owned by
        // `Self`, which only accesses it with volatile operations, so a
        // concurrent change of the file cannot invalidate a Rust reference.
        let p = unsafe { rustix::mm::mmap(hint, len, prot, flags, fd, offset) }?;
        let ptr = NonNull::new(p.cast::<u8>()).ok_or(Errno::NOMEM)?;
        Ok(Self { ptr, len })
    }

    /// Takes ownership of a mapping created elsewhere (e.g. by `shmat`).
    ///
    /// # Safety
    /// `ptr..ptr+len` must be a mapping of the calling process that nothing
    /// else will unmap, and it must be valid to release it with `munmap`.
    pub unsafe fn from_raw(ptr: NonNull<u8>, len: usize) -> Self {
        Self { ptr, len }
    }

    /// Start address.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, off: usize, len: usize) -> Result<(), Errno> {
        match off.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Errno::FAULT),
        }
    }

    /// Reads the byte at `off` (faults the page in, as a real reader would).
    pub fn read_byte(&self, off: usize) -> Result<u8, Errno> {
        self.check(off, 1)?;
        // SAFETY: `off` is inside the mapping (checked); volatile access to
        // mapped memory of this process.
        Ok(unsafe { self.ptr.as_ptr().add(off).read_volatile() })
    }

    /// Writes `value` at `off`.
    pub fn write_byte(&self, off: usize, value: u8) -> Result<(), Errno> {
        self.check(off, 1)?;
        // SAFETY: `off` is inside the mapping (checked); volatile access to
        // mapped memory of this process, which must be writable (a
        // read-only mapping raises SIGSEGV, which is the caller's bug).
        unsafe { self.ptr.as_ptr().add(off).write_volatile(value) };
        Ok(())
    }

    /// Writes `data` at `off`.
    pub fn write(&self, off: usize, data: &[u8]) -> Result<(), Errno> {
        self.check(off, data.len())?;
        for (i, &b) in data.iter().enumerate() {
            // SAFETY: inside the mapping (checked above).
            unsafe { self.ptr.as_ptr().add(off + i).write_volatile(b) };
        }
        Ok(())
    }

    /// Copies `buf.len()` bytes from `off` into `buf`.
    pub fn read(&self, off: usize, buf: &mut [u8]) -> Result<(), Errno> {
        self.check(off, buf.len())?;
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: inside the mapping (checked above).
            *b = unsafe { self.ptr.as_ptr().add(off + i).read_volatile() };
        }
        Ok(())
    }

    /// `madvise(addr + off, len, advice)`.
    pub fn madvise(&self, off: usize, len: usize, advice: Advice) -> Result<(), Errno> {
        self.check(off, len)?;
        // SAFETY: the range is inside our mapping; madvise does not create
        // references, and destructive advice (DONTNEED, REMOVE) only changes
        // contents we access volatilely.
        let rc = unsafe { libc::madvise(self.ptr.as_ptr().add(off).cast(), len, advice.raw()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(super::last_errno())
        }
    }

    /// `mprotect(addr + off, len, prot)` with read (and write) permission.
    pub fn mprotect(&self, off: usize, len: usize, writable: bool) -> Result<(), Errno> {
        self.check(off, len)?;
        let prot = if writable {
            ProtFlags::READ | ProtFlags::WRITE
        } else {
            ProtFlags::READ
        };
        // SAFETY: the range is inside our mapping; only volatile accesses
        // refer to it, and a write to a read-only page is the caller's bug.
        unsafe {
            rustix::mm::mprotect(self.ptr.as_ptr().add(off).cast(), len, mprotect_flags(prot))
        }
    }

    /// `mremap(addr, len, new_len, MREMAP_MAYMOVE|MREMAP_FIXED, new)`: moves
    /// the mapping (resized to `new_len`) to a fresh address.
    pub fn mremap_move(self, new_len: usize) -> Result<Self, Errno> {
        let window = Self::anonymous(new_len, 0)?;
        let dst = window.ptr.as_ptr();
        std::mem::forget(window);
        // SAFETY: moves our own mapping onto the reservation made just
        // above (MREMAP_FIXED replaces it); `self` is consumed, so nothing
        // refers to the old range afterwards.
        let p = unsafe {
            rustix::mm::mremap_fixed(
                self.ptr.as_ptr().cast(),
                self.len,
                new_len,
                rustix::mm::MremapFlags::MAYMOVE,
                dst.cast(),
            )
        }?;
        std::mem::forget(self);
        let ptr = NonNull::new(p.cast::<u8>()).ok_or(Errno::NOMEM)?;
        Ok(Self { ptr, len: new_len })
    }

    /// Writes `value` at `off` (8-byte aligned) in one store: a thread
    /// stopped at any instruction leaves either the old or the new value.
    pub fn write_u64(&self, off: usize, value: u64) -> Result<(), Errno> {
        self.check(off, 8)?;
        if !off.is_multiple_of(8) {
            return Err(Errno::INVAL);
        }
        // SAFETY: inside our mapping (checked), 8-byte aligned (mappings
        // are page aligned and `off` is a multiple of 8); a volatile store
        // of plain memory.
        unsafe {
            self.ptr
                .as_ptr()
                .add(off)
                .cast::<u64>()
                .write_volatile(value)
        };
        Ok(())
    }

    /// `mlock(addr + off, len)` (`lock`) or `munlock`.
    pub fn lock(&self, off: usize, len: usize, lock: bool) -> Result<(), Errno> {
        self.check(off, len)?;
        // SAFETY: the range is inside our mapping (checked); mlock/munlock
        // change no byte of it.
        unsafe {
            let p = self.ptr.as_ptr().add(off).cast();
            if lock {
                rustix::mm::mlock(p, len)
            } else {
                rustix::mm::munlock(p, len)
            }
        }
    }

    /// `mincore` of part of this mapping: one byte per page.
    pub fn mincore(&self, off: usize, len: usize, out: &mut [u8]) -> Result<(), Errno> {
        self.check(off, len)?;
        // SAFETY: pointer arithmetic inside our mapping (checked above).
        let p = unsafe { self.ptr.as_ptr().add(off) };
        super::mincore::mincore_self(p.cast(), len, out)
    }
}

fn mprotect_flags(p: ProtFlags) -> rustix::mm::MprotectFlags {
    rustix::mm::MprotectFlags::from_bits_truncate(p.bits())
}

impl Drop for OwnedMapping {
    fn drop(&mut self) {
        // SAFETY: we own the mapping and nothing refers to it after drop.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
