//! Programs the image and verify tests start (killed at the end), and
//! their scratch directories.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use pagescope_fixture::testing::{is_root, skip};

/// A scratch directory on tmpfs, removed at the end.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// `/dev/shm/pagescope-verify-TAG-PID`, empty.
    pub fn new(tag: &str) -> Self {
        let p = PathBuf::from(format!(
            "/dev/shm/pagescope-verify-{tag}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    /// `name` in it, as a string.
    pub fn p(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A started program, killed at the end.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether dump and verify of another process can run (root).
pub fn usable() -> bool {
    if !is_root() {
        skip("dump and verify of another process need ptrace rights and userfaultfd (root)");
        return false;
    }
    true
}

/// Starts `cmd` and waits for its first stdout line.
pub fn start(cmd: &mut Command) -> (Proc, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the program");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (Proc(child), line.trim().to_owned())
}
