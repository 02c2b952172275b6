//! The handshake: each side's hello (magic, version, capabilities, mode,
//! nonce), checked before any page moves; with a pre-shared key, an
//! HMAC-SHA256 challenge-response over both nonces (the sender proves the
//! key first, then the receiver), and per-direction session keys
//! (HKDF-SHA256 of the key salted with both nonces) that tag every later
//! frame. A peer that cannot go on gets an `ERROR` frame saying why.

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::frame::{FrameReader, FrameWriter};
use super::wire::{Hello, Mode, NONCE, Record, TAG, VERSION};
use super::{Class, Conn, TransferError};

/// Every page travels with its sum (required by both sides).
pub const CAP_PAGE_SUMS: u64 = 1 << 0;
/// Pre-shared-key authentication and tagged frames.
pub const CAP_PSK: u64 = 1 << 1;
/// Resume: a sender speaks the resume records (every sender of this
/// build); a receiver keeps partial state (`receive --resume`).
pub const CAP_RESUME: u64 = 1 << 2;
/// What this build has besides the key and per-run capabilities.
const CAPS: u64 = CAP_PAGE_SUMS;

/// An established stream.
pub struct Session {
    /// Records from the peer.
    pub reader: FrameReader,
    /// Records to the peer.
    pub writer: FrameWriter,
    /// The peer's name.
    pub peer: String,
    /// The sender's page size.
    pub page_size: u32,
    /// The capabilities the peer's hello named.
    pub peer_caps: u64,
    /// The socket (TCP only), for [`close_after_error`](Self::close_after_error).
    socket: Option<std::net::TcpStream>,
}

impl Session {
    /// Tells the peer why this side gives up (best effort) and returns
    /// the error.
    pub fn refuse(&mut self, e: TransferError) -> TransferError {
        let _ = self.writer.record(&Record::Error(e.class, e.what.clone()));
        let _ = self.writer.flush();
        self.close_after_error();
        e
    }

    /// After an `ERROR`: no more writes, and what the peer still sends is
    /// read and dropped (up to 2 s) until it closes, so the `ERROR` is not
    /// lost to a reset of a socket closed with unread data.
    pub fn close_after_error(&mut self) {
        let Some(sock) = self.socket.take() else {
            return;
        };
        let _ = sock.shutdown(std::net::Shutdown::Write);
        let _ = sock.set_read_timeout(Some(std::time::Duration::from_millis(200)));
        let until = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut buf = vec![0u8; 1 << 16];
        let mut sock = sock;
        while std::time::Instant::now() < until {
            match std::io::Read::read(&mut sock, &mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(_) => return,
            }
        }
    }
}

fn nonce() -> [u8; NONCE] {
    let mut n = [0u8; NONCE];
    let mut filled = 0;
    while filled < NONCE {
        match rustix::rand::getrandom(&mut n[filled..], rustix::rand::GetRandomFlags::empty()) {
            Ok(k) => filled += k,
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => panic!("getrandom failed: no nonce for the handshake"),
        }
    }
    n
}

fn hello(psk: Option<&[u8]>, mode: Mode, page_size: u32, offered: u64, required: u64) -> Hello {
    let auth = if psk.is_some() { CAP_PSK } else { 0 } | required;
    Hello {
        version: VERSION,
        caps: CAPS | auth | offered,
        required: CAP_PAGE_SUMS | auth,
        mode,
        page_size,
        nonce: nonce(),
    }
}

