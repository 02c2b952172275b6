//! `send` and `receive`: a process's memory over a stream (TCP, or
//! stdin/stdout for `ssh`), written on the other side as an image
//! directory or one shared object's pages in a file
//! (`docs/stream-format.md`).

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use pagescope::dump::DumpOptions;
use pagescope::qemu::{self, HandOffOptions, MigrateError, Qmp};
use pagescope::transfer::{
    self, Class, Conn, ObjectChoice, ReceiveInto, ReceiveOptions, SendError, SendOptions,
    SendReport, TransferError,
};
use pagescope::{KernelCaps, Target};

use crate::cli::parse_interval;
use crate::exit::{CliError, OK, OTHER, USAGE};
use crate::progress::SendOutput;

/// The peers could not agree (magic, version, capability, mode).
pub const HANDSHAKE: u8 = 20;
/// The pre-shared key is missing or wrong.
pub const AUTH: u8 = 21;
/// The stream broke its rules (lengths, offsets, checksums, totals).
pub const BAD_STREAM: u8 = 22;
/// The connection failed or closed before the commit.
pub const CONNECTION: u8 = 23;
/// The sender aborted: nothing was committed.
pub const ABORTED: u8 = 24;
/// The receiver could not write its output.
pub const OUTPUT: u8 = 25;
/// The post-copy destination process could not be attached or filled.
pub const DESTINATION: u8 = 26;

fn code(class: Class) -> u8 {
    match class {
        Class::Handshake => HANDSHAKE,
        Class::Auth => AUTH,
        Class::BadStream => BAD_STREAM,
        Class::Connection => CONNECTION,
        Class::Aborted => ABORTED,
        Class::Output => OUTPUT,
        Class::Destination => DESTINATION,
    }
}

pub(crate) fn fail(side: &str, e: &TransferError) -> anyhow::Error {
    CliError::new(code(e.class), format!("{side}: {}", e.what)).into()
}

/// Options of `pagescope send`.
#[derive(Debug, clap::Args)]
pub struct SendArgs {
    /// Target process.
    pub pid: u32,
    /// The receiver: HOST:PORT, or `-` for stdout (replies on stdin).
    #[arg(long, value_name = "ADDR")]
    pub to: String,
    /// Only this shared object's pages (PATH, or memfd:NAME), for a
    /// receiver `--into FILE`.
    #[arg(long, value_name = "PATH|memfd:NAME")]
    pub object: Option<String>,
    /// The pre-shared key (at least 16 bytes).
    #[arg(long, value_name = "FILE")]
    pub psk_file: Option<PathBuf>,
    #[command(flatten)]
    pub passes: crate::cli::PassArgs,
    /// Pre-copy goes on while what is left (the pages written since the
    /// last pass) would take longer than this to send at the stream's
    /// measured bandwidth (QEMU's downtime-limit), within --max-iterations
    /// and --max-time.
    #[arg(long, default_value = "300ms", value_parser = parse_interval)]
    pub max_downtime: Duration,
    /// Bytes per second at most (suffix K, M, G: powers of 1024).
    #[arg(long, value_parser = parse_rate)]
    pub bandwidth: Option<u64>,
    /// Progress as NDJSON on stdout: updates and passes as they go, then
    /// the report (docs/stream-format.md).
    #[arg(long)]
    pub json: bool,
    /// Once the receiver has committed, page the sent pages out of the
    /// source (process_madvise MADV_PAGEOUT; shmem through pagescope's own
    /// mapping), re-scan and report what left RAM; with --leave-stopped
    /// the stopped source then holds its memory in swap, not RAM.
    #[arg(long)]
    pub pageout_sent: bool,
    /// Post-copy after at most N pre-copy passes (sooner if they stop
    /// converging): the source is left stopped (`receive --postcopy`).
    /// `auto` or no N: up to --max-iterations, switching as soon as the
    /// written set stops shrinking. With --qmp: QEMU post-copy.
    #[arg(long, value_name = "N|auto", requires = "object", num_args = 0..=1, default_missing_value = "auto", value_parser = crate::postcopy_cmd::parse_after)]
    pub postcopy_after: Option<u32>,
    /// Post-copy: send requested pages over a second connection to --to
    /// (the urgent channel), so they overtake the background pages.
    #[arg(long, requires = "postcopy_after")]
    pub postcopy_preempt: bool,
    /// Post-copy: after a dropped connection, keep the source stopped with
    /// its pages and connect again for this long (after each drop).
    #[arg(long, default_value = "10s", value_parser = parse_interval)]
    pub reconnect_wait: Duration,
    /// Continue an interrupted transfer: pages the receiver (started with
    /// --resume) holds unchanged are not sent again.
    #[arg(long)]
    pub resume: bool,
    /// A QEMU VM's QMP socket (`-qmp unix:SOCKET,server=on,wait=off`): the
    /// VM is paused over it for the final pass (`x-ignore-shared` set),
    /// then migrated to `--qemu-migrate` once the receiver acknowledged
    /// the RAM; on failure it is continued.
    #[arg(long, value_name = "SOCKET", requires_all = ["qemu_migrate", "object"])]
    pub qmp: Option<PathBuf>,
    /// The destination QEMU's `migrate-incoming` URI (`tcp:HOST:PORT`,
    /// `unix:PATH`): where the source QEMU sends the device state.
    #[arg(long, value_name = "URI", requires = "qmp")]
    pub qemu_migrate: Option<String>,
}

