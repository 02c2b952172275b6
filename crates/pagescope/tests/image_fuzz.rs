//! The image reader against hostile images (an image may come from
//! elsewhere): structured mutations of a valid image, a bounded number of
//! cases per run (`PAGESCOPE_FUZZ_CASES`, default 256). Whatever the
//! mutation, opening, checking and restoring the image either fails with
//! an [`ImageError`] (exit 12 for the image's own faults) or restores
//! exactly what the intact image restores (metadata rewritten with valid
//! checksums: whatever it validly describes, inside the output directory); nothing panics and nothing is
//! written outside the output directory.
//!
//! Mutations: truncation and extension of any file, bit flips anywhere,
//! files swapped between stores, and `meta.json` rewritten (checksums
//! recomputed, so only the reader's validation stands in the way) with
//! wrong lengths, out-of-range runs, hostile store names, devices and file
//! paths.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use pagescope::PageSize;
use pagescope::image::{FileIdentity, Image, Meta, ObjectRec, PageKind, ProcessRec, Run, VmaRec};
use pagescope::raw::ImageWriter;
use pagescope::raw::image_format as format;
use proptest::prelude::*;

const PAGE: u64 = 4096;

/// A scratch directory, removed at the end.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(tag: &str) -> Scratch {
    let p = std::env::temp_dir().join(format!("pagescope-fuzz-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    Scratch(p)
}

fn run(first: u64, count: u64, kind: PageKind) -> Run {
    Run {
        first,
        count,
        kind,
        from: None,
    }
}

/// A small valid image: one process with two mappings (one with data,
/// zero and hole pages, one viewing a shared object), the object's store.
fn base_image(dir: &Path) {
    let w = ImageWriter::create(dir, PageSize::new(PAGE).unwrap(), None).unwrap();
    let own = w.store("pid-1-1000", 4).unwrap();
    let page = |b: u8| vec![b; PAGE as usize];
    own.write(0, &[page(1), page(2)].concat()).unwrap();
    let obj = w.store("object-0_1-7", 3).unwrap();
    obj.write(1, &page(9)).unwrap();
    let vma = |start: u64, pages: u64, store: Option<&str>, object, runs| VmaRec {
        start,
        end: start + pages * PAGE,
        perms: "rw-p".into(),
        offset: 0,
        dev: "00:00".into(),
        inode: 0,
        path: String::new(),
        backing: "anon".into(),
        object,
        store: store.map(str::to_owned),
        runs,
        swap_slots: Vec::new(),
    };
    let meta = Meta {
        processes: vec![ProcessRec {
            pid: 1,
            ppid: 0,
            comm: "fuzz".into(),
            vmas: vec![
                vma(
                    0x10000,
                    4,
                    Some("pid-1-1000"),
                    None,
                    vec![
                        run(0, 2, PageKind::Data),
                        run(2, 1, PageKind::Zero),
                        run(3, 1, PageKind::Hole),
                    ],
                ),
                vma(0x20000, 3, None, Some(0), vec![run(0, 3, PageKind::Object)]),
            ],
            rseq: Vec::new(),
        }],
        objects: vec![ObjectRec {
            dev: "00:01".into(),
            inode: 7,
            path: "/memfd:x (deleted)".into(),
            kind: "memfd".into(),
            pages: 3,
            store: Some("object-0_1-7".into()),
            file: None,
            runs: vec![
                run(0, 1, PageKind::Hole),
                run(1, 1, PageKind::Data),
                run(2, 1, PageKind::Zero),
            ],
        }],
        stores: Vec::new(),
        kept_tracking: None,
        swap_devices: Vec::new(),
    };
    w.commit(meta).unwrap();
}

/// Every file under `dir` (relative path → bytes).
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

fn write_files(dir: &Path, f: &BTreeMap<String, Vec<u8>>) {
    let _ = std::fs::remove_dir_all(dir);
    for (rel, bytes) in f {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
}

/// Opens, checks and restores `img` into `out`: the restored files, or
/// the error.
fn restore(
    img: &Path,
    out: &Path,
) -> Result<BTreeMap<String, Vec<u8>>, pagescope::image::ImageError> {
    let _ = std::fs::remove_dir_all(out);
    let image = Image::open(img)?;
    image.verify_data()?;
    image.restore_to_dir(out)?;
    Ok(files(out))
}

/// `meta` re-encoded with fresh checksums in `HEADER`.
fn rewrite_meta(f: &mut BTreeMap<String, Vec<u8>>, meta: &Meta) {
    let bytes = serde_json::to_vec(meta).unwrap();
    let mut h = format::decode_header(&f["HEADER"]).unwrap();
    h.meta_len = bytes.len() as u64;
    h.meta_xxh3 = format::file_sum(&bytes);
    f.insert("HEADER".into(), format::encode_header(&h));
    f.insert("meta.json".into(), bytes);
}

#[derive(Clone, Debug)]
enum Mutation {
    Truncate { file: usize, keep: usize },
    Extend { file: usize, by: usize },
    Flip { file: usize, at: usize, bit: u8 },
    Swap { a: usize, b: usize },
    Meta(MetaEdit),
}

#[derive(Clone, Debug)]
enum MetaEdit {
    StoreName(String),
    StorePages(u64),
    ObjectDev(String),
    ObjectPages(u64),
    RunCount(u64),
    RunFirst(u64),
    RunKind(u8),
    VmaEnd(u64),
    FilePath(String),
    ObjectRef(usize),
}

fn hostile_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("../../escape".to_owned()),
        Just("..".to_owned()),
        Just(".hidden".to_owned()),
        Just("a/b".to_owned()),
        Just(String::new()),
        Just("x\0y".to_owned()),
        Just("/etc/passwd".to_owned()),
        "[a-z./_-]{0,12}",
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (0..8usize, 0..1000usize).prop_map(|(file, keep)| Mutation::Truncate { file, keep }),
        (0..8usize, 1..5000usize).prop_map(|(file, by)| Mutation::Extend { file, by }),
        (0..8usize, 0..1000usize, 0..8u8).prop_map(|(file, at, bit)| Mutation::Flip {
            file,
            at,
            bit
        }),
        (0..8usize, 0..8usize).prop_map(|(a, b)| Mutation::Swap { a, b }),
        prop_oneof![
            hostile_name().prop_map(MetaEdit::StoreName),
            any::<u64>().prop_map(MetaEdit::StorePages),
            hostile_name().prop_map(MetaEdit::ObjectDev),
            any::<u64>().prop_map(MetaEdit::ObjectPages),
            prop_oneof![Just(0u64), Just(u64::MAX), 1..10u64].prop_map(MetaEdit::RunCount),
            prop_oneof![Just(u64::MAX), 0..10u64].prop_map(MetaEdit::RunFirst),
            (0..8u8).prop_map(MetaEdit::RunKind),
            any::<u64>().prop_map(MetaEdit::VmaEnd),
            hostile_name().prop_map(MetaEdit::FilePath),
            (0..4usize).prop_map(MetaEdit::ObjectRef),
        ]
        .prop_map(Mutation::Meta),
    ]
}