/// The sender's side: offers `mode` with pages of `page_size` bytes, and
/// the capabilities `offered` (used if the peer has them too) and
/// `required` (post-copy: refused by a peer without them) besides this
/// build's own.
pub fn client(
    conn: Conn,
    psk: Option<&[u8]>,
    mode: Mode,
    page_size: u32,
    offered: u64,
    required: u64,
) -> Result<Session, TransferError> {
    let mut s = session(conn, page_size);
    let mine = hello(psk, mode, page_size, offered, required);
    send(&mut s, &Record::Hello(mine.clone()))?;
    let theirs = match expect(&mut s, "hello")? {
        Record::Hello(h) => h,
        r => return Err(s.refuse(unexpected(&s.peer, &r, "hello"))),
    };
    s.peer_caps = theirs.caps;
    if let Err(e) = compatible(&mine, &theirs, &s.peer, "receiver") {
        return Err(s.refuse(e));
    }
    if let Some(key) = psk {
        let proof = prove(key, b"sender", &mine.nonce, &theirs.nonce);
        send(&mut s, &Record::Auth(proof))?;
        match expect(&mut s, "the receiver's proof")? {
            Record::Auth(mac) if check(key, b"receiver", &theirs.nonce, &mine.nonce, &mac) => {}
            Record::Auth(_) => {
                let e = TransferError::new(
                    Class::Auth,
                    &s.peer,
                    "the receiver does not hold the pre-shared key",
                );
                return Err(s.refuse(e));
            }
            r => return Err(s.refuse(unexpected(&s.peer, &r, "the receiver's proof"))),
        }
        keys(&mut s, key, &mine.nonce, &theirs.nonce, true);
    }
    Ok(s)
}

/// The receiver's side: accepts `mode`, with the capabilities `offered`
/// and `required` besides this build's own (as [`client`]).
pub fn server(
    conn: Conn,
    psk: Option<&[u8]>,
    mode: Mode,
    offered: u64,
    required: u64,
) -> Result<Session, TransferError> {
    let mut s = session(conn, 0);
    let theirs = match s.reader.next() {
        Ok(Some(Record::Hello(h))) => h,
        Ok(Some(r)) => return Err(s.refuse(unexpected(&s.peer, &r, "hello"))),
        Ok(None) => return Err(closed(&s.peer, "hello")),
        Err(e) => {
            // Wrong magic or version: say so before going.
            let e = TransferError::new(Class::Handshake, &e.peer, e.what);
            return Err(s.refuse(e));
        }
    };
    s.peer_caps = theirs.caps;
    let mine = hello(psk, mode, 0, offered, required);
    send(&mut s, &Record::Hello(mine.clone()))?;
    if let Err(e) = compatible(&mine, &theirs, &s.peer, "sender") {
        return Err(s.refuse(e));
    }
    if theirs.mode != mode {
        let e = TransferError::new(
            Class::Handshake,
            &s.peer,
            match mode {
                Mode::Image => {
                    "this receiver writes an image (-o DIR): the sender must not use --object"
                }
                Mode::Object => {
                    "this receiver writes one object (--into FILE): the sender needs --object"
                }
            },
        );
        return Err(s.refuse(e));
    }
    if !theirs.page_size.is_power_of_two() || theirs.page_size < 4096 || theirs.page_size > 1 << 30
    {
        let e = TransferError::new(
            Class::Handshake,
            &s.peer,
            format!("page size {} is not one", theirs.page_size),
        );
        return Err(s.refuse(e));
    }
    s.page_size = theirs.page_size;
    if let Some(key) = psk {
        match expect(&mut s, "the sender's proof")? {
            Record::Auth(mac) if check(key, b"sender", &theirs.nonce, &mine.nonce, &mac) => {}
            Record::Auth(_) => {
                let e = TransferError::new(
                    Class::Auth,
                    &s.peer,
                    "authentication failed: the sender's pre-shared key is not this receiver's",
                );
                return Err(s.refuse(e));
            }
            r => return Err(s.refuse(unexpected(&s.peer, &r, "the sender's proof"))),
        }
        send(
            &mut s,
            &Record::Auth(prove(key, b"receiver", &mine.nonce, &theirs.nonce)),
        )?;
        keys(&mut s, key, &theirs.nonce, &mine.nonce, false);
    }
    Ok(s)
}

fn session(conn: Conn, page_size: u32) -> Session {
    Session {
        reader: FrameReader::new(conn.reader, &conn.peer),
        writer: FrameWriter::new(conn.writer),
        peer: conn.peer,
        page_size,
        peer_caps: 0,
        socket: conn.socket,
    }
}

pub(super) fn send(s: &mut Session, r: &Record) -> Result<(), TransferError> {
    s.writer
        .record(r)
        .and_then(|()| s.writer.flush())
        .map_err(|e| TransferError::io("write to", &s.peer, e))
}

