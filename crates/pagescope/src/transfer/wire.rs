//! The stream's frames and records (`docs/stream-format.md`): every frame
//! is `u32 LE length | u8 kind | payload [| 32-byte tag]`, the length
//! bounded by [`MAX_FRAME`]; once the handshake authenticated a session,
//! every frame carries an HMAC-SHA256 tag of its sequence number, kind and
//! payload. Decoding checks every length against what is left, so a
//! hostile or truncated stream gives an error, never a panic or an
//! allocation past the bound.

use super::Class;

/// The stream's magic, first in the sender's hello.
pub const MAGIC: [u8; 8] = *b"PGSCSTRM";
/// The stream version this build speaks.
pub const VERSION: u16 = 1;
/// Payload bytes one frame carries at most (page data: 8 MiB).
pub const MAX_PAYLOAD: usize = 8 << 20;
/// A frame's length field at most: kind, a page record's header and sums
/// beside 8 MiB of data, and the tag.
pub const MAX_FRAME: u32 = (MAX_PAYLOAD + (64 << 10)) as u32;
/// Bytes of an authentication tag (HMAC-SHA256).
pub const TAG: usize = 32;
/// Bytes of a handshake nonce.
pub const NONCE: usize = 32;

/// The kinds of frame.
pub mod kind {
    /// Handshake: magic, version, capabilities, mode, page size, nonce.
    pub const HELLO: u8 = 1;
    /// Handshake: the HMAC proof of the pre-shared key.
    pub const AUTH: u8 = 2;
    /// Either side gives up: class and a one-line message.
    pub const ERROR: u8 = 3;
    /// A pass begins.
    pub const BEGIN_PASS: u8 = 10;
    /// A store opens.
    pub const OPEN_STORE: u8 = 11;
    /// A store grows.
    pub const GROW_STORE: u8 = 12;
    /// Whole pages with their sums.
    pub const PAGES: u8 = 13;
    /// Pages not stored, and why.
    pub const NOT_STORED: u8 = 14;
    /// A pass ends.
    pub const END_PASS: u8 = 15;
    /// A part of the metadata JSON.
    pub const META: u8 = 16;
    /// The end: totals the receiver checks before it commits.
    pub const COMMIT: u8 = 17;
    /// The sender gives up: nothing may be committed.
    pub const ABORT: u8 = 18;
    /// The receiver's last word: status and message.
    pub const ACK: u8 = 20;
    /// Resume: who the sender is, and whether it continues a transfer.
    pub const RESUME: u8 = 40;
    /// Resume: sums of pages a receiver holds from an interrupted transfer.
    pub const HAVE: u8 = 41;
    /// Resume: the end of the receiver's `HAVE` records.
    pub const HAVE_END: u8 = 42;
    /// Resume: pages the receiver holds already, with their sums.
    pub const KEEP: u8 = 43;
}

/// What the stream is to make on the receiving side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// An image directory (every store).
    Image = 0,
    /// One shared object's pages into a file at their offsets.
    Object = 1,
}

/// The first frame each side sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The version spoken.
    pub version: u16,
    /// Capability bits this side has.
    pub caps: u64,
    /// Capability bits the peer must have.
    pub required: u64,
    /// What is sent (sender) or accepted (receiver).
    pub mode: Mode,
    /// The sender's page size (0 from the receiver).
    pub page_size: u32,
    /// Fresh random bytes for the authentication and session keys.
    pub nonce: [u8; NONCE],
}

/// Why pages are not stored (`sink::NotStored` on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// All zeros.
    Zero,
    /// Nothing there.
    Hole,
    /// As in the parent image.
    InParent,
    /// Left swapped out.
    Swapped,
    /// The object's page (a private file page).
    Object,
    /// The page of another store: pid, mapping start, page.
    Dedup(u32, u64, u64),
}

