//! The codec against well-formed and hostile input: every record round
//! trips; wrong magic, unknown versions, lengths past the bound, frames
//! cut short, bytes left over, unknown kinds and forged or replayed
//! frames are errors (never a panic or a large allocation).

use std::io::Write;
use std::sync::{Arc, Mutex};

use super::frame::{FrameReader, FrameWriter};
use super::wire::{Hello, MAGIC, MAX_FRAME, Mode, Record, VERSION, Why, kind};
use super::{Class, TransferError};

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn hello() -> Hello {
    Hello {
        version: VERSION,
        caps: 3,
        required: 1,
        mode: Mode::Object,
        page_size: 4096,
        nonce: [7; 32],
    }
}

fn records() -> Vec<Record> {
    vec![
        Record::Hello(hello()),
        Record::Auth([9; 32]),
        Record::Error(Class::Auth, "no".into()),
        Record::BeginPass(2, true),
        Record::OpenStore {
            store: 0,
            object: true,
            pages: 16,
            name: "o00_05-9".into(),
        },
        Record::GrowStore(0, 32),
        Record::Pages {
            store: 0,
            first: 3,
            sums: vec![1, 2],
            data: vec![5; 8192],
        },
        Record::NotStored {
            store: 0,
            first: 1,
            count: 2,
            why: Why::Dedup(4, 0x1000, 3),
        },
        Record::NotStored {
            store: 0,
            first: 1,
            count: 2,
            why: Why::Zero,
        },
        Record::EndPass(2),
        Record::Meta(b"{}".to_vec()),
        Record::Commit {
            meta_len: 2,
            meta_sum: 3,
            pages: 4,
            records: 5,
        },
        Record::Abort("gone".into()),
        Record::Ack(true, "ok".into()),
        Record::Resume(true, "boot b process 7 started 9".into()),
        Record::Have {
            first: 3,
            sums: vec![0, 5, 7],
            name: "o1-2".into(),
        },
        Record::HaveEnd(2),
        Record::Keep {
            store: 1,
            first: 2,
            sums: vec![5, 7],
        },
    ]
}

/// Frames written by a writer (keyed or not), read back by a reader.
fn through(recs: &[Record], wkey: Option<[u8; 32]>) -> Vec<u8> {
    let buf = Shared::default();
    let mut w = FrameWriter::new(Box::new(buf.clone()));
    if let Some(k) = wkey {
        w.authenticate(k);
    }
    for r in recs {
        w.record(r).unwrap();
    }
    buf.0.lock().unwrap().clone()
}

fn reader(bytes: Vec<u8>, key: Option<[u8; 32]>) -> FrameReader {
    let mut r = FrameReader::new(Box::new(std::io::Cursor::new(bytes)), "peer");
    if let Some(k) = key {
        r.authenticate(k);
    }
    r
}

fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut b = ((payload.len() + 1) as u32).to_le_bytes().to_vec();
    b.push(kind);
    b.extend_from_slice(payload);
    b
}

fn first_error(bytes: Vec<u8>) -> TransferError {
    let mut r = reader(bytes, None);
    loop {
        match r.next() {
            Ok(Some(_)) => {}
            Ok(None) => panic!("no error"),
            Err(e) => return e,
        }
    }
}

#[test]
fn every_record_round_trips_plain_and_tagged() {
    for key in [None, Some([3u8; 32])] {
        let recs = records();
        let mut r = reader(through(&recs, key), key);
        for want in &recs {
            assert_eq!(r.next().unwrap().as_ref(), Some(want));
        }
        assert!(r.next().unwrap().is_none(), "a clean end");
    }
}

#[test]
fn wrong_magic_and_unknown_versions_are_refused_by_name() {
    let mut payload = Record::Hello(hello()).encode();
    payload[..8].copy_from_slice(b"PGSCIMG\n");
    let e = first_error(frame(kind::HELLO, &payload));
    assert!(e.what.contains("wrong magic"), "{}", e.what);
    let mut payload = MAGIC.to_vec();
    payload.extend_from_slice(&2u16.to_le_bytes());
    payload.extend_from_slice(&[0; 100]); // a longer, later hello
    let e = first_error(frame(kind::HELLO, &payload));
    assert!(e.what.contains("version 2 is not supported"), "{}", e.what);
    assert_eq!(e.class, Class::BadStream);
}

#[test]
fn lengths_past_the_bound_or_cut_short_are_errors() {
    let mut huge = (MAX_FRAME + 1).to_le_bytes().to_vec();
    huge.push(kind::PAGES);
    assert!(first_error(huge).what.contains("frame length"));
    assert!(
        first_error(vec![0, 0, 0, 0])
            .what
            .contains("frame length 0")
    );
    let mut cut = frame(kind::PAGES, &[0; 100]);
    cut.truncate(50);
    assert!(first_error(cut).what.contains("mid-record"));
    assert!(first_error(vec![1, 0]).what.contains("mid-record"));
}

