//! The one way pagescope spreads work over threads: numbered items pulled
//! from a shared counter by a few workers, each with its own state (a
//! backend and its buffers), results landing in item order.
//!
//! Used by the page-table scan (chunks of the address space) and by object
//! classification (chunks of an object). Both only read the target
//! (`pread`, `PAGEMAP_SCAN`, `mincore`, `cachestat` take the target's mmap
//! lock or the object's mapping for reading), so workers do not serialise.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Workers for `items` items: `requested`, or one per CPU up to 8 when 0;
/// never more than the items.
pub(crate) fn workers(requested: usize, items: usize) -> usize {
    // Asked once: std reads the cgroup's CPU quota files every time, which
    // costs more than a small scan (the exporter scans hundreds).
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let want = if requested == 0 {
        let cpus =
            *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        cpus.min(8)
    } else {
        requested
    };
    want.clamp(1, items.max(1))
}

/// Runs `work(state, i)` for every `i < count` on `workers` threads, each
/// with its own `init()` state. Once a result is an error that `fatal`
/// says ends everything, workers stop taking items; items not run are
/// `None`. Results are in item order.
pub(crate) fn run<S, T, E>(
    count: usize,
    workers: usize,
    init: impl Fn() -> S + Sync,
    work: impl Fn(&mut S, usize) -> Result<T, E> + Sync,
    fatal: impl Fn(&E) -> bool + Sync,
) -> Vec<Option<Result<T, E>>>
where
    T: Send,
    E: Send,
{
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let results: Mutex<Vec<Option<Result<T, E>>>> = Mutex::new((0..count).map(|_| None).collect());
    let worker = || {
        let mut state = init();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= count || stop.load(Ordering::Relaxed) {
                return;
            }
            let r = work(&mut state, i);
            if r.as_ref().is_err_and(&fatal) {
                stop.store(true, Ordering::Relaxed);
            }
            if let Ok(mut v) = results.lock() {
                v[i] = Some(r);
            }
        }
    };
    if workers <= 1 {
        worker();
    } else {
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(worker);
            }
        });
    }
    results.into_inner().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_keep_item_order_and_stop_on_fatal_errors() {
        let r = run(100, 4, || 0u64, |_, i| Ok::<_, ()>(i * 2), |_| true);
        assert!(r.iter().enumerate().all(|(i, x)| *x == Some(Ok(i * 2))));
        let r = run(
            1000,
            1,
            || (),
            |_, i| if i == 3 { Err(i) } else { Ok(i) },
            |_| true,
        );
        assert_eq!(r[3], Some(Err(3)));
        assert!(
            r[4..].iter().all(Option::is_none),
            "nothing runs after a fatal error"
        );
        let r = run(
            10,
            2,
            || (),
            |_, i| if i % 2 == 0 { Err(i) } else { Ok(i) },
            |_| false,
        );
        assert!(
            r.iter().all(Option::is_some),
            "non-fatal errors do not stop the run"
        );
    }
}
