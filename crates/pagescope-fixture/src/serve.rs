//! The fixture process itself: build, report, serve commands.

use std::io::{BufRead, Write};

use crate::scenarios::{self, Fixture};

/// Runs the fixture with command-line `args` (scenario names, `--churn`,
/// `--dir PATH`, `--size-mib N`); never returns.
pub fn serve(args: &[String]) -> ! {
    crate::sys::keep_heap();
    let mut fx = Fixture::new(args);
    let names = fx.scenario_names(args);
    for name in &names {
        fx.build(name);
    }
    fx.finish();
    if let Some(what) = args
        .iter()
        .position(|a| a == "--deny-uffd")
        .and_then(|i| args.get(i + 1))
    {
        if let Err(e) = crate::sys::deny_userfaultfd(what == "all") {
            eprintln!("fixture: cannot install the seccomp filter: {e}");
            std::process::exit(1);
        }
    }
    if args.iter().any(|a| a == "--churn") {
        scenarios::start_churn();
    }
    // Standard input's buffer is allocated on first use: take it before the
    // ground truth is printed, so the process's memory is settled by the
    // time a test reads "ready" (allocating it afterwards put a new heap
    // page in between a test's two scans).
    let stdin = std::io::stdin();
    emit(&fx);
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let reply = match line.trim() {
            "exit" | "" => break,
            "truth" => serde_json::to_string(fx.truth()).unwrap_or_default(),
            "ping" => "pong".to_owned(),
            cmd => fx.command(cmd).unwrap_or_else(|e| format!("error: {e}")),
        };
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{reply}");
        let _ = out.flush();
    }
    fx.cleanup();
    std::process::exit(0)
}

fn emit(fx: &Fixture) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{}",
        serde_json::to_string(fx.truth()).unwrap_or_default()
    );
    let _ = out.flush();
}
