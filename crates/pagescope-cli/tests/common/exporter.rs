//! Support for the exporter's tests: the exporter served on a free port,
//! HTTP GETs, `promtool`, and a Prometheus server of our own (started
//! from the Debian package's binary, killed by PID, its data in a
//! temporary directory).

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{cli, exe};

/// Kills a child (by its PID, through `Child`) on drop.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn promtool_check(text: &str) {
    let mut c = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    std::io::Write::write_all(&mut c.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts `pagescope exporter --listen 127.0.0.1:0 ARGS` (through `cmd`)
/// and returns it with the address it serves.
pub fn serve(mut cmd: Command) -> (Killed, String) {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the exporter");
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|s| s.strip_suffix("/metrics\n"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned();
    // Keep draining stderr so the exporter never blocks on it.
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    (Killed(child), addr)
}

pub fn exporter_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(exe());
    c.args(["exporter", "--listen", "127.0.0.1:0"]).args(args);
    c
}

pub fn get(url: &str, accept: Option<&str>) -> (String, String) {
    let mut req = ureq::get(url);
    if let Some(a) = accept {
        req = req.header("Accept", a);
    }
    let mut resp = req.call().unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (resp.body_mut().read_to_string().unwrap(), ctype)
}

/// A Prometheus server scraping `targets` (job name → address) every
/// second, with its data in a temporary directory.
pub struct Prometheus {
    child: Killed,
    base: String,
    dir: std::path::PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl Prometheus {
    pub fn start(targets: &[(&str, &str)]) -> Self {
        let dir = std::env::temp_dir().join(format!("pagescope-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let mut config =
            String::from("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n");
        for (job, addr) in targets {
            config +=
                &format!("  - job_name: {job}\n    static_configs:\n      - targets: ['{addr}']\n");
        }
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("log")).unwrap())
            .spawn()
            .expect("start prometheus");
        let p = Self {
            child: Killed(child),
            base: format!("http://127.0.0.1:{port}"),
            dir,
        };
        p.wait_for(
            &format!("count(up == 1) == {}", targets.len()),
            Duration::from_secs(60),
        );
        p
    }

    /// The result vector of an instant query.
    pub fn query(&self, expr: &str) -> Vec<Value> {
        let url = format!("{}/api/v1/query", self.base);
        let mut resp = match ureq::get(&url).query("query", expr).call() {
            Ok(r) => r,
            Err(e) => panic!("query {expr}: {e}"),
        };
        let doc: Value = serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap();
        assert_eq!(doc["status"], "success", "{expr}: {doc}");
        doc["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The single value of `expr` (None when it has no series).
    pub fn value(&self, expr: &str) -> Option<f64> {
        let r = self.query(expr);
        assert!(r.len() <= 1, "{expr}: several series {r:?}");
        r.first()
            .and_then(|s| s["value"][1].as_str())
            .map(|v| v.parse().unwrap())
    }

    pub fn wait_for(&self, expr: &str, limit: Duration) {
        let start = Instant::now();
        loop {
            let ready = ureq::get(&format!("{}/api/v1/query", self.base))
                .query("query", expr)
                .call()
                .ok()
                .and_then(|mut r| r.body_mut().read_to_string().ok())
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .is_some_and(|d| {
                    d["data"]["result"]
                        .as_array()
                        .is_some_and(|a| !a.is_empty())
                });
            if ready {
                return;
            }
            if start.elapsed() > limit {
                let mut log = String::new();
                let _ = std::fs::File::open(self.dir.join("log"))
                    .map(|mut f| f.read_to_string(&mut log));
                panic!("prometheus: {expr} not true after {limit:?}; log: {log}");
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

pub fn json_of(args: &[&str]) -> Value {
    let out = cli(args);
    assert!(
        matches!(out.status.code(), Some(0 | 8)),
        "pagescope {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Runs `check` until it returns `Ok`, a few times: a DAMON pageout or a
/// page-cache change may land between pagescope's own scan and the
/// exporter's; what it did must then be seen by both on the next try.
pub fn eventually(what: &str, mut check: impl FnMut() -> Result<(), String>) {
    let mut last = String::new();
    for _ in 0..8 {
        match check() {
            Ok(()) => return,
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(2500));
    }
    panic!("{what}: {last}");
}
