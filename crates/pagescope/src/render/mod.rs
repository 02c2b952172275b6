//! Text rendering shared by the commands: size units, tables, filters,
//! the `map` table, the per-process summary (`top`) and the SVG picture.

pub(crate) mod filter;
pub(crate) mod map;
pub(crate) mod summary;
pub(crate) mod svg;
pub(crate) mod table;
pub(crate) mod units;

pub use filter::{Filter, Glob};
pub use map::{MapColumn, MapView};
pub use summary::{ProcessSummary, TopColumn, summarize, whole_bytes, write_top};
pub use svg::render as render_svg;
pub use units::SizeUnit;
