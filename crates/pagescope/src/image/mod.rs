//! Memory images: a checksummed, incremental on-disk format for the pages
//! of one process or a tree of them (`pagescope dump`), with a reader that
//! rejects any corrupt or truncated image before anything is applied.
//!
//! * `format.rs`: the records and the bytes (`docs/image-format.md`).
//! * `write.rs`: [`ImageWriter`]: page data at fixed offsets per mapping or
//!   object (sparse files, rewritten in place when a page is written
//!   again, so an image is never larger than the memory it covers and
//!   several workers can write at once), committed atomically (temporary
//!   names, fsync, the header renamed last).
//! * `read`: [`Image`]: opens and checks an image and its parent chain
//!   (every size bounded, every byte of metadata checksummed), and reads
//!   pages through the chain.
//! * `store_name`: `StoreName`: what a store of page data is called
//!   (after the mapping or the object whose pages it holds) and its files.
//! * `identity`: regular files recorded by identity, reopened only if
//!   they are the same file.
//! * `restore`: memory as sparse files (one per mapping and per shared
//!   object), or into a buffer or a memfd of the caller's.

pub(crate) mod format;
pub(crate) mod identity;
pub(crate) mod read;
pub(crate) mod restore;
pub(crate) mod store_name;
pub(crate) mod write;

use std::path::PathBuf;

pub use format::{
    DedupRef, FileIdentity, Header, HeaderFault, KeptTracking, Meta, ObjectRec, PageKind,
    ParentRef, ProcessRec, RseqRec, Run, StoreRec, SwapSlotRec, VmaRec,
};
pub use read::{Image, PageFill};
pub use restore::{ImageRegion, RestoreSummary};
pub use store_name::{StoreName, StoreOwner};
pub(crate) use write::ImageWriter;

use crate::error::ErrorKind;

/// Errors reading or writing an image. Each names the file and, for a
/// corrupt one, the byte offset.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// A file could not be read, written or created.
    #[error("cannot {what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A file of the image is missing or cannot be read (a missing
    /// `HEADER` means the directory is no image).
    #[error("cannot {what} {path}: a file of the image is missing or unreadable")]
    Unreadable {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A file's bytes are not what the image says they must be.
    #[error("{path}: corrupt at byte {offset}: {what}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Where.
        offset: u64,
        /// What is wrong.
        what: String,
    },
    /// A file is larger than any valid image has.
    #[error("{path}: {size} bytes, more than the {limit} a valid image has")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The bound.
        limit: u64,
    },
    /// The parent image is not where this image says.
    #[error("{path}: the parent image {image_id} is missing")]
    ParentMissing {
        /// The expected parent directory.
        path: PathBuf,
        /// Its id.
        image_id: String,
    },
    /// The directory holds another image than the parent named.
    #[error("{path}: holds image {found}, not the parent {expected}")]
    ParentMismatch {
        /// The directory.
        path: PathBuf,
        /// The parent's id as recorded.
        expected: String,
        /// What is there.
        found: String,
    },
    /// An image is written only into a new or empty directory.
    #[error("{path}: not empty; pagescope writes an image only into a new or empty directory")]
    NotEmpty {
        /// The directory.
        path: PathBuf,
    },
    /// A backing file read at restore changed since the dump.
    #[error("{path}: the file changed since the dump ({what})")]
    FileChanged {
        /// The file.
        path: PathBuf,
        /// What differs.
        what: String,
    },
    /// No such mapping or object in the image.
    #[error("the image has no {what}")]
    NotFound {
        /// What was asked for.
        what: String,
    },
}

impl ImageError {
    /// The broad class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Io { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied => {
                ErrorKind::PermissionDenied
            }
            Self::Io { .. } => ErrorKind::Other,
            Self::NotEmpty { .. } | Self::NotFound { .. } => ErrorKind::BadInput,
            Self::Corrupt { .. }
            | Self::Unreadable { .. }
            | Self::TooLarge { .. }
            | Self::ParentMissing { .. }
            | Self::ParentMismatch { .. }
            | Self::FileChanged { .. } => ErrorKind::BadImage,
        }
    }

    fn unreadable(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Unreadable { what, path, source }
    }

    fn io(what: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { what, path, source }
    }
}