fn kind_of(k: u8) -> PageKind {
    [
        PageKind::Data,
        PageKind::Zero,
        PageKind::Hole,
        PageKind::InParent,
        PageKind::Swapped,
        PageKind::Object,
        PageKind::File,
        PageKind::Dedup,
    ][usize::from(k % 8)]
}

fn edit_meta(meta: &mut Meta, e: &MetaEdit) {
    let v = &mut meta.processes[0].vmas[0];
    let o = &mut meta.objects[0];
    match e.clone() {
        MetaEdit::StoreName(n) => {
            meta.stores[0].name = n.clone();
            v.store = Some(n);
        }
        MetaEdit::StorePages(n) => meta.stores[0].pages = n,
        MetaEdit::ObjectDev(d) => o.dev = d,
        MetaEdit::ObjectPages(n) => o.pages = n,
        MetaEdit::RunCount(n) => {
            if let Some(r) = v.runs.first_mut() {
                r.count = n;
            }
        }
        MetaEdit::RunFirst(n) => {
            if let Some(r) = v.runs.get_mut(1) {
                r.first = n;
            }
        }
        MetaEdit::RunKind(k) => {
            if let Some(r) = o.runs.last_mut() {
                r.kind = kind_of(k);
            }
        }
        MetaEdit::VmaEnd(n) => v.end = n,
        MetaEdit::FilePath(p) => {
            // A file identity naming any path: never opened unless device
            // and inode match (they cannot: inode 1 on device 00:00).
            o.file = Some(FileIdentity {
                path: p.clone(),
                path_hex: p.bytes().map(|b| format!("{b:02x}")).collect(),
                dev: "00:00".into(),
                inode: 1,
                size: 0,
                mtime_ns: 0,
                content_xxh3: None,
            });
            o.runs = vec![run(0, o.pages.min(3), PageKind::File)];
            o.store = None;
        }
        MetaEdit::ObjectRef(i) => v.object = Some(i),
    }
}

