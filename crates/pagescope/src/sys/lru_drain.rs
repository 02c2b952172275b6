//! Draining every CPU's LRU-add batch (`lru_add_drain_all()`), so that
//! `MADV_PAGEOUT` finds pages faulted or read in moments ago.
//!
//! A page newly added to memory sits in a per-CPU batch until that batch
//! is drained onto an LRU list; `MADV_PAGEOUT` can only isolate pages on a
//! list and drains just the calling CPU's batch. A page read by a worker
//! thread on another CPU is therefore silently skipped. `mlock(2)` stopped
//! draining all CPUs in Linux 5.18 (measured here on 6.18: 3 of 4 pages
//! read on CPU 1 stay resident after `mlock`/`munlock` + `MADV_PAGEOUT` on
//! CPU 0; none after the drain below).
//!
//! The drain is `migrate_pages(2)` of our own process from its allowed
//! nodes to the same nodes (Linux 2.6.16, `CONFIG_NUMA` +
//! `CONFIG_MIGRATION`): `do_migrate_pages()` begins with
//! `lru_cache_disable()`, which drains every CPU, and with equal node
//! masks nothing moves. Without NUMA support (`ENOSYS`) the calling thread
//! visits each CPU it may run on and drains there (`MADV_PAGEOUT` on an
//! empty page of its own starts with the local `lru_add_drain()`).

use rustix::io::Errno;

use super::last_errno;
use super::mm::{Advice, OwnedMapping};

/// Node mask bits passed to the NUMA syscalls (`MAX_NUMNODES` is at most
/// 1024 on x86_64).
const NODE_BITS: usize = 1024;
/// `MPOL_F_MEMS_ALLOWED`: `get_mempolicy` returns the nodes this task may
/// use.
const MPOL_F_MEMS_ALLOWED: libc::c_ulong = 1 << 2;

type NodeMask = [libc::c_ulong; NODE_BITS / libc::c_ulong::BITS as usize];

/// Moves the pages every CPU holds in its LRU-add batch onto the LRU
/// lists. Touches no page of any process.
pub fn drain_all_cpus() -> Result<(), Errno> {
    match drain_by_migrate_pages() {
        Err(Errno::NOSYS) => drain_by_visiting_cpus(),
        other => other,
    }
}

/// `get_mempolicy(MPOL_F_MEMS_ALLOWED)`, then `migrate_pages(0, m, m)`.
fn drain_by_migrate_pages() -> Result<(), Errno> {
    let mut nodes: NodeMask = [0; NODE_BITS / libc::c_ulong::BITS as usize];
    let maxnode = (NODE_BITS + 1) as libc::c_ulong;
    // SAFETY: `nodes` is a writable buffer of NODE_BITS bits, and the
    // kernel writes at most ALIGN(maxnode - 1, 64) = NODE_BITS bits; the
    // mode and address pointers may be null with MPOL_F_MEMS_ALLOWED.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            std::ptr::null_mut::<libc::c_int>(),
            nodes.as_mut_ptr(),
            maxnode,
            std::ptr::null_mut::<libc::c_void>(),
            MPOL_F_MEMS_ALLOWED,
        )
    };
    if rc != 0 {
        return Err(last_errno());
    }
    // SAFETY: both masks point at `nodes` (read only, NODE_BITS bits, as
    // maxnode - 1 says); pid 0 is the calling process. With equal masks
    // no page moves.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_migrate_pages,
            0 as libc::pid_t,
            maxnode,
            nodes.as_ptr(),
            nodes.as_ptr(),
        )
    };
    if rc < 0 {
        return Err(last_errno());
    }
    Ok(())
}

/// Pins the calling thread to each CPU of its affinity mask in turn and
/// drains that CPU's batch, then restores the mask.
fn drain_by_visiting_cpus() -> Result<(), Errno> {
    let page = rustix::param::page_size();
    let empty = OwnedMapping::anonymous(page, 0)?;
    // SAFETY: a zeroed cpu_set_t is a valid empty set.
    let mut saved: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: `saved` is a writable cpu_set_t of `size` bytes.
    if unsafe { libc::sched_getaffinity(0, size, &mut saved) } != 0 {
        return Err(last_errno());
    }
    let mut result = Ok(());
    for cpu in 0..libc::CPU_SETSIZE as usize {
        // SAFETY: `cpu` is below CPU_SETSIZE.
        if !unsafe { libc::CPU_ISSET(cpu, &saved) } {
            continue;
        }
        // SAFETY: a zeroed cpu_set_t is a valid empty set.
        let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `cpu` is below CPU_SETSIZE.
        unsafe { libc::CPU_SET(cpu, &mut one) };
        // SAFETY: `one` is a valid cpu_set_t of `size` bytes.
        if unsafe { libc::sched_setaffinity(0, size, &one) } != 0 {
            continue; // a CPU gone offline meanwhile
        }
        if let Err(e) = empty.madvise(0, page, Advice::PageOut) {
            result = Err(e);
        }
    }
    // SAFETY: `saved` is the valid mask read above.
    if unsafe { libc::sched_setaffinity(0, size, &saved) } != 0 {
        return Err(last_errno());
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_drains_succeed_here() {
        drain_all_cpus().unwrap();
        drain_by_visiting_cpus().unwrap();
    }
}