/// One record after the handshake (and the handshake's own frames).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// See [`Hello`].
    Hello(Hello),
    /// The HMAC proof of the key.
    Auth([u8; TAG]),
    /// The peer gave up.
    Error(Class, String),
    /// Pass `n` begins (stopped or not).
    BeginPass(u32, bool),
    /// Store `store` (the next index) for an object (`true`) or a mapping,
    /// named `name`, of `pages` pages.
    OpenStore {
        /// Its index: the number of stores opened before.
        store: u32,
        /// Whether it holds a shared object's pages.
        object: bool,
        /// Pages it holds.
        pages: u64,
        /// Its name in the image.
        name: String,
    },
    /// Store `.0` now holds `.1` pages.
    GrowStore(u32, u64),
    /// Pages `first..` of `store`: one sum per page, then the bytes.
    Pages {
        /// The store.
        store: u32,
        /// The first page.
        first: u64,
        /// The pages' sums.
        sums: Vec<u64>,
        /// The pages' bytes.
        data: Vec<u8>,
    },
    /// Pages `first..first + count` of `store` are not stored.
    NotStored {
        /// The store.
        store: u32,
        /// The first page.
        first: u64,
        /// How many.
        count: u64,
        /// Why.
        why: Why,
    },
    /// Pass `n` ended.
    EndPass(u32),
    /// A part of the metadata JSON.
    Meta(Vec<u8>),
    /// The end: metadata length and sum, pages and records sent.
    Commit {
        /// Bytes of metadata JSON sent.
        meta_len: u64,
        /// Their xxh3.
        meta_sum: u64,
        /// Pages sent in `Pages` records.
        pages: u64,
        /// Records sent after the handshake, this one not counted.
        records: u64,
    },
    /// The sender gave up.
    Abort(String),
    /// The receiver's status (true: committed) and message.
    Ack(bool, String),
    /// Post-copy's records (`postcopy/wire.rs`).
    Postcopy(super::postcopy::wire::PostcopyRecord),
    /// The sender asks to continue an interrupted transfer (`true`) or
    /// starts afresh; its identity (a line: host boot, process or object).
    Resume(bool, String),
    /// The receiver holds pages `first..` of store `name` with these sums
    /// (0: not held).
    Have {
        /// The first page.
        first: u64,
        /// One sum per page, 0 for a page not held.
        sums: Vec<u64>,
        /// The store's name.
        name: String,
    },
    /// The receiver's `HAVE` records are over: pages held in all.
    HaveEnd(u64),
    /// Pages `first..` of `store` are the ones the receiver holds: their
    /// sums, checked against what it holds.
    Keep {
        /// The store.
        store: u32,
        /// The first page.
        first: u64,
        /// The pages' sums.
        sums: Vec<u64>,
    },
}

impl Record {
    /// The frame kind.
    pub fn kind(&self) -> u8 {
        match self {
            Self::Hello(_) => kind::HELLO,
            Self::Auth(_) => kind::AUTH,
            Self::Error(..) => kind::ERROR,
            Self::BeginPass(..) => kind::BEGIN_PASS,
            Self::OpenStore { .. } => kind::OPEN_STORE,
            Self::GrowStore(..) => kind::GROW_STORE,
            Self::Pages { .. } => kind::PAGES,
            Self::NotStored { .. } => kind::NOT_STORED,
            Self::EndPass(_) => kind::END_PASS,
            Self::Meta(_) => kind::META,
            Self::Commit { .. } => kind::COMMIT,
            Self::Abort(_) => kind::ABORT,
            Self::Ack(..) => kind::ACK,
            Self::Postcopy(p) => p.kind(),
            Self::Resume(..) => kind::RESUME,
            Self::Have { .. } => kind::HAVE,
            Self::HaveEnd(_) => kind::HAVE_END,
            Self::Keep { .. } => kind::KEEP,
        }
    }

