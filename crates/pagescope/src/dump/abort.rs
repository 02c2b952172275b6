//! What a dump that fails or is interrupted (`DumpOptions::cancel`, set
//! by a signal) checks and undoes: the cancel flag between steps, a
//! process that exited (reported as that, exit 9, whatever step noticed
//! it), the userfaultfd `keep_tracking` left in the process. Stopped
//! threads are resumed by `Stopped`'s drop, pagescope's own userfaultfds
//! close with the trackers, the sink is told (`PageSink::abort`) and the
//! incomplete image directory goes with `out_dir::discard`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::DumpError;
use super::attach::Proc;
use super::passes::Dump;

/// The cancel flag of a dump ([`DumpOptions::cancel`](super::DumpOptions::cancel)),
/// checked between steps.
pub(super) struct Cancel {
    flag: Option<Arc<AtomicUsize>>,
    /// The process the interruption is reported for.
    pid: u32,
}

impl Cancel {
    /// `flag` for the dump of process `pid`.
    pub(super) fn new(flag: Option<Arc<AtomicUsize>>, pid: u32) -> Self {
        Self { flag, pid }
    }

    /// Fails with [`DumpError::Interrupted`] once the flag is set.
    pub(super) fn check(&self) -> Result<(), DumpError> {
        match self.flag.as_ref().map_or(0, |c| c.load(Ordering::SeqCst)) {
            0 => Ok(()),
            signal => Err(DumpError::Interrupted {
                pid: self.pid,
                signal,
            }),
        }
    }
}

impl Dump<'_, '_, '_> {
    /// A dumped process that exited or became a zombie (after a failure,
    /// to report that rather than the step that noticed it).
    pub(super) fn gone(&self) -> Option<u32> {
        self.procs
            .iter()
            .find(|p| p.target.require_address_space().is_err())
            .map(|p| p.pid)
    }

    /// After a failure `e`: closes the userfaultfd `keep_tracking` left in
    /// the process (nothing stays write-protected; pagescope's own copies
    /// close as the trackers drop), aborts the sink. Stopped threads were
    /// resumed already.
    pub(super) fn abandon(self, e: &DumpError) {
        if let Some(first) = self.procs.first() {
            close_kept(first, self.opts.keep_tracking);
        }
        self.sink.abort(e);
    }
}

/// Closes the userfaultfd a dump that failed left in the first process
/// for `keep_tracking` (not one it adopted: that stays for the image it
/// came with).
fn close_kept(first: &Proc<'_>, keep_tracking: bool) {
    if let Some(fd) = first.tracker.kept_in_target().filter(|_| keep_tracking) {
        if first.adopted != Some(fd) {
            let _ = crate::dirty::target_uffd::close_in_target(first.target, fd);
        }
    }
}