#[test]
fn payloads_that_do_not_add_up_are_errors() {
    // A page record announcing more sums than it carries.
    let mut p = 0u32.to_le_bytes().to_vec();
    p.extend_from_slice(&0u64.to_le_bytes());
    p.extend_from_slice(&1000u32.to_le_bytes());
    assert!(
        first_error(frame(kind::PAGES, &p))
            .what
            .contains("truncated")
    );
    // Bytes past a fixed-size record.
    let mut g = Record::GrowStore(0, 1).encode();
    g.push(0);
    assert!(
        first_error(frame(kind::GROW_STORE, &g))
            .what
            .contains("past its end")
    );
    assert!(
        first_error(frame(99, &[]))
            .what
            .contains("unknown record kind 99")
    );
    let mut n = Record::NotStored {
        store: 0,
        first: 0,
        count: 1,
        why: Why::Zero,
    }
    .encode();
    *n.last_mut().unwrap() = 42;
    assert!(
        first_error(frame(kind::NOT_STORED, &n))
            .what
            .contains("unknown reason")
    );
}

#[test]
fn forged_replayed_or_unkeyed_frames_fail_their_tag() {
    let key = [5u8; 32];
    let recs = [Record::BeginPass(0, false), Record::EndPass(0)];
    let mut bytes = through(&recs, Some(key));
    bytes[6] ^= 1; // a payload byte of the first frame
    let e = reader(bytes, Some(key)).next().unwrap_err();
    assert_eq!(e.class, Class::Auth);
    // The second frame alone: its tag is for sequence number 1, not 0.
    let bytes = through(&recs, Some(key));
    let first_len = 4 + u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
    let e = reader(bytes[first_len..].to_vec(), Some(key))
        .next()
        .unwrap_err();
    assert_eq!(e.class, Class::Auth);
    // Another key.
    let bytes = through(&recs, Some(key));
    let e = reader(bytes, Some([6; 32])).next().unwrap_err();
    assert_eq!(e.class, Class::Auth);
}

#[test]
fn pages_decode_in_place_as_records_do() {
    use super::frame::Frame;
    for key in [None, Some([3u8; 32])] {
        let recs = records();
        let mut r = reader(through(&recs, key), key);
        for want in &recs {
            let got = r.next_frame().unwrap().unwrap();
            match (got, want) {
                (
                    Frame::Pages(p),
                    Record::Pages {
                        store,
                        first,
                        sums,
                        data,
                    },
                ) => {
                    assert_eq!((p.store, p.first), (*store, *first));
                    assert_eq!((&p.sums, p.data), (sums, &data[..]));
                }
                (Frame::Record(got), want) => assert_eq!(&got, want),
                (got, want) => panic!("{got:?} for {want:?}"),
            }
        }
        assert!(r.next_frame().unwrap().is_none(), "a clean end");
    }
}

#[test]
fn a_smaller_frame_after_a_larger_one_borrows_only_its_own_bytes() {
    use super::frame::Frame;
    let big = Record::Pages {
        store: 0,
        first: 0,
        sums: vec![1, 2, 3],
        data: vec![8; 3 * 4096],
    };
    let small = Record::Pages {
        store: 1,
        first: 9,
        sums: vec![4],
        data: vec![6; 4096],
    };
    let mut r = reader(through(&[big, small, Record::EndPass(1)], None), None);
    assert!(matches!(r.next_frame().unwrap(), Some(Frame::Pages(p)) if p.data.len() == 3 * 4096));
    match r.next_frame().unwrap() {
        Some(Frame::Pages(p)) => {
            assert_eq!((p.store, p.first, p.sums), (1, 9, vec![4]));
            assert_eq!(p.data, &[6; 4096][..]);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        r.next_frame().unwrap(),
        Some(Frame::Record(Record::EndPass(1)))
    );
}

#[test]
fn in_place_pages_that_do_not_add_up_are_errors() {
    // Announcing more sums than it carries, read in place.
    let mut p = 0u32.to_le_bytes().to_vec();
    p.extend_from_slice(&0u64.to_le_bytes());
    p.extend_from_slice(&1000u32.to_le_bytes());
    let e = reader(frame(kind::PAGES, &p), None)
        .next_frame()
        .unwrap_err();
    assert!(e.what.contains("truncated"), "{}", e.what);
    assert_eq!(e.class, Class::BadStream);
    let mut cut = frame(kind::PAGES, &[0; 100]);
    cut.truncate(50);
    let e = reader(cut, None).next_frame().unwrap_err();
    assert!(e.what.contains("mid-record"), "{}", e.what);
}
