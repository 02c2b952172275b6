//! Backing-object classification (placeholder until objects land).

use crate::kernel::KernelCaps;
use crate::proc::Target;
use crate::report::ProcessReport;

/// Refines the pages of shared and file mappings from their objects.
pub fn apply_objects(_target: &Target, _caps: &KernelCaps, _report: &mut ProcessReport) {}
