//! The fixture's own raw calls that pagescope's library has no business
//! offering: `fork`, `prctl(PR_SET_PDEATHSIG)`, SysV `shmget`/`shmat`.
//!
//! The fixture is a test program; each block still carries its contract.

#![allow(unsafe_code)]

use std::ptr::NonNull;

use pagescope::raw::OwnedMapping;

/// Forks a helper that runs `child` and then sleeps until it is killed; it
/// gets SIGKILL when the fixture dies. Returns the helper's PID once `child`
/// has finished.
///
/// Must be called while the fixture is single-threaded.
pub fn fork_helper(child: impl FnOnce()) -> std::io::Result<u32> {
    fork_child(child, true)
}

/// Like [`fork_helper`]; with `stay == false` the child exits right after
/// `child` (the parent still waits until `child` has run).
pub fn fork_child(child: impl FnOnce(), stay: bool) -> std::io::Result<u32> {
    use std::io::{Read, Write};
    let parent = std::process::id();
    let (mut ready_rx, mut ready_tx) = std::os::unix::net::UnixStream::pair()?;
    // SAFETY: the fixture is single-threaded when it forks (documented
    // contract of this function), so the child may run arbitrary code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid > 0 {
        drop(ready_tx);
        let mut byte = [0u8];
        ready_rx.read_exact(&mut byte)?;
        return Ok(pid.cast_unsigned());
    }
    drop(ready_rx);
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number by value.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    if std::os::unix::process::parent_id() != parent {
        std::process::exit(0);
    }
    child();
    let _ = ready_tx.write_all(b"r");
    if !stay {
        // SAFETY: _exit ends the forked child without running the parent's
        // atexit handlers or flushing its copied stdio buffers.
        unsafe { libc::_exit(0) };
    }
    loop {
        // SAFETY: pause has no arguments and only returns on a signal.
        unsafe { libc::pause() };
    }
}

/// A SysV shared memory segment, created `IPC_PRIVATE`, attached, and
/// marked for removal at once so it disappears with its last user.
pub fn sysv_segment(len: usize) -> std::io::Result<OwnedMapping> {
    // SAFETY: plain syscall with value arguments.
    let id = unsafe { libc::shmget(libc::IPC_PRIVATE, len, libc::IPC_CREAT | 0o600) };
    if id < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: attaching a segment we just created at a kernel-chosen
    // address; the result is checked below.
    let p = unsafe { libc::shmat(id, std::ptr::null(), 0) };
    // SAFETY: IPC_RMID with a null buffer only marks the segment.
    unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
    if p as isize == -1 {
        return Err(std::io::Error::last_os_error());
    }
    let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(std::io::Error::last_os_error)?;
    // SAFETY: `ptr..ptr+len` is the attachment just made, owned by nobody
    // else; munmap releases a SysV attachment just like shmdt.
    Ok(unsafe { OwnedMapping::from_raw(ptr, len) })
}

/// Writes `value` at `addr` in the helper process after fork, where the
/// fixture's `OwnedMapping` handles (in the parent) are not ours to use.
pub fn poke(addr: u64, value: u8) {
    // SAFETY: called only in the forked helper on addresses of mappings it
    // inherited (MADV_DOFORK parts of shared mappings), which are mapped
    // read-write in it.
    unsafe { (addr as *mut u8).write_volatile(value) };
}

/// Stops glibc from trimming or moving the heap while the fixture serves
/// commands, so its `[heap]` mapping stays exactly as the tests saw it
/// (a trim between two snapshots looks like the scanner changed it).
pub fn keep_heap() {
    // SAFETY: mallopt takes two integers by value and only tunes malloc.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
    }
}

/// Forks a child that runs `serve` and exits; it gets SIGKILL when the
/// fixture dies. Returns at once with the child's PID.
///
/// Must be called while the fixture is single-threaded.
pub fn fork_server(serve: impl FnOnce()) -> std::io::Result<u32> {
    let parent = std::process::id();
    // SAFETY: the fixture is single-threaded when it forks (documented
    // contract of this function), so the child may run arbitrary code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid > 0 {
        return Ok(pid.cast_unsigned());
    }
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number by value.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    if std::os::unix::process::parent_id() != parent {
        // SAFETY: _exit ends the child without running inherited handlers.
        unsafe { libc::_exit(0) };
    }
    serve();
    // SAFETY: as above.
    unsafe { libc::_exit(0) }
}

/// Installs a seccomp filter that makes `userfaultfd(2)` fail with `EPERM`
/// (as container runtimes' default profiles do) and, with `also_dev`,
/// `ioctl(USERFAULTFD_IOC_NEW)` on `/dev/userfaultfd` too: a target where
/// pagescope cannot create a userfaultfd one way, or at all.
pub fn deny_userfaultfd(also_dev: bool) -> std::io::Result<()> {
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    const ALLOW: u32 = 0x7fff_0000;
    const DENY: u32 = 0x0005_0000 | libc::EPERM as u32;
    let f = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let ioctl_check = if also_dev { 0 } else { 2 };
    let prog = [
        f(LD_W_ABS, 0, 0, 0),         // 0: A = nr
        f(JEQ_K, 5, 0, 323),          // 1: userfaultfd -> 7
        f(JEQ_K, ioctl_check, 3, 16), // 2: ioctl -> 3 (or allow)
        f(LD_W_ABS, 0, 0, 24),        // 3: A = low word of args[1]
        f(JEQ_K, 2, 0, 0xAA00),       // 4: USERFAULTFD_IOC_NEW -> 7
        f(RET_K, 0, 0, ALLOW),        // 5
        f(RET_K, 0, 0, ALLOW),        // 6
        f(RET_K, 0, 0, DENY),         // 7
    ];
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr().cast_mut(),
    };
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fprog` points at `prog`, both alive for the call; the kernel
    // copies the filter.
    let rc = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &raw const fprog,
            0,
            0,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Closes a descriptor a forked child inherited but must not keep (the
/// parent's end of a socket pair), without running any destructor.
pub fn close_inherited(fd: std::os::fd::RawFd) {
    // SAFETY: closing a raw fd number; the child owns no Rust handle for it
    // that would close it again (the parent's `OwnedFd` copy is never
    // dropped in the child, which exits with `_exit`).
    unsafe { libc::close(fd) };
}

/// `read(/dev/urandom, addr, len)`: the kernel fills the fixture's own
/// memory at `addr`.
pub fn read_urandom_into(addr: u64, len: usize) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open("/dev/urandom")?;
    let mut done = 0;
    while done < len {
        // SAFETY: `addr..addr+len` lies in a read-write mapping the fixture
        // owns (checked by the caller against its regions); the kernel
        // writes at most `len - done` bytes there.
        let n = unsafe {
            libc::read(
                f.as_raw_fd(),
                (addr as usize + done) as *mut libc::c_void,
                len - done,
            )
        };
        if n <= 0 {
            return Err(std::io::Error::last_os_error());
        }
        done += n.cast_unsigned();
    }
    Ok(())
}