fn apply(f: &mut BTreeMap<String, Vec<u8>>, m: &Mutation) {
    let names: Vec<String> = f.keys().cloned().collect();
    let pick = |i: usize| names[i % names.len()].clone();
    match m {
        Mutation::Truncate { file, keep } => {
            let b = f.get_mut(&pick(*file)).unwrap();
            let n = b.len() * keep / 1000;
            b.truncate(n);
        }
        Mutation::Extend { file, by } => {
            f.get_mut(&pick(*file))
                .unwrap()
                .extend(std::iter::repeat_n(0u8, *by));
        }
        Mutation::Flip { file, at, bit } => {
            let b = f.get_mut(&pick(*file)).unwrap();
            if !b.is_empty() {
                let i = (b.len() * at / 1000).min(b.len() - 1);
                b[i] ^= 1 << bit;
            }
        }
        Mutation::Swap { a, b } => {
            let (a, b) = (pick(*a), pick(*b));
            let x = f[&a].clone();
            let y = f[&b].clone();
            f.insert(a, y);
            f.insert(b, x);
        }
        Mutation::Meta(e) => {
            // Only on metadata and a header still intact enough to edit.
            let Some(mut meta) = f
                .get("meta.json")
                .and_then(|b| serde_json::from_slice::<Meta>(b).ok())
                .filter(|m| m.stores.len() == 2 && !m.objects.is_empty())
            else {
                return;
            };
            if f.get("HEADER")
                .is_none_or(|h| format::decode_header(h).is_err())
            {
                return;
            }
            edit_meta(&mut meta, e);
            rewrite_meta(f, &meta);
        }
    }
}

fn cases() -> u32 {
    std::env::var("PAGESCOPE_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256)
}

#[test]
fn hostile_images_are_rejected_or_restore_exactly_the_original() {
    let s = scratch("img");
    let base = s.0.join("base");
    base_image(&base);
    let original = files(&base);
    let want = restore(&base, &s.0.join("want")).expect("the intact image restores");
    let img = s.0.join("case/img");
    let out = s.0.join("case/out");
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let result = runner.run(&proptest::collection::vec(mutation(), 1..4), |ms| {
        let mut f = original.clone();
        for m in &ms {
            apply(&mut f, m);
        }
        write_files(&img, &f);
        let _ = std::fs::remove_dir_all(s.0.join("case/out.partial"));
        // Metadata rewritten with fresh checksums may describe other
        // (valid) memory: it must then be accepted whole or rejected, never
        // escape. Any other mutation must be rejected or change nothing.
        let rewritten = ms.iter().any(|m| matches!(m, Mutation::Meta(_)));
        match restore(&img, &out) {
            Ok(got) => prop_assert!(
                rewritten || got == want,
                "accepted and restored something else: {:?}",
                got.keys().collect::<Vec<_>>()
            ),
            Err(e) => prop_assert!(
                !out.exists() && !s.0.join("case/out.partial").exists(),
                "rejected ({}) but left output behind",
                e
            ),
        }
        // Nothing but the image and the output under the case directory.
        for e in std::fs::read_dir(s.0.join("case")).unwrap() {
            let n = e.unwrap().file_name();
            prop_assert!(n == "img" || n == "out", "wrote {:?}", n);
        }
        prop_assert!(
            std::fs::read_dir(&s.0).unwrap().count() == 3,
            "wrote next to the case directory"
        );
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn every_corrupt_file_of_a_truncated_image_names_the_file() {
    let s = scratch("names");
    let base = s.0.join("base");
    base_image(&base);
    for (rel, bytes) in files(&base) {
        let mut f = files(&base);
        f.insert(rel.clone(), bytes[..bytes.len() / 2].to_vec());
        let img = s.0.join("t");
        write_files(&img, &f);
        let err = restore(&img, &s.0.join("o")).expect_err(&rel);
        let leaf = Path::new(&rel)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(err.to_string().contains(&leaf), "{rel}: {err}");
        assert_eq!(err.kind(), pagescope::ErrorKind::BadImage, "{rel}: {err}");
    }
}
