//! rseq areas (`rseq(2)`): glibc 2.35+ registers one per thread, and the
//! kernel rewrites its `cpu_id_start`, `cpu_id`, `node_id` and `mm_cid`
//! fields whenever the thread runs (on return to user space after it was
//! scheduled or migrated). A thread resumed after the dump's stopped pass
//! may run on another CPU, so those fields can differ from the image
//! without anything having gone wrong: they are compared as "kernel-owned,
//! may differ" and reported apart from mismatches. Every other byte of the
//! page is compared as usual.
//!
//! Where the areas are: the image records them per thread (read with
//! `PTRACE_GET_RSEQ_CONFIGURATION` while the dump had the threads
//! stopped). A thread the image does not know (started after the dump) is
//! asked the same way, which needs a ptrace stop: the process is stopped
//! for that moment with the dump's invisible interrupt (`dump/stop.rs`).

use super::report::{KernelOwned, VerifyReport};
use crate::dump::stop::Stopped;
use crate::image::format::{ProcessRec, RSEQ_KERNEL_FIELDS, RseqRec};
use crate::proc::Target;

/// The live rseq areas of a process.
#[derive(Debug, Default)]
pub(super) struct RseqAreas {
    pid: u32,
    areas: Vec<RseqRec>,
}

impl RseqAreas {
    /// The areas of `target`'s live threads: as the image recorded them,
    /// and asked of the threads it did not record.
    pub(super) fn find(target: &Target, rec: &ProcessRec, out: &mut VerifyReport) -> Self {
        let pid = target.pid();
        let live = target.tasks().unwrap_or_default();
        let known = |tid: u32| rec.rseq.iter().any(|a| a.tid == tid);
        let mut areas: Vec<RseqRec> = rec
            .rseq
            .iter()
            .filter(|a| a.address != 0 && live.contains(&a.tid))
            .copied()
            .collect();
        let unknown: Vec<u32> = live.iter().copied().filter(|&t| !known(t)).collect();
        if !unknown.is_empty() {
            match Stopped::stop(target) {
                Ok(s) => {
                    areas.extend(
                        s.rseq_areas()
                            .into_iter()
                            .filter(|a| a.address != 0 && unknown.contains(&a.tid)),
                    );
                    let stopped = s.resume();
                    out.note(format!(
                        "process {pid} was stopped for {:.2} ms (ptrace interrupt, no signal) to read the rseq areas of {} threads the image does not record",
                        stopped.as_secs_f64() * 1e3,
                        unknown.len()
                    ));
                }
                Err(e) => out.note(format!(
                    "process {pid}: cannot read the rseq areas of {} threads the image does not record ({e}); their kernel-owned fields compare as memory",
                    unknown.len()
                )),
            }
        }
        Self { pid, areas }
    }

    /// When `live` and `want` (the page at `addr`) differ only in
    /// kernel-owned fields of rseq areas: those areas and fields. `None`
    /// when any other byte differs (a real difference).
    pub(super) fn kernel_owned(
        &self,
        addr: u64,
        live: &[u8],
        want: &[u8],
    ) -> Option<Vec<KernelOwned>> {
        let end = addr + live.len() as u64;
        // (area, field name, byte range in the page)
        let mut fields = Vec::new();
        for a in self
            .areas
            .iter()
            .filter(|a| a.address >= addr && a.address < end)
        {
            for (name, off, len) in RSEQ_KERNEL_FIELDS {
                let at = a.address + off;
                if off + len <= u64::from(a.length) && at + len <= end {
                    let lo = usize::try_from(at - addr).ok()?;
                    fields.push((a, name, lo..lo + usize::try_from(len).ok()?));
                }
            }
        }
        if fields.is_empty() {
            return None;
        }
        let differs = |r: &std::ops::Range<usize>| live[r.clone()] != want[r.clone()];
        let outside = live
            .iter()
            .zip(want)
            .enumerate()
            .any(|(i, (l, w))| l != w && !fields.iter().any(|(_, _, r)| r.contains(&i)));
        if outside {
            return None;
        }
        let mut out: Vec<KernelOwned> = Vec::new();
        for (a, name, _) in fields.iter().filter(|(_, _, r)| differs(r)) {
            match out.iter_mut().find(|k| k.tid == a.tid) {
                Some(k) => k.fields.push((*name).to_owned()),
                None => out.push(KernelOwned {
                    pid: self.pid,
                    tid: a.tid,
                    address: a.address,
                    fields: vec![(*name).to_owned()],
                }),
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn areas() -> RseqAreas {
        RseqAreas {
            pid: 7,
            areas: vec![RseqRec {
                tid: 8,
                address: 0x1000 + 0x100,
                length: 32,
                signature: 0x5305_3053,
            }],
        }
    }

    #[test]
    fn only_kernel_owned_bytes_are_forgiven() {
        let a = areas();
        let want = vec![0u8; 4096];
        let mut live = want.clone();
        live[0x100 + 4] = 3; // cpu_id
        live[0x100 + 24] = 1; // mm_cid
        let k = a.kernel_owned(0x1000, &live, &want).unwrap();
        assert_eq!(k.len(), 1);
        assert_eq!(k[0].fields, ["cpu_id", "mm_cid"]);
        live[0x100 + 8] = 1; // rseq_cs: user-owned
        assert!(a.kernel_owned(0x1000, &live, &want).is_none());
        let mut other = want.clone();
        other[0x100 + 32] = 1; // just after the area
        assert!(a.kernel_owned(0x1000, &other, &want).is_none());
        assert!(
            a.kernel_owned(0x2000, &live, &want).is_none(),
            "another page"
        );
    }
}
