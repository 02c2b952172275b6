//! The helper's answer to pagescope: a few integers, with the fd
//! attached (`SCM_RIGHTS` over a `SOCK_SEQPACKET` socketpair).
//!
//! # References
//! - `unix(7)` (`SCM_RIGHTS`), `recvmsg(2)`, `sendmsg(2)`

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

use super::{Failed, Injected, Step, UffdOrigin};

/// The helper's answer (sent as bytes, with the fd attached on success).
#[derive(Clone, Copy, Default)]
#[repr(C)]
pub(super) struct Outcome {
    /// 0, or the errno of the failed step.
    pub(super) errno: i32,
    /// The failed step.
    pub(super) step: i32,
    /// [`UffdOrigin`] as a number ([`UffdOrigin::from_raw`]).
    pub(super) origin: i32,
    /// The errno of the first `userfaultfd()` attempt, if it failed.
    pub(super) first_errno: i32,
    /// The fd number left in the target (`keep_in_target`), else -1.
    pub(super) target_fd: i32,
}

const OUTCOME_LEN: usize = std::mem::size_of::<Outcome>();

impl Outcome {
    fn to_bytes(self) -> [u8; OUTCOME_LEN] {
        let mut b = [0u8; OUTCOME_LEN];
        for (i, v) in [
            self.errno,
            self.step,
            self.origin,
            self.first_errno,
            self.target_fd,
        ]
        .into_iter()
        .enumerate()
        {
            b[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
        }
        b
    }

    fn from_bytes(b: &[u8; OUTCOME_LEN]) -> Self {
        let at =
            |i: usize| i32::from_ne_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]]);
        Self {
            errno: at(0),
            step: at(1),
            origin: at(2),
            first_errno: at(3),
            target_fd: at(4),
        }
    }
}

/// Waits (bounded) for the helper's outcome and the fd.
pub(super) fn receive(sock: BorrowedFd<'_>, timeout: Duration) -> Result<Injected, Failed> {
    let lost = |errno| Failed {
        step: Step::Send,
        errno,
    };
    let mut fds = [PollFd::new(&sock, PollFlags::IN)];
    let timeout = Timespec::try_from(timeout).unwrap_or_default();
    loop {
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(0) => return Err(lost(Errno::TIMEDOUT)),
            Ok(_) => break,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(lost(e)),
        }
    }
    let mut bytes = [0u8; OUTCOME_LEN];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        sock,
        &mut [IoSliceMut::new(&mut bytes)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(lost)?;
    let fd = control.drain().find_map(|m| match m {
        RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
        _ => None,
    });
    if got.bytes != OUTCOME_LEN {
        return Err(lost(Errno::PIPE));
    }
    let o = Outcome::from_bytes(&bytes);
    if o.errno != 0 {
        return Err(Failed {
            step: Step::from_raw(o.step).unwrap_or(Step::Userfaultfd),
            errno: Errno::from_raw_os_error(o.errno),
        });
    }
    let origin = UffdOrigin::from_raw(o.origin);
    Ok(Injected {
        fd,
        origin,
        target_fd: (o.target_fd >= 0).then_some(o.target_fd),
    })
}

/// Sends the outcome and the fd (best effort: pagescope times out).
pub(super) fn send(sock: BorrowedFd<'_>, out: &Outcome, fd: Option<&OwnedFd>) {
    let bytes = out.to_bytes();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds;
    if let Some(fd) = fd {
        fds = [fd.as_fd()];
        control.push(SendAncillaryMessage::ScmRights(&fds));
    }
    let _ = rustix::net::sendmsg(
        sock,
        &[IoSlice::new(&bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    );
}
