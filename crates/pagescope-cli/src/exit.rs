//! Exit codes, decided in one place from the library's error kinds
//! (`docs/json.md`, "Exit codes").

use pagescope::ErrorKind;

/// Success, complete result.
pub const OK: u8 = 0;
/// Any other error.
pub const OTHER: u8 = 1;
/// Bad command line (clap's own code), or a request that cannot be done as
/// asked.
pub const USAGE: u8 = 2;
/// No such process.
pub const NO_SUCH_PROCESS: u8 = 3;
/// Permission denied.
pub const PERMISSION: u8 = 4;
/// Kernel thread or zombie.
pub const NO_ADDRESS_SPACE: u8 = 5;
/// The kernel lacks a needed interface.
pub const UNSUPPORTED: u8 = 6;
/// Bad address range.
pub const BAD_RANGE: u8 = 7;
/// Result printed but incomplete.
pub const INCOMPLETE: u8 = 8;
/// The process exited before a result.
pub const TARGET_EXITED: u8 = 9;
/// `watch` would only report everything written (no `--allow-fallback`).
pub const DEGRADED: u8 = 10;
/// The target is already tracked by another userfaultfd.
pub const BUSY: u8 = 11;
/// An image is corrupt, truncated, or not the parent a chain names.
pub const BAD_IMAGE: u8 = 12;

/// The exit code for a library error kind.
pub fn for_kind(kind: ErrorKind) -> u8 {
    match kind {
        ErrorKind::NoSuchProcess => NO_SUCH_PROCESS,
        ErrorKind::PermissionDenied => PERMISSION,
        ErrorKind::NoAddressSpace => NO_ADDRESS_SPACE,
        ErrorKind::TargetExited => TARGET_EXITED,
        ErrorKind::BadRange => BAD_RANGE,
        ErrorKind::Unsupported => UNSUPPORTED,
        ErrorKind::Busy => BUSY,
        ErrorKind::BadImage => BAD_IMAGE,
        ErrorKind::BadInput => USAGE,
        _ => OTHER,
    }
}

/// An error the CLI itself decides the exit code of.
#[derive(Debug)]
pub struct CliError {
    code: u8,
    message: String,
}

impl CliError {
    /// An error exiting with `code`.
    pub fn new(code: u8, message: String) -> Self {
        Self { code, message }
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CliError {}

/// The exit code of an error: a [`CliError`]'s own, else that of the
/// first pagescope error in the chain, else 1.
pub fn code_of(e: &anyhow::Error) -> u8 {
    e.chain()
        .find_map(|c| {
            c.downcast_ref::<CliError>()
                .map(|e| e.code)
                .or_else(|| pagescope::error_kind(c).map(for_kind))
        })
        .unwrap_or(OTHER)
}
