//! `process_vm_readv(2)`: copy another process's memory in one system call
//! per batch of ranges.
//!
//! It reads through the target's page tables like the target itself
//! would: a swapped-out anonymous page is swapped in and mapped in the
//! target, a not-yet-faulted file page is faulted in; and it *pins* the
//! pages it reads, which unshares a COW-shared anonymous page (Linux
//! 5.19+). pagescope uses it only for present, exclusively mapped pages
//! it means to copy (see `dump::remote`), and reads shared memory through
//! the object instead.
//!
//! # References
//! - `process_vm_readv(2)` (Linux 3.2+, ptrace read access to the target)

use rustix::io::Errno;

/// Most iovecs per call (`IOV_MAX`).
pub const MAX_IOV: usize = 1024;

/// iovecs naming `ranges` (address, length) in *another* process's
/// address space: the kernel checks them there; they are never
/// dereferenced in ours.
pub(crate) fn remote_iovecs(ranges: &[(u64, usize)]) -> Vec<libc::iovec> {
    ranges
        .iter()
        .map(|&(addr, len)| libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: len,
        })
        .collect()
}

/// Reads the target's `remote` ranges (address, length) into `local` at
/// the matching `at` offsets (one per range, each range in bounds), in as
/// many calls as `MAX_IOV` requires. Returns the bytes read; fewer than
/// asked means a range became unmapped (the read stops there).
pub fn read_scattered(
    pid: i32,
    remote: &[(u64, usize)],
    at: &[usize],
    local: &mut [u8],
) -> Result<usize, Errno> {
    if remote.len() != at.len()
        || remote
            .iter()
            .zip(at)
            .any(|(r, &a)| a.checked_add(r.1).is_none_or(|e| e > local.len()))
    {
        return Err(Errno::INVAL);
    }
    let mut done = 0;
    for (batch, offs) in remote.chunks(MAX_IOV).zip(at.chunks(MAX_IOV)) {
        let want: usize = batch.iter().map(|r| r.1).sum();
        let base = local.as_mut_ptr();
        let liov: Vec<libc::iovec> = batch
            .iter()
            .zip(offs)
            .map(|(&(_, len), &off)| libc::iovec {
                // SAFETY: `off + len <= local.len()` (checked above), so
                // the pointer stays inside `local`.
                iov_base: unsafe { base.add(off) }.cast(),
                iov_len: len,
            })
            .collect();
        let riov = remote_iovecs(batch);
        // SAFETY: every local iovec lies inside `local`, which is
        // exclusively borrowed; the remote iovecs only name addresses in
        // the other process, which the kernel checks.
        let n = unsafe {
            libc::process_vm_readv(
                pid,
                liov.as_ptr(),
                liov.len() as libc::c_ulong,
                riov.as_ptr(),
                riov.len() as libc::c_ulong,
                0,
            )
        };
        if n < 0 {
            return Err(super::last_errno());
        }
        let n = n.cast_unsigned();
        done += n;
        if n < want {
            break;
        }
    }
    Ok(done)
}
