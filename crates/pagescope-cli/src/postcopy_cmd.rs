//! `receive --into FILE --postcopy --pid DEST`, the post-copy line of
//! `send --postcopy-after N` (`docs/stream-format.md`, "Post-copy"), and
//! QEMU post-copy: `send --qmp SOCKET --qemu-migrate URI --postcopy-after
//! N|auto` (`docs/qemu.md`).

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use pagescope::qemu::{self, HandOffOptions, MigrateError, PostcopyMigrateError, Qmp};
use pagescope::transfer::postcopy::{self, Destination, PostcopySendStats};
use pagescope::transfer::{Class, Conn, SendOptions, TransferError};
use pagescope::{KernelCaps, Target};

use crate::exit::{CliError, OK, OTHER};
use crate::progress::SendOutput;
use crate::transfer_cmd::{
    DESTINATION, QMP_TIMEOUT, ReceiveArgs, SendArgs, accept_keeping, fail, send_failed, sent_lines,
    shown,
};

/// Registers DEST's mappings of FILE before listening (so the destination
/// may run as soon as the address is printed), then receives.
pub fn receive(
    args: &ReceiveArgs,
    file: &Path,
    pid: u32,
    key: Option<Vec<u8>>,
    side: &str,
) -> Result<u8> {
    let page = rustix::param::page_size() as u64;
    let dest = Destination::attach(file, pid, page).map(|d| d.hold_in_memory(args.hold_in_memory));
    let dest = dest.map_err(|m| {
        let e = TransferError::new(Class::Destination, "", m);
        fail(side, &e)
    })?;
    if let Some(socket) = &args.qmp {
        continue_destination(socket, pid)?;
    }
    let report = match &args.listen {
        Some(a) => {
            let (conn, listener) = accept_keeping(a, key.is_some(), side)?;
            let rejoin = postcopy::Rejoin {
                listener,
                wait: args.reconnect_wait,
            };
            postcopy::receive_rejoining(conn, key.as_deref(), dest, rejoin)
        }
        None => postcopy::receive(Conn::stdio(), key.as_deref(), dest),
    }
    .map_err(|e| fail(side, &e))?;
    let s = &report.stats;
    writeln!(
        std::io::stderr(),
        "received {} pages in {} records over {} passes: {}; post-copy {:.2} s, {} pages pending at the switch: {} by fault, {} in the background ({} already present), {} faults, fault wait p50 {:.0} us p99 {:.0} us; {} reconnects",
        report.pages,
        report.records,
        report.passes,
        report.committed,
        report.postcopy_seconds,
        report.pending_at_switch,
        s.pages_by_fault,
        s.pages_background,
        s.pages_already_present,
        s.faults,
        s.fault_latency_p50_us,
        s.fault_latency_p99_us,
        report.reconnects
    )?;
    if args.json && args.listen.is_some() {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    }
    if s.pages_already_present > 0 {
        return Err(CliError::new(
            DESTINATION,
            format!(
                "receive: {} pages of {} were already filled when pagescope came to install them (page offsets {:?}{}): the destination may have read zeros there (a mapping of it not registered yet, or a write to it)",
                s.pages_already_present,
                args.into.as_deref().map_or("FILE".into(), |p| p.display().to_string()),
                s.already_present_pages,
                if s.pages_already_present as usize > s.already_present_pages.len() { ", …" } else { "" },
            ),
        )
        .into());
    }
    Ok(OK)
}

/// `receive --postcopy --qmp SOCKET`: a thread continues the
/// destination QEMU as soon as its device state is in.
fn continue_destination(socket: &Path, pid: u32) -> Result<()> {
    let mut qmp = Qmp::connect(socket, QMP_TIMEOUT)
        .with_context(|| format!("the destination QEMU {pid}'s QMP socket"))?;
    std::thread::spawn(move || {
        let t0 = std::time::Instant::now();
        let line = match qemu::continue_when_migrated(&mut qmp, DEVICE_STATE_WAIT) {
            Ok(_) => format!(
                "pagescope: destination VM {pid} continued (device state in after {:.2} s)",
                t0.elapsed().as_secs_f64()
            ),
            Err(e) => format!("pagescope: destination VM {pid} not continued: {e}"),
        };
        let _ = writeln!(std::io::stderr(), "{line}");
    });
    Ok(())
}

/// How long the destination may wait for its device state (the pre-copy
/// passes come first).
const DEVICE_STATE_WAIT: std::time::Duration = std::time::Duration::from_secs(3600);

/// The post-copy line of a send's report.
pub fn sent(pc: Option<&PostcopySendStats>) -> Result<()> {
    if let Some(pc) = pc {
        writeln!(
            std::io::stderr(),
            "post-copy: {} pages kept at the stop, {} sent on request ({} requests), {} in order, {:.2} s; {} reconnects, {} pages sent again",
            pc.pending_at_switch,
            pc.pages_requested,
            pc.requests,
            pc.pages_background,
            pc.seconds,
            pc.reconnects,
            pc.pages_resent
        )?;
    }
    Ok(())
}

/// `--postcopy-after N|auto`: `auto` is "as many as --max-iterations
/// allows" (the switch comes when the written set stops shrinking).
pub fn parse_after(s: &str) -> Result<u32, String> {
    match s {
        "auto" => Ok(u32::MAX),
        n => n
            .parse()
            .map_err(|_| format!("not a number of passes or `auto`: {n}")),
    }
}

/// `send --qmp SOCKET --qemu-migrate URI --postcopy-after N`: QEMU
/// post-copy (`pagescope::qemu::send_and_migrate_postcopy`).
pub fn migrate(
    args: &SendArgs,
    (target, caps, socket, uri): (Target, KernelCaps, &Path, &str),
    conn: Conn,
    opts: &SendOptions,
    out: &mut SendOutput,
) -> Result<u8> {
    let pid = args.pid;
    let not_migrated = || {
        format!(
            "QEMU post-copy of process {pid} to {uri} (the source VM was not handed over and runs)"
        )
    };
    let mut qmp = Qmp::connect(socket, QMP_TIMEOUT).with_context(not_migrated)?;
    let hand = HandOffOptions::new(uri);
    let migrated =
        qemu::send_and_migrate_postcopy(&target, &caps, conn, opts, &mut qmp, &hand, &mut |e| {
            out.event(e)
        });
    out.clear();
    let report = migrated.map_err(|e| match e {
        PostcopyMigrateError::Migrate(MigrateError::Send(e)) => {
            send_failed(args, e).context(not_migrated())
        }
        PostcopyMigrateError::Migrate(e @ MigrateError::NotContinued { .. }) => {
            let m = format!("QEMU post-copy of process {pid} to {uri}: {e} (it may be paused)");
            CliError::new(OTHER, m).into()
        }
        PostcopyMigrateError::Migrate(e) => anyhow::Error::new(e).context(not_migrated()),
        e => {
            let m = format!("QEMU post-copy of process {pid} to {uri}: {e}");
            CliError::new(OTHER, m).into()
        }
    })?;
    sent_lines(args, &report.send)?;
    writeln!(
        std::io::stderr(),
        "migrated the VM to {uri} with post-copy: stopped to switch {:.1} ms, to the device state's arrival (downtime) {:.1} ms, to the receiver's acknowledgement {:.1} ms; QEMU: downtime {} ms, total {} ms, {} bytes",
        report.switch_ms,
        report.downtime_ms,
        report.held_ms,
        shown(report.migration.downtime_ms),
        shown(report.migration.total_time_ms),
        shown(report.migration.ram_transferred),
    )?;
    out.report(&report);
    Ok(OK)
}
