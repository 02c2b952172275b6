//! `receive --into FILE --postcopy --pid DEST` and the post-copy line of
//! `send --postcopy-after N` (`docs/stream-format.md`, "Post-copy").

use std::io::Write;
use std::path::Path;

use anyhow::Result;
use pagescope::transfer::postcopy::{self, Destination, PostcopySendStats};
use pagescope::transfer::{Class, Conn, TransferError};

use crate::exit::OK;
use crate::transfer_cmd::{ReceiveArgs, accept_keeping, fail};

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
    Ok(OK)
}

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
