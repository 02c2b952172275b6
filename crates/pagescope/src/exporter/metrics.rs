//! The metric families: a [`Snapshot`] (and the exporter's counters) as a
//! `prometheus-client` registry, encoded in the Prometheus text format or
//! OpenMetrics. Names follow the Prometheus conventions: one `pagescope_`
//! prefix, the base unit in the name (`_bytes`, `_seconds`), `_total` on
//! counters, HELP and TYPE (and UNIT in OpenMetrics) for every family.
//!
//! Labels are bounded: `pid`/`comm` only for the selected processes (the
//! `--top` limit), object labels only for objects above the size
//! threshold, paths shortened to [`PATH_LABEL_CHARS`].

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{prometheus_text, text};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use super::collect::Snapshot;
use super::watch::WrittenCounter;
use super::{Format, Totals};
use crate::render::summary::whole_bytes;

/// Longest `path` label value (longer paths lose their middle).
pub const PATH_LABEL_CHARS: usize = 64;

/// What one exposition shows.
#[derive(Debug)]
pub struct State<'a> {
    /// The snapshot served.
    pub snapshot: &'a Snapshot,
    /// The exporter's counters.
    pub totals: Totals,
    /// How old the snapshot is.
    pub age_seconds: f64,
    /// The `--watch` counters.
    pub written: Vec<WrittenCounter>,
    /// Processes named by `--watch` that could not be tracked.
    pub watch_failed: usize,
}

