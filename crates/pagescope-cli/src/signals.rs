//! Termination signals (SIGINT, SIGTERM, SIGHUP) as a flag the command
//! polls: `watch` and `exporter` detach and exit cleanly, `dump` stops its
//! passes (`image_cmds.rs`, which also ends pagescope at a second signal).

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

/// Sets `flag` when SIGINT, SIGTERM or SIGHUP arrives.
pub fn stop_on_termination(flag: &Arc<AtomicBool>) -> std::io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    for sig in [SIGINT, SIGTERM, SIGHUP] {
        signal_hook::flag::register(sig, Arc::clone(flag))?;
    }
    Ok(())
}
