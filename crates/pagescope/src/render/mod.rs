//! Text rendering shared by the commands: size units, tables, filters,
//! the `map` table, the per-process summary (`top`) and the SVG picture.

pub mod filter;
pub mod map;
pub mod summary;
pub mod svg;
pub mod table;
pub mod units;

pub use filter::{Filter, Glob};
pub use map::{MapColumn, MapView};
pub use units::SizeUnit;
