//! pagescope benchmarks: every result is a ratio against a baseline run in
//! the same process, on the same target, in the same minute.
//!
//! `cargo run --release -p pagescope-bench -- scan` reproduces the table in
//! BENCHMARKS.md ("Whole-process scan"). The target is the fixture's
//! `bench` layout, started by this binary itself (`pagescope-bench fixture
//! ...` runs the fixture).

mod baseline;
mod dirty;
mod dump;
mod exporter;
mod move_floor;
mod objects;
mod scan;
mod sharers;
mod swap;
mod util;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("fixture") => pagescope_fixture::serve(&args[1..]),
        Some("scan") => report(scan::run(&args[1..])),
        Some("objects") => report(objects::run(&args[1..])),
        Some("dirty") => report(dirty::run(&args[1..])),
        Some("sharers") => report(sharers::run(&args[1..])),
        Some("dump") => report(dump::run(&args[1..])),
        Some("swap") => report(swap::run(&args[1..])),
        Some("exporter") => report(exporter::run(&args[1..])),
        Some("move-floor") => report(move_floor::run(&args[1..])),
        _ => {
            eprintln!(
                "usage: pagescope-bench scan [--sparse-gib N] [--dense-gib N] [--reps N]\n       pagescope-bench objects [--shmem-gib N] [--sharers N] [--reps N]\n       pagescope-bench dirty [--gib N] [--reps N]\n       pagescope-bench sharers [--gib N] [--reps N]\n       pagescope-bench dump [--gib N] [--incremental-only] [--reps N]\n       pagescope-bench swap [--gib N] [--swapped-gib N]\n       pagescope-bench exporter [--small N] [--large N] [--reps N]\n       pagescope-bench move-floor PID ADDR BYTES OUT [--sums] [--local | --mmap]"
            );
            ExitCode::from(2)
        }
    }
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pagescope-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
