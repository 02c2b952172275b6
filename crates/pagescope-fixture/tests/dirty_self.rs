//! Tracking the calling process through the library API (what a VMM or a
//! runtime would do for its own guest memory).

mod common;

use common::{caps, skip};
use pagescope::dirty::{TrackerBackend, WriteSource, track_self};
use pagescope::raw::{Advice, OwnedMapping};
use pagescope::{VirtAddr, VirtRange};

#[test]
fn tracks_own_ranges_including_swap_and_threads_swapdev() {
    if !caps().has_uffd_wp_async() {
        skip("kernel lacks userfaultfd WP_ASYNC or PAGEMAP_SCAN (Linux 6.7+)");
        return;
    }
    let page = 4096usize;
    let m = OwnedMapping::anonymous(256 * page, 0).unwrap();
    m.madvise(0, m.len(), Advice::NoHugePage).unwrap();
    let range = VirtRange::from_start_len(VirtAddr::new(m.addr()), m.len() as u64).unwrap();
    let mut t = track_self(&[range], caps()).unwrap();
    assert_eq!(t.backend(), TrackerBackend::UffdWpAsync);
    assert_eq!(t.collect().unwrap().pages(), 0);
    for p in [3usize, 4, 200] {
        m.write_byte(p * page, 1).unwrap();
    }
    let r = t.collect().unwrap();
    assert_eq!(r.pages(), 3);
    assert!(
        r.written
            .iter()
            .all(|w| w.source == WriteSource::Tracked && range.contains(w.range.start()))
    );
    // Threads write disjoint pages while we collect: all of them show up.
    let mut seen = pagescope::RangeSet::new();
    std::thread::scope(|s| {
        for t in 0..2usize {
            let m = &m;
            s.spawn(move || {
                for p in (t..256).step_by(2) {
                    m.write_byte(p * page + 1, 2).unwrap();
                }
            });
        }
        for _ in 0..5 {
            seen.extend(t.collect().unwrap().ranges().ranges().iter().copied());
        }
    });
    seen.extend(t.collect().unwrap().ranges().ranges().iter().copied());
    assert_eq!(seen.pages(pagescope::PageSize::new(4096).unwrap()), 256);
    // Swapped out after a write: still reported.
    if caps().swaps.is_empty() {
        skip("no active swap device");
        return;
    }
    m.write_byte(10 * page, 3).unwrap();
    m.madvise(10 * page, page, Advice::PageOut).unwrap();
    let r = t.collect().unwrap();
    assert!(r.contains(VirtAddr::new(m.addr() + 10 * page as u64)));
    assert_eq!(r.pages(), 1);
}