/// The next record; the peer's `ERROR` becomes this side's error.
pub(super) fn expect(s: &mut Session, what: &str) -> Result<Record, TransferError> {
    match s.reader.next()? {
        Some(Record::Error(class, msg)) => Err(TransferError::new(
            class,
            &s.peer,
            format!("refused: {msg}"),
        )),
        Some(r) => Ok(r),
        None => Err(closed(&s.peer, what)),
    }
}

fn closed(peer: &str, what: &str) -> TransferError {
    TransferError::new(
        Class::Connection,
        peer,
        format!("the connection closed before {what}"),
    )
}

pub(super) fn unexpected(peer: &str, r: &Record, wanted: &str) -> TransferError {
    TransferError::new(
        Class::BadStream,
        peer,
        format!("record of kind {} where {wanted} was due", r.kind()),
    )
}

/// Whether each side has what the other requires.
fn compatible(mine: &Hello, theirs: &Hello, peer: &str, who: &str) -> Result<(), TransferError> {
    let missing = theirs.required & !mine.caps;
    let postcopy = super::postcopy::wire::CAP_POSTCOPY;
    if (missing | (mine.required & !theirs.caps)) & postcopy != 0 {
        let (yes, no) = if missing & postcopy != 0 {
            (who, "this side")
        } else {
            ("this side", who)
        };
        return Err(TransferError::new(
            Class::Handshake,
            peer,
            format!(
                "the {yes} runs post-copy (send --postcopy-after, receive --postcopy) and {no} does not"
            ),
        ));
    }
    if missing & CAP_PSK != 0 {
        return Err(TransferError::new(
            Class::Auth,
            peer,
            format!("the {who} requires a pre-shared key (--psk-file)"),
        ));
    }
    if missing != 0 {
        return Err(TransferError::new(
            Class::Handshake,
            peer,
            format!("the {who} requires capabilities {missing:#x} this pagescope lacks"),
        ));
    }
    let lacking = mine.required & !theirs.caps;
    if lacking & CAP_PSK != 0 {
        return Err(TransferError::new(
            Class::Auth,
            peer,
            format!("the {who} has no pre-shared key, and this side requires one"),
        ));
    }
    if lacking != 0 {
        return Err(TransferError::new(
            Class::Handshake,
            peer,
            format!("the {who} lacks required capabilities {lacking:#x}"),
        ));
    }
    Ok(())
}

type HmacSha256 = Hmac<Sha256>;

fn mac(key: &[u8], role: &[u8], first: &[u8; NONCE], second: &[u8; NONCE]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    m.update(b"pagescope stream v1 ");
    m.update(role);
    m.update(first);
    m.update(second);
    m
}

/// `role`'s proof: HMAC(key, label, its own nonce, the peer's).
fn prove(key: &[u8], role: &[u8], own: &[u8; NONCE], peer: &[u8; NONCE]) -> [u8; TAG] {
    mac(key, role, own, peer).finalize().into_bytes().into()
}

/// Checks `role`'s proof (in constant time).
fn check(
    key: &[u8],
    role: &[u8],
    own: &[u8; NONCE],
    peer: &[u8; NONCE],
    proof: &[u8; TAG],
) -> bool {
    mac(key, role, own, peer).verify_slice(proof).is_ok()
}

/// The session keys, one per direction, from the key and both nonces.
fn keys(
    s: &mut Session,
    psk: &[u8],
    sender: &[u8; NONCE],
    receiver: &[u8; NONCE],
    is_sender: bool,
) {
    let salt: Vec<u8> = sender.iter().chain(receiver).copied().collect();
    let hk = Hkdf::<Sha256>::new(Some(&salt), psk);
    let mut to_receiver = [0u8; 32];
    let mut to_sender = [0u8; 32];
    hk.expand(b"pagescope stream v1 sender to receiver", &mut to_receiver)
        .expect("32 bytes is a valid HKDF length");
    hk.expand(b"pagescope stream v1 receiver to sender", &mut to_sender)
        .expect("32 bytes is a valid HKDF length");
    let (out, inn) = if is_sender {
        (to_receiver, to_sender)
    } else {
        (to_sender, to_receiver)
    };
    s.writer.authenticate(out);
    s.reader.authenticate(inn);
}
