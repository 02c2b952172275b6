//! The other writers of a dump's shared memory. Stopping the dumped
//! processes does not stop a PostgreSQL backend or a pre-fork server's
//! child from writing the segment they share while the final pass copies
//! it: by default ([`DumpOptions::stop_sharers`](super::DumpOptions)) every
//! process that maps a dumped shared object writable is stopped too, the
//! same invisible way (`PTRACE_SEIZE` + `PTRACE_INTERRUPT`, see
//! [`super::stop`]), for the final pass, and let go with the dumped ones
//! (or left stopped with them: `leave_stopped`). Processes that could not
//! be stopped, or all of them with `--no-stop-sharers`, are named in the
//! report with the objects whose image is therefore not a consistent
//! snapshot.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::Serialize;

use super::stop::Stopped;
use crate::dirty::sharers::MapsSnapshot;
use crate::proc::Target;
use crate::proc::maps::MapsEntry;
use crate::vma::ObjectId;

/// Rounds of "stop the writers, look again" before giving up on
/// processes that keep appearing (a writer forking as it is stopped).
const ROUNDS: usize = 20;

/// Other processes writing the dumped shared memory, and what the dump
/// did about them.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SharedWriters {
    /// Whether other writers were stopped for the final pass.
    pub stop_sharers: bool,
    /// Every other process that mapped a dumped shared object writable
    /// during the final pass.
    pub writers: Vec<SharedWriter>,
    /// Objects whose image is not a consistent snapshot: a process that
    /// was not stopped could write them while they were copied.
    pub inconsistent: Vec<InconsistentObject>,
}

/// One other writer.
#[derive(Clone, Debug, Serialize)]
pub struct SharedWriter {
    /// The process.
    pub pid: u32,
    /// Whether it was stopped for the final pass.
    pub stopped: bool,
    /// Why not, if it was not.
    pub why_not: Option<String>,
    /// The dumped objects it maps writable (paths).
    pub objects: Vec<String>,
}

/// A shared object copied while another process could write it.
#[derive(Clone, Debug, Serialize)]
pub struct InconsistentObject {
    /// Its path as the dumped process maps it.
    pub path: String,
    /// The processes that were not stopped.
    pub writers: Vec<u32>,
}

/// The shared objects `procs` map, with a path each.
fn watched(procs: &[&Target]) -> HashMap<ObjectId, String> {
    let mut out = HashMap::new();
    for t in procs {
        let Ok(layout) = crate::inspect::read_layout(t, false) else {
            continue;
        };
        for v in layout.iter().filter(|v| v.is_shared()) {
            if let Some(id) = v.object_id() {
                out.entry(id).or_insert_with(|| v.path.display());
            }
        }
    }
    out
}

/// Finds the other writers of the shared objects `procs` map (already
/// stopped) and, with `stop`, stops them too, until no new one appears.
/// Returns the stopped processes (to resume with the dumped ones) and the
/// report.
pub(super) fn stop_writers(procs: &[&Target], stop: bool) -> (Vec<Stopped>, SharedWriters) {
    let objects = watched(procs);
    let mut report = SharedWriters {
        stop_sharers: stop,
        ..SharedWriters::default()
    };
    let mut stopped = Vec::new();
    if objects.is_empty() || procs.is_empty() {
        return (stopped, report);
    }
    let ids: HashSet<ObjectId> = objects.keys().copied().collect();
    let dumped: HashSet<u32> = procs.iter().map(|t| t.pid()).collect();
    let mut seen: BTreeSet<u32> = BTreeSet::new();
    let mut writes: BTreeMap<u32, Vec<ObjectId>> = BTreeMap::new();
    for _ in 0..ROUNDS {
        let snap = MapsSnapshot::take(procs[0].pid(), &ids);
        let mut new = 0;
        for (pid, entries) in snap.by_pid {
            if dumped.contains(&pid) || seen.contains(&pid) {
                continue;
            }
            let mine = written_objects(&entries);
            if mine.is_empty() {
                continue;
            }
            seen.insert(pid);
            new += 1;
            let why_not = match stop_one(pid, stop) {
                Ok(s) => {
                    stopped.push(s);
                    None
                }
                Err(e) => Some(e),
            };
            let ok = why_not.is_none();
            let mut paths: Vec<String> = mine.iter().map(|o| objects[o].clone()).collect();
            paths.sort();
            paths.dedup();
            report.writers.push(SharedWriter {
                pid,
                stopped: ok,
                why_not,
                objects: paths,
            });
            if !ok {
                writes.insert(pid, mine);
            }
        }
        if new == 0 || !stop {
            break;
        }
    }
    report.inconsistent = inconsistent(writes, &objects);
    (stopped, report)
}

/// The objects of `entries` mapped writable.
fn written_objects(entries: &[MapsEntry]) -> Vec<ObjectId> {
    entries
        .iter()
        .filter(|e| e.perms.write)
        .map(ObjectId::of_entry)
        .collect()
}

/// Stops writer `pid` (with `stop`), or why not.
fn stop_one(pid: u32, stop: bool) -> Result<Stopped, String> {
    if !stop {
        return Err("--no-stop-sharers".to_owned());
    }
    let t = Target::open(pid).map_err(|e| e.to_string())?;
    Stopped::stop(&t).map_err(|e| e.to_string())
}

/// The objects written by the writers left running (`writes`), with them.
fn inconsistent(
    writes: BTreeMap<u32, Vec<ObjectId>>,
    objects: &HashMap<ObjectId, String>,
) -> Vec<InconsistentObject> {
    let mut by_object: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    for (pid, objs) in writes {
        for o in objs {
            by_object
                .entry(objects[&o].clone())
                .or_default()
                .insert(pid);
        }
    }
    by_object
        .into_iter()
        .map(|(path, w)| InconsistentObject {
            path,
            writers: w.into_iter().collect(),
        })
        .collect()
}
