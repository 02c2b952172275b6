//! `kcmp(2)`: whether two processes share a kernel resource.
//!
//! # References
//! - `kcmp(2)` (Linux 3.5+, `CONFIG_KCMP`; needs ptrace read access to
//!   both processes)

use rustix::io::Errno;

/// `KCMP_VM`: the address space.
const KCMP_VM: libc::c_int = 1;

/// `kcmp(pid1, pid2, KCMP_VM, 0, 0) == 0`: whether both processes share
/// one mm (threads of one process, `CLONE_VM` children, `vfork`).
pub fn same_mm(pid1: i32, pid2: i32) -> Result<bool, Errno> {
    // SAFETY: kcmp takes integers only.
    let rc = unsafe { libc::syscall(libc::SYS_kcmp, pid1, pid2, KCMP_VM, 0usize, 0usize) };
    if rc < 0 {
        Err(super::last_errno())
    } else {
        Ok(rc == 0)
    }
}
