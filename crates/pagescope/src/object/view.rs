//! Placeholder for the per-object view.
