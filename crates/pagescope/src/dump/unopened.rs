//! Shared objects a dump cannot open (no descriptor in the process, and
//! no CAP_SYS_ADMIN / CAP_CHECKPOINT_RESTORE for `map_files`: shared
//! anonymous memory, SysV segments, deleted files, the `[aio]` ring): their
//! pages are copied through the process's own mappings of them
//! (`/proc/PID/mem`), and what no mapping covers is named as not copied.

use std::collections::BTreeMap;

use crate::addr::{PageSize, PageSpan};
use crate::rangeset::RangeSet;
use crate::vma::{ObjectId, Vma, VmaKind};

/// One object read through mappings.
#[derive(Debug)]
struct Unopened {
    path: String,
    kind: VmaKind,
    why: String,
    /// Object pages some mapping covers.
    covered: RangeSet<PageSpan>,
}

/// Every object read through mappings in this dump.
#[derive(Debug, Default)]
pub(super) struct UnopenedObjects(BTreeMap<ObjectId, Unopened>);

impl UnopenedObjects {
    /// Records that `vma`'s object (`id`) could not be opened (`why`); its
    /// pages in `vma` are copied through the mapping.
    pub(super) fn add(&mut self, id: ObjectId, vma: &Vma, why: String, page: PageSize) {
        let e = self.0.entry(id).or_insert_with(|| Unopened {
            path: vma.path.display(),
            kind: vma.kind,
            why,
            covered: RangeSet::default(),
        });
        e.covered.insert(vma.object_span(vma.range, page));
    }

    /// One note per object: what was copied through the mappings, and the
    /// object pages no mapping covers (known for SysV segments, whose size
    /// `/proc/sysvipc/shm` gives; otherwise said to be unknown).
    pub(super) fn notes(&self, page: PageSize) -> Vec<String> {
        self.0
            .iter()
            .map(|(id, o)| {
                let covered = spans(o.covered.ranges());
                let size = (o.kind == VmaKind::Sysv)
                    .then(|| sysv_size(id.inode))
                    .flatten()
                    .map(|bytes| bytes.div_ceil(page.get()));
                let rest = match size.and_then(|n| PageSpan::new(0, n)) {
                    Some(all) => {
                        let missing = o.covered.subtract_from(all);
                        if missing.is_empty() {
                            "no mapping leaves any of its pages out".to_owned()
                        } else {
                            format!(
                                "object pages {} (of {}) are mapped by no process dumped: not copied",
                                spans(&missing),
                                all.end()
                            )
                        }
                    }
                    None => "pages of it no mapping covers (its size is not visible without it) are not copied".to_owned(),
                };
                format!(
                    "object {} inode {} ({}) cannot be opened ({}): object pages {covered} copied through the process's mappings (/proc/PID/mem; pages it did not map were faulted in, holes as zero pages); {rest}",
                    id.dev, id.inode, o.path, o.why
                )
            })
            .collect()
    }
}

fn spans(s: &[PageSpan]) -> String {
    s.iter()
        .map(|r| format!("{}..{}", r.start(), r.end()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The size in bytes of the SysV segment whose shmid is `inode` (the
/// kernel numbers a segment's inode by its id).
fn sysv_size(inode: u64) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/sysvipc/shm").ok()?;
    text.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1)?.parse::<u64>().ok()? == inode).then(|| f.get(3)?.parse().ok())?
    })
}
