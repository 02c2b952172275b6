//! Swap-aware `send` between real processes on loopback: an unmodified
//! python3 process holds 64 anonymous and 64 memfd pages of random
//! bytes; the test pages out the first 32 of each (`pagescope pageout`:
//! `process_madvise(MADV_PAGEOUT)`, pages the test controls, so pageouts
//! of idle memory by DAMON elsewhere in the process do not matter), then
//! sends the process to a receiver. `/proc/vmstat` `pswpin`, the target's
//! pagemap entries and its memfd's page states before and after prove what
//! `--swap direct`, `--swap keep-cold` and `--pageout-sent` claim, and the
//! received image verifies against the stopped source (`verify` never
//! swaps anything in). Names contain `swapdev`: they need a swap device
//! (`scripts/test` runs them on zram and on a swap file).

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::process::Command;

use common::programs::{Proc, Scratch, start, usable};
use common::transfer::{Receiver, text};
use common::{caps, cli, scan, skip};
use pagescope::{BackendChoice, PageState};

/// Pages of each region; the first [`OUT`] are paged out before the send.
const PAGES: u64 = 64;
const OUT: u64 = 32;

/// The target: anonymous and memfd pages of random bytes (never zero, so
/// every page is sent as data), their addresses on one line, then sleep.
const PROGRAM: &str = r#"
import ctypes, mmap, os, sys, time
PAGE = mmap.PAGESIZE
N = int(sys.argv[1])
anon = mmap.mmap(-1, N * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
fd = os.memfd_create("swapped-ram")
os.ftruncate(fd, N * PAGE)
shm = mmap.mmap(fd, N * PAGE, flags=mmap.MAP_SHARED)
for i in range(N):
    anon[i * PAGE:(i + 1) * PAGE] = os.urandom(PAGE)
    shm[i * PAGE:(i + 1) * PAGE] = os.urandom(PAGE)
addr = lambda m: ctypes.addressof(ctypes.c_char.from_buffer(m))
print(f"{addr(anon):x} {addr(shm):x}", flush=True)
time.sleep(600)
"#;

/// `pswpin` is global: the tests run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn pswpin() -> u64 {
    std::fs::read_to_string("/proc/vmstat")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("pswpin ")?.trim().parse().ok())
        .unwrap()
}

fn page() -> u64 {
    caps().page_size.get()
}

const PRESENT: u64 = 1 << 63;
const SWAP: u64 = 1 << 62;

/// The started program and its two regions.
struct Target {
    proc: Proc,
    anon: u64,
    memfd: u64,
}

impl Target {
    fn pid(&self) -> u32 {
        self.proc.0.id()
    }

    /// Raw pagemap entries of anonymous pages `pages`.
    fn anon_entries(&self, pages: std::ops::Range<u64>) -> Vec<u64> {
        let f = File::open(format!("/proc/{}/pagemap", self.pid())).unwrap();
        pages
            .map(|i| {
                let mut b = [0u8; 8];
                let a = self.anon + i * page();
                f.read_exact_at(&mut b, a / page() * 8).unwrap();
                u64::from_ne_bytes(b)
            })
            .collect()
    }

    /// pagescope's state of memfd pages `pages` (a scan changes none).
    fn memfd_states(&self, pages: std::ops::Range<u64>) -> Vec<PageState> {
        let report = scan(self.pid(), BackendChoice::Auto);
        pages
            .map(|i| {
                let a = self.memfd + i * page();
                report
                    .vmas
                    .iter()
                    .flat_map(|v| &v.runs)
                    .find(|r| r.start.get() <= a && a < r.start.get() + r.pages * page())
                    .map_or(PageState::Unknown, |r| r.state)
            })
            .collect()
    }
}

fn out_of_ram(s: PageState) -> bool {
    matches!(s, PageState::Swapped | PageState::SwapCache)
}

fn swapped_out(e: u64) -> bool {
    e & SWAP != 0 && e & PRESENT == 0
}

