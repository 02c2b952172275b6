//! Putting an image's memory somewhere: sparse files on disk (one per
//! mapping and per shared object, holes kept as holes), a buffer, or a
//! memfd of the caller's. Every page of the chain is checked first, so a
//! corrupt image is never half-applied.

use std::fs::File;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::ImageError;
use super::read::{Image, PageFill, vma_pages};

/// What a restore wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RestoreSummary {
    /// Files written.
    pub files: Vec<PathBuf>,
    /// Pages written (data).
    pub pages: u64,
    /// Pages left as holes (zero, hole).
    pub holes: u64,
    /// Pages the image does not hold (swapped, not copied): left as holes
    /// and listed here.
    pub not_copied: u64,
}

/// Which memory of an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageRegion {
    /// The mapping starting at `start` in process `pid`.
    Vma {
        /// The process.
        pid: u32,
        /// The mapping's first address.
        start: u64,
    },
    /// Shared object `index` of the image's object table.
    Object {
        /// Its index.
        index: usize,
    },
}

impl Image {
    /// Calls `sink(page, fill, bytes)` for every page of `region`, in
    /// order.
    pub fn for_each_page(
        &self,
        region: ImageRegion,
        mut sink: impl FnMut(u64, PageFill, &[u8]) -> Result<(), ImageError>,
    ) -> Result<(), ImageError> {
        let page = self.header().page_size;
        let mut buf = vec![0u8; self.page_size()];
        let pages = self.region_pages(region)?;
        for p in 0..pages {
            let fill = match region {
                ImageRegion::Vma { pid, start } => self.vma_page(pid, start, p, &mut buf)?,
                ImageRegion::Object { index } => self.object_page(index, p, &mut buf)?,
            };
            if fill != PageFill::Data {
                buf.fill(0);
            }
            sink(p, fill, &buf)?;
        }
        let _ = page;
        Ok(())
    }

    /// Pages in `region`.
    pub fn region_pages(&self, region: ImageRegion) -> Result<u64, ImageError> {
        let page = self.header().page_size;
        match region {
            ImageRegion::Vma { pid, start } => self
                .process(pid)
                .and_then(|p| p.vmas.iter().find(|v| v.start == start))
                .map(|v| vma_pages(v, page)),
            ImageRegion::Object { index } => self.meta().objects.get(index).map(|o| o.pages),
        }
        .ok_or_else(|| ImageError::NotFound {
            what: format!("{region:?}"),
        })
    }

    /// Writes `region` into `dst` (exactly its length): the memory as it
    /// was (zeros where nothing was, or where the page was not copied).
    pub fn apply_to_slice(
        &self,
        region: ImageRegion,
        dst: &mut [u8],
    ) -> Result<RestoreSummary, ImageError> {
        let p = self.page_size();
        let need = usize::try_from(self.region_pages(region)?).unwrap_or(usize::MAX) * p;
        if dst.len() != need {
            return Err(ImageError::NotFound {
                what: format!("{region:?} of {need} bytes (the buffer has {})", dst.len()),
            });
        }
        self.verify_data()?;
        let mut sum = RestoreSummary::default();
        self.for_each_page(region, |i, fill, bytes| {
            let at = i as usize * p;
            dst[at..at + p].copy_from_slice(bytes);
            count(&mut sum, fill);
            Ok(())
        })?;
        Ok(sum)
    }

    /// Writes `region` into the file (a memfd, say) `fd` from byte
    /// `offset`: data pages only, so holes stay holes in a fresh file.
    pub fn apply_to_fd(
        &self,
        region: ImageRegion,
        fd: BorrowedFd<'_>,
        offset: u64,
    ) -> Result<RestoreSummary, ImageError> {
        self.verify_data()?;
        let p = self.page_size() as u64;
        let mut sum = RestoreSummary::default();
        self.for_each_page(region, |i, fill, bytes| {
            if fill == PageFill::Data {
                write_all_at(fd, bytes, offset + i * p)
                    .map_err(ImageError::io("write", "the destination fd"))?;
            }
            count(&mut sum, fill);
            Ok(())
        })?;
        Ok(sum)
    }

