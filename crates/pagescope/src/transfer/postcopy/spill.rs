//! The pre-copy pages a post-copy receiver holds until the switch, within
//! a bound in memory (`receive --hold-in-memory`): past it, pages go to a
//! temporary file next to `FILE` (`O_TMPFILE`: unnamed, gone when the
//! receiver exits), at the page's own offset, and are read back when they
//! are installed. Not written into `FILE` itself: the destination may
//! already run and map it, and a page there would be final to it.
//!
//! Kernel interface: `open(O_TMPFILE)`, `pwrite`, `pread`.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A pre-copy page held until it is final.
enum Held {
    Data(Box<[u8]>),
    Zero,
    Spilled,
}

/// The held pages, in memory up to a bound, the rest in the spill file.
pub(super) struct HeldPages {
    pages: HashMap<u64, Held>,
    page: u64,
    budget: u64,
    in_memory: u64,
    dir: PathBuf,
    file: Option<File>,
    /// The most bytes of page data held in memory at once.
    pub(super) peak: u64,
    /// Pages written to the spill file.
    pub(super) spilled: u64,
}

/// A held page taken out: its bytes, or `None` for a zero page.
pub(super) type Taken = Option<Box<[u8]>>;

impl HeldPages {
    /// Pages of `page` bytes, at most `budget` bytes of them in memory,
    /// the rest spilled next to `file`.
    pub(super) fn new(page: usize, budget: u64, file: &Path) -> Self {
        let dir = file
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        Self {
            pages: HashMap::new(),
            page: page as u64,
            budget,
            in_memory: 0,
            dir: dir.to_owned(),
            file: None,
            peak: 0,
            spilled: 0,
        }
    }

    /// Holds page `p` (`None`: zero), replacing what was held.
    pub(super) fn put(&mut self, p: u64, data: Option<&[u8]>) -> Result<(), String> {
        self.forget(p);
        let held = match data {
            None => Held::Zero,
            Some(d) if self.in_memory + self.page <= self.budget => {
                self.in_memory += self.page;
                self.peak = self.peak.max(self.in_memory);
                Held::Data(d.into())
            }
            Some(d) => {
                let at = p * self.page;
                self.spill_file()?
                    .write_all_at(d, at)
                    .map_err(|e| format!("cannot spill held pages: {e}"))?;
                self.spilled += 1;
                Held::Spilled
            }
        };
        self.pages.insert(p, held);
        Ok(())
    }

    /// Page `p` is no longer held.
    pub(super) fn forget(&mut self, p: u64) {
        if let Some(Held::Data(_)) = self.pages.remove(&p) {
            self.in_memory -= self.page;
        }
    }

    /// Takes page `p` out: its bytes, `None` for a zero page or one not
    /// held.
    pub(super) fn take(&mut self, p: u64) -> Result<Taken, String> {
        match self.pages.remove(&p) {
            Some(Held::Data(d)) => {
                self.in_memory -= self.page;
                Ok(Some(d))
            }
            Some(Held::Spilled) => {
                let mut b = vec![0u8; self.page as usize].into_boxed_slice();
                let at = p * self.page;
                let f = self.spill_file()?;
                f.read_exact_at(&mut b, at)
                    .map_err(|e| format!("cannot read back a spilled page: {e}"))?;
                Ok(Some(b))
            }
            Some(Held::Zero) | None => Ok(None),
        }
    }

    fn spill_file(&mut self) -> Result<&File, String> {
        if self.file.is_none() {
            let fd = rustix::fs::open(
                &self.dir,
                rustix::fs::OFlags::TMPFILE
                    | rustix::fs::OFlags::RDWR
                    | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::from_raw_mode(0o600),
            )
            .map_err(|e| {
                format!(
                    "cannot make a file to spill held pages in {}: {e}",
                    self.dir.display()
                )
            })?;
            self.file = Some(File::from(fd));
        }
        Ok(self.file.as_ref().expect("made above"))
    }
}
