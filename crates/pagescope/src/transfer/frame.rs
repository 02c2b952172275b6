//! Frames on a byte stream: `u32 LE length | u8 kind | payload [| tag]`,
//! the length checked against [`MAX_FRAME`] before anything is allocated;
//! once a session key is set, each frame's HMAC-SHA256 tag covers its
//! sequence number (per direction), kind and payload, so a frame cannot be
//! forged, replayed or reordered.
//!
//! Page data is copied by the kernel only: a frame goes out as one
//! `writev` of its parts (the caller's buffers), and comes in into one
//! buffer per connection, from which [`FrameReader::next_frame`] lends a
//! `PAGES` record's data ([`Frame::Pages`]) instead of copying it.

use std::io::{IoSlice, Read, Write};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::wire::{MAX_FRAME, PagesRef, Record, TAG, decode_pages, kind};
use super::{Class, TransferError};

type HmacSha256 = Hmac<Sha256>;

/// The tag of frame `seq` of `kind` with `parts` as its payload.
fn tag(key: &[u8; 32], seq: u64, kind: u8, parts: &[&[u8]]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(&seq.to_le_bytes());
    mac.update(&[kind]);
    for p in parts {
        mac.update(p);
    }
    mac
}

/// Writes frames (tagged once a session key is set).
pub struct FrameWriter {
    w: Box<dyn Write + Send>,
    key: Option<[u8; 32]>,
    seq: u64,
    /// Bytes written so far.
    pub bytes: u64,
}

impl std::fmt::Debug for FrameWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "FrameWriter {{ seq: {}, bytes: {} }}",
            self.seq, self.bytes
        )
    }
}

impl FrameWriter {
    /// Frames onto `w`.
    pub fn new(w: Box<dyn Write + Send>) -> Self {
        Self {
            w,
            key: None,
            seq: 0,
            bytes: 0,
        }
    }

    /// Tags every later frame with `key`.
    pub fn authenticate(&mut self, key: [u8; 32]) {
        self.key = Some(key);
    }

    /// Writes a record.
    pub fn record(&mut self, r: &Record) -> std::io::Result<()> {
        self.frame(r.kind(), &[&r.encode()])
    }

    /// Writes one frame of `kind` whose payload is `parts` in order.
    pub fn frame(&mut self, kind: u8, parts: &[&[u8]]) -> std::io::Result<()> {
        let payload: usize = parts.iter().map(|p| p.len()).sum();
        let tag_len = if self.key.is_some() { TAG } else { 0 };
        let len = u32::try_from(1 + payload + tag_len)
            .ok()
            .filter(|&l| l <= MAX_FRAME)
            .ok_or_else(|| std::io::Error::other("frame larger than the stream's bound"))?;
        let mut head = [0u8; 5];
        head[..4].copy_from_slice(&len.to_le_bytes());
        head[4] = kind;
        let t = self
            .key
            .as_ref()
            .map(|key| tag(key, self.seq, kind, parts).finalize().into_bytes());
        let mut slices = Vec::with_capacity(parts.len() + 2);
        slices.push(IoSlice::new(&head));
        slices.extend(parts.iter().map(|p| IoSlice::new(p)));
        if let Some(t) = &t {
            slices.push(IoSlice::new(t));
        }
        write_all_vectored(&mut *self.w, &mut slices)?;
        self.seq += 1;
        self.bytes += 4 + u64::from(len);
        Ok(())
    }

    /// Sends what is buffered.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

/// A frame read by [`FrameReader::next_frame`].
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Pages, their data still in the reader's buffer.
    Pages(PagesRef<'a>),
    /// Any other record.
    Record(Record),
}

/// Reads frames (checking tags once a session key is set).
pub struct FrameReader {
    r: Box<dyn Read + Send>,
    key: Option<[u8; 32]>,
    seq: u64,
    peer: String,
    /// The last frame's bytes: one buffer for the connection, so a frame
    /// of several MiB is not allocated, faulted in and zeroed anew.
    buf: Vec<u8>,
}

impl std::fmt::Debug for FrameReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "FrameReader {{ peer: {}, seq: {} }}",
            self.peer, self.seq
        )
    }
}

