//! The fixture's ground truth: what it built and what state every page
//! must have. Printed as one JSON line; tests parse it back.

use serde::{Deserialize, Serialize};

/// Everything the fixture built.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Truth {
    /// The fixture's PID.
    pub pid: u32,
    /// Base page size.
    pub page_size: u64,
    /// The swap device that receives paged-out pages: `zram`, `file`,
    /// `other` or `none`.
    pub swap: String,
    /// The layouts, with expected page states.
    pub regions: Vec<Region>,
    /// PIDs of helper processes the fixture forked (they die with it).
    pub children: Vec<u32>,
    /// Scenarios that could not be built here, and why.
    pub skipped: Vec<SkippedScenario>,
}

/// One named address range of the fixture.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Region {
    /// Unique name, e.g. `anon_present`.
    pub name: String,
    /// Scenario that built it.
    pub scenario: String,
    /// Start address.
    pub start: u64,
    /// Length in pages.
    pub pages: u64,
    /// Expected `backing` of the VMA (`anon`, `shmem`, `file`, ...).
    pub backing: String,
    /// Expected states, covering every page of the region.
    pub expect: Vec<Expect>,
    /// Set when the expectation could not be established (e.g. no swap
    /// device): tests skip the region with this reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip: Option<String>,
    /// Backing object: `(dev, inode)` as `"MAJ:MIN"` and number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<ObjectTruth>,
}

/// Identity of a backing object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectTruth {
    /// Device, `major:minor` in hex as in maps.
    pub dev: String,
    /// Inode.
    pub inode: u64,
    /// Offset of the region's first page in the object, in pages.
    pub first_page: u64,
}

/// Expected state of `count` pages starting at page `first` of a region.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expect {
    /// First page (index within the region).
    pub first: u64,
    /// Number of pages.
    pub count: u64,
    /// Expected state name.
    pub state: String,
    /// Exactly these flags (apart from `ignore_flags`).
    pub flags: Vec<String>,
    /// Flags whose presence is not asserted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignore_flags: Vec<String>,
}

impl Expect {
    /// `count` pages from `first` in `state` with `flags`.
    pub fn new(first: u64, count: u64, state: &str, flags: &[&str]) -> Self {
        Self {
            first,
            count,
            state: state.to_owned(),
            flags: flags.iter().map(|f| (*f).to_owned()).collect(),
            ignore_flags: Vec::new(),
        }
    }

    /// Adds flags that are not asserted either way.
    pub fn ignoring(mut self, flags: &[&str]) -> Self {
        self.ignore_flags = flags.iter().map(|f| (*f).to_owned()).collect();
        self
    }
}

/// A scenario the fixture could not build.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SkippedScenario {
    /// Scenario name.
    pub scenario: String,
    /// Why.
    pub reason: String,
}

impl Truth {
    /// The region called `name`.
    pub fn region(&self, name: &str) -> Option<&Region> {
        self.regions.iter().find(|r| r.name == name)
    }
}

impl Region {
    /// Address of page `i` of the region.
    pub fn page_addr(&self, i: u64, page_size: u64) -> u64 {
        self.start + i * page_size
    }

    /// The expected state of page `i`.
    pub fn expected(&self, i: u64) -> Option<&Expect> {
        self.expect
            .iter()
            .find(|e| e.first <= i && i < e.first + e.count)
    }
}