    /// The payload bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        match self {
            Self::Hello(h) => {
                b.extend_from_slice(&MAGIC);
                b.extend_from_slice(&h.version.to_le_bytes());
                put64(&mut b, h.caps);
                put64(&mut b, h.required);
                b.push(h.mode as u8);
                b.extend_from_slice(&h.page_size.to_le_bytes());
                b.extend_from_slice(&h.nonce);
            }
            Self::Auth(mac) => b.extend_from_slice(mac),
            Self::Error(class, msg) => {
                b.push(*class as u8);
                b.extend_from_slice(msg.as_bytes());
            }
            Self::BeginPass(n, stopped) => {
                b.extend_from_slice(&n.to_le_bytes());
                b.push(u8::from(*stopped));
            }
            Self::OpenStore {
                store,
                object,
                pages,
                name,
            } => {
                b.extend_from_slice(&store.to_le_bytes());
                b.push(u8::from(*object));
                put64(&mut b, *pages);
                b.extend_from_slice(name.as_bytes());
            }
            Self::GrowStore(store, pages) => {
                b.extend_from_slice(&store.to_le_bytes());
                put64(&mut b, *pages);
            }
            Self::Pages {
                store,
                first,
                sums,
                data,
            } => {
                b = pages_header(*store, *first, sums);
                b.extend_from_slice(data);
            }
            Self::NotStored {
                store,
                first,
                count,
                why,
            } => encode_not_stored(&mut b, *store, *first, *count, *why),
            Self::EndPass(n) => b.extend_from_slice(&n.to_le_bytes()),
            Self::Meta(part) => b.extend_from_slice(part),
            Self::Commit {
                meta_len,
                meta_sum,
                pages,
                records,
            } => {
                for v in [meta_len, meta_sum, pages, records] {
                    put64(&mut b, *v);
                }
            }
            Self::Abort(msg) => b.extend_from_slice(msg.as_bytes()),
            Self::Ack(ok, msg) | Self::Resume(ok, msg) => {
                b.push(u8::from(*ok));
                b.extend_from_slice(msg.as_bytes());
            }
            Self::Postcopy(p) => b = p.encode(),
            Self::Have { first, sums, name } => {
                b = pages_header(0, *first, sums);
                b.drain(..4);
                b.extend_from_slice(name.as_bytes());
            }
            Self::HaveEnd(pages) => put64(&mut b, *pages),
            Self::Keep { store, first, sums } => b = pages_header(*store, *first, sums),
        }
        b
    }

    /// Decodes a frame of `kind`: every length checked against what is left,
    /// nothing left over.
    pub fn decode(kind: u8, payload: &[u8]) -> Result<Self, String> {
        if super::postcopy::wire::owns(kind) {
            return super::postcopy::wire::PostcopyRecord::decode(kind, payload)
                .map(Self::Postcopy);
        }
        let mut f = Fields::new(payload, kind);
        let r = match kind {
            kind::HELLO => Self::Hello(decode_hello(&mut f)?),
            kind::AUTH => Self::Auth(f.array()?),
            kind::ERROR => Self::Error(Class::from_u8(f.u8()?), f.text()?),
            kind::BEGIN_PASS => Self::BeginPass(f.u32()?, f.u8()? != 0),
            kind::OPEN_STORE => Self::OpenStore {
                store: f.u32()?,
                object: f.u8()? != 0,
                pages: f.u64()?,
                name: f.text()?,
            },
            kind::GROW_STORE => Self::GrowStore(f.u32()?, f.u64()?),
            kind::PAGES => {
                let p = decode_pages_fields(&mut f)?;
                Self::Pages {
                    store: p.store,
                    first: p.first,
                    sums: p.sums,
                    data: p.data.to_vec(),
                }
            }
            kind::NOT_STORED => decode_not_stored(&mut f)?,
            kind::END_PASS => Self::EndPass(f.u32()?),
            kind::META => Self::Meta(f.rest().to_vec()),
            kind::COMMIT => Self::Commit {
                meta_len: f.u64()?,
                meta_sum: f.u64()?,
                pages: f.u64()?,
                records: f.u64()?,
            },
            kind::ABORT => Self::Abort(f.text()?),
            kind::ACK => Self::Ack(f.u8()? != 0, f.text()?),
            kind::RESUME => Self::Resume(f.u8()? != 0, f.text()?),
            kind::HAVE => {
                let first = f.u64()?;
                let sums = f.sums()?;
                Self::Have {
                    first,
                    sums,
                    name: f.text()?,
                }
            }
            kind::HAVE_END => Self::HaveEnd(f.u64()?),
            kind::KEEP => Self::Keep {
                store: f.u32()?,
                first: f.u64()?,
                sums: f.sums()?,
            },
            k => return Err(format!("unknown record kind {k}")),
        };
        f.end()?;
        Ok(r)
    }
}

/// A `PAGES` record whose data is borrowed from the frame it came in (the
/// receiver checks and writes it from there: no copy).
#[derive(Debug, PartialEq, Eq)]
pub struct PagesRef<'a> {
    /// The store.
    pub store: u32,
    /// The first page.
    pub first: u64,
    /// The pages' sums.
    pub sums: Vec<u64>,
    /// The pages' bytes, in the frame.
    pub data: &'a [u8],
}

/// Decodes a `PAGES` payload in place (checked as [`Record::decode`]
/// checks it).
pub fn decode_pages(payload: &[u8]) -> Result<PagesRef<'_>, String> {
    let mut f = Fields::new(payload, kind::PAGES);
    let p = decode_pages_fields(&mut f)?;
    f.end()?;
    Ok(p)
}

