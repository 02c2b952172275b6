//! `process_vm_readv(2)`: copy another process's memory in one system call
//! per batch of ranges.
//!
//! It reads through the target's page tables like the target itself
//! would: a swapped-out anonymous page is swapped in and mapped in the
//! target, a not-yet-faulted file page is faulted in. pagescope uses it
//! only for pages it means to copy (dump), and reads shared memory through
//! the object instead.
//!
//! # References
//! - `process_vm_readv(2)` (Linux 3.2+, ptrace read access to the target)

use rustix::io::Errno;

/// Most iovecs per call (`IOV_MAX`).
pub const MAX_IOV: usize = 1024;

/// Reads the target's `remote` ranges (address, length) into `local` in
/// order, in as many calls as `MAX_IOV` requires. Returns the bytes read;
/// fewer than asked means a range became unmapped (the read stops there).
pub fn read(pid: i32, remote: &[(u64, usize)], local: &mut [u8]) -> Result<usize, Errno> {
    let need: usize = remote.iter().map(|r| r.1).sum();
    if need > local.len() {
        return Err(Errno::INVAL);
    }
    let mut done = 0;
    for batch in remote.chunks(MAX_IOV) {
        let want: usize = batch.iter().map(|r| r.1).sum();
        let liov = libc::iovec {
            iov_base: local[done..].as_mut_ptr().cast(),
            iov_len: want,
        };
        let riov: Vec<libc::iovec> = batch
            .iter()
            .map(|&(addr, len)| libc::iovec {
                iov_base: addr as *mut libc::c_void,
                iov_len: len,
            })
            .collect();
        // SAFETY: `liov` covers `local[done..done + want]`, exclusively
        // borrowed and in bounds (checked above); the remote iovecs only
        // name addresses in the other process, which the kernel checks.
        let n = unsafe {
            libc::process_vm_readv(pid, &raw const liov, 1, riov.as_ptr(), riov.len() as libc::c_ulong, 0)
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