/// Options of `pagescope receive`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["listen", "from"])))]
#[command(group(clap::ArgGroup::new("dest").required(true).args(["out", "into"])))]
pub struct ReceiveArgs {
    /// Listen on HOST:PORT for one sender (port 0: any; the address is
    /// printed on stderr).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// `-`: the stream on stdin, replies on stdout.
    #[arg(long, value_name = "-")]
    pub from: Option<String>,
    /// The image directory (new or empty).
    #[arg(short = 'o', long = "out")]
    pub out: Option<PathBuf>,
    /// One shared object's pages into this file (written as FILE.partial,
    /// renamed at commit).
    #[arg(long, value_name = "FILE")]
    pub into: Option<PathBuf>,
    /// Write into the existing FILE itself (a destination, e.g. QEMU
    /// `-incoming defer`, already maps it): FILE.incomplete exists until
    /// the commit, and exit status 0 says it is complete.
    #[arg(long, requires = "into", conflicts_with_all = ["out", "resume", "postcopy"])]
    pub in_place: bool,
    /// The pre-shared key the sender must prove (required to listen on a
    /// non-loopback address).
    #[arg(long, value_name = "FILE")]
    pub psk_file: Option<PathBuf>,
    /// The report as JSON on stdout (not with `--from -`).
    #[arg(long)]
    pub json: bool,
    /// Post-copy into process --pid, which maps FILE: it runs while the
    /// pages arrive, each first touch waits for its page.
    #[arg(long, requires_all = ["into", "pid"])]
    pub postcopy: bool,
    /// The post-copy destination process.
    #[arg(long, requires = "postcopy")]
    pub pid: Option<u32>,
    /// With --postcopy: the destination QEMU's QMP socket; the VM is
    /// continued (`cont`) as soon as its device state is in.
    #[arg(long, value_name = "SOCKET", requires = "pid")]
    pub qmp: Option<PathBuf>,
    /// Post-copy: after a dropped connection, wait this long for the
    /// sender to connect again (the destination's threads block
    /// meanwhile); then fail naming the pages that never arrived.
    #[arg(long, default_value = "10s", value_parser = parse_interval, requires = "postcopy")]
    pub reconnect_wait: Duration,
    /// Post-copy: hold at most this much of the pre-copy pages in memory
    /// until the switch (suffix K, M, G), the rest in a temporary file
    /// next to FILE.
    #[arg(long, default_value = "1G", value_parser = parse_rate, requires = "postcopy")]
    pub hold_in_memory: u64,
    /// Keep the partial state if the connection drops, and resume from
    /// the one an interrupted `receive --resume` kept.
    #[arg(long)]
    pub resume: bool,
}

fn parse_rate(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1 << 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("not a rate: {s} (e.g. 100M)"))
}

pub(crate) fn psk(path: Option<&PathBuf>, side: &str) -> Result<Option<Vec<u8>>> {
    path.map(|p| transfer::read_psk(p).map_err(|e| fail(side, &e)))
        .transpose()
}

