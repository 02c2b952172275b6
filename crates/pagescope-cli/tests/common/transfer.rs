//! Helpers of the `send`/`receive` tests: the exit codes, the VM-like
//! writer, a `receive --listen` on a free port.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ChildStderr, Command, Output, Stdio};

use super::exe;
use super::programs::{Proc, start};

/// Exit codes (`docs/stream-format.md`).
pub const HANDSHAKE: i32 = 20;
pub const AUTH: i32 = 21;
pub const BAD_STREAM: i32 = 22;
pub const CONNECTION: i32 = 23;
pub const ABORTED: i32 = 24;

/// A program of `tests/programs/`.
pub fn program(name: &str) -> String {
    format!("{}/tests/programs/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// The VM-like writer (a 64 MiB memfd `guest-ram` and 64 MiB anonymous,
/// 300 pages written per second).
pub fn writer() -> Proc {
    let (p, line) =
        start(Command::new("python3").args([&program("anon_memfd_writer.py"), "300", "600"]));
    assert_eq!(line, "ready");
    p
}

/// A command's exit code (-1: killed by a signal).
pub fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

/// A command's stderr.
pub fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A `receive --listen`: it and the address it listens on.
pub struct Receiver {
    pub child: Child,
    pub addr: String,
    stderr: BufReader<ChildStderr>,
}

impl Receiver {
    /// On a free loopback port.
    pub fn start(args: &[&str]) -> Self {
        Self::listen("127.0.0.1:0", args)
    }

    /// On `listen`; `note:` lines before the address are passed over.
    pub fn listen(listen: &str, args: &[&str]) -> Self {
        let mut child = Command::new(exe())
            .args(["receive", "--listen", listen])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start receive");
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        let addr = loop {
            line.clear();
            stderr.read_line(&mut line).unwrap();
            if let Some(a) = line.trim().strip_prefix("pagescope: listening on ") {
                break a.to_owned();
            }
            assert!(line.contains("note:"), "receive said {line:?}");
        };
        Self {
            child,
            addr,
            stderr,
        }
    }

    /// Its exit code and the rest of its stderr.
    pub fn finish(mut self) -> (i32, String) {
        let mut rest = String::new();
        self.stderr.read_to_string(&mut rest).unwrap();
        let code = self.child.wait().unwrap().code().unwrap_or(-1);
        (code, rest)
    }
}
