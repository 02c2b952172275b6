//! `pagescope`: a thin command-line layer over the pagescope library.
//!
//! Parses arguments (clap), calls one library entry point per subcommand,
//! renders the result and turns errors into the documented exit codes
//! (`docs/json.md`, "Exit codes").

mod cli;
mod commands;
mod watch;
mod watch_view;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    if let cli::Command::Fixture { args } = &cli.command {
        pagescope_fixture::serve(args);
    }
    match commands::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "pagescope: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}

/// The exit code of the first library error in the chain (1 if none).
fn exit_code(e: &anyhow::Error) -> u8 {
    let kind = e.chain().find_map(|c| {
        c.downcast_ref::<pagescope::ScanError>()
            .map(|e| e.kind())
            .or_else(|| c.downcast_ref::<pagescope::ProcError>().map(|e| e.kind()))
            .or_else(|| {
                c.downcast_ref::<pagescope::uffd::UffdError>()
                    .map(|e| e.kind())
            })
            .or_else(|| {
                c.downcast_ref::<pagescope::dirty::TrackError>()
                    .map(|e| e.kind())
            })
    });
    kind.map_or(1, |k| u8::try_from(k.exit_code()).unwrap_or(1))
}