pub fn send(args: &SendArgs) -> Result<u8> {
    let side = format!("send to {}", args.to);
    let key = psk(args.psk_file.as_ref(), &side)?;
    let caps = KernelCaps::probe();
    let target = Target::open(args.pid)?;
    let object = args
        .object
        .as_deref()
        .map(|o| match o.strip_prefix("memfd:") {
            Some(name) => ObjectChoice::Memfd(name.to_owned()),
            None => ObjectChoice::Path(o.into()),
        });
    let opts = SendOptions {
        dump: DumpOptions {
            max_downtime: Some(args.max_downtime),
            cancel: Some(crate::image_cmds::cancel_on_signals()?),
            ..args.passes.apply(DumpOptions::new(&args.to))
        },
        object,
        psk: key,
        bandwidth: args.bandwidth,
        pageout_sent: args.pageout_sent,
        postcopy_after: args.postcopy_after,
        resume: args.resume,
        postcopy_reconnect: (args.to != "-").then(|| transfer::postcopy::Reconnect {
            to: args.to.clone(),
            wait: args.reconnect_wait,
            preempt: args.postcopy_preempt,
        }),
    };
    let conn = if args.to == "-" {
        Conn::stdio()
    } else {
        Conn::connect(&args.to).map_err(|e| fail(&side, &e))?
    };
    // With `--to -` stdout is the stream: progress goes to stderr only.
    let mut out = SendOutput::new(args.json, args.json && args.to != "-");
    if let (Some(socket), Some(uri), Some(_)) = (&args.qmp, &args.qemu_migrate, args.postcopy_after)
    {
        let qemu = (target, caps, socket.as_path(), uri.as_str());
        return crate::postcopy_cmd::migrate(args, qemu, conn, &opts, &mut out);
    }
    if let (Some(socket), Some(uri)) = (&args.qmp, &args.qemu_migrate) {
        let migrated = migrate(args, &target, &caps, conn, &opts, (socket, uri), &mut |e| {
            out.event(e)
        });
        out.clear();
        let report = migrated?;
        sent_lines(args, &report.send)?;
        writeln!(
            std::io::stderr(),
            "migrated the VM to {uri}: paused {:.1} ms (RAM final pass and acknowledgement {:.1} ms); QEMU: downtime {} ms, total {} ms, {} bytes",
            report.stopped_ms,
            report.final_pass_ms,
            shown(report.migration.downtime_ms),
            shown(report.migration.total_time_ms),
            shown(report.migration.ram_transferred),
        )?;
        out.report(&report);
        return Ok(OK);
    }
    let result = transfer::send(&target, &caps, conn, &opts, &mut |e| out.event(e));
    out.clear();
    let report = result.map_err(|e| send_failed(args, e))?;
    sent_lines(args, &report)?;
    out.report(&report);
    Ok(OK)
}

/// `send --qmp SOCKET --qemu-migrate URI`.
fn migrate(
    args: &SendArgs,
    target: &Target,
    caps: &KernelCaps,
    conn: Conn,
    opts: &SendOptions,
    (socket, uri): (&Path, &str),
    progress: &mut dyn FnMut(transfer::SendEvent<'_>),
) -> Result<qemu::MigrateReport> {
    let not_migrated = || {
        format!(
            "QEMU migration of process {} to {uri} (the source VM was not handed over and runs)",
            args.pid
        )
    };
    let mut qmp = Qmp::connect(socket, QMP_TIMEOUT).with_context(not_migrated)?;
    let hand = HandOffOptions::new(uri);
    qemu::send_and_migrate(target, caps, conn, opts, &mut qmp, &hand, progress).map_err(|e| match e
    {
        MigrateError::Send(e) => send_failed(args, e).context(not_migrated()),
        MigrateError::NotContinued { .. } => {
            let m = format!(
                "QEMU migration of process {} to {uri}: {e} (it may be paused)",
                args.pid
            );
            CliError::new(OTHER, m).into()
        }
        e => anyhow::Error::new(e).context(not_migrated()),
    })
}

/// How long a QMP command may take.
pub(crate) const QMP_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) fn shown(v: Option<u64>) -> String {
    v.map_or_else(|| "?".to_owned(), |v| v.to_string())
}

pub(crate) fn send_failed(args: &SendArgs, e: SendError) -> anyhow::Error {
    match e {
        SendError::Transfer(e) => fail(&format!("send to {}", args.to), &e),
        SendError::Dump(e) => {
            anyhow::Error::new(e).context(format!("send of process {} to {}", args.pid, args.to))
        }
    }
}

/// The report's lines on stderr: what was sent, resume, swap, pageout,
/// post-copy.
pub(crate) fn sent_lines(args: &SendArgs, report: &SendReport) -> Result<()> {
    crate::transfer_resume::report_send(&report.resumed, args.resume)?;
    writeln!(
        std::io::stderr(),
        "sent process {} to {}: {} pages, {} bytes in {:.2} s over {} passes ({:.1} MiB/s); pre-copy {}; stopped {:.1} ms; receiver: {}",
        args.pid,
        args.to,
        report.pages_sent,
        report.bytes_sent,
        report.seconds,
        report.dump.iterations.len(),
        report.bandwidth_bytes_s / f64::from(1 << 20),
        report.precopy_end.text(),
        report.downtime_s * 1e3,
        report.receiver
    )?;
    swap_and_pageout_lines(report)?;
    crate::postcopy_cmd::sent(report.postcopy.as_ref())?;
    Ok(())
}