/// The program with the first [`OUT`] pages of each region paged out;
/// `None` (skipped) without root or swap.
fn paged_out_target() -> Option<Target> {
    if !usable() {
        return None;
    }
    let swaps = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
    if swaps.lines().count() < 2 {
        skip("no active swap device");
        return None;
    }
    let (proc, line) = start(Command::new("python3").args(["-c", PROGRAM, &PAGES.to_string()]));
    let mut addrs = line
        .split_whitespace()
        .map(|a| u64::from_str_radix(a, 16).expect("address"));
    let (anon, memfd) = (addrs.next().unwrap(), addrs.next().unwrap());
    let t = Target { proc, anon, memfd };
    for start in [anon, memfd] {
        let range = format!("{start:x}-{:x}", start + OUT * page());
        let o = cli(&["pageout", &t.pid().to_string(), "--range", &range]);
        assert!(o.status.success(), "pageout: {}", text(&o));
    }
    let anon_before = t.anon_entries(0..OUT);
    assert!(
        anon_before.iter().all(|e| swapped_out(*e)),
        "the pageout left anonymous pages in RAM: {anon_before:x?}"
    );
    let shm_before = t.memfd_states(0..OUT);
    assert!(
        shm_before.iter().all(|s| out_of_ram(*s)),
        "the pageout left memfd pages in RAM: {shm_before:?}"
    );
    Some(t)
}

/// What one send did: its report (the last NDJSON line), its stderr, and
/// the swap-ins during it.
struct Sent {
    report: serde_json::Value,
    stderr: String,
    swapins: u64,
}