impl FrameReader {
    /// Frames from `r`, sent by `peer` (named in errors).
    pub fn new(r: Box<dyn Read + Send>, peer: &str) -> Self {
        Self {
            r,
            key: None,
            seq: 0,
            peer: peer.to_owned(),
            buf: Vec::new(),
        }
    }

    /// Checks the tag of every later frame with `key`.
    pub fn authenticate(&mut self, key: [u8; 32]) {
        self.key = Some(key);
    }

    /// The next record; `Ok(None)` at a clean end of stream (between
    /// frames).
    pub fn next(&mut self) -> Result<Option<Record>, TransferError> {
        let Some((kind, len)) = self.read_frame()? else {
            return Ok(None);
        };
        let payload = &self.buf[1..len];
        Record::decode(kind, payload)
            .map(Some)
            .map_err(|m| self.bad(m))
    }

    /// The next frame, a `PAGES` record's data borrowed from the reader's
    /// buffer (valid until the next call); `Ok(None)` at a clean end of
    /// stream.
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, TransferError> {
        let Some((kind, len)) = self.read_frame()? else {
            return Ok(None);
        };
        let payload = &self.buf[1..len];
        let frame = if kind == kind::PAGES {
            decode_pages(payload).map(Frame::Pages)
        } else {
            Record::decode(kind, payload).map(Frame::Record)
        };
        frame.map(Some).map_err(|m| self.bad(m))
    }

    /// Reads the next frame into the buffer and checks its tag: its kind
    /// and where its payload ends (`buf[1..end]`); `None` at a clean end.
    fn read_frame(&mut self) -> Result<Option<(u8, usize)>, TransferError> {
        let mut len = [0u8; 4];
        match read_full(&mut self.r, &mut len) {
            Ok(0) => return Ok(None),
            Ok(4) => {}
            Ok(n) => {
                return Err(self.bad(format!(
                    "the stream stopped mid-record ({n} of 4 length bytes)"
                )));
            }
            Err(e) => return Err(TransferError::io("read from", &self.peer, e)),
        }
        let len = u32::from_le_bytes(len);
        let tag_len = if self.key.is_some() { TAG } else { 0 };
        if len > MAX_FRAME || (len as usize) < 1 + tag_len {
            return Err(self.bad(format!(
                "frame length {len} outside 1 + {tag_len}..={MAX_FRAME}"
            )));
        }
        let mut buf = std::mem::take(&mut self.buf);
        if buf.len() < len as usize {
            buf.resize(len as usize, 0);
        }
        let kind = self.frame(&mut buf[..len as usize], tag_len);
        self.buf = buf;
        Ok(Some((kind?, len as usize - tag_len)))
    }

    /// Reads the frame of `frame.len()` bytes after its length and checks
    /// its tag (`tag_len` bytes): its kind.
    fn frame(&mut self, frame: &mut [u8], tag_len: usize) -> Result<u8, TransferError> {
        let len = frame.len();
        match read_full(&mut self.r, frame) {
            Ok(n) if n == len => {}
            Ok(n) => {
                return Err(self.bad(format!(
                    "the stream stopped mid-record ({n} of {len} bytes)"
                )));
            }
            Err(e) => return Err(TransferError::io("read from", &self.peer, e)),
        }
        let (body, t) = frame.split_at(len - tag_len);
        let (kind, payload) = (body[0], &body[1..]);
        if let Some(key) = &self.key {
            let ok = tag(key, self.seq, kind, &[payload]).verify_slice(t).is_ok();
            if !ok {
                return Err(TransferError::new(
                    Class::Auth,
                    &self.peer,
                    format!("frame {} fails its authentication tag", self.seq),
                ));
            }
        }
        self.seq += 1;
        Ok(kind)
    }

    fn bad(&self, what: String) -> TransferError {
        TransferError::new(Class::BadStream, &self.peer, what)
    }
}

/// Writes every byte of `slices` (one `writev` for a whole frame when the
/// buffer passes it through: a frame of pages is not copied into the
/// buffer, nor split into a header write and a data write).
fn write_all_vectored(w: &mut dyn Write, mut slices: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        match w.write_vectored(slices) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads until `buf` is full or the end of the stream: the bytes read.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
