//! Reading another process's own pages without changing what it shares.
//!
//! `process_vm_readv(2)` pins the pages it reads (`FOLL_PIN`), and since
//! Linux 5.19 pinning a COW-shared anonymous page, even for reading,
//! *unshares* it first (`FAULT_FLAG_UNSHARE`): every page a forked tree
//! still shares would be copied, growing the target's memory by what it
//! shares and defeating `--tree`'s deduplication. So pages are read with
//! `process_vm_readv` (one copy, large vectors) only where pagemap says
//! they are present and exclusively mapped; every other page (shared,
//! swapped, not present) is read through `/proc/PID/mem`
//! (`access_remote_vm`, `FOLL_GET`, which leaves sharing alone).
//!
//! Swapped pages go as the swap policy (`swap/`) decides per page: read
//! (swapped in, remembered to page back out), left alone, or read from
//! the swap device.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};

use super::DumpError;
use super::swap::{SwapAction, SwapIo};
use crate::addr::PageSize;
use crate::pagemap::{PagemapEntry, PagemapFlags};
use crate::proc::Target;

/// A process's memory, open for copying.
#[derive(Debug)]
pub struct RemoteMem {
    pid: u32,
    mem: OwnedFd,
    pagemap: OwnedFd,
    page: PageSize,
    swap: Arc<SwapIo>,
    /// Swapped pages read in (to page back out with `keep-cold`).
    cold: Mutex<Vec<u64>>,
}

/// What [`RemoteMem::read`] found for one page.
#[derive(Clone, Copy, Debug)]
pub struct PageRead {
    /// Whether the page was read (false: unmapped meanwhile, or skipped).
    pub ok: bool,
    /// Swapped out and left alone (`--swap skip`).
    pub skipped: bool,
    /// Its pagemap entry just before the read.
    pub entry: PagemapEntry,
}

impl RemoteMem {
    /// Opens `/proc/PID/mem` and `pagemap` of `target`.
    pub fn open(target: &Target, page: PageSize, swap: Arc<SwapIo>) -> Result<Self, DumpError> {
        Ok(Self {
            pid: target.pid(),
            mem: target.open_file("mem")?,
            pagemap: target.pagemap()?,
            page,
            swap,
            cold: Mutex::new(Vec::new()),
        })
    }

