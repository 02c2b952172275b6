//! Regular files recorded by identity (their pages are read from the file
//! at restore, not stored): what identifies a file, and opening one an
//! image names without trusting the image.
//!
//! An image may come from elsewhere (copied, received), so the path it
//! names is only a hint: the file is opened with `openat2(2)`
//! `RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS` (Linux 5.6+; else
//! `O_NOFOLLOW`, which guards the last component only), then `fstat`ed,
//! and used only if its device, inode, size and modification time are the
//! recorded ones, and its content hash too where one was recorded (files
//! up to [`HASHED_FILE_BYTES`]). Anything else is refused
//! ([`ImageError::FileChanged`], exit 12): a path never leads into
//! another file.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags};

use super::ImageError;
use super::format::{FileIdentity, HASHED_FILE_BYTES, file_sum};
use crate::vma::ObjectId;

/// The identity of the regular file open as `fd` (pagescope's own fd of
/// a mapped file). `None` for a file that is not a regular file or was
/// deleted (no link left: it cannot be reopened by name, so its pages
/// must be copied).
pub fn of_fd(fd: BorrowedFd<'_>) -> Option<FileIdentity> {
    let st = rustix::fs::fstat(fd).ok()?;
    let regular =
        rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile;
    if !regular || st.st_nlink == 0 {
        return None;
    }
    // The kernel's own name for the file (d_path: raw bytes, no escaping).
    let link = std::fs::read_link(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&fd)
    ))
    .ok()?;
    let raw = link.as_os_str().as_bytes();
    if !raw.starts_with(b"/") || raw.ends_with(b" (deleted)") {
        return None;
    }
    let size = u64::try_from(st.st_size).ok()?;
    let content_xxh3 = if size <= HASHED_FILE_BYTES {
        Some(content_sum(fd, size).ok()?)
    } else {
        None
    };
    Some(FileIdentity {
        path: crate::proc::maps::escape_bytes(raw),
        path_hex: hex(raw),
        dev: ObjectId::of_stat(&st).dev.to_string(),
        inode: st.st_ino,
        size,
        mtime_ns: mtime_ns(&st),
        content_xxh3,
    })
}

/// Opens the file `id` names, refusing anything that is not that file.
pub fn open_checked(id: &FileIdentity) -> Result<File, ImageError> {
    let raw = unhex(&id.path_hex).ok_or_else(|| changed(Path::new(&id.path), "path not hex"))?;
    let path = PathBuf::from(std::ffi::OsStr::from_bytes(&raw));
    if !raw.starts_with(b"/") || raw.contains(&0) {
        return Err(changed(&path, "not an absolute path"));
    }
    let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NOCTTY;
    let fd = match rustix::fs::openat2(
        rustix::fs::CWD,
        &path,
        flags,
        Mode::empty(),
        ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    ) {
        Err(rustix::io::Errno::NOSYS) => rustix::fs::open(&path, flags, Mode::empty()),
        other => other,
    }
    .map_err(|e| match e {
        rustix::io::Errno::LOOP | rustix::io::Errno::XDEV => {
            changed(&path, "a symbolic link on the way")
        }
        e => ImageError::FileChanged {
            path: path.clone(),
            what: format!("cannot open it: {e}"),
        },
    })?;
    let st = rustix::fs::fstat(&fd).map_err(|e| changed(&path, &format!("fstat: {e}")))?;
    if Some(ObjectId::of_stat(&st)) != id.object_id() {
        return Err(changed(&path, "another file (device or inode differ)"));
    }
    if u64::try_from(st.st_size).ok() != Some(id.size) || mtime_ns(&st) != id.mtime_ns {
        return Err(changed(&path, "size or modification time"));
    }
    if let Some(want) = id.content_xxh3 {
        if content_sum(fd.as_fd(), id.size).ok() != Some(want) {
            return Err(changed(&path, "content"));
        }
    }
    Ok(File::from(fd))
}

fn changed(path: &Path, what: &str) -> ImageError {
    ImageError::FileChanged {
        path: path.to_owned(),
        what: what.to_owned(),
    }
}

/// A file's modification time in nanoseconds since the epoch, as
/// [`FileIdentity::mtime_ns`] records it.
pub fn mtime_ns(st: &rustix::fs::Stat) -> i128 {
    i128::from(st.st_mtime) * 1_000_000_000 + i128::from(st.st_mtime_nsec)
}

/// xxh3-64 of the first `size` bytes of `fd`.
fn content_sum(fd: BorrowedFd<'_>, size: u64) -> std::io::Result<u64> {
    let mut bytes = vec![0u8; usize::try_from(size).map_err(std::io::Error::other)?];
    let mut done = 0;
    while done < bytes.len() {
        match rustix::io::pread(fd, &mut bytes[done..], done as u64) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(file_sum(&bytes))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_reopened_only_if_it_is_the_same_file() {
        let dir = std::env::temp_dir().join(format!("pagescope-identity-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let name = dir.join("a\\b\u{e9}\n");
        std::fs::write(&name, b"hello").unwrap();
        let f = File::open(&name).unwrap();
        let id = of_fd(f.as_fd()).unwrap();
        assert_eq!(unhex(&id.path_hex).unwrap(), name.as_os_str().as_bytes());
        assert!(open_checked(&id).is_ok());
        // The same size and mtime under the recorded name, another inode.
        let other = dir.join("other");
        std::fs::write(&other, b"HELLO").unwrap();
        let mtime = std::fs::metadata(&name).unwrap().modified().unwrap();
        File::options()
            .write(true)
            .open(&other)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        std::fs::rename(&other, &name).unwrap();
        assert!(matches!(
            open_checked(&id),
            Err(ImageError::FileChanged { .. })
        ));
        // A symlink at the recorded path is not followed.
        std::fs::remove_file(&name).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", &name).unwrap();
        assert!(open_checked(&id).is_err());
        // A deleted file has no identity to reopen.
        let gone = dir.join("gone");
        std::fs::write(&gone, b"x").unwrap();
        let g = File::open(&gone).unwrap();
        std::fs::remove_file(&gone).unwrap();
        assert!(of_fd(g.as_fd()).is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
