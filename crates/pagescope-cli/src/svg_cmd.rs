//! `map --svg FILE`: writes the picture atomically (temporary file,
//! rename).

use anyhow::{Context, Result};
use pagescope::ProcessReport;

pub fn write(reports: &[&ProcessReport], path: &std::path::Path) -> Result<()> {
    let doc = pagescope::render::render_svg(reports);
    let tmp = path.with_extension("svg.tmp");
    std::fs::write(&tmp, doc).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}