    /// The swapped-out pages this reader swapped in, taken (sorted).
    pub fn take_cold(&self) -> Vec<u64> {
        let mut v = std::mem::take(&mut *self.cold.lock().unwrap_or_else(|p| p.into_inner()));
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Pagemap entries of the pages at `addrs` (sorted), now.
    pub fn entries_at(&self, addrs: &[u64]) -> Result<Vec<PagemapEntry>, DumpError> {
        let mut out = Vec::with_capacity(addrs.len());
        for (first, count) in runs(addrs, self.page.get()) {
            out.extend(self.entries(addrs[first], count)?);
        }
        Ok(out)
    }

    /// Base page size.
    pub fn page_size(&self) -> PageSize {
        self.page
    }

    /// Reads the pages at `addrs` (sorted, page aligned) into `buf` (one
    /// page each, in order).
    pub fn read(&self, addrs: &[u64], buf: &mut [u8]) -> Result<Vec<PageRead>, DumpError> {
        let p = self.page.as_usize();
        let mut out = Vec::with_capacity(addrs.len());
        let (mut pinned, mut pinned_at) = (Vec::new(), Vec::new());
        let mut rest = Vec::new();
        let (mut swapped, mut direct) = (Vec::new(), Vec::new());
        for (first, count) in runs(addrs, self.page.get()) {
            let entries = self.entries(addrs[first], count)?;
            for (k, e) in entries.into_iter().enumerate() {
                let i = first + k;
                out.push(PageRead {
                    ok: true,
                    skipped: false,
                    entry: e,
                });
                match self.swap.action(e) {
                    SwapAction::Normal => {
                        let safe = e.is_present() && e.flags().contains(PagemapFlags::EXCLUSIVE);
                        if safe {
                            push_merged(&mut pinned, &mut pinned_at, addrs[i], i * p, p);
                        } else {
                            rest.push(i);
                        }
                    }
                    SwapAction::Read => swapped.push(i),
                    SwapAction::Skip => {
                        self.swap.count_skipped();
                        out[i].ok = false;
                        out[i].skipped = true;
                    }
                    SwapAction::Direct { ty, offset } => direct.push((i, ty, offset)),
                }
            }
        }
        let tid = i32::try_from(self.pid).map_err(|_| DumpError::Exited { pid: self.pid })?;
        let got = crate::sys::process_vm::read_scattered(tid, &pinned, &pinned_at, buf)
            .map_err(|e| self.error(e.into()))?;
        // Something unmapped meanwhile: the pages not read go the slow way.
        rest.extend(not_read(&pinned, &pinned_at, got, p));
        for i in rest {
            out[i].ok = self.read_mem(addrs[i], &mut buf[i * p..(i + 1) * p]);
        }
        self.read_direct(addrs, &direct, &mut out, buf, &mut swapped)?;
        self.read_swapped(addrs, &swapped, &mut out, buf);
        Ok(out)
    }

    /// Swapped pages `swapped` (indices in `addrs`) read through the
    /// process (swapping them in), remembered for `keep-cold`; `verify`
    /// leaves them alone.
    fn read_swapped(&self, addrs: &[u64], swapped: &[usize], out: &mut [PageRead], buf: &mut [u8]) {
        let p = self.page.as_usize();
        let keep_cold = self.swap.policy() != super::swap::SwapPolicy::Read;
        let mut cold = Vec::new();
        for &i in swapped {
            if self.swap.never_swap_in() {
                // `verify`: not readable from the device, so not read.
                self.swap.count_skipped();
                out[i].ok = false;
                out[i].skipped = true;
                continue;
            }
            self.swap.count_read();
            out[i].ok = self.read_mem(addrs[i], &mut buf[i * p..(i + 1) * p]);
            if out[i].ok && keep_cold {
                cold.push(addrs[i]);
            }
        }
        if !cold.is_empty() {
            self.cold
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(cold);
        }
    }

    /// `--swap direct`: pages `direct` (index, swap type, offset) read from
    /// the swap device; kept only if the page's entry is unchanged after
    /// the read. The others join `swapped` (read through the process).
    fn read_direct(
        &self,
        addrs: &[u64],
        direct: &[(usize, u8, u64)],
        out: &mut [PageRead],
        buf: &mut [u8],
        swapped: &mut Vec<usize>,
    ) -> Result<(), DumpError> {
        let p = self.page.as_usize();
        let page = self.page.get();
        // Runs of pages next to each other in the batch, in memory and on
        // the device: one read and one pagemap check each.
        let mut k = 0;
        while k < direct.len() {
            let (i0, ty, off0) = direct[k];
            let mut n = 1;
            while let Some(&(i, t, off)) = direct.get(k + n) {
                let next = i == i0 + n
                    && t == ty
                    && off == off0 + n as u64
                    && addrs[i] == addrs[i0] + n as u64 * page;
                if !next {
                    break;
                }
                n += 1;
            }
            let got = self
                .swap
                .read_slot(ty, off0, &mut buf[i0 * p..(i0 + n) * p]);
            let now = if got {
                self.entries(addrs[i0], n)?
            } else {
                Vec::new()
            };
            for j in 0..n {
                if got && now.get(j) == Some(&out[i0 + j].entry) {
                    self.swap.count_direct();
                } else {
                    self.swap.count_fallback();
                    swapped.push(i0 + j);
                }
            }
            k += n;
        }
        Ok(())
    }

    /// Pagemap entries of `count` pages from `addr`.
    fn entries(&self, addr: u64, count: usize) -> Result<Vec<PagemapEntry>, DumpError> {
        let mut raw = vec![0u64; count];
        let got =
            crate::sys::pagemap::pread_u64s(self.pagemap.as_fd(), &mut raw, addr / self.page.get())
                .map_err(|e| self.error(e.into()))?;
        if got < count {
            return Err(DumpError::Exited { pid: self.pid });
        }
        Ok(raw.into_iter().map(PagemapEntry).collect())
    }

    /// One page through `/proc/PID/mem`; `false` if it is not mapped.
    fn read_mem(&self, addr: u64, page: &mut [u8]) -> bool {
        let mut done = 0;
        while done < page.len() {
            match rustix::io::pread(self.mem.as_fd(), &mut page[done..], addr + done as u64) {
                Ok(0) => return false,
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(_) => return false,
            }
        }
        true
    }

    fn error(&self, source: std::io::Error) -> DumpError {
        if source.raw_os_error() == Some(libc::ESRCH) {
            return DumpError::Exited { pid: self.pid };
        }
        DumpError::Read {
            pid: self.pid,
            source,
        }
    }
}

/// Consecutive addresses as (first index, count).
fn runs(addrs: &[u64], page: u64) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for (i, &a) in addrs.iter().enumerate() {
        match out.last_mut() {
            Some((f, n)) if addrs[*f] + (*n as u64) * page == a => *n += 1,
            _ => out.push((i, 1)),
        }
    }
    out
}

/// Appends a page to the scatter list, merging with the previous range
/// when both the remote and local sides are contiguous.
fn push_merged(
    remote: &mut Vec<(u64, usize)>,
    at: &mut Vec<usize>,
    addr: u64,
    off: usize,
    p: usize,
) {
    if let (Some((a, len)), Some(&o)) = (remote.last_mut(), at.last()) {
        if *a + *len as u64 == addr && o + *len == off {
            *len += p;
            return;
        }
    }
    remote.push((addr, p));
    at.push(off);
}

/// The pages (indices) of the ranges `pinned` (placed at `pinned_at` in
/// the buffer) a vectored read that got `got` bytes did not read.
fn not_read(pinned: &[(u64, usize)], pinned_at: &[usize], got: usize, p: usize) -> Vec<usize> {
    let mut missed = Vec::new();
    let mut seen = 0;
    for (&(_, len), &at) in pinned.iter().zip(pinned_at) {
        if seen + len > got {
            let from = got.saturating_sub(seen) / p;
            missed.extend((from..len / p).map(|k| (at / p) + k));
        }
        seen += len;
    }
    missed
}
