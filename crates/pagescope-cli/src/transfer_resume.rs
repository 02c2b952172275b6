//! `--resume` of `send` and `receive`: what the receiver's output holds
//! before it listens, and what resuming spared, on stderr
//! (`docs/stream-format.md`, "Resume").

use std::io::Write;

use anyhow::Result;
use pagescope::transfer::{self, ReceiveInto, ReceiveReport, Resumed};

use crate::exit::{CliError, USAGE};

/// Before `receive` listens: an image directory must be new, empty, or an
/// interrupted resumable receive's (kept with `--resume`, discarded
/// without, with a note).
pub fn prepare(into: &ReceiveInto, resume: bool, side: &str) -> Result<()> {
    match transfer::prepare_receive(into, resume) {
        Ok(Some(note)) => writeln!(std::io::stderr(), "pagescope: note: {note}")?,
        Ok(None) => {}
        Err(m) => return Err(CliError::new(USAGE, format!("{side}: {m}")).into()),
    }
    Ok(())
}

/// `send --resume`'s line: pages the receiver held and kept, or why none.
pub fn report_send(r: &Resumed, asked: bool) -> Result<()> {
    let mut err = std::io::stderr();
    if let Some(note) = &r.note {
        writeln!(err, "pagescope: note: {note}")?;
    } else if asked || r.pages_kept > 0 {
        writeln!(
            err,
            "resumed: the receiver held {} pages, {} of them unchanged were not sent again",
            r.pages_held, r.pages_kept
        )?;
    }
    Ok(())
}

/// `receive --resume`'s line: what became of the partial state.
pub fn report_receive(r: &ReceiveReport) -> Result<()> {
    let mut err = std::io::stderr();
    if let Some(note) = &r.note {
        writeln!(err, "pagescope: note: {note}")?;
    }
    if r.held > 0 {
        writeln!(
            err,
            "resumed: {} pages held from the interrupted transfer, {} kept",
            r.held, r.kept
        )?;
    }
    Ok(())
}
