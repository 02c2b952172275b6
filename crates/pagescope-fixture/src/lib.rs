//! The pagescope fixture: a process that builds known memory layouts on
//! request, prints its ground truth (addresses and the state every page
//! must have) as one JSON line, and then serves commands on stdin until it
//! is told to exit.
//!
//! It is run as `pagescope fixture [--churn] SCENARIO...` (a hidden
//! subcommand, so tests, benchmarks and `pagescope demo` all find it in the
//! one binary). [`FixtureProcess`] is the client side.
//!
//! Scenarios: see [`SCENARIOS`].

pub mod check;
mod client;
mod scenarios;
mod serve;
mod sys;
pub mod truth;

pub use client::FixtureProcess;
pub use scenarios::SCENARIOS;
pub use serve::serve;
pub use truth::{Expect, ObjectTruth, Region, SkippedScenario, Truth};
