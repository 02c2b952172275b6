//! Pure parser for the parts of `/proc/PID/stat` pagescope needs.
//!
//! # References
//! - `proc_pid_stat(5)`

/// `PF_KTHREAD` in the `flags` field.
const PF_KTHREAD: u64 = 0x0020_0000;

/// What `/proc/PID/stat` says about a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stat {
    /// `comm`, the command name (bytes; may contain spaces and parentheses).
    pub comm: Vec<u8>,
    /// State letter (`R`, `S`, `D`, `Z`, `T`, ...).
    pub state: u8,
    /// Parent PID.
    pub ppid: u32,
    /// Kernel `task->flags`.
    pub flags: u64,
    /// Start time after boot, in clock ticks (field 22): with the PID, it
    /// names one process across PID reuse.
    pub start_time: u64,
}

impl Stat {
    /// A kernel thread has no user address space.
    pub fn is_kernel_thread(&self) -> bool {
        self.flags & PF_KTHREAD != 0
    }

    /// A zombie has released its address space.
    pub fn is_zombie(&self) -> bool {
        self.state == b'Z' || self.state == b'X'
    }
}

/// Parses `/proc/PID/stat`. `comm` is everything between the first `(` and
/// the *last* `)`, since the name itself may contain parentheses.
pub fn parse_stat(buf: &[u8]) -> Option<Stat> {
    let open = buf.iter().position(|&b| b == b'(')?;
    let close = buf.iter().rposition(|&b| b == b')')?;
    let comm = buf.get(open + 1..close)?.to_vec();
    let rest = std::str::from_utf8(buf.get(close + 1..)?).ok()?;
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    Some(Stat {
        comm,
        state: *fields.first()?.as_bytes().first()?,
        ppid: fields.get(1)?.parse().ok()?,
        flags: fields.get(6)?.parse().ok()?,
        start_time: fields.get(19).and_then(|f| f.parse().ok()).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_user_and_kernel_threads() {
        let user =
            parse_stat(b"1234 (my (odd) prog) S 1 1234 1234 0 -1 4194560 100 0 0 0").unwrap();
        assert_eq!(user.comm, b"my (odd) prog");
        assert_eq!(user.ppid, 1);
        assert!(!user.is_kernel_thread());
        let kthread = parse_stat(b"2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0").unwrap();
        assert!(kthread.is_kernel_thread());
        assert!(parse_stat(b"garbage").is_none());
    }
}
