//! The QEMU migration tests' harness: a source VM with its guest RAM in a
//! memfd (`memory-backend-memfd,share=on`), a destination VM mapping a file
//! (`memory-backend-file,mem-path=FILE,share=on`, `-incoming defer`), both
//! TCG, two QMP sockets (the test's, and `tool.sock` for `pagescope send
//! --qmp`: QEMU serves one client per socket) and the serial console in a
//! file each; the guest
//! (`scripts/guest-image`: a Debian kernel and `programs/guest_init.c` as
//! init) prints `ps-guest: seq=N uptime_ms=T written=W checks=C failures=F`
//! once a second. Every VM is killed by its PID when dropped. Also: a
//! `pagescope receive --into FILE --in-place` child ([`Receiver`]).

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::time::{Duration, Instant};

use pagescope::PageSize;
use pagescope::qemu::Qmp;

/// The QEMU binary.
pub const QEMU: &str = "qemu-system-x86_64";

/// Where `scripts/guest-image` puts the guest (`PAGESCOPE_GUEST_DIR`, or
/// the workspace's `target/guest`).
pub fn guest_dir() -> PathBuf {
    std::env::var_os("PAGESCOPE_GUEST_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/guest"),
        PathBuf::from,
    )
}

/// Why the QEMU tests cannot run here, if they cannot.
pub fn missing() -> Option<String> {
    let qemu = Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .status();
    if !qemu.is_ok_and(|s| s.success()) {
        return Some(format!("{QEMU} not installed (Debian qemu-system-x86)"));
    }
    let dir = guest_dir();
    for f in ["vmlinuz", "initrd"] {
        if !dir.join(f).is_file() {
            return Some(format!(
                "no {} (run scripts/guest-image)",
                dir.join(f).display()
            ));
        }
    }
    None
}

/// The guest's RAM and workload.
#[derive(Clone, Debug)]
pub struct GuestSpec {
    /// Guest RAM, MiB.
    pub ram_mib: u64,
    /// MiB the guest program writes and checks (`ps.mib`).
    pub work_mib: u64,
    /// Pages it rewrites per second (`ps.rate`).
    pub rate: u64,
}

impl GuestSpec {
    fn common_args(&self, dir: &Path) -> Vec<String> {
        let g = guest_dir();
        let append = format!(
            "console=ttyS0 quiet ps.mib={} ps.rate={} ps.check=1",
            self.work_mib, self.rate
        );
        [
            "-machine",
            "pc,accel=tcg,memory-backend=ram",
            "-cpu",
            "qemu64",
            "-m",
            &format!("{}M", self.ram_mib),
            "-kernel",
            &g.join("vmlinuz").display().to_string(),
            "-initrd",
            &g.join("initrd").display().to_string(),
            "-append",
            &append,
            "-display",
            "none",
            "-nodefaults",
            "-no-user-config",
            "-serial",
            &format!("file:{}", dir.join("serial.log").display()),
            "-qmp",
            &format!("unix:{},server=on,wait=off", dir.join("qmp.sock").display()),
            "-qmp",
            &format!(
                "unix:{},server=on,wait=off",
                dir.join("tool.sock").display()
            ),
        ]
        .map(str::to_owned)
        .to_vec()
    }
}

/// A running QEMU process, killed (by PID) when dropped.
#[derive(Debug)]
pub struct Vm {
    child: Child,
    /// Its directory: `qmp.sock`, `serial.log`, `qemu.log`.
    pub dir: PathBuf,
    /// Its QMP session.
    pub qmp: Qmp,
}

impl Vm {
    /// The source: guest RAM in a memfd, running.
    pub fn source(spec: &GuestSpec, dir: &Path) -> Self {
        let backend = format!(
            "memory-backend-memfd,id=ram,size={}M,share=on",
            spec.ram_mib
        );
        Self::start(spec, dir, &["-object", &backend])
    }

    /// The destination: guest RAM mapped from `ram_file`, waiting for a
    /// `migrate-incoming` (`-incoming defer`), paused after it (`-S`).
    pub fn destination(spec: &GuestSpec, dir: &Path, ram_file: &Path) -> Self {
        let backend = format!(
            "memory-backend-file,id=ram,size={}M,mem-path={},share=on",
            spec.ram_mib,
            ram_file.display()
        );
        Self::start(
            spec,
            dir,
            &["-object", &backend, "-incoming", "defer", "-S"],
        )
    }