/// `pagescope send PID --to RECEIVER --json --max-iterations 1 EXTRA...`
/// into a receiver started with `receive_args`.
fn send(t: &Target, receive_args: &[&str], extra: &[&str]) -> Sent {
    let r = Receiver::start(receive_args);
    let pid = t.pid().to_string();
    let mut args = vec![
        "send",
        &pid,
        "--to",
        &r.addr,
        "--json",
        "--max-iterations",
        "1",
    ];
    args.extend_from_slice(extra);
    let in0 = pswpin();
    let o = cli(&args);
    let swapins = pswpin() - in0;
    let (rc, rerr) = r.finish();
    assert!(o.status.success(), "send: {}", text(&o));
    assert_eq!(rc, 0, "receive: {rerr}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    let last = stdout.lines().last().expect("the report");
    Sent {
        report: serde_json::from_str(last).expect("report JSON"),
        stderr: text(&o),
        swapins,
    }
}

fn n(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

fn verify_clean(dir: &str, pid: u32) {
    let v = cli(&["verify", dir, &pid.to_string(), "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&v.stdout).expect("verify JSON");
    assert_eq!(v.status.code(), Some(0), "verify: {report}\n{}", text(&v));
    assert_eq!(report["mismatched_pages"], 0, "{report}");
    assert_eq!(report["process_stopped"], true, "{report}");
}

#[test]
fn send_direct_reads_swapped_anon_pages_from_the_device_swapdev() {
    let _serial = serial();
    let Some(t) = paged_out_target() else {
        return;
    };
    let scratch = Scratch::new("send-direct");
    let img = scratch.p("img");
    let before = t.anon_entries(0..OUT);
    let s = send(&t, &["-o", &img], &["--swap", "direct", "--leave-stopped"]);
    let swap = &s.report["dump"]["swap"];
    let (anon, shmem) = (&swap["anon"], &swap["shmem"]);
    assert_eq!(swap["policy"], "direct", "{swap}");
    assert!(n(&anon["swapped"]) >= OUT, "{swap}");
    assert_eq!(
        n(&anon["direct"]) + n(&anon["direct_fallback"]),
        n(&anon["swapped"]),
        "{swap}"
    );
    assert!(n(&anon["direct"]) > 0, "{swap}");
    let fallback = n(&anon["direct_fallback"]);
    let changed = before
        .iter()
        .zip(t.anon_entries(0..OUT))
        .filter(|(b, a)| **b != *a)
        .count() as u64;
    assert!(
        changed <= fallback,
        "direct: {changed} of the swapped anonymous pages' entries changed, {fallback} fallbacks"
    );
    // shmem shows no swap slot: its swapped pages are read (swapped in)
    // and paged back out, as with keep-cold; anonymous ones add nothing.
    assert!(
        s.swapins <= fallback + n(&shmem["read"]) + 8,
        "direct: {} swap-ins; {swap}",
        s.swapins
    );
    assert!(
        s.stderr.contains("swap (direct): ") && s.stderr.contains("read from the swap device"),
        "{}",
        s.stderr
    );
    verify_clean(&img, t.pid());
}

#[test]
fn send_keep_cold_leaves_the_swapped_memfd_pages_swapped_swapdev() {
    let _serial = serial();
    let Some(t) = paged_out_target() else {
        return;
    };
    let scratch = Scratch::new("send-keep-cold");
    let img = scratch.p("img");
    let s = send(
        &t,
        &["-o", &img],
        &["--swap", "keep-cold", "--leave-stopped"],
    );
    let swap = &s.report["dump"]["swap"];
    let shmem = &swap["shmem"];
    assert!(n(&shmem["swapped"]) >= OUT, "{swap}");
    assert_eq!(n(&shmem["read"]), n(&shmem["swapped"]), "{swap}");
    assert_eq!(
        n(&shmem["paged_out"]) + n(&shmem["still_in_ram"]),
        n(&shmem["swapped"]),
        "{swap}"
    );
    let after = t.memfd_states(0..OUT);
    assert!(
        after.iter().all(|s| out_of_ram(*s)),
        "keep-cold: memfd pages swapped before the send are in RAM after it: {after:?}; {swap}"
    );
    let anon = t.anon_entries(0..OUT);
    assert!(
        anon.iter().all(|e| swapped_out(*e)),
        "keep-cold: anonymous pages left in RAM: {anon:x?}; {swap}"
    );
    assert!(s.stderr.contains("swap (keep-cold): "), "{}", s.stderr);
    verify_clean(&img, t.pid());
}

#[test]
fn pageout_sent_leaves_the_sent_pages_out_of_ram_swapdev() {
    let _serial = serial();
    let Some(t) = paged_out_target() else {
        return;
    };
    let scratch = Scratch::new("send-pageout");
    let img = scratch.p("img");
    let s = send(
        &t,
        &["-o", &img],
        &["--swap", "direct", "--pageout-sent", "--leave-stopped"],
    );
    let p = &s.report["pageout_sent"];
    assert_eq!(p["source_stopped"], true, "{p}");
    assert!(n(&p["sent_pages"]) >= 2 * PAGES, "{p}");
    assert!(n(&p["in_ram"]) >= 2 * (PAGES - OUT), "{p}");
    assert_eq!(
        n(&p["paged_out"]) + n(&p["still_in_ram"]),
        n(&p["in_ram"]),
        "{p}"
    );
    // Every page of both regions is out of RAM: the 32 swapped before
    // (direct and keep-cold kept them out), the 32 sent from RAM.
    let anon = t.anon_entries(0..PAGES);
    assert!(
        anon.iter().all(|e| swapped_out(*e)),
        "--pageout-sent left anonymous pages in RAM: {anon:x?}; {p}"
    );
    let shm = t.memfd_states(0..PAGES);
    assert!(
        shm.iter().all(|s| out_of_ram(*s)),
        "--pageout-sent left memfd pages in RAM: {shm:?}; {p}"
    );
    assert!(
        s.stderr.contains("pageout-sent (source left stopped): "),
        "{}",
        s.stderr
    );
    verify_clean(&img, t.pid());
}

/// `--object` sends the memfd alone: only its pages are paged out (the
/// anonymous ones were not sent), while the source runs on; the file
/// received is the memfd's bytes.
#[test]
fn pageout_sent_of_one_object_pages_out_only_that_object_swapdev() {
    let _serial = serial();
    let Some(t) = paged_out_target() else {
        return;
    };
    let scratch = Scratch::new("send-pageout-object");
    let file = scratch.p("ram.bin");
    let s = send(
        &t,
        &["--into", &file],
        &[
            "--object",
            "memfd:swapped-ram",
            "--swap",
            "keep-cold",
            "--pageout-sent",
        ],
    );
    let p = &s.report["pageout_sent"];
    assert_eq!(p["source_stopped"], false, "{p}");
    assert_eq!(n(&p["sent_pages"]), PAGES, "{p}");
    assert!(n(&p["in_ram"]) >= PAGES - OUT, "{p}");
    let shm = t.memfd_states(0..PAGES);
    assert!(
        shm.iter().all(|s| out_of_ram(*s)),
        "--pageout-sent left memfd pages in RAM: {shm:?}; {p}"
    );
    let anon = t.anon_entries(OUT..PAGES);
    assert!(
        anon.iter().all(|e| e & PRESENT != 0),
        "--pageout-sent paged out anonymous pages it did not send: {anon:x?}"
    );
    // Read last: it swaps the memfd back in.
    let fd = std::fs::read_dir(format!("/proc/{}/fd", t.pid()))
        .unwrap()
        .filter_map(Result::ok)
        .find(|e| {
            std::fs::read_link(e.path())
                .is_ok_and(|l| l.to_string_lossy().starts_with("/memfd:swapped-ram"))
        })
        .expect("the memfd");
    let want = std::fs::read(fd.path()).unwrap();
    assert!(
        std::fs::read(&file).unwrap() == want,
        "FILE differs from the memfd"
    );
}