type Labels = Vec<(&'static str, String)>;
type Gauges = Family<Labels, Gauge>;
type Seconds = Family<Labels, Gauge<f64, AtomicU64>>;
type Counters = Family<Labels, Counter<u64>>;

/// Registers families on one registry.
struct Families(Registry);

impl Families {
    fn gauge(&mut self, name: &str, help: &str, unit: Option<Unit>) -> Gauges {
        let g = Gauges::default();
        match unit {
            Some(u) => self.0.register_with_unit(name, help, u, g.clone()),
            None => self.0.register(name, help, g.clone()),
        }
        g
    }

    fn counter(&mut self, name: &str, help: &str, unit: Option<Unit>) -> Counters {
        let c = Counters::default();
        match unit {
            Some(u) => self.0.register_with_unit(name, help, u, c.clone()),
            None => self.0.register(name, help, c.clone()),
        }
        c
    }

    fn seconds(&mut self, name: &str, help: &str) -> Seconds {
        let g = Seconds::default();
        self.0
            .register_with_unit(name, help, Unit::Seconds, g.clone());
        g
    }

    /// A gauge without labels, set to `v` (a count).
    fn count(&mut self, name: &str, help: &str, v: u64) {
        set(&self.gauge(name, help, None), vec![], v as f64);
    }

    fn bytes(&mut self, name: &str, help: &str) -> Gauges {
        self.gauge(name, help, Some(Unit::Bytes))
    }
}

/// Sets a gauge of whole bytes or a count (divided bytes are rounded).
#[allow(clippy::cast_possible_truncation)]
fn set(g: &Gauges, labels: Labels, v: f64) {
    // Byte counts and process counts, far below 2^63.
    g.get_or_create(&labels).set(v.round() as i64);
}

/// The exposition of `state` in `format`.
pub fn encode(state: &State<'_>, format: Format) -> String {
    let mut f = Families(Registry::with_prefix("pagescope"));
    processes(&mut f, state);
    objects(&mut f, state.snapshot);
    machine(&mut f, state.snapshot);
    health(&mut f, state);
    let mut out = String::new();
    let r = match format {
        Format::Prometheus => prometheus_text::encode(&mut out, &f.0),
        Format::OpenMetrics => text::encode(&mut out, &f.0),
    };
    // Writing to a String cannot fail.
    debug_assert!(r.is_ok());
    out
}

fn processes(f: &mut Families, state: &State<'_>) {
    let s = state.snapshot;
    let per = |f: &mut Families, name: &str, help: &str| f.bytes(name, help);
    let rss = per(
        f,
        "process_rss",
        "smaps Rss of the process (the kernel's [vdso] etc. left out, as in pagescope top)",
    );
    let pss = per(
        f,
        "process_pss",
        "smaps Pss of the process (special mappings left out)",
    );
    let smaps_swap = per(
        f,
        "process_smaps_swap",
        "smaps Swap: swap in the process's mappings, charged in full to every process holding it (what smaps-based exporters report)",
    );
    let swap_pss = per(
        f,
        "process_smaps_swap_pss",
        "smaps SwapPss: private swap divided by the kernel's swap count (shared memory swap not included)",
    );
    let swap = per(
        f,
        "process_swap",
        "private memory in swap or swap cache, each swap slot divided among the processes holding it (pagescope top SWAP)",
    );
    let shmem_swap = per(
        f,
        "process_shmem_swap",
        "shared memory in swap inside the process's mappings, each page divided among the processes mapping it (pagescope top SHMEM_SWAP)",
    );
    let unmapped = per(
        f,
        "process_shmem_unmapped",
        "shared memory in RAM that no process maps, inside the process's mappings, divided among them (pagescope top UNMAPPED)",
    );
    let states = per(
        f,
        "process_memory",
        "bytes of the process's address space per backing and page state (pagescope map totals)",
    );
    for p in &s.processes {
        let id = || vec![("pid", p.pid.to_string()), ("comm", p.comm.clone())];
        set(&rss, id(), p.divided.rss as f64);
        set(&pss, id(), p.divided.pss as f64);
        set(&smaps_swap, id(), p.rollup.swap as f64);
        set(&swap_pss, id(), p.rollup.swap_pss as f64);
        set(&swap, id(), whole_bytes(p.divided.swap) as f64);
        set(&shmem_swap, id(), whole_bytes(p.divided.shmem_swap) as f64);
        set(&unmapped, id(), whole_bytes(p.divided.unmapped) as f64);
        for ((backing, st), bytes) in &p.states {
            let mut l = id();
            l.push(("backing", (*backing).to_owned()));
            l.push(("state", st.name().to_owned()));
            set(&states, l, *bytes as f64);
        }
    }
    let o = &s.others;
    f.count(
        "other_processes",
        "processes without their own series (summed in pagescope_other_processes_*)",
        o.processes,
    );
    for (name, help, v) in [
        (
            "other_processes_rss",
            "smaps_rollup Rss of the other processes, summed",
            o.rss as f64,
        ),
        (
            "other_processes_pss",
            "smaps_rollup Pss of the other processes, summed",
            o.pss as f64,
        ),
        (
            "other_processes_smaps_swap",
            "smaps_rollup Swap of the other processes, summed (shared swap counted once per holder)",
            o.smaps_swap as f64,
        ),
        (
            "other_processes_swap",
            "divided private swap of the other processes, summed",
            o.swap,
        ),
        (
            "other_processes_shmem_swap",
            "divided shared memory swap of the other processes, summed",
            o.shmem_swap,
        ),
        (
            "other_processes_shmem_unmapped",
            "divided shared memory in RAM mapped by no one, of the other processes, summed",
            o.unmapped,
        ),
    ] {
        let g = f.bytes(name, help);
        set(&g, vec![], whole_bytes(v) as f64);
    }
    let written = f.counter("process_written", "bytes of distinct pages the process wrote, counted per refresh of the snapshot by the dirty tracker (--watch), since it was attached", Some(Unit::Bytes));
    for w in &state.written {
        let l = vec![
            ("pid", w.pid.to_string()),
            ("comm", w.comm.clone()),
            ("tracker", w.backend.to_owned()),
        ];
        written.get_or_create(&l).inc_by(w.written_bytes);
    }
}

fn objects(f: &mut Families, s: &Snapshot) {
    let bytes = f.bytes("object_memory", "bytes of a shared object per state: mapped (in RAM, some process maps it), unmapped (in RAM, mapped by no one), swapcache, swapped, fallocated");
    let size = f.bytes("object_size", "size of a shared object");
    let sharers = f.gauge("object_sharers", "processes mapping a shared object", None);
    for o in &s.objects {
        let Some(id) = o.id else { continue };
        let label = || {
            vec![
                ("dev", id.dev.to_string()),
                ("inode", id.inode.to_string()),
                ("kind", o.kind.clone()),
                (
                    "path",
                    crate::render::table::elide(&o.path, Some(PATH_LABEL_CHARS)),
                ),
            ]
        };
        for (st, v) in &o.states {
            let mut l = label();
            l.push(("state", (*st).to_owned()));
            set(&bytes, l, *v as f64);
        }
        set(&size, label(), o.size as f64);
        set(&sharers, label(), o.sharers as f64);
    }
    let small = &s.small_objects;
    f.count(
        "small_objects",
        "shared objects below the size threshold (summed in pagescope_small_objects_memory_bytes)",
        small.objects,
    );
    let mem = f.bytes(
        "small_objects_memory",
        "bytes per state of the shared objects below the size threshold, summed",
    );
    for (st, v) in &small.states {
        set(&mem, vec![("state", (*st).to_owned())], *v as f64);
    }
}

fn machine(f: &mut Families, s: &Snapshot) {
    let kernel = f.bytes("machine_meminfo", "machine total from /proc/meminfo (field Shmem, SwapCached, or SwapUsed = SwapTotal - SwapFree)");
    let explained = f.bytes("machine_explained", "the part of the /proc/meminfo total pagescope found in processes' memory and the shared objects they map");
    let unexplained = f.bytes("machine_unexplained", "/proc/meminfo total minus what pagescope explained (tmpfs files and SysV segments no process maps, unreadable processes, anonymous swap cache pages)");
    for (field, r) in &s.machine {
        let l = || vec![("field", (*field).to_owned())];
        set(&kernel, l(), r.kernel as f64);
        set(&explained, l(), whole_bytes(r.explained) as f64);
        set(
            &unexplained,
            l(),
            r.kernel as f64 - whole_bytes(r.explained) as f64,
        );
    }
}

fn health(f: &mut Families, state: &State<'_>) {
    let s = state.snapshot;
    let duration = f.seconds(
        "scrape_duration",
        "how long the collection of the snapshot served took",
    );
    duration
        .get_or_create(&vec![])
        .set(s.duration.as_secs_f64());
    let age = f.seconds(
        "snapshot_age",
        "age of the snapshot served (collections run at most every --min-interval)",
    );
    age.get_or_create(&vec![]).set(state.age_seconds);
    let t = state.totals;
    for (name, help, v) in [
        (
            "collections",
            "collections of the machine run",
            t.collections,
        ),
        (
            "scrape_errors",
            "failures during collections other than a process exiting or being denied (an unreadable /proc/meminfo, a scan error)",
            t.errors,
        ),
        (
            "scrapes",
            "scrapes served, from a fresh or cached snapshot",
            t.scrapes,
        ),
        (
            "late_scrapes",
            "scrapes served the previous snapshot because the collection they asked for outlasted --scrape-timeout",
            t.late,
        ),
    ] {
        f.counter(name, help, None).get_or_create(&vec![]).inc_by(v);
    }
    f.count(
        "processes_selected",
        "processes with their own series",
        s.processes.len() as u64,
    );
    f.count("processes_truncated", "processes left out of the per-process series by the --top limit (summed in pagescope_other_processes_*)", s.truncated);
    let skipped = f.gauge("processes_skipped", "processes left out of every number, by reason: permission (not readable with the exporter's privileges), exited (during the collection), error", None);
    for why in ["permission", "exited", "error"] {
        let n = s.skipped.get(why).copied().unwrap_or(0);
        set(&skipped, vec![("reason", why.to_owned())], n as f64);
    }
    let missing = f.gauge(
        "process_missing",
        "a process named by --pid that could not be reported (1), with the reason",
        None,
    );
    for (pid, why) in &s.missing {
        set(
            &missing,
            vec![("pid", pid.to_string()), ("reason", (*why).to_owned())],
            1.0,
        );
    }
    f.count(
        "watch_failed",
        "processes named by --watch whose writes cannot be tracked",
        state.watch_failed as u64,
    );
}
