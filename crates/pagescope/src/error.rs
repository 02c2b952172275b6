//! What every pagescope error has in common: an [`ErrorKind`] the caller can
//! act on (the CLI turns it into an exit code, in one place).
//!
//! Each layer has its own error enum carrying the PID, path or address range
//! it concerns ([`ProcError`](crate::ProcError),
//! [`ScanError`](crate::ScanError), ...). Messages never repeat their
//! `#[source]`; print the chain (`{:#}` with anyhow) to see it.

/// The broad class of an error: what a caller can do about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// No such process (or it exited before it could be pinned).
    NoSuchProcess,
    /// The caller lacks a privilege (ptrace access, CAP_SYS_ADMIN, ...).
    PermissionDenied,
    /// The process has no user address space (kernel thread, zombie).
    NoAddressSpace,
    /// The process exited while pagescope was working on it.
    TargetExited,
    /// An address range that is malformed or not mapped in the target.
    BadRange,
    /// The running kernel lacks an interface the operation needs.
    Unsupported,
    /// Something else already holds what the operation needs (another
    /// userfaultfd registered over the target's memory).
    Busy,
    /// An image is corrupt, truncated, or not the one a chain names.
    BadImage,
    /// The caller asked for something that cannot be done as asked (an
    /// image into a directory that is not empty, ...).
    BadInput,
    /// Anything else (I/O errors, unexpected kernel answers).
    Other,
}