    /// The post-copy destination: as [`Vm::destination`] but without `-S`,
    /// so it runs as soon as the device state is in.
    pub fn destination_running(spec: &GuestSpec, dir: &Path, ram_file: &Path) -> Self {
        let backend = format!(
            "memory-backend-file,id=ram,size={}M,mem-path={},share=on",
            spec.ram_mib,
            ram_file.display()
        );
        Self::start(spec, dir, &["-object", &backend, "-incoming", "defer"])
    }

    fn start(spec: &GuestSpec, dir: &Path, extra: &[&str]) -> Self {
        std::fs::create_dir_all(dir).expect("VM directory");
        let log = File::create(dir.join("qemu.log")).expect("qemu.log");
        let child = Command::new(QEMU)
            .args(spec.common_args(dir))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("start qemu-system-x86_64");
        let sock = dir.join("qmp.sock");
        let deadline = Instant::now() + Duration::from_secs(30);
        let qmp = loop {
            match Qmp::connect(&sock, Duration::from_secs(30)) {
                Ok(q) => break q,
                Err(e) if Instant::now() > deadline => panic!(
                    "QMP at {}: {e:#?}; qemu.log: {}",
                    sock.display(),
                    read(&dir.join("qemu.log"))
                ),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        Self {
            child,
            dir: dir.to_owned(),
            qmp,
        }
    }

    /// The QMP socket left for `pagescope send --qmp`.
    pub fn tool_socket(&self) -> PathBuf {
        self.dir.join("tool.sock")
    }

    /// QEMU's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The serial console so far.
    pub fn console(&self) -> String {
        read(&self.dir.join("serial.log"))
    }

    /// The guest's status lines so far.
    pub fn guest_lines(&self) -> Vec<GuestLine> {
        GuestLine::parse_all(&self.console())
    }

    /// Waits until `done` holds for the guest's status lines; panics with
    /// the console after `timeout`, or at once when the guest reports a
    /// failed self-check or the kernel panicked.
    pub fn wait_guest(&self, what: &str, timeout: Duration, done: impl Fn(&[GuestLine]) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let console = self.console();
            assert_guest_healthy(&console);
            if done(&GuestLine::parse_all(&console)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {timeout:?}; console:\n{}",
                tail(&console)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The guest RAM memfd's `/proc/PID/fd/N`.
    pub fn memfd_path(&self) -> PathBuf {
        let fds = Path::new("/proc").join(self.pid().to_string()).join("fd");
        for e in std::fs::read_dir(&fds).expect("QEMU's fds") {
            let path = e.expect("fd entry").path();
            let link = std::fs::read_link(&path).unwrap_or_default();
            if link.to_string_lossy().starts_with("/memfd:") {
                return path;
            }
        }
        panic!("QEMU {} holds no memfd", self.pid());
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Child::kill signals this child's PID only.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Panics on a failed self-check or a kernel panic in `console`.
pub fn assert_guest_healthy(console: &str) {
    for bad in ["SELFCHECK FAIL", "Kernel panic", "cannot allocate"] {
        assert!(
            !console.contains(bad),
            "guest reports {bad:?}; console:\n{}",
            tail(console)
        );
    }
}

fn read(p: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned()
}

/// The last 40 lines of a console.
pub fn tail(console: &str) -> String {
    let lines: Vec<&str> = console.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// One `ps-guest: seq=N uptime_ms=T written=W checks=C failures=F` line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestLine {
    /// Line number since the guest started.
    pub seq: u64,
    /// Milliseconds since the program started (guest clock).
    pub uptime_ms: u64,
    /// Pages written so far.
    pub written: u64,
    /// Full checks done.
    pub checks: u64,
    /// Bad pages found, all checks together.
    pub failures: u64,
}

impl GuestLine {
    /// Parses one console line (`None` if it is not a status line).
    pub fn parse(line: &str) -> Option<Self> {
        let rest = line.trim_end_matches('\r').split("ps-guest: seq=").nth(1)?;
        let mut nums = Vec::new();
        for (i, field) in format!("seq={rest}").split_whitespace().enumerate() {
            let want = ["seq", "uptime_ms", "written", "checks", "failures"].get(i)?;
            let (k, v) = field.split_once('=')?;
            if k != *want {
                return None;
            }
            nums.push(v.parse().ok()?);
        }
        let [seq, uptime_ms, written, checks, failures] = nums[..] else {
            return None;
        };
        Some(Self {
            seq,
            uptime_ms,
            written,
            checks,
            failures,
        })
    }

    /// Every status line of a console.
    pub fn parse_all(console: &str) -> Vec<Self> {
        console.lines().filter_map(Self::parse).collect()
    }
}

/// `pagescope receive --listen 127.0.0.1:0 --into FILE --in-place`,
/// running: it and the address it listens on.
pub struct Receiver {
    child: Child,
    /// Where it listens.
    pub addr: String,
    stderr: BufReader<ChildStderr>,
}

impl Receiver {
    /// Starts one writing into `file` in place.
    pub fn in_place(file: &Path) -> Self {
        let mut child = Command::new(super::exe())
            .args(["receive", "--listen", "127.0.0.1:0", "--into"])
            .arg(file)
            .arg("--in-place")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start pagescope receive");
        let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
        let mut line = String::new();
        stderr.read_line(&mut line).expect("receive's first line");
        let addr = line
            .trim()
            .strip_prefix("pagescope: listening on ")
            .unwrap_or_else(|| panic!("receive said {line:?}"))
            .to_owned();
        Self {
            child,
            addr,
            stderr,
        }
    }

    /// Starts `receive --into FILE --postcopy --pid PID --json`: FILE's
    /// pages are served to process `pid` (which maps it) by post-copy;
    /// the report comes on stdout ([`Receiver::finish_json`]).
    /// With `qmp`, the destination's QMP socket (`--qmp`): it is
    /// continued as soon as its device state is in.
    pub fn postcopy(file: &Path, pid: u32, qmp: Option<&Path>) -> Self {
        let mut cmd = Command::new(super::exe());
        cmd.args(["receive", "--listen", "127.0.0.1:0", "--into"])
            .arg(file)
            .args(["--postcopy", "--pid", &pid.to_string(), "--json"]);
        if let Some(q) = qmp {
            cmd.arg("--qmp").arg(q);
        }
        let child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start pagescope receive --postcopy");
        Self::listening(child)
    }

    fn listening(mut child: Child) -> Self {
        let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
        let mut line = String::new();
        stderr.read_line(&mut line).expect("receive's first line");
        let addr = line
            .trim()
            .strip_prefix("pagescope: listening on ")
            .unwrap_or_else(|| panic!("receive said {line:?}"))
            .to_owned();
        Self {
            child,
            addr,
            stderr,
        }
    }

    /// Its exit code, the rest of its stderr and its JSON report (`Null`
    /// if none).
    pub fn finish_json(mut self) -> (i32, String, serde_json::Value) {
        let mut out = String::new();
        if let Some(mut o) = self.child.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        let (code, err) = self.finish();
        (code, err, serde_json::from_str(&out).unwrap_or_default())
    }

    /// Its exit code and the rest of its stderr.
    pub fn finish(mut self) -> (i32, String) {
        let mut rest = String::new();
        let _ = self.stderr.read_to_string(&mut rest);
        let code = self.child.wait().expect("wait").code().unwrap_or(-1);
        (code, rest)
    }
}

/// The first page (index) at which `a` and `b` differ, or `None` if they
/// are byte-identical (same length too).
pub fn first_difference(a: &Path, b: &Path) -> Option<u64> {
    let (fa, fb) = (
        File::open(a).expect("open a"),
        File::open(b).expect("open b"),
    );
    let len = fa.metadata().expect("stat a").len();
    if fb.metadata().expect("stat b").len() != len {
        return Some(0);
    }
    let page = PageSize::current().get();
    let (mut ba, mut bb) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
    let mut pos = 0;
    while pos < len {
        let n = ba.len().min(usize::try_from(len - pos).expect("fits"));
        fa.read_exact_at(&mut ba[..n], pos).expect("read a");
        fb.read_exact_at(&mut bb[..n], pos).expect("read b");
        if ba[..n] != bb[..n] {
            let at = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .expect("a difference");
            return Some((pos + at as u64) / page);
        }
        pos += n as u64;
    }
    None
}
