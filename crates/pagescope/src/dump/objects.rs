//! The shared objects a dump copies or records: opened once each through
//! the `inspect` driver's `open_object` (`/proc/PID/map_files`, the fd
//! table, or the path) and grown as mappings show more of them; their
//! data extents found with `SEEK_DATA`; regular files mapped read-only recorded by identity
//! instead of copied (unless `copy_files`). An object that cannot be
//! opened is read through the process's mapping (`unopened.rs`).

use std::collections::BTreeMap;
use std::os::fd::AsFd;

use super::DumpError;
use super::model::{ObjectModel, VmaModel};
use super::sink::PageSink;
use super::unopened::UnopenedObjects;
use crate::addr::{PageSize, PageSpan};
use crate::error::ErrorKind;
use crate::image::Image;
use crate::image::format::PageKind;
use crate::kernel::KernelCaps;
use crate::proc::Target;
use crate::vma::{ObjectClass, ObjectId};

/// Every object of the dump, by identity.
pub(super) struct Objects {
    /// The objects, in the order the image records them.
    pub map: BTreeMap<ObjectId, ObjectModel>,
    /// Objects copied through the process's mappings (not openable).
    pub unopened: UnopenedObjects,
    page: PageSize,
    copy_files: bool,
}

impl Objects {
    pub(super) fn new(caps: &KernelCaps, copy_files: bool) -> Self {
        Self {
            map: BTreeMap::new(),
            unopened: UnopenedObjects::default(),
            page: caps.page_size,
            copy_files,
        }
    }

    /// The objects' identities.
    pub(super) fn ids(&self) -> Vec<ObjectId> {
        self.map.keys().copied().collect()
    }

    /// Opens (once) the object behind `m` of `target`, growing it to cover
    /// `m`; `false` if it cannot be opened (then `m` is read through the
    /// process's mapping, and a note says what that leaves out).
    pub(super) fn add(
        &mut self,
        target: &Target,
        caps: &KernelCaps,
        m: &VmaModel,
        sink: &dyn PageSink,
    ) -> Result<bool, DumpError> {
        let Some(id) = m.vma.object_id() else {
            return Ok(true);
        };
        if !self.map.contains_key(&id) {
            let Some(o) = self.open(target, caps, id, m)? else {
                return Ok(false);
            };
            self.map.insert(id, o);
        }
        let Some(o) = self.map.get_mut(&id) else {
            return Ok(true);
        };
        let span = m.vma.object_span(m.vma.range, self.page);
        if span.end() > o.pages {
            let fill = if o.file.is_some() {
                PageKind::File
            } else {
                PageKind::Hole
            };
            o.kinds
                .resize(usize::try_from(span.end()).unwrap_or(0), fill);
            o.pages = span.end();
            if let Some(s) = &o.store {
                sink.grow_store(s, o.pages)?;
            }
        }
        Ok(true)
    }

    /// The model of object `id` behind `m`, opened; `None` if it cannot be
    /// (noted).
    fn open(
        &mut self,
        target: &Target,
        caps: &KernelCaps,
        id: ObjectId,
        m: &VmaModel,
    ) -> Result<Option<ObjectModel>, DumpError> {
        let o = match crate::inspect::open_object(target, caps, &m.vma) {
            Ok(o) => o,
            Err(e) if e.kind() != ErrorKind::TargetExited => {
                let why = match &e {
                    crate::object::ObjectError::Open { tried, .. } => tried.clone(),
                    other => other.to_string(),
                };
                self.unopened.add(id, &m.vma, why, self.page);
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let written_through = m.vma.is_shared() && m.vma.perms.write;
        let by_identity =
            !self.copy_files && !written_through && m.vma.object_class() == Some(ObjectClass::File);
        // A deleted file has no identity to reopen: copied instead.
        let file = if by_identity {
            crate::image::identity::of_fd(o.fd.as_fd())
        } else {
            None
        };
        Ok(Some(ObjectModel {
            id,
            path: m.vma.path.display(),
            kind: m.vma.kind,
            pages: 0,
            fd: o.fd,
            kinds: Vec::new(),
            store: None,
            file,
            cold: Vec::new(),
        }))
    }

    /// The data pages (`SEEK_DATA`) of copied object `id` within `span`
    /// (all of it by default); its other pages there become holes.
    pub(super) fn data(
        &mut self,
        id: ObjectId,
        span: Option<PageSpan>,
    ) -> Result<Vec<u64>, DumpError> {
        let page = self.page;
        let Some(o) = self.map.get_mut(&id) else {
            return Ok(Vec::new());
        };
        if o.file.is_some() {
            return Ok(Vec::new());
        }
        let span = span.unwrap_or_else(|| PageSpan::new(0, o.pages).unwrap_or_default());
        let data = crate::object::extents::data_extents(o.fd.as_fd(), span, page).map_err(|e| {
            DumpError::ObjectRead {
                inode: id.inode,
                source: e.into(),
            }
        })?;
        for p in span.start()..span.end().min(o.pages) {
            o.kinds[usize::try_from(p).unwrap_or(0)] = PageKind::Hole;
        }
        Ok(data
            .ranges()
            .iter()
            .flat_map(|r| r.start()..r.end())
            .collect())
    }
}

/// The index of object `id` in the parent image.
pub(super) fn parent_object(parent: &Image, id: ObjectId) -> Option<usize> {
    parent
        .meta()
        .objects
        .iter()
        .position(|o| o.object_id() == Some(id))
}
