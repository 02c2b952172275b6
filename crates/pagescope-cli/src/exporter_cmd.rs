//! `pagescope exporter`: serve the library's exporter over HTTP
//! (`tiny_http`), or print one exposition (`--once`).

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use pagescope::exporter::Background;
use pagescope::exporter::{Exporter, ExporterOptions, Format, Selection, WatchSpec};
use pagescope::render::Glob;

use crate::exit::{CliError, OK, USAGE};

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("mode").required(true).args(["listen", "once"]))]
pub struct ExporterArgs {
    /// Serve /metrics on this address (e.g. 127.0.0.1:9787; port 0 picks
    /// one, printed on stderr).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Print one exposition to stdout and exit (for node_exporter's
    /// textfile collector, or to look).
    #[arg(long)]
    pub once: bool,
    /// With --once: OpenMetrics text instead of the Prometheus text format.
    #[arg(long, requires = "once")]
    pub openmetrics: bool,
    /// Give these processes their own series (repeat, or comma-separated).
    #[arg(long = "pid", value_name = "PID", value_delimiter = ',')]
    pub pids: Vec<u32>,
    /// Give processes whose command name matches this glob their own
    /// series (at most --top of them).
    #[arg(long, value_name = "GLOB")]
    pub name: Option<String>,
    /// Without --pid/--name: the N largest processes by Rss + Swap get
    /// their own series; every other process is summed.
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub top: usize,
    /// Collect at most this often; scrapes in between get the last
    /// collection.
    #[arg(long, default_value = "5s", value_parser = crate::cli::parse_interval)]
    pub min_interval: Duration,
    /// Track the pages these processes write (PID or comm glob; repeat):
    /// a dirty tracker as `watch` attaches, collected at each refresh.
    #[arg(long, value_name = "PID|GLOB")]
    pub watch: Vec<String>,
    /// Shared objects using less RAM + swap than this are summed, not
    /// listed (bytes; K, M, G suffixes).
    #[arg(long, default_value = "1M", value_parser = parse_size, value_name = "BYTES")]
    pub object_min_size: u64,
    /// A scrape waits at most this long for a fresh collection, then gets
    /// the previous one (keep it below Prometheus's scrape_timeout).
    #[arg(long, default_value = "8s", value_parser = crate::cli::parse_interval)]
    pub scrape_timeout: Duration,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, scale) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("not a size: {s:?} (try 1048576, 64K or 1M)"))
}

fn options(args: &ExporterArgs) -> ExporterOptions {
    let watch = args
        .watch
        .iter()
        .map(|w| match w.parse() {
            Ok(pid) => WatchSpec::Pid(pid),
            Err(_) => WatchSpec::Name(w.clone()),
        })
        .collect();
    ExporterOptions {
        selection: Selection {
            pids: args.pids.clone(),
            name: args.name.as_deref().map(Glob::new),
        },
        top: args.top,
        min_interval: args.min_interval,
        watch,
        object_min_bytes: args.object_min_size,
    }
}

pub fn run(args: &ExporterArgs) -> Result<u8> {
    let Some(addr) = &args.listen else {
        let mut exporter = Exporter::new(options(args));
        let format = if args.openmetrics {
            Format::OpenMetrics
        } else {
            Format::Prometheus
        };
        let text = exporter.scrape(format);
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes())?;
        out.flush()?;
        return Ok(OK);
    };
    let server = tiny_http::Server::http(addr.as_str())
        .map_err(|e| CliError::new(USAGE, format!("cannot listen on {addr}: {e}")))?;
    let exporter = Background::start(options(args), args.scrape_timeout);
    let stop = Arc::new(AtomicBool::new(false));
    crate::signals::stop_on_termination(&stop)?;
    eprintln!(
        "pagescope exporter: serving http://{}/metrics",
        server.server_addr()
    );
    while !stop.load(Ordering::SeqCst) {
        let Some(req) = server
            .recv_timeout(Duration::from_millis(200))
            .context("accepting a connection")?
        else {
            continue;
        };
        // A client that goes away mid-response is its problem, not ours.
        let _ = respond(&exporter, req);
    }
    Ok(OK)
}

fn respond(exporter: &Background, req: tiny_http::Request) -> std::io::Result<()> {
    let header = |name: &str, value: &str| {
        tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("a valid header")
    };
    let path = req.url().split('?').next().unwrap_or_default().to_owned();
    match (req.method(), path.as_str()) {
        (tiny_http::Method::Get, "/metrics") => {
            let accept = req
                .headers()
                .iter()
                .find(|h| h.field.equiv("Accept"))
                .map(|h| h.value.as_str().to_owned());
            let format = Format::from_accept(accept.as_deref());
            let body = exporter.scrape(format);
            let resp = tiny_http::Response::from_string(body)
                .with_header(header("Content-Type", format.content_type()));
            req.respond(resp)
        }
        (tiny_http::Method::Get, "/") => req.respond(
            tiny_http::Response::from_string(
                "<html><body><h1>pagescope exporter</h1><a href=\"/metrics\">/metrics</a></body></html>\n",
            )
            .with_header(header("Content-Type", "text/html; charset=utf-8")),
        ),
        _ => req.respond(tiny_http::Response::from_string("not found\n").with_status_code(404)),
    }
}
