//! Starting a fixture process and talking to it.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use crate::truth::Truth;

/// A running fixture process; told to exit (then killed) on drop.
#[derive(Debug)]
pub struct FixtureProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    truth: Truth,
}

impl FixtureProcess {
    /// Starts the fixture binary `exe` with `args` and waits for its
    /// ground truth.
    pub fn spawn(exe: &Path, args: &[&str]) -> std::io::Result<Self> {
        let mut cmd = Command::new(exe);
        cmd.args(args);
        Self::spawn_command(cmd)
    }

    /// The `pagescope-fixture` binary: `$PAGESCOPE_FIXTURE` if set, else
    /// next to the running program (or one directory up, where Cargo puts
    /// the binaries its test executables in `deps/` go with).
    pub fn locate() -> std::io::Result<PathBuf> {
        if let Some(p) = std::env::var_os("PAGESCOPE_FIXTURE") {
            return Ok(PathBuf::from(p));
        }
        let me = std::env::current_exe()?;
        let dir = me.parent().unwrap_or(Path::new("."));
        [dir.join("pagescope-fixture"), dir.join("../pagescope-fixture")]
            .into_iter()
            .find(|p| p.is_file())
            .ok_or_else(|| {
                std::io::Error::other(format!(
                    "the pagescope-fixture binary is not next to {} (build it: cargo build --release --workspace)",
                    me.display()
                ))
            })
    }

    /// Starts a prepared command that runs the fixture (for example under
    /// `setpriv` as another user) and waits for its ground truth.
    pub fn spawn_command(mut cmd: Command) -> std::io::Result<Self> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(
            child
                .stdout
                .take()
                .ok_or_else(|| std::io::Error::other("no stdout"))?,
        );
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let truth: Truth = serde_json::from_str(&line)
            .map_err(|e| std::io::Error::other(format!("bad fixture truth {line:?}: {e}")))?;
        Ok(Self {
            child,
            stdin,
            stdout,
            truth,
        })
    }

    /// The fixture's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The ground truth printed at start.
    pub fn truth(&self) -> &Truth {
        &self.truth
    }

    /// Sends one command line and returns the reply line.
    pub fn command(&mut self, cmd: &str) -> std::io::Result<String> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| std::io::Error::other("fixture stdin closed"))?;
        writeln!(stdin, "{cmd}")?;
        stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        let reply = line.trim_end().to_owned();
        if let Some(e) = reply.strip_prefix("error: ") {
            return Err(std::io::Error::other(format!(
                "fixture command {cmd:?} failed: {e}"
            )));
        }
        Ok(reply)
    }

    /// Re-reads the ground truth (after commands changed it).
    pub fn refresh_truth(&mut self) -> std::io::Result<&Truth> {
        let line = self.command("truth")?;
        self.truth = serde_json::from_str(&line).map_err(std::io::Error::other)?;
        Ok(&self.truth)
    }

    /// Tells the fixture to exit and waits for it (killing it after 10 s).
    pub fn stop(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin, "exit");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills the fixture at once (to test a target that disappears).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for FixtureProcess {
    fn drop(&mut self) {
        self.stop();
    }
}
