//! A userfaultfd made from `/dev/userfaultfd` inside the target, two ways:
//!
//! * handed over: pagescope (root) opened the device itself; the target
//!   gets a copy through an injected `socketpair()` whose sending end the
//!   helper copies out (`pidfd_getfd`) and sends the device on
//!   (`SCM_RIGHTS`), then an injected `recvmsg()`. No name is bound
//!   anywhere (no abstract socket, no temporary path: nothing another
//!   process or namespace could reach). `ioctl(USERFAULTFD_IOC_NEW)` in the
//!   target then creates a full (not user-mode-only) uffd bound to *its*
//!   mm, and the device and both sockets are closed there again. Every
//!   other thread of the target is stopped meanwhile (`threads.rs`), so
//!   none sees the extra fds.
//! * opened by the target (`open("/dev/userfaultfd")`): when pagescope
//!   cannot open it, a target that may (a seccomp filter refused the
//!   system call) still gets a uffd.
//!
//! The structures the injected calls use (`int[2]`, `msghdr`, `iovec`,
//! the control buffer, the path) go below the red zone of the stopped
//! thread's stack; the words they cover are put back afterwards.
//!
//! # References
//! - `userfaultfd(2)` (`/dev/userfaultfd`, `USERFAULTFD_IOC_NEW`, Linux
//!   6.1), `unix(7)` (`SCM_RIGHTS`), `socketpair(2)`, `recvmsg(2)`,
//!   `pidfd_getfd(2)`

use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::BorrowedFd;

use rustix::io::Errno;
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use rustix::process::PidfdGetfdFlags;

use super::{InjectPlan, Step, StepResult, Thread, close_fd, inject_call, step};
use crate::sys::ptrace::{self, NR_CLOSE, NR_IOCTL, NR_OPENAT, NR_RECVMSG, NR_SOCKETPAIR, Regs};
use crate::sys::uffd::USERFAULTFD_IOC_NEW;

/// Words of target memory borrowed.
const WORDS: usize = 17;
/// Byte offsets in the borrowed memory.
const SV: u64 = 0;
const MSG: u64 = 16;
const IOV: u64 = 80;
const CMSG: u64 = 96;
const DATA: u64 = 128;
/// `CMSG_SPACE(sizeof(int))` on x86_64.
const CMSG_SPACE_ONE_FD: u64 = 24;

/// Memory of the stopped target borrowed below its stack's red zone.
struct Scratch {
    base: u64,
    old: [u64; WORDS],
}

impl Scratch {
    /// Saves the words at 512 bytes below the stack pointer (16-aligned).
    fn borrow(tid: i32, saved: &Regs) -> Result<Self, Errno> {
        let base = saved.stack_pointer().wrapping_sub(512) & !15;
        let mut old = [0u64; WORDS];
        for (i, w) in old.iter_mut().enumerate() {
            *w = ptrace::peek(tid, base + 8 * i as u64)?;
        }
        Ok(Self { base, old })
    }

    fn at(&self, off: u64) -> u64 {
        self.base + off
    }

    fn write(&self, tid: i32, off: u64, words: &[u64]) -> Result<(), Errno> {
        for (i, &w) in words.iter().enumerate() {
            ptrace::poke(tid, self.base + off + 8 * i as u64, w)?;
        }
        Ok(())
    }

    fn read(&self, tid: i32, off: u64) -> Result<u64, Errno> {
        ptrace::peek(tid, self.base + off)
    }

    /// Puts the saved words back.
    fn give_back(&self, tid: i32) -> Result<(), Errno> {
        let mut last = Ok(());
        for (i, &w) in self.old.iter().enumerate() {
            let r = ptrace::poke(tid, self.base + 8 * i as u64, w);
            last = last.and(r);
        }
        last
    }
}

/// Fds the handover put into the target, closed again afterwards.
struct Opened {
    fds: [i64; 3],
    n: usize,
}

impl Opened {
    fn add(&mut self, fd: i64) {
        if self.n < self.fds.len() {
            self.fds[self.n] = fd;
            self.n += 1;
        }
    }
}

/// Hands `device` to the target and creates a uffd there from it; returns
/// its fd number in the target, or the negative errno of a call the target
/// refused (nothing is left in it then). The device, the sockets and the
/// borrowed memory are given back on every path.
pub(super) fn handed_userfaultfd(
    t: &mut Thread,
    plan: &InjectPlan<'_>,
    saved: &Regs,
    device: BorrowedFd<'_>,
    flags: u64,
) -> StepResult<i64> {
    let scratch = Scratch::borrow(t.tid, saved).map_err(|e| (Step::HandSocketpair, e))?;
    let mut opened = Opened { fds: [0; 3], n: 0 };
    let made = hand_over(t, plan, saved, device, flags, &scratch, &mut opened);
    let mut closed = Ok(());
    for &fd in &opened.fds[..opened.n] {
        closed = closed.and(close_fd(t, plan, saved, fd, Step::HandClose));
    }
    let restored = scratch.give_back(t.tid).map_err(|e| (Step::HandClose, e));
    match (made, closed.and(restored)) {
        (Ok(uffd), Err(e)) if uffd >= 0 => {
            let _ = close_fd(t, plan, saved, uffd, Step::CloseInTarget);
            Err(e)
        }
        (made, closed) => closed.and(made),
    }
}

