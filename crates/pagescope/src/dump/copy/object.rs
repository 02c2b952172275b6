//! Copying a shared object's pages: `pread` on pagescope's own fd of
//! the object (never through the target's mappings, so nothing is mapped
//! into it or swapped in on its behalf), each page classified and written
//! to the sink at its page index in the object.

use std::os::fd::{AsFd, BorrowedFd};

use super::{Copied, Out, Parent};
use crate::dump::DumpError;
use crate::dump::model::ObjectModel;
use crate::dump::sink::{NotStored, PageSink, StoreOwner, StoreRef};
use crate::image::format::PageKind;

/// Copies object pages `pages` (sorted object page indices) with `pread`;
/// pages in `skip` (swapped out, `--swap skip`) are recorded as swapped.
pub fn object(
    o: &mut ObjectModel,
    pages: &[u64],
    skip: &std::collections::BTreeSet<u64>,
    out: &mut Out<'_>,
    parent: &Parent<'_>,
) -> Result<Copied, DumpError> {
    if pages.is_empty() {
        return Ok(Copied::default());
    }
    let page = out.page;
    let p = page.as_usize();
    let sink = out.sink;
    let store = object_store(o, sink)?;
    let mut buf = vec![0u8; p];
    let mut scratch = vec![0u8; p];
    let mut copied = Copied::default();
    for &i in pages {
        let ix = usize::try_from(i).unwrap_or(usize::MAX);
        if ix >= o.kinds.len() {
            continue;
        }
        if skip.contains(&i) {
            sink.not_stored(&store, i, 1, NotStored::Swapped);
            o.kinds[ix] = PageKind::Swapped;
            continue;
        }
        let n = pread_page(o.fd.as_fd(), &mut buf, page.bytes(i)).map_err(|source| {
            DumpError::ObjectRead {
                inode: o.id.inode,
                source,
            }
        })?;
        buf[n..].fill(0);
        copied.pages += 1;
        let kind = if buf.iter().all(|&b| b == 0) {
            PageKind::Zero
        } else if parent.same(i, &buf, &mut scratch) {
            PageKind::InParent
        } else {
            sink.write(&store, i, &buf)?;
            copied.stored += 1;
            PageKind::Data
        };
        match kind {
            PageKind::Zero => sink.not_stored(&store, i, 1, NotStored::Zero),
            PageKind::InParent => sink.not_stored(&store, i, 1, NotStored::InParent),
            _ => {}
        }
        o.kinds[ix] = kind;
        if copied.pages % 1024 == 0 {
            out.progress.tick(1024);
        }
    }
    out.progress.tick(copied.pages % 1024);
    Ok(copied)
}

/// The store of object `o`'s pages (opened on first use).
pub(in crate::dump) fn object_store(
    o: &mut ObjectModel,
    sink: &dyn PageSink,
) -> Result<StoreRef, DumpError> {
    if let Some(s) = &o.store {
        return Ok(s.clone());
    }
    let s = sink.open_store(StoreOwner::Object(o.id), o.pages)?;
    o.store = Some(s.clone());
    Ok(s)
}

/// One page at `off` (short at end of file).
pub(in crate::dump) fn pread_page(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    off: u64,
) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match rustix::io::pread(fd, &mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(done)
}
