//! `map` and `top` over one or several processes (by PID, `--name`,
//! `--all`).

use std::io::Write;

use anyhow::Result;
use pagescope::render::{Glob, MapView};
use pagescope::{ErrorKind, KernelCaps, ProcessReport, ScanOptions, Target, scan_process};

use crate::cli::{ColumnArg, ScanArgs, Targets, UnitArgs, ViewArgs};
use crate::exit::{CliError, INCOMPLETE, OK, for_kind};

/// A process pagescope could not report on, and why.
pub struct Failed {
    pub pid: u32,
    pub kind: ErrorKind,
    pub reason: String,
}

/// The PIDs named: as given, every process, or those whose comm matches.
pub fn resolve(t: &Targets) -> Vec<u32> {
    if !t.all && t.name.is_none() {
        return t.pids.clone();
    }
    let me = std::process::id();
    let glob = t.name.as_deref().map(Glob::new);
    pagescope::pids()
        .into_iter()
        .filter(|&p| p != me)
        .filter(|&p| {
            glob.as_ref()
                .is_none_or(|g| comm_of(p).is_some_and(|c| g.matches(&c)))
        })
        .collect()
}

fn comm_of(pid: u32) -> Option<String> {
    let c = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(c.trim_end_matches('\n').to_owned())
}

/// Scans each PID; failures are collected, churn (exited, kernel thread)
/// dropped when `churn_is_normal`.
pub fn scan_all(
    pids: &[u32],
    opts: &ScanOptions,
    churn_is_normal: bool,
) -> (Vec<ProcessReport>, Vec<Failed>) {
    let caps = KernelCaps::probe();
    let mut reports = Vec::new();
    let mut failed = Vec::new();
    for &pid in pids {
        let result = Target::open(pid)
            .map_err(pagescope::ScanError::from)
            .and_then(|t| scan_process(&t, &caps, opts));
        match result {
            Ok(r) => reports.push(r),
            Err(e) => {
                let kind = e.kind();
                let churn = matches!(
                    kind,
                    ErrorKind::NoSuchProcess | ErrorKind::NoAddressSpace | ErrorKind::TargetExited
                );
                if !(churn && churn_is_normal) {
                    failed.push(Failed {
                        pid,
                        kind,
                        reason: e.to_string(),
                    });
                }
            }
        }
    }
    (reports, failed)
}

/// Fails like a single-process command when nothing could be examined;
/// otherwise lists the skipped processes on stderr and says whether the
/// result is incomplete.
pub fn finish(reports_len: usize, failed: &[Failed], all: bool) -> Result<u8> {
    if reports_len == 0 && !all {
        if let Some(f) = failed.first() {
            return Err(CliError::new(for_kind(f.kind), f.reason.clone()).into());
        }
        return Err(
            CliError::new(crate::exit::NO_SUCH_PROCESS, "no process matches".into()).into(),
        );
    }
    if failed.is_empty() {
        return Ok(OK);
    }
    eprintln!("pagescope: result incomplete, skipped {}", describe(failed));
    Ok(INCOMPLETE)
}

/// One line naming the skipped processes: each with its reason when
/// there are few, else grouped by kind (the JSON lists every reason).
fn describe(failed: &[Failed]) -> String {
    if failed.len() <= 3 {
        let each: Vec<String> = failed
            .iter()
            .map(|f| format!("process {} ({})", f.pid, f.reason))
            .collect();
        return each.join("; ");
    }
    let mut kinds: Vec<(ErrorKind, Vec<String>)> = Vec::new();
    for f in failed {
        match kinds.iter_mut().find(|(k, _)| *k == f.kind) {
            Some((_, pids)) => pids.push(f.pid.to_string()),
            None => kinds.push((f.kind, vec![f.pid.to_string()])),
        }
    }
    let groups: Vec<String> = kinds
        .iter()
        .map(|(k, pids)| format!("{} processes ({k:?}): {}", pids.len(), pids.join(", ")))
        .collect();
    groups.join("; ")
}

