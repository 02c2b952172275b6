//! The pagescope fixture: a process that builds known memory layouts on
//! request, prints its ground truth (addresses and the state every page
//! must have) as one JSON line, and then serves commands on stdin until it
//! is told to exit.
//!
//! It is its own binary, `pagescope-fixture [--churn] SCENARIO...`
//! (`pagescope` itself carries none of it); [`FixtureProcess`] starts it
//! and talks to it, [`FixtureProcess::locate`] finds it next to the
//! running program. [`testing`] holds what the behaviour tests share.
//!
//! Scenarios: see [`SCENARIOS`].

pub mod check;
mod client;
mod scenarios;
mod serve;
mod sys;
pub mod testing;
pub mod truth;

pub use client::FixtureProcess;
pub use scenarios::SCENARIOS;
pub use serve::serve;
pub use truth::{Expect, ObjectTruth, Region, SkippedScenario, Truth};