/// `socketpair`, `pidfd_getfd` + `sendmsg` of the device, `recvmsg`,
/// `ioctl(USERFAULTFD_IOC_NEW)`.
fn hand_over(
    t: &mut Thread,
    plan: &InjectPlan<'_>,
    saved: &Regs,
    device: BorrowedFd<'_>,
    flags: u64,
    scratch: &Scratch,
    opened: &mut Opened,
) -> StepResult<i64> {
    let tid = t.tid;
    let kind = (libc::SOCK_DGRAM | libc::SOCK_CLOEXEC) as u64;
    let pair = inject_call(t, Step::HandSocketpair, |t| {
        t.call(
            saved,
            plan.insn,
            NR_SOCKETPAIR,
            [libc::AF_UNIX as u64, kind, 0, scratch.at(SV), 0, 0],
        )
    })?;
    if pair < 0 {
        return Ok(pair);
    }
    let sv = scratch
        .read(tid, SV)
        .map_err(|e| (Step::HandSocketpair, e))?;
    let (send_end, recv_end) = (
        i64::from((sv as u32).cast_signed()),
        i64::from(((sv >> 32) as u32).cast_signed()),
    );
    opened.add(send_end);
    opened.add(recv_end);
    let ours = step(t, Step::HandGetSocket, || {
        rustix::process::pidfd_getfd(plan.pidfd, send_end as i32, PidfdGetfdFlags::empty())
    })?;
    step(t, Step::HandSend, || send_device(&ours, device))?;
    drop(ours);
    let got = inject_call(t, Step::HandRecv, |t| {
        receive_in_target(t, plan, saved, scratch, recv_end)
    })?;
    if got < 0 {
        return Ok(got);
    }
    let dev = device_received(tid, scratch).map_err(|e| (Step::HandRecv, e))?;
    opened.add(dev);
    inject_call(t, Step::HandIoctl, |t| {
        t.call(
            saved,
            plan.insn,
            NR_IOCTL,
            [dev.unsigned_abs(), USERFAULTFD_IOC_NEW, flags, 0, 0, 0],
        )
    })
}

/// One byte with the device attached.
fn send_device(sock: &std::os::fd::OwnedFd, device: BorrowedFd<'_>) -> Result<(), Errno> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds = [device];
    control.push(SendAncillaryMessage::ScmRights(&fds));
    let sent = rustix::net::sendmsg(
        sock,
        &[IoSlice::new(&[1u8])],
        &mut control,
        SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
    )?;
    if sent == 1 { Ok(()) } else { Err(Errno::PIPE) }
}

/// `recvmsg(fd, &msghdr, MSG_CMSG_CLOEXEC | MSG_DONTWAIT)` in the target.
fn receive_in_target(
    t: &mut Thread,
    plan: &InjectPlan<'_>,
    saved: &Regs,
    scratch: &Scratch,
    fd: i64,
) -> Result<i64, Errno> {
    // struct msghdr: name, namelen (+pad), iov, iovlen, control,
    // controllen, flags (+pad); struct iovec: base, len.
    let msghdr = [
        0,
        0,
        scratch.at(IOV),
        1,
        scratch.at(CMSG),
        CMSG_SPACE_ONE_FD,
        0,
    ];
    scratch.write(t.tid, MSG, &msghdr)?;
    scratch.write(t.tid, IOV, &[scratch.at(DATA), 8])?;
    scratch.write(t.tid, CMSG, &[0, 0, 0])?;
    let how = (libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT) as u64;
    t.call(
        saved,
        plan.insn,
        NR_RECVMSG,
        [fd.unsigned_abs(), scratch.at(MSG), how, 0, 0, 0],
    )
}

/// The fd number an `SCM_RIGHTS` control message gave the target.
fn device_received(tid: i32, scratch: &Scratch) -> Result<i64, Errno> {
    let len = scratch.read(tid, CMSG)?;
    let level_type = scratch.read(tid, CMSG + 8)?;
    let want = (libc::SOL_SOCKET as u64) | ((libc::SCM_RIGHTS as u64) << 32);
    if len < 20 || level_type != want {
        return Err(Errno::PROTO);
    }
    let fd = (scratch.read(tid, CMSG + 16)? as u32).cast_signed();
    Ok(i64::from(fd))
}

/// `open("/dev/userfaultfd")` + `ioctl(USERFAULTFD_IOC_NEW)` + `close()`
/// inside the target.
pub(super) fn opened_by_target(
    t: &mut Thread,
    plan: &InjectPlan<'_>,
    saved: &Regs,
    flags: u64,
) -> Result<i64, Errno> {
    const PATH: &[u8; 24] = b"/dev/userfaultfd\0\0\0\0\0\0\0\0";
    let scratch = Scratch::borrow(t.tid, saved)?;
    let mut words = [0u64; 3];
    for (i, w) in words.iter_mut().enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(&PATH[i * 8..i * 8 + 8]);
        *w = u64::from_ne_bytes(b);
    }
    let open = (libc::O_RDWR | libc::O_CLOEXEC) as u64;
    let dev = scratch.write(t.tid, 0, &words).and_then(|()| {
        t.call(
            saved,
            plan.insn,
            NR_OPENAT,
            [
                i64::from(libc::AT_FDCWD).cast_unsigned(),
                scratch.at(0),
                open,
                0,
                0,
                0,
            ],
        )
    });
    scratch.give_back(t.tid)?;
    let dev = dev?;
    if dev < 0 {
        return Ok(dev);
    }
    let uffd = t.call(
        saved,
        plan.insn,
        NR_IOCTL,
        [dev.unsigned_abs(), USERFAULTFD_IOC_NEW, flags, 0, 0, 0],
    );
    let closed = t.call(
        saved,
        plan.insn,
        NR_CLOSE,
        [dev.unsigned_abs(), 0, 0, 0, 0, 0],
    );
    closed?;
    uffd
}
