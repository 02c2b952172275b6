//! One function per subcommand: build library options, call, render.

use std::io::Write;

use anyhow::{Context, Result};
use pagescope::{KernelCaps, PageState, ScanOptions, Target, VirtRange, scan_process};
use pagescope_fixture::FixtureProcess;

use crate::cli::{Cli, Command};
use crate::scanning::{Render, options, render, scan_pid};

use crate::exit::{INCOMPLETE, OK};

pub fn run(cli: Cli) -> Result<u8> {
    match cli.command {
        Command::Map {
            targets,
            view,
            columns,
            sort,
            wide,
            svg,
            scan,
        } => crate::listing::map(&targets, &view, &columns, sort, wide, svg.as_deref(), &scan),
        Command::Top {
            pids,
            name,
            sort,
            limit,
            units,
            json,
        } => crate::listing::top(&pids, name.as_deref(), sort, limit, &units, json),
        Command::Pages {
            pid,
            range,
            swap_detail,
            view,
            scan,
        } => {
            let range = range.map(|r| parse_range(pid, &r)).transpose()?;
            let mut report = scan_pid(pid, options(&scan, range, swap_detail))?;
            view.filter().apply(&mut report, true);
            render(&report, scan.json, Render::Pages(view.units.unit()))
        }
        Command::Objects {
            targets,
            files,
            ranges,
            view,
            json,
        } => objects(&targets, files, ranges, &view, json),
        Command::Watch(args) => crate::watch::run(&args),
        Command::Dump(args) => crate::image_cmds::dump(&args),
        Command::Exporter(args) => crate::exporter_cmd::run(&args),
        Command::Send(args) => crate::transfer_cmd::send(&args),
        Command::Receive(args) => crate::transfer_cmd::receive(&args),
        Command::Image { command } => crate::image_cmds::image(command),
        Command::Verify {
            dir,
            pid,
            json,
            limit,
        } => crate::verify_cmd::verify(&dir, pid, json, limit),
        Command::Restore { dir, to, json } => crate::image_cmds::restore(&dir, &to, json),
        Command::Pageout {
            pid,
            range,
            state,
            json,
        } => {
            let range = range.map(|r| parse_range(pid, &r)).transpose()?;
            crate::pageout_cmd::run(pid, range, &state, json)
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "pagescope", &mut std::io::stdout().lock());
            Ok(OK)
        }
        Command::Manpage => {
            let cmd = <Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(cmd).render(&mut std::io::stdout().lock())?;
            Ok(OK)
        }
        Command::Kernel { json } => kernel(json),
        Command::Demo { json, backend, svg } => demo(json, backend.into(), svg.as_deref()),
    }
}

fn parse_range(pid: u32, s: &str) -> Result<VirtRange> {
    s.parse::<VirtRange>().map_err(|e| {
        anyhow::Error::new(pagescope::ScanError::MalformedRange {
            pid,
            text: s.to_owned(),
            why: e.to_string(),
        })
    })
}

fn objects(
    targets: &crate::cli::Targets,
    files: bool,
    ranges: bool,
    view: &crate::cli::ViewArgs,
    json: bool,
) -> Result<u8> {
    use pagescope::ErrorKind;
    use pagescope::object::ObjectsOptions;
    let caps = KernelCaps::probe();
    let pids = crate::listing::resolve(targets);
    let all = targets.all || targets.name.is_some();
    let mut report = pagescope::objects_view(
        &pids,
        &caps,
        &ObjectsOptions {
            private_files: files,
        },
    );
    if all {
        // Processes that exited meanwhile or are kernel threads have no
        // objects: normal churn, not a gap in the answer.
        report.skipped.retain(|s| {
            !matches!(
                s.kind,
                ErrorKind::NoSuchProcess | ErrorKind::NoAddressSpace | ErrorKind::TargetExited
            )
        });
    } else if report.skipped.len() == pids.len() || pids.is_empty() {
        // Nothing could be examined: that is the error, with its exit code.
        if let Some(first) = report.skipped.first() {
            return Err(crate::exit::CliError::new(
                crate::exit::for_kind(first.kind),
                first.reason.clone(),
            )
            .into());
        }
    }
    view.filter().apply_objects(&mut report);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if json {
        serde_json::to_writer(&mut out, &report.json(ranges))?;
        writeln!(out)?;
    } else {
        report.write_text(view.units.unit(), &mut out)?;
    }
    out.flush()?;
    if report.complete() {
        return Ok(OK);
    }
    let what: Vec<String> = report
        .skipped
        .iter()
        .map(|s| format!("process {}", s.pid))
        .chain(
            report
                .objects
                .iter()
                .filter(|o| o.error.is_some())
                .map(|o| format!("object {}", o.path)),
        )
        .collect();
    eprintln!(
        "pagescope: result incomplete, skipped {} (listed in the output)",
        what.join(", ")
    );
    Ok(INCOMPLETE)
}