/// What the swap policy and `--pageout-sent` did, on stderr.
fn swap_and_pageout_lines(report: &transfer::SendReport) -> std::io::Result<()> {
    let mut err = std::io::stderr().lock();
    let swap = &report.dump.swap;
    let pageout_notes = report.pageout_sent.iter().flat_map(|p| &p.notes);
    for n in report
        .dump
        .notes
        .iter()
        .chain(&swap.notes)
        .chain(pageout_notes)
    {
        writeln!(err, "note: {n}")?;
    }
    for (class, c) in [("anonymous", &swap.anon), ("shmem", &swap.shmem)] {
        if c.swapped > 0 {
            let line = crate::image_cmds::swap_line(swap.policy.name(), class, c);
            writeln!(err, "{line}")?;
        }
    }
    if let Some(p) = &report.pageout_sent {
        writeln!(err, "{}", pageout_sent_line(p))?;
    }
    Ok(())
}

/// `--pageout-sent` in one line: what left RAM, why the rest stayed.
fn pageout_sent_line(p: &transfer::PageoutSentReport) -> String {
    let mut s = format!(
        "pageout-sent ({}): {} pages sent, {} of them in RAM: {} paged out, {} still in RAM",
        if p.source_stopped {
            "source left stopped"
        } else {
            "source running"
        },
        p.sent_pages,
        p.in_ram,
        p.paged_out,
        p.still_in_ram
    );
    let reasons = p.pageout.iter().flat_map(|r| &r.reasons);
    let why: Vec<String> = reasons
        .map(|(r, n)| format!("{n} {}", r.describe()))
        .collect();
    if !why.is_empty() {
        s.push_str(&format!(" ({})", why.join("; ")));
    }
    s
}

pub fn receive(args: &ReceiveArgs) -> Result<u8> {
    let addr = args.listen.clone().unwrap_or_else(|| "-".to_owned());
    let side = format!("receive on {addr}");
    if args.from.as_deref().is_some_and(|f| f != "-") {
        return Err(CliError::new(USAGE, "--from takes only `-` (stdin)".into()).into());
    }
    let key = psk(args.psk_file.as_ref(), &side)?;
    if let (true, Some(file), Some(pid)) = (args.postcopy, &args.into, args.pid) {
        return crate::postcopy_cmd::receive(args, file, pid, key, &side);
    }
    let into = match (&args.out, &args.into) {
        (Some(dir), _) => ReceiveInto::Image(dir.clone()),
        (None, Some(file)) if args.in_place => ReceiveInto::InPlace(file.clone()),
        (None, Some(file)) => ReceiveInto::File(file.clone()),
        (None, None) => unreachable!("clap requires -o or --into"),
    };
    crate::transfer_resume::prepare(&into, args.resume, &side)?;
    let conn = match &args.listen {
        Some(a) => accept(a, key.is_some(), &side)?,
        None => Conn::stdio(),
    };
    let opts = ReceiveOptions {
        into,
        psk: key,
        resume: args.resume,
    };
    let report = transfer::receive(conn, &opts).map_err(|e| fail(&side, &e))?;
    crate::transfer_resume::report_receive(&report)?;
    writeln!(
        std::io::stderr(),
        "received {} pages in {} records over {} passes: {}",
        report.pages,
        report.records,
        report.passes,
        report.committed
    )?;
    if args.json && args.listen.is_some() {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    }
    Ok(OK)
}

/// Listens on `addr` (refused without a key unless it is loopback) and
/// accepts one sender.
pub(crate) fn accept(addr: &str, keyed: bool, side: &str) -> Result<Conn> {
    accept_keeping(addr, keyed, side).map(|(conn, _)| conn)
}

/// [`accept`], keeping the listener (post-copy waits on it for the
/// sender to connect again after a drop).
pub(crate) fn accept_keeping(addr: &str, keyed: bool, side: &str) -> Result<(Conn, TcpListener)> {
    let loopback = transfer::is_loopback(addr).map_err(|e| fail(side, &e))?;
    if !loopback && !keyed {
        let m = format!(
            "{side}: listening on a non-loopback address needs --psk-file (anyone could push pages)"
        );
        return Err(CliError::new(AUTH, m).into());
    }
    let listener = TcpListener::bind(addr).with_context(|| format!("{side}: cannot listen"))?;
    let local = listener.local_addr()?;
    writeln!(std::io::stderr(), "pagescope: listening on {local}")?;
    let (stream, peer) = listener
        .accept()
        .with_context(|| format!("{side}: accept failed"))?;
    let conn = Conn::tcp(stream, &peer.to_string())
        .with_context(|| format!("{side}: connection set-up"))?;
    Ok((conn, listener))
}
