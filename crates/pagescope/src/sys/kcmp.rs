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

/// `KCMP_FILE`: an open file description.
const KCMP_FILE: libc::c_int = 0;

/// `kcmp(pid1, pid2, KCMP_FILE, fd1, fd2) == 0`: whether `pid1`'s fd
/// `fd1` and `pid2`'s fd `fd2` are one open file description (one was
/// inherited or passed from the other, or both from a common source).
pub fn same_file(pid1: i32, pid2: i32, fd1: i32, fd2: i32) -> Result<bool, Errno> {
    // SAFETY: kcmp takes integers only.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid1,
            pid2,
            KCMP_FILE,
            libc::c_long::from(fd1),
            libc::c_long::from(fd2),
        )
    };
    if rc < 0 {
        Err(super::last_errno())
    } else {
        Ok(rc == 0)
    }
}