fn decode_pages_fields<'a>(f: &mut Fields<'a>) -> Result<PagesRef<'a>, String> {
    let (store, first, count) = (f.u32()?, f.u64()?, f.u32()?);
    let sums = f.take((count as usize).saturating_mul(8))?;
    Ok(PagesRef {
        store,
        first,
        sums: sums
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect(),
        data: f.rest(),
    })
}

/// The start of a `PAGES` payload (the data follows).
pub fn pages_header(store: u32, first: u64, sums: &[u64]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + sums.len() * 8);
    b.extend_from_slice(&store.to_le_bytes());
    put64(&mut b, first);
    b.extend_from_slice(&(sums.len() as u32).to_le_bytes());
    for s in sums {
        put64(&mut b, *s);
    }
    b
}

fn encode_not_stored(b: &mut Vec<u8>, store: u32, first: u64, count: u64, why: Why) {
    b.extend_from_slice(&store.to_le_bytes());
    put64(b, first);
    put64(b, count);
    let code = match why {
        Why::Zero => 0,
        Why::Hole => 1,
        Why::InParent => 2,
        Why::Swapped => 3,
        Why::Object => 4,
        Why::Dedup(..) => 5,
    };
    b.push(code);
    if let Why::Dedup(pid, start, page) = why {
        b.extend_from_slice(&pid.to_le_bytes());
        put64(b, start);
        put64(b, page);
    }
}

fn decode_not_stored(f: &mut Fields<'_>) -> Result<Record, String> {
    let (store, first, count) = (f.u32()?, f.u64()?, f.u64()?);
    let why = match f.u8()? {
        0 => Why::Zero,
        1 => Why::Hole,
        2 => Why::InParent,
        3 => Why::Swapped,
        4 => Why::Object,
        5 => Why::Dedup(f.u32()?, f.u64()?, f.u64()?),
        w => return Err(format!("unknown reason {w} for pages not stored")),
    };
    Ok(Record::NotStored {
        store,
        first,
        count,
        why,
    })
}

/// The hello: the magic and the version are checked before anything else
/// is read, so a later version's longer hello is refused by its version,
/// not misread.
fn decode_hello(f: &mut Fields<'_>) -> Result<Hello, String> {
    let magic: [u8; 8] = f.array()?;
    if magic != MAGIC {
        return Err("not a pagescope stream (wrong magic)".into());
    }
    let version = f.u16()?;
    if version != VERSION {
        return Err(format!(
            "stream version {version} is not supported (this pagescope speaks version {VERSION})"
        ));
    }
    Ok(Hello {
        version,
        caps: f.u64()?,
        required: f.u64()?,
        mode: match f.u8()? {
            0 => Mode::Image,
            1 => Mode::Object,
            m => return Err(format!("unknown mode {m}")),
        },
        page_size: f.u32()?,
        nonce: f.array()?,
    })
}

fn put64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}

/// A payload being decoded: every read checks what is left.
struct Fields<'a> {
    b: &'a [u8],
    at: usize,
    kind: u8,
}

impl<'a> Fields<'a> {
    fn new(b: &'a [u8], kind: u8) -> Self {
        Self { b, at: 0, kind }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        let end = end.ok_or_else(|| {
            format!(
                "record of kind {} truncated: {} bytes, needs {} at byte {}",
                self.kind,
                self.b.len(),
                n,
                self.at
            )
        })?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A `u32` count, then that many `u64` sums (checked against what is
    /// left before anything is allocated).
    fn sums(&mut self) -> Result<Vec<u64>, String> {
        let count = self.u32()? as usize;
        let bytes = self.take(count.saturating_mul(8))?;
        Ok(bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect())
    }

    fn rest(&mut self) -> &'a [u8] {
        let s = &self.b[self.at..];
        self.at = self.b.len();
        s
    }

    /// The rest as text (a name or a one-line message).
    fn text(&mut self) -> Result<String, String> {
        let s = self.rest();
        String::from_utf8(s.to_vec())
            .map_err(|_| format!("record of kind {}: text is not UTF-8", self.kind))
    }

    fn end(&self) -> Result<(), String> {
        if self.at == self.b.len() {
            Ok(())
        } else {
            Err(format!(
                "record of kind {}: {} bytes past its end",
                self.kind,
                self.b.len() - self.at
            ))
        }
    }
}
