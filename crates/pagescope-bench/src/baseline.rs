//! Baselines: the bare kernel interfaces, with no processing beyond what a
//! loop needs to make progress.

#![allow(unsafe_code)]

use std::os::fd::BorrowedFd;

use pagescope::ScanCategories as C;
use pagescope::sys::pagemap::pread_u64s;
use pagescope::sys::pagemap_scan::{ScanRequest, page_region, pagemap_scan};
use pagescope::VirtRange;

/// PAGEMAP_SCAN over `ranges` with the categories pagescope asks for;
/// returns the number of regions.
pub fn pagemap_scan_loop(fd: BorrowedFd<'_>, ranges: &[VirtRange], vec: &mut [page_region]) -> u64 {
    let anyof = C::PRESENT | C::SWAPPED | C::GUARD;
    let ret = anyof | C::PFNZERO | C::HUGE | C::WRITTEN;
    let mut regions = 0;
    for r in ranges {
        let mut start = r.start().get();
        while start < r.end().get() {
            let req = ScanRequest {
                start,
                end: r.end().get(),
                category_anyof_mask: anyof.bits(),
                return_mask: ret.bits(),
                ..ScanRequest::default()
            };
            let Ok(reply) = pagemap_scan(fd, &req, vec) else { break };
            regions += reply.filled as u64;
            if reply.walk_end <= start {
                break;
            }
            start = reply.walk_end;
        }
    }
    regions
}

/// pagemap `pread` of 64K entries at a time over `ranges`; returns the
/// number of present entries (so the reads cannot be optimised away).
pub fn pread_loop(fd: BorrowedFd<'_>, ranges: &[VirtRange], buf: &mut [u64]) -> u64 {
    let mut present = 0;
    for r in ranges {
        let mut page = r.start().get() / 4096;
        let end = r.end().get() / 4096;
        while page < end {
            let n = ((end - page) as usize).min(buf.len());
            let Ok(got) = pread_u64s(fd, &mut buf[..n], page) else { break };
            present += buf[..got].iter().filter(|&&e| e >> 63 != 0).count() as u64;
            page += n as u64;
        }
    }
    present
}

/// The procfs crate's pagemap API over `ranges`; returns present pages.
pub fn procfs_loop(pid: u32, ranges: &[VirtRange]) -> anyhow::Result<u64> {
    let p = procfs::process::Process::new(i32::try_from(pid)?)?;
    let mut pm = p.pagemap()?;
    let mut present = 0;
    for r in ranges {
        let info = pm.get_range_info((r.start().get() / 4096) as usize..(r.end().get() / 4096) as usize)?;
        present += info
            .iter()
            .filter(|i| matches!(i, procfs::process::PageInfo::MemoryPage(f) if f.contains(procfs::process::MemoryPageFlags::PRESENT)))
            .count() as u64;
    }
    Ok(present)
}
