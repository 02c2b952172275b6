//! Which scan backend runs: one decision table, giving both the backend
//! and what reports say about it (its name, whether `exclusive` is known).

use super::pagemap_read::PagemapReadBackend;
use super::pagemap_scan::PagemapScanBackend;
use super::{BackendChoice, PageScanner, ScanError, ScanOptions, ScanStrategy};
use crate::kernel::KernelCaps;

/// The backend a scan will use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendPlan {
    walk: bool,
    skip_exclusive: bool,
    strategy: ScanStrategy,
}

impl BackendPlan {
    /// The backend `opts` asks for on this kernel: `PAGEMAP_SCAN` when
    /// chosen or when `Auto` finds it, else plain pagemap reads; forcing
    /// `PAGEMAP_SCAN` where the kernel lacks it is an error.
    pub fn choose(opts: &ScanOptions, caps: &KernelCaps) -> Result<Self, ScanError> {
        let walk = match (opts.backend, caps.has_pagemap_scan()) {
            (BackendChoice::Pagemap, _) | (BackendChoice::Auto, false) => false,
            (BackendChoice::Auto | BackendChoice::PagemapScan, true) => true,
            (BackendChoice::PagemapScan, false) => {
                return Err(ScanError::Unsupported {
                    backend: "pagemap_scan",
                    why: "the kernel has no PAGEMAP_SCAN ioctl (Linux 6.7+)",
                });
            }
        };
        Ok(Self {
            walk,
            skip_exclusive: opts.skip_exclusive,
            strategy: opts.strategy,
        })
    }

    /// The name reports give it.
    pub fn name(&self) -> &'static str {
        if self.walk { "pagemap_scan" } else { "pagemap" }
    }

    /// Whether every page carries `exclusive` where it applies (only the
    /// `PAGEMAP_SCAN` backend can skip reading it).
    pub fn exclusive_known(&self) -> bool {
        !(self.walk && self.skip_exclusive)
    }

    /// A backend instance (each worker has its own: they hold buffers).
    pub fn build(&self, caps: &KernelCaps) -> Box<dyn PageScanner + Send> {
        match self
            .walk
            .then(|| PagemapScanBackend::new(caps, self.skip_exclusive, self.strategy))
            .flatten()
        {
            Some(b) => Box::new(b),
            None => Box::new(PagemapReadBackend::new()),
        }
    }
}
