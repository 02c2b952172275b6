//! `pagescope`: a thin command-line layer over the pagescope library.
//!
//! Parses arguments (clap), calls one library entry point per subcommand,
//! renders the result and turns errors into the documented exit codes
//! (`docs/json.md`, "Exit codes").

mod cli;
mod commands;
mod exit;
mod exporter_cmd;
mod image_cmds;
mod listing;
mod pageout_cmd;
mod postcopy_cmd;
mod progress;
mod scanning;
mod screen;
mod signals;
mod svg_cmd;
mod transfer_cmd;
mod transfer_resume;
mod verify_cmd;
mod watch;
mod watch_view;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match commands::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "pagescope: {e:#}");
            ExitCode::from(exit::code_of(&e))
        }
    }
}

/// A closed stdout, whether a write failed directly or inside the JSON
/// encoder (`serde_json::Error` wraps the I/O error it met).
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        let kind = c
            .downcast_ref::<std::io::Error>()
            .map(std::io::Error::kind)
            .or_else(|| c.downcast_ref::<serde_json::Error>()?.io_error_kind());
        kind == Some(std::io::ErrorKind::BrokenPipe)
    })
}
