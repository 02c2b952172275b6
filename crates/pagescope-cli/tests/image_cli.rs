//! Images from elsewhere and broken images, through the CLI: every
//! missing image file is exit 12 from `image show`, `verify` and
//! `restore`; a mapped file is restored only from the same file (device,
//! inode, size, mtime, content), a deleted one is copied into the image,
//! and restored files are 0600.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::programs::{Proc, Scratch, start, usable};
use common::{cli, skip};

/// Every file of an image (and of its parent) removed in turn: `image
/// show`, `verify` and `restore` all exit 12 with one line naming it.
#[test]
fn a_missing_image_file_is_exit_12_from_every_command() {
    if !usable() {
        return;
    }
    let dir = Scratch::new("missing");
    let sleeper = Proc(Command::new("sleep").arg("1000").spawn().unwrap());
    let pid = sleeper.0.id().to_string();
    std::thread::sleep(std::time::Duration::from_millis(50));
    let g0 = dir.p("g0");
    let g1 = dir.p("g1");
    // Relative paths: the copies below name their own parent.
    for (out, parent) in [("g0", None), ("g1", Some("g0"))] {
        let mut args = vec!["dump", pid.as_str(), "-o", out];
        if let Some(p) = parent {
            args.extend(["--parent", p]);
        }
        let d = Command::new(common::exe())
            .args(&args)
            .current_dir(&dir.0)
            .output()
            .unwrap();
        assert!(d.status.success(), "{}", String::from_utf8_lossy(&d.stderr));
    }
    let data_file = |img: &str, ext: &str| {
        std::fs::read_dir(format!("{img}/data"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == ext))
            .map(|p| format!("data/{}", p.file_name().unwrap().to_string_lossy()))
    };
    let files = |img: &str| {
        let mut v = vec![
            "HEADER".to_owned(),
            "meta.json".to_owned(),
            "data".to_owned(),
        ];
        v.extend(data_file(img, "pages"));
        v.extend(data_file(img, "sums"));
        v
    };
    assert_eq!(files(&g0).len(), 5, "the full image stores pages");
    let mut cases = files(&g1);
    cases.extend(files(&g0).into_iter().map(|f| format!("../g0/{f}")));
    for case in &cases {
        let copy = dir.p("copy");
        let _ = std::fs::remove_dir_all(&copy);
        std::fs::create_dir_all(&copy).unwrap();
        for g in ["g0", "g1"] {
            let ok = Command::new("cp")
                .args(["-a", &dir.p(g), &copy])
                .status()
                .unwrap()
                .success();
            assert!(ok);
        }
        let gone = std::path::Path::new(&copy).join("g1").join(case);
        if gone.is_dir() {
            std::fs::remove_dir_all(&gone).unwrap();
        } else {
            std::fs::remove_file(&gone).unwrap();
        }
        let img = format!("{copy}/g1");
        let to = format!("{copy}/restored");
        for args in [
            vec!["image", "show", img.as_str()],
            vec!["image", "show", img.as_str(), "--check-data"],
            vec!["verify", img.as_str(), pid.as_str()],
            vec!["restore", img.as_str(), "--to", to.as_str()],
        ] {
            let out = cli(&args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(12),
                "{case} missing: {args:?}: {err}"
            );
            assert_eq!(err.lines().count(), 1, "{case}: one line: {err}");
            assert!(!std::path::Path::new(&to).exists(), "{case}: restored");
        }
    }
}

const PY_FILES: &str = r#"
import mmap, os, sys
d = sys.argv[1]
f = open(d + '/kept', 'rb')
kept = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
g = open(d + '/gone', 'rb')
gone = mmap.mmap(g.fileno(), 0, prot=mmap.PROT_READ)
kept[0], gone[0]
os.unlink(d + '/gone')
g.close()
print('ready', flush=True)
sys.stdin.read()
"#;

/// A mapped file is reopened at restore only if it is still the same
/// file (another file of equal size and mtime put under its name is
/// refused, exit 12, nothing written); a deleted mapped file is copied
/// into the image and restored byte for byte; output files are 0600.
#[test]
fn files_are_restored_only_from_the_same_file_and_deleted_ones_are_copied() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if !usable() {
        return;
    }
    // On a disk filesystem: tmpfs files are shmem objects, always copied.
    let work = PathBuf::from(format!(
        "/var/tmp/pagescope-verify-files-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let work = Scratch(work);
    let kept: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 251) as u8).collect();
    let gone: Vec<u8> = (0..2 * 4096u32).map(|i| (i % 13) as u8 + 1).collect();
    std::fs::write(work.0.join("kept"), &kept).unwrap();
    std::fs::write(work.0.join("gone"), &gone).unwrap();
    let gone_inode = std::fs::metadata(work.0.join("gone")).unwrap().ino();
    let Ok((py, _)) = std::panic::catch_unwind(|| {
        start(Command::new("python3").args(["-c", PY_FILES, &work.0.display().to_string()]))
    }) else {
        skip("python3 not available");
        return;
    };
    let pid = py.0.id().to_string();
    let img = work.p("img");
    let d = cli(&["dump", &pid, "-o", &img]);
    assert!(d.status.success(), "{}", String::from_utf8_lossy(&d.stderr));
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(format!("{img}/meta.json")).unwrap()).unwrap();
    let objects = meta["objects"].as_array().unwrap();
    let kept_rec = objects
        .iter()
        .find(|o| o["path"].as_str().unwrap().ends_with("/kept"))
        .expect("kept is an object");
    assert!(kept_rec["file"]["inode"].as_u64().is_some(), "{kept_rec:#}");
    let gone_rec = objects
        .iter()
        .find(|o| o["inode"] == gone_inode)
        .expect("gone is an object");
    assert!(
        gone_rec["file"].is_null(),
        "a deleted file is copied: {gone_rec:#}"
    );
    let to = work.p("restored");
    let r = cli(&["restore", &img, "--to", &to]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let name = format!(
        "object-{}-{gone_inode}.mem",
        gone_rec["dev"].as_str().unwrap().replace(':', "_")
    );
    let restored = std::fs::read(format!("{to}/{name}")).unwrap();
    assert_eq!(
        &restored[..gone.len()],
        &gone[..],
        "the deleted file's pages"
    );
    for e in std::fs::read_dir(&to).unwrap() {
        let mode = e.unwrap().metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    // Another file, same size and mtime, under the recorded name.
    let other = work.0.join("other");
    std::fs::write(&other, vec![0x42u8; kept.len()]).unwrap();
    let mtime = std::fs::metadata(work.0.join("kept"))
        .unwrap()
        .modified()
        .unwrap();
    std::fs::File::options()
        .write(true)
        .open(&other)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    std::fs::rename(&other, work.0.join("kept")).unwrap();
    let to2 = work.p("restored2");
    let r = cli(&["restore", &img, "--to", &to2]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(12), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("kept"), "{err}");
    assert!(!std::path::Path::new(&to2).exists());
    assert!(!std::path::Path::new(&format!("{}/restored2.partial", work.0.display())).exists());
}