    /// Writes every mapping (`pid-PID-START-END.mem`) and every shared
    /// object (`object-DEV-INODE.mem`, DEV with `_` for `:`) of the image
    /// as sparse files into the new directory `out`: into a temporary
    /// directory first, renamed when complete.
    pub fn restore_to_dir(&self, out: &Path) -> Result<RestoreSummary, ImageError> {
        if out.exists() {
            return Err(ImageError::NotEmpty {
                path: out.to_owned(),
            });
        }
        self.verify_data()?;
        self.check_files()?;
        let tmp = out.with_extension("partial");
        let _ = std::fs::remove_dir_all(&tmp);
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&tmp)
                .map_err(ImageError::io("create", &tmp))?;
        }
        let written = self.write_regions(&tmp, out);
        if written.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        let sum = written?;
        std::fs::rename(&tmp, out).map_err(ImageError::io("rename into place", out))?;
        Ok(sum)
    }

    /// Every region as a file in `tmp` (named for `out`).
    fn write_regions(&self, tmp: &Path, out: &Path) -> Result<RestoreSummary, ImageError> {
        let mut sum = RestoreSummary::default();
        let regions = self.regions();
        for (name, region) in &regions {
            // Names are built from numbers and validated devices; never a
            // path out of the directory.
            if name.contains('/') || name.starts_with('.') {
                return Err(ImageError::Corrupt {
                    path: self.dir().join(super::format::META_FILE),
                    offset: 0,
                    what: format!("restore file name {name:?}"),
                });
            }
            let path = tmp.join(name);
            let f = create_private(&path)?;
            let len = self.region_pages(*region)? * self.page_size() as u64;
            f.set_len(len).map_err(ImageError::io("size", &path))?;
            let p = self.page_size() as u64;
            self.for_each_page(*region, |i, fill, bytes| {
                if fill == PageFill::Data && bytes.iter().any(|&b| b != 0) {
                    f.write_all_at(bytes, i * p)
                        .map_err(ImageError::io("write", &path))?;
                }
                count(&mut sum, fill);
                Ok(())
            })?;
            f.sync_all().map_err(ImageError::io("fsync", &path))?;
            sum.files.push(out.join(name));
        }
        Ok(sum)
    }

    /// Every mapping and object, with the file name a restore gives it.
    pub fn regions(&self) -> Vec<(String, ImageRegion)> {
        let mut out = Vec::new();
        for p in &self.meta().processes {
            for v in &p.vmas {
                out.push((
                    format!("pid-{}-{:x}-{:x}.mem", p.pid, v.start, v.end),
                    ImageRegion::Vma {
                        pid: p.pid,
                        start: v.start,
                    },
                ));
            }
        }
        for (index, o) in self.meta().objects.iter().enumerate() {
            out.push((
                format!("object-{}-{}.mem", o.dev.replace(':', "_"), o.inode),
                ImageRegion::Object { index },
            ));
        }
        out
    }
}

/// A new file readable and writable by its owner only (0600): memory
/// contents are as private as the process's.
fn create_private(path: &Path) -> Result<File, ImageError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(ImageError::io("create", path))
}

fn count(sum: &mut RestoreSummary, fill: PageFill) {
    match fill {
        PageFill::Data => sum.pages += 1,
        PageFill::Zero | PageFill::Hole => sum.holes += 1,
        PageFill::NotCopied => sum.not_copied += 1,
    }
}

fn write_all_at(fd: BorrowedFd<'_>, mut bytes: &[u8], mut off: u64) -> std::io::Result<()> {
    while !bytes.is_empty() {
        let n = rustix::io::pwrite(fd, bytes, off)?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        bytes = &bytes[n..];
        off += n as u64;
    }
    Ok(())
}
