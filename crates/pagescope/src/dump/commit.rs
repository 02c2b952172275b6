//! The end of a dump that succeeded: the models turned into the image's
//! records ([`Meta`]: processes with `/proc/PID/stat`'s ppid and comm,
//! mappings, objects, rseq areas, the userfaultfd kept in the target for
//! the next incremental dump), the sink committed, the caller's
//! after-commit hook, then the swap policy's paging back out
//! (`swap/cold.rs`), the report.

use std::collections::BTreeMap;

use super::attach::Proc;
use super::passes::Dump;
use super::swap::{self, SwapPolicy};
use super::{CowStats, DumpError, DumpReport, Iteration};
use crate::image::format::{KeptTracking, Meta, ObjectRec, ProcessRec};

/// Pages of the image.
#[derive(Default)]
struct Counts {
    stored: u64,
    covered: u64,
}

impl Dump<'_, '_, '_> {
    /// Writes the metadata and commits the sink; closes a kept
    /// userfaultfd that is not wanted any more.
    pub(super) fn finish(
        mut self,
        iterations: Vec<Iteration>,
        stopped_s: f64,
        snapshot: Option<CowStats>,
    ) -> Result<DumpReport, DumpError> {
        let mut counts = Counts::default();
        let (objects, index) = self.object_records(&mut counts);
        let processes = self.process_records(&index, &mut counts)?;
        let kept_tracking = kept_tracking(&self.procs, self.opts.keep_tracking, &mut self.notes)?;
        self.notes.extend(self.objects.unopened.notes(self.page));
        let meta = Meta {
            processes,
            objects,
            stores: Vec::new(),
            kept_tracking: kept_tracking.clone(),
            swap_devices: if self.swap.policy() == SwapPolicy::Skip {
                self.swap.device_paths()
            } else {
                Vec::new()
            },
        };
        let pids = self.procs.iter().map(|p| p.pid).collect();
        let committed = self.sink.commit(meta)?;
        if let Some(hook) = self.hooks.after_commit.as_mut() {
            hook();
        }
        // After the commit (and the caller's hook): paging out is no part
        // of a receiver's wait or a VM's pause.
        let swap = swap::page_back_out(&self.swap, &self.procs, &mut self.objects, self.page);
        Ok(DumpReport {
            dir: self.opts.out.clone(),
            image_id: committed.image_id,
            generation: committed.generation,
            pids,
            iterations,
            stopped_s,
            precopy_end: self.precopy_end,
            converged: self.precopy_end.converged(),
            stored_pages: counts.stored,
            covered_pages: counts.covered,
            kept_tracking,
            swap,
            snapshot,
            notes: self.notes,
            shared_writers: self.shared_writers,
        })
    }

    /// The objects' records, and each object's index among them.
    fn object_records(
        &self,
        counts: &mut Counts,
    ) -> (Vec<ObjectRec>, BTreeMap<crate::vma::ObjectId, usize>) {
        let mut index = BTreeMap::new();
        let mut records = Vec::with_capacity(self.objects.map.len());
        for (ix, o) in self.objects.map.values().enumerate() {
            index.insert(o.id, ix);
            records.push(o.record());
            counts.stored += o.store.as_ref().map_or(0, |s| self.sink.stored(s));
            counts.covered += o.pages;
        }
        (records, index)
    }

    /// The processes' records.
    fn process_records(
        &self,
        index: &BTreeMap<crate::vma::ObjectId, usize>,
        counts: &mut Counts,
    ) -> Result<Vec<ProcessRec>, DumpError> {
        let mut processes = Vec::with_capacity(self.procs.len());
        for p in &self.procs {
            let st = p.target.stat()?;
            for m in &p.vmas {
                counts.stored += m.store.as_ref().map_or(0, |s| self.sink.stored(s));
                counts.covered += m.kinds.len() as u64;
            }
            processes.push(ProcessRec {
                pid: p.pid,
                ppid: st.ppid,
                comm: String::from_utf8_lossy(&st.comm).into_owned(),
                vmas: p
                    .vmas
                    .iter()
                    .map(|m| m.record(m.vma.object_id().and_then(|id| index.get(&id).copied())))
                    .collect(),
                rseq: self.rseq.get(&p.pid).cloned().unwrap_or_default(),
            });
        }
        Ok(processes)
    }
}

/// The userfaultfd the target keeps for the next dump (`keep_tracking`);
/// a note if it could not be kept.
fn kept_tracking(
    procs: &[Proc<'_>],
    keep: bool,
    notes: &mut Vec<String>,
) -> Result<Option<KeptTracking>, DumpError> {
    let Some(first) = procs.first().filter(|_| keep) else {
        return Ok(None);
    };
    match first.tracker.kept_in_target() {
        Some(fd) => Ok(Some(KeptTracking {
            pid: first.pid,
            start_time: first.target.stat()?.start_time,
            fd,
        })),
        None => {
            notes.push(format!(
                "process {}: tracking could not be kept in the process ({}); the next incremental dump compares pages with this image",
                first.pid,
                first.tracker.backend().name()
            ));
            Ok(None)
        }
    }
}