fn kernel(json: bool) -> Result<u8> {
    let caps = KernelCaps::probe();
    let mut out = std::io::stdout().lock();
    if json {
        let doc = serde_json::json!({ "caps": &caps, "features": caps.features(), "swaps": swaps_json(&caps) });
        serde_json::to_writer_pretty(&mut out, &doc)?;
        writeln!(out)?;
        return Ok(OK);
    }
    writeln!(
        out,
        "kernel {} (page size {} B)",
        caps.release, caps.page_size
    )?;
    for f in caps.features() {
        let mark = if f.available { "yes" } else { "NO " };
        writeln!(out, "  [{mark}] {:<40} requires: {}", f.name, f.requires)?;
        if !f.available {
            writeln!(out, "        without it: {}", f.without)?;
        }
    }
    if let Some(cats) = caps.pagemap_scan {
        let names: Vec<_> = cats
            .iter_names()
            .map(|(n, _)| n.to_ascii_lowercase())
            .collect();
        writeln!(out, "  PAGEMAP_SCAN categories: {}", names.join(" "))?;
    }
    if let Some(u) = caps.uffd {
        writeln!(
            out,
            "  userfaultfd features: {:#x}{}",
            u.features,
            if u.user_mode_only {
                " (user-mode only)"
            } else {
                ""
            }
        )?;
    }
    writeln!(
        out,
        "  THP: {}",
        caps.thp_mode.as_deref().unwrap_or("unavailable")
    )?;
    if caps.swaps.is_empty() {
        writeln!(out, "  swap: none active")?;
    }
    for (ty, d) in caps.swaps.devices().iter().enumerate() {
        writeln!(
            out,
            "  swap type {ty}: {} ({}, {} kB, priority {})",
            d.display_path(),
            d.kind,
            d.size_kb,
            d.priority
        )?;
    }
    Ok(OK)
}

fn swaps_json(caps: &KernelCaps) -> serde_json::Value {
    caps.swaps
        .devices()
        .iter()
        .map(|d| serde_json::json!({"path": d.display_path(), "kind": d.kind, "size_kb": d.size_kb, "priority": d.priority}))
        .collect()
}

fn demo(
    json: bool,
    backend: pagescope::BackendChoice,
    svg: Option<&std::path::Path>,
) -> Result<u8> {
    let exe = FixtureProcess::locate().context("pagescope demo needs its fixture")?;
    let fixture = FixtureProcess::spawn(&exe, &["demo"])
        .with_context(|| format!("cannot start the demo fixture {}", exe.display()))?;
    let caps = KernelCaps::probe();
    let target = Target::open(fixture.pid())?;
    let opts = ScanOptions {
        backend,
        objects: true,
        smaps: true,
        ..ScanOptions::default()
    };
    let report = scan_process(&target, &caps, &opts)?;
    if let Some(path) = svg {
        crate::svg_cmd::write(&[&report], path)?;
    }
    if json {
        return render(
            &report,
            true,
            Render::Pages(pagescope::render::SizeUnit::Kib),
        );
    }
    let truth = fixture.truth();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "pagescope demo: fixture process {} (backend {})\n",
        fixture.pid(),
        report.backend
    )?;
    // The fixture shows off page states: their columns instead of Pss
    // (Rss is what is present).
    use pagescope::render::{MapColumn, MapView};
    let states = [
        PageState::Zero,
        PageState::Swapped,
        PageState::SwapCache,
        PageState::Resident,
        PageState::Fallocated,
        PageState::Hole,
        PageState::Guard,
    ];
    let view = MapView {
        columns: [MapColumn::Size, MapColumn::Rss, MapColumn::Swap]
            .into_iter()
            .chain(states.map(MapColumn::State))
            .collect(),
        ..MapView::default()
    };
    view.write(&report, &mut out)?;
    writeln!(
        out,
        "\nfixture regions, checked page by page against the fixture's ground truth:"
    )?;
    for region in &truth.regions {
        let range = VirtRange::from_start_len(
            pagescope::VirtAddr::new(region.start),
            region.pages * truth.page_size,
        )
        .unwrap_or_default();
        let verdict = match &region.skip {
            Some(why) => format!("not checked: {why}"),
            None => match pagescope_fixture::check::check_region(truth, region, &report).as_slice()
            {
                [] => "matches".to_owned(),
                [first, ..] => format!("MISMATCH: {first}"),
            },
        };
        writeln!(
            out,
            "  {:<16} {range} {:>7} pages  {}",
            region.name, region.pages, verdict
        )?;
        for (_, run) in report.runs().filter(|(_, r)| range.contains(r.start)) {
            let flags: Vec<_> = run.flags.names().collect();
            writeln!(
                out,
                "      {} {:>6} {:<12} {}",
                run.range(report.page_size),
                run.pages,
                run.state,
                flags.join(",")
            )?;
        }
    }
    for s in &truth.skipped {
        writeln!(out, "  scenario {} not built: {}", s.scenario, s.reason)?;
    }
    Ok(if report.complete() { OK } else { INCOMPLETE })
}
