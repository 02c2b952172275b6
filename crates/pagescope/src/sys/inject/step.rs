//! The injection helper's steps, numbered for test failpoints.

/// The helper's steps, in order (test failpoints name them by number,
/// from 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// `PTRACE_SEIZE`.
    Seize,
    /// `PTRACE_INTERRUPT`.
    Interrupt,
    /// Waiting for the thread to stop.
    WaitStop,
    /// `PTRACE_GETREGS` of the original registers.
    SaveRegs,
    /// `userfaultfd()` in the target.
    Userfaultfd,
    /// Stopping every other thread of the target (before a device fd
    /// enters its fd table).
    StopThreads,
    /// `socketpair()` in the target (to receive pagescope's
    /// `/dev/userfaultfd`).
    HandSocketpair,
    /// `pidfd_getfd` of the target's sending end.
    HandGetSocket,
    /// `sendmsg(SCM_RIGHTS)` of the device fd by the helper.
    HandSend,
    /// `recvmsg()` of the device fd in the target.
    HandRecv,
    /// `ioctl(USERFAULTFD_IOC_NEW)` on the device fd in the target.
    HandIoctl,
    /// `close()` of the device fd and both sockets in the target.
    HandClose,
    /// `userfaultfd(UFFD_USER_MODE_ONLY)` in the target.
    UserModeOnly,
    /// `open("/dev/userfaultfd")` + `USERFAULTFD_IOC_NEW` in the target.
    DevUserfaultfd,
    /// `pidfd_getfd` of the new fd.
    GetFd,
    /// `close()` of the target's copy.
    CloseInTarget,
    /// `PTRACE_SETREGS` of the original registers.
    Restore,
    /// `PTRACE_DETACH`.
    Detach,
    /// Handing the fd to pagescope.
    Send,
}

/// Every step, in order: `ALL[n - 1]` is step number `n`.
const ALL: [Step; Step::LAST as usize] = [
    Step::Seize,
    Step::Interrupt,
    Step::WaitStop,
    Step::SaveRegs,
    Step::Userfaultfd,
    Step::StopThreads,
    Step::HandSocketpair,
    Step::HandGetSocket,
    Step::HandSend,
    Step::HandRecv,
    Step::HandIoctl,
    Step::HandClose,
    Step::UserModeOnly,
    Step::DevUserfaultfd,
    Step::GetFd,
    Step::CloseInTarget,
    Step::Restore,
    Step::Detach,
    Step::Send,
];

impl Step {
    /// The last step's number.
    pub const LAST: i32 = 19;

    /// The step's number (1 for the first).
    pub fn number(self) -> i32 {
        let i = ALL.iter().position(|s| *s == self).unwrap_or(0);
        i32::try_from(i + 1).unwrap_or(0)
    }

    /// The step numbered `n`.
    pub fn from_raw(n: i32) -> Option<Self> {
        usize::try_from(n - 1)
            .ok()
            .and_then(|i| ALL.get(i))
            .copied()
    }

    /// Whether the step hands pagescope's `/dev/userfaultfd` to the target
    /// (taken only when the target may not create a full userfaultfd
    /// itself and pagescope could open the device).
    pub fn hands_device(self) -> bool {
        matches!(
            self,
            Step::StopThreads
                | Step::HandSocketpair
                | Step::HandGetSocket
                | Step::HandSend
                | Step::HandRecv
                | Step::HandIoctl
                | Step::HandClose
        )
    }

    /// What the step does, for error messages.
    pub fn describe(self) -> &'static str {
        match self {
            Step::Seize => {
                "seize the process with ptrace (is a debugger or strace attached, or are ptrace rights missing?)"
            }
            Step::Interrupt => "interrupt the process with ptrace",
            Step::WaitStop => "wait for the process to stop",
            Step::SaveRegs => "read the process's registers",
            Step::Userfaultfd | Step::UserModeOnly | Step::DevUserfaultfd => {
                "create a userfaultfd inside the process"
            }
            Step::StopThreads => "stop every thread of the process",
            Step::HandSocketpair | Step::HandGetSocket | Step::HandSend | Step::HandRecv => {
                "hand /dev/userfaultfd to the process"
            }
            Step::HandIoctl => "create a userfaultfd inside the process from /dev/userfaultfd",
            Step::HandClose => "close /dev/userfaultfd and its socket inside the process",
            Step::GetFd => "copy the userfaultfd out of the process (pidfd_getfd)",
            Step::CloseInTarget => "close the userfaultfd's copy inside the process",
            Step::Restore => "restore the process's registers",
            Step::Detach => "detach from the process",
            Step::Send => "receive the userfaultfd from the injection helper",
        }
    }
}

/// A test-only fault at one step of the helper.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failpoint {
    /// The step ([`Step`] as a number).
    pub step: i32,
    /// 0: the step fails as if its system call had (`EIO`); otherwise
    /// this signal is sent to the helper's parent (pagescope) there, and
    /// the helper carries on.
    pub signal: i32,
}