/// `pagescope map`.
#[allow(clippy::too_many_arguments)]
pub fn map(
    targets: &Targets,
    view: &ViewArgs,
    columns: &[ColumnArg],
    sort: Option<pagescope::render::MapColumn>,
    wide: bool,
    svg: Option<&std::path::Path>,
    scan: &ScanArgs,
) -> Result<u8> {
    let mut opts = crate::scanning::options(scan, None, false);
    opts.smaps = true;
    let mv = MapView {
        unit: view.units.unit(),
        columns: map_columns(columns),
        sort,
        max_width: (!wide).then_some(120),
        filter: view.filter(),
    };
    if let Some(pid) = targets.single() {
        let mut report = crate::scanning::scan_pid(pid, opts)?;
        mv.filter.apply(&mut report, false);
        if let Some(path) = svg {
            crate::svg_cmd::write(&[&report], path)?;
        }
        return crate::scanning::render(&report, scan.json, crate::scanning::Render::Map(&mv));
    }
    let pids = resolve(targets);
    let churn = targets.all || targets.name.is_some();
    let (mut reports, failed) = scan_all(&pids, &opts, churn);
    for r in &mut reports {
        mv.filter.apply(r, false);
    }
    if let Some(path) = svg {
        crate::svg_cmd::write(&reports.iter().collect::<Vec<_>>(), path)?;
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if scan.json {
        let docs: Vec<_> = reports.iter().map(|r| r.map_json()).collect();
        let skipped: Vec<_> = failed
            .iter()
            .map(|f| serde_json::json!({"pid": f.pid, "reason": f.reason}))
            .collect();
        let doc = serde_json::json!({"processes": docs, "skipped": skipped});
        serde_json::to_writer(&mut out, &doc)?;
        writeln!(out)?;
    } else {
        for (i, r) in reports.iter().enumerate() {
            if i > 0 {
                writeln!(out)?;
            }
            mv.write(r, &mut out)?;
        }
    }
    out.flush()?;
    let incomplete = reports.iter().any(|r| !r.complete());
    match finish(reports.len(), &failed, targets.all)? {
        OK if incomplete => {
            eprintln!("pagescope: result incomplete, ranges skipped (listed in the output)");
            Ok(INCOMPLETE)
        }
        code => Ok(code),
    }
}

fn map_columns(columns: &[ColumnArg]) -> Vec<pagescope::render::MapColumn> {
    use pagescope::render::MapColumn;
    if columns.is_empty() {
        return MapColumn::DEFAULT.to_vec();
    }
    let mut out = Vec::new();
    for c in columns {
        let add = match c {
            ColumnArg::All => MapColumn::selectable(),
            ColumnArg::One(c) => vec![*c],
        };
        for c in add {
            if !out.contains(&c) {
                out.push(c);
            }
        }
    }
    out
}

/// `pagescope top`.
pub fn top(
    pids: &[u32],
    name: Option<&str>,
    sort: pagescope::render::TopColumn,
    limit: Option<u64>,
    units: &UnitArgs,
    json: bool,
) -> Result<u8> {
    let opts = ScanOptions {
        smaps: true,
        swap_detail: true,
        objects: true,
        skip_exclusive: true,
        ..ScanOptions::default()
    };
    // Every process is scanned: a shared page is divided among all its
    // holders, whichever are shown.
    let all = resolve(&Targets {
        pids: Vec::new(),
        name: None,
        all: true,
    });
    let (reports, failed) = scan_all(&all, &opts, true);
    let mut sums = pagescope::render::summarize(&reports);
    let glob = name.map(Glob::new);
    sums.retain(|s| {
        (pids.is_empty() || pids.contains(&s.pid))
            && glob.as_ref().is_none_or(|g| g.matches(&s.comm))
    });
    // PIDs asked for but not scanned: the reason their scan failed, or
    // gone (exited, kernel thread).
    let mut failed = failed;
    for &p in pids.iter().filter(|p| !sums.iter().any(|s| s.pid == **p)) {
        if !failed.iter().any(|f| f.pid == p) {
            failed.push(Failed {
                pid: p,
                kind: ErrorKind::NoSuchProcess,
                reason: format!("process {p}: no such process, or it has no address space"),
            });
        }
    }
    // With a selection, only a selected process that could not be read
    // makes the result incomplete; other unreadable processes only make
    // the division of shared memory less precise (a note).
    let mut notes = Vec::new();
    if !pids.is_empty() || glob.is_some() {
        let selected = |pid: u32| {
            pids.contains(&pid)
                || glob.as_ref().is_some_and(|g| {
                    let comm =
                        std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                    g.matches(comm.trim_end())
                })
        };
        let (mine, others): (Vec<Failed>, Vec<Failed>) =
            failed.into_iter().partition(|f| selected(f.pid));
        if !others.is_empty() {
            notes.push(format!(
                "{} other process(es) could not be read ({}): shared memory they hold is divided among the readable holders only, so shared shares are approximate",
                others.len(),
                others
                    .iter()
                    .take(8)
                    .map(|f| f.pid.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        failed = mine;
    }
    for n in &notes {
        eprintln!("note: {n}");
    }
    sort.sort(&mut sums);
    if let Some(n) = limit {
        sums.truncate(n as usize);
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let whole_bytes = pagescope::render::whole_bytes;
    if json {
        let rows: Vec<_> = sums
            .iter()
            .map(|s| {
                serde_json::json!({
                    "pid": s.pid, "comm": s.comm, "rss_bytes": s.rss, "pss_bytes": s.pss,
                    "swap_bytes": whole_bytes(s.swap),
                    "shmem_swap_bytes": whole_bytes(s.shmem_swap),
                    "unmapped_bytes": whole_bytes(s.unmapped),
                })
            })
            .collect();
        let skipped: Vec<_> = failed
            .iter()
            .map(|f| serde_json::json!({"pid": f.pid, "reason": f.reason}))
            .collect();
        serde_json::to_writer(
            &mut out,
            &serde_json::json!({"processes": rows, "skipped": skipped, "notes": notes}),
        )?;
        writeln!(out)?;
    } else {
        pagescope::render::write_top(&sums, units.unit(), sort, &mut out)?;
    }
    out.flush()?;
    finish(sums.len(), &failed, pids.is_empty())
}
