//! Post-copy between real processes on loopback
//! (`docs/stream-format.md`, "Post-copy"): a python3 source writing its
//! /dev/shm file without pause (pre-copy cannot converge), sent with
//! `--postcopy-after`, into a python3 destination that maps FILE and reads
//! every page in random order while post-copy runs: every page it saw,
//! and FILE, equal the source's pages at the stop (the source is left
//! stopped). And the sender killed mid-post-copy: the receiver names
//! exactly the pages that never arrived, the destination is blocked, not
//! crashed, and every page that did arrive is the source's. A post-copy
//! sender and a plain receiver refuse each other in the hello. And the
//! connection cut twice at random points of post-copy by a proxy: the
//! destination's reader blocks meanwhile, a new sender is refused while
//! the receiver waits, the sender reconnects, and every page ends up
//! equal to the source's, each installed once; a sender whose receiver
//! never comes back fails saying the source is left stopped. A mapping
//! the destination makes during post-copy is found and served. Held
//! pre-copy pages past `--hold-in-memory` are spilled and still arrive. A
//! page filled behind the receiver's back fails the receive, named. And
//! with the urgent channel (`--postcopy-preempt`) and the background paced
//! slow, the pages a reading destination touches overtake the background.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use common::exe;
use common::programs::{Proc, Scratch, start, usable};
use common::transfer::{CONNECTION, HANDSHAKE, program};

const PAGE: usize = 4096;

/// The source: `pages` random pages in `path`, written without pause.
fn source(path: &str, pages: usize) -> Proc {
    let (p, line) = start(Command::new("python3").args([
        &program("postcopy_source.py"),
        path,
        &pages.to_string(),
    ]));
    assert_eq!(line, "ready");
    p
}

/// The destination: maps `path`, reads every page after `go`, copies
/// what it saw into `seen`.
fn destination(path: &str, pages: usize, seen: &str) -> Proc {
    let (p, line) = start(Command::new("python3").args([
        &program("postcopy_dest.py"),
        path,
        &pages.to_string(),
        seen,
    ]));
    assert_eq!(line, "ready");
    p
}

/// A post-copy receiver into `file` for process `pid`, listening.
fn receiver(file: &str, pid: u32) -> (Child, String, BufReader<ChildStderr>) {
    listening(file, &["--postcopy", "--pid", &pid.to_string()])
}

/// `receive --listen 127.0.0.1:0 --into FILE ARGS…` (its stdout piped
/// with `--json`): the child, the address it printed, the rest of its
/// stderr.
fn listening(file: &str, args: &[&str]) -> (Child, String, BufReader<ChildStderr>) {
    let json = args.contains(&"--json");
    let mut child = Command::new(exe())
        .args(["receive", "--listen", "127.0.0.1:0", "--into", file])
        .args(args)
        .stdout(if json { Stdio::piped() } else { Stdio::null() })
        .stderr(Stdio::piped())
        .spawn()
        .expect("start receive");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("pagescope: listening on ")
        .unwrap_or_else(|| panic!("receive said {line:?}"))
        .to_owned();
    (child, addr, stderr)
}

/// A `--json` receiver's report (its whole stdout), once it exited.
fn report_of(child: &mut Child) -> String {
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    out
}

/// Waits (at most 60 s) for the destination to have read every page, then
/// checks that each page it saw (`seen`), and each page of `file` if
/// given, equals the source's (`src`), which has `pages` pages.
fn assert_read_as_source(seen: &str, src: &str, pages: usize, file: Option<&str>) {
    let done = format!("{seen}.done");
    let until = Instant::now() + Duration::from_secs(60);
    while !std::path::Path::new(&done).exists() {
        assert!(Instant::now() < until, "the destination read every page");
        std::thread::sleep(Duration::from_millis(50));
    }
    let want = std::fs::read(src).unwrap();
    assert_eq!(want.len(), pages * PAGE);
    let got_seen = std::fs::read(seen).unwrap();
    let got_file = file.map(|f| std::fs::read(f).unwrap());
    for p in 0..pages {
        let r = p * PAGE..(p + 1) * PAGE;
        assert!(got_seen[r.clone()] == want[r.clone()], "page {p} as read");
        if let Some(got) = &got_file {
            assert!(got[r.clone()] == want[r], "page {p} of FILE");
        }
    }
}

/// Reads `send`'s stderr up to its stopped pass.
fn until_stopped(send_err: &mut BufReader<ChildStderr>) {
    let mut line = String::new();
    while !line.contains("(stopped)") {
        line.clear();
        let n = send_err.read_line(&mut line).unwrap();
        assert!(n > 0, "send ended before its stopped pass");
    }
}

/// Waits at most `secs` for `child`; its exit code (killed on timeout).
fn wait(child: &mut Child, secs: u64, what: &str) -> i32 {
    let until = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code().unwrap_or(-1);
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {secs} s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The rest of a stderr.
fn rest(mut r: BufReader<ChildStderr>) -> String {
    let mut s = String::new();
    r.read_to_string(&mut s).unwrap();
    s
}

/// The one-letter state of process `pid`.
fn state(pid: u32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    after.chars().next().unwrap()
}

fn send_args(src_pid: u32, addr: &str, object: &str) -> Command {
    let mut c = Command::new(exe());
    c.args([
        "send",
        &src_pid.to_string(),
        "--to",
        addr,
        "--object",
        object,
    ]);
    c
}

#[test]
fn postcopy_fills_a_destination_reading_in_random_order() {
    if !usable() {
        return;
    }
    let pages = 8192;
    let scratch = Scratch::new("postcopy");
    let (src, dst, seen) = (scratch.p("src"), scratch.p("dst"), scratch.p("seen"));
    let source = source(&src, pages);
    let mut dest = destination(&dst, pages, &seen);
    let (mut recv, addr, recv_err) = receiver(&dst, dest.0.id());
    writeln!(dest.0.stdin.as_mut().unwrap(), "go").unwrap();
    let mut send = send_args(source.0.id(), &addr, &src)
        .args(["--postcopy-after", "2", "--max-downtime", "10ms"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let send_rc = wait(&mut send, 120, "send");
    let mut send_err = String::new();
    send.stderr
        .take()
        .unwrap()
        .read_to_string(&mut send_err)
        .unwrap();
    if send_rc != 0 {
        let _ = recv.kill();
    }
    let recv_rc = wait(&mut recv, 60, "receive");
    let recv_err = rest(recv_err);
    assert_eq!(send_rc, 0, "send: {send_err}\nreceive: {recv_err}");
    assert_eq!(recv_rc, 0, "receive: {recv_err}");
    assert!(send_err.contains("post-copy:"), "{send_err}");
    assert!(recv_err.contains(" by fault"), "{recv_err}");
    assert_eq!(state(source.0.id()), 'T', "the source is left stopped");

    assert_read_as_source(&seen, &src, pages, Some(&dst));
    let fds = std::fs::read_dir(format!("/proc/{}/fd", dest.0.id())).unwrap();
    let uffds = fds
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().contains("userfaultfd"))
        .count();
    assert_eq!(
        uffds, 0,
        "the destination's userfaultfd is closed at the end"
    );
}

/// `first-last,…` from the receiver's message.
fn missing_pages(msg: &str) -> Vec<bool> {
    let at = msg.find("pages never arrived: ").expect("names the pages") + 21;
    let list = msg[at..].split(';').next().unwrap().trim();
    let mut gone = vec![false; 1 << 20];
    for part in list.split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b) = (a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap());
        gone[a..=b].fill(true);
    }
    gone
}

#[test]
fn a_dead_sender_leaves_the_destination_blocked_and_names_the_missing_pages() {
    if !usable() {
        return;
    }
    let pages = 4096;
    let scratch = Scratch::new("postcopy-dead");
    let (src, dst, seen) = (scratch.p("src"), scratch.p("dst"), scratch.p("seen"));
    let source = source(&src, pages);
    let mut dest = destination(&dst, pages, &seen);
    let (mut recv, addr, recv_err) = receiver(&dst, dest.0.id());
    writeln!(dest.0.stdin.as_mut().unwrap(), "go").unwrap();
    // A slow link: the full pass and post-copy take seconds each.
    let mut send = send_args(source.0.id(), &addr, &src)
        .args(["--postcopy-after", "0", "--bandwidth", "4M"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut send_err = BufReader::new(send.stderr.take().unwrap());
    until_stopped(&mut send_err);
    std::thread::sleep(Duration::from_millis(500));
    send.kill().unwrap();
    let _ = send.wait();

    let recv_rc = wait(&mut recv, 30, "receive");
    let msg = rest(recv_err);
    assert_eq!(recv_rc, CONNECTION, "{msg}");
    assert_eq!(msg.lines().count(), 1, "one line: {msg}");
    assert!(msg.contains("block"), "{msg}");
    let gone = missing_pages(&msg);
    let want = std::fs::read(&src).unwrap();
    let got = std::fs::read(&dst).unwrap();
    let mut lost = 0;
    for (p, &missing) in gone.iter().enumerate().take(pages) {
        let r = p * PAGE..(p + 1) * PAGE;
        let same = got[r.clone()] == want[r];
        assert_eq!(same, !missing, "page {p}: arrived iff not named missing");
        lost += usize::from(missing);
    }
    assert!(lost > 0, "the sender died with pages left to send");

    std::thread::sleep(Duration::from_millis(300));
    assert!(
        dest.0.try_wait().unwrap().is_none(),
        "the destination lives"
    );
    let st = state(dest.0.id());
    assert!(
        matches!(st, 'S' | 'D'),
        "the destination waits (state {st})"
    );
}

#[test]
fn a_postcopy_sender_and_a_plain_receiver_refuse_each_other() {
    if !usable() {
        return;
    }
    let scratch = Scratch::new("postcopy-plain");
    let (src, dst) = (scratch.p("src"), scratch.p("dst"));
    let source = source(&src, 64);
    let (mut recv, addr, recv_err) = listening(&dst, &[]);
    let sent = send_args(source.0.id(), &addr, &src)
        .args(["--postcopy-after", "1"])
        .output()
        .unwrap();
    let recv_rc = wait(&mut recv, 30, "receive");
    let msg = rest(recv_err);
    let send_msg = String::from_utf8_lossy(&sent.stderr);
    assert_eq!(sent.status.code(), Some(HANDSHAKE), "{send_msg}");
    assert_eq!(recv_rc, HANDSHAKE, "{msg}");
    assert!(msg.contains("runs post-copy"), "{msg}");
    assert!(!std::path::Path::new(&dst).exists(), "nothing written");
}

/// The frame kind of `START` (`docs/stream-format.md`, "Post-copy").
const START: u8 = 31;

/// A TCP proxy for one transfer's connections: connection `i` is cut
/// after `cuts[i]` bytes from the sender (the first counted from its
/// `START` frame, so the cut falls inside post-copy), then the proxy
/// reports the cut and waits `pause` before it takes the next connection;
/// a connection past the cuts is forwarded whole.
fn cutting_proxy(to: &str, cuts: Vec<u64>, pause: Duration) -> (String, Receiver<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let to = to.to_owned();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for i in 0..=cuts.len() {
            let Ok((sender, _)) = listener.accept() else {
                return;
            };
            let receiver = TcpStream::connect(&to).unwrap();
            let (mut back_from, mut back_to) =
                (receiver.try_clone().unwrap(), sender.try_clone().unwrap());
            let back = std::thread::spawn(move || {
                let _ = std::io::copy(&mut back_from, &mut back_to);
            });
            let from_start = if i == 0 { Some(START) } else { None };
            forward(&sender, &receiver, cuts.get(i).copied(), from_start);
            let _ = sender.shutdown(Shutdown::Both);
            let _ = receiver.shutdown(Shutdown::Both);
            let _ = back.join();
            if i == cuts.len() {
                return;
            }
            let _ = tx.send(i);
            std::thread::sleep(pause);
        }
    });
    (addr, rx)
}

/// Forwards whole frames until `cut` bytes (counted once a frame of kind
/// `after` passed, or from the start) were forwarded, cutting a frame.
fn forward(mut from: &TcpStream, mut to: &TcpStream, cut: Option<u64>, after: Option<u8>) {
    let mut counting = after.is_none();
    let mut sent = 0u64;
    loop {
        let mut len = [0u8; 4];
        if from.read_exact(&mut len).is_err() {
            return;
        }
        let mut frame = len.to_vec();
        frame.resize(4 + u32::from_le_bytes(len) as usize, 0);
        if from.read_exact(&mut frame[4..]).is_err() {
            return;
        }
        let keep = match cut {
            Some(c) if counting => usize::try_from(c.saturating_sub(sent)).unwrap(),
            _ => frame.len(),
        };
        let part = &frame[..frame.len().min(keep)];
        if to.write_all(part).is_err() {
            return;
        }
        if counting {
            sent += part.len() as u64;
        }
        counting |= after == Some(frame[4]);
        if part.len() < frame.len() {
            return;
        }
    }
}

/// A small xorshift generator seeded from the clock (the seed printed).
fn random() -> impl FnMut(u64, u64) -> u64 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("cut seed {seed}");
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    move |lo, hi| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        lo + x % (hi - lo)
    }
}

#[test]
fn a_connection_cut_twice_during_postcopy_resumes_and_every_page_arrives_once() {
    if !usable() {
        return;
    }
    let pages = 8192;
    let scratch = Scratch::new("postcopy-cut");
    let (src, dst, seen) = (scratch.p("src"), scratch.p("dst"), scratch.p("seen"));
    let origin = source(&src, pages);
    let mut dest = destination(&dst, pages, &seen);
    let pid = dest.0.id().to_string();
    let (mut recv, addr, mut recv_err) = listening(&dst, &["--json", "--postcopy", "--pid", &pid]);
    let mut rnd = random();
    // Post-copy sends 32 MiB at 8 MiB/s over the first connection; the
    // later ones are not paced.
    let cuts = vec![rnd(256 << 10, 4 << 20), rnd(64 << 10, 2 << 20)];
    let (proxy, cut) = cutting_proxy(&addr, cuts.clone(), Duration::from_secs(3));
    writeln!(dest.0.stdin.as_mut().unwrap(), "go").unwrap();
    let mut send = send_args(origin.0.id(), &proxy, &src)
        .args(["--postcopy-after", "0", "--bandwidth", "8M", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // The first cut: the reader blocks, the receiver waits and refuses
    // a sender that does not continue this transfer.
    assert_eq!(cut.recv_timeout(Duration::from_secs(60)), Ok(0), "{cuts:?}");
    let done = format!("{seen}.done");
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(100));
        let st = state(dest.0.id());
        assert!(matches!(st, 'S' | 'D'), "the reader blocks (state {st})");
        assert!(!std::path::Path::new(&done).exists(), "cut at {cuts:?}");
    }
    let other_src = scratch.p("other");
    let other = source(&other_src, 16);
    let stray = send_args(other.0.id(), &addr, &other_src)
        .args(["--postcopy-after", "1"])
        .output()
        .unwrap();
    let stray_err = String::from_utf8_lossy(&stray.stderr);
    if stray.status.code() != Some(HANDSHAKE) {
        let _ = recv.kill();
        let _ = send.kill();
        let mut e = String::new();
        let _ = recv_err.read_to_string(&mut e);
        let mut se = String::new();
        let _ = send.stderr.take().unwrap().read_to_string(&mut se);
        panic!("{stray_err}\nreceive: {e}\nsend: {se}");
    }
    assert!(
        stray_err.contains("waits for its post-copy sender"),
        "{stray_err}"
    );
    assert_eq!(cut.recv_timeout(Duration::from_secs(60)), Ok(1), "{cuts:?}");

    let send_rc = wait(&mut send, 120, "send");
    let mut send_out = String::new();
    send.stdout
        .take()
        .unwrap()
        .read_to_string(&mut send_out)
        .unwrap();
    let mut send_err = String::new();
    send.stderr
        .take()
        .unwrap()
        .read_to_string(&mut send_err)
        .unwrap();
    if send_rc != 0 {
        let _ = recv.kill();
    }
    let recv_rc = wait(&mut recv, 60, "receive");
    let recv_out = report_of(&mut recv);
    let recv_err = rest(recv_err);
    assert_eq!(send_rc, 0, "{cuts:?} send: {send_err}\nreceive: {recv_err}");
    assert_eq!(recv_rc, 0, "{cuts:?} receive: {recv_err}");
    assert_eq!(state(origin.0.id()), 'T', "the source is left stopped");

    let r: serde_json::Value = serde_json::from_str(&recv_out).expect("receive's report");
    assert_eq!(r["reconnects"], 2, "{r}");
    assert_eq!(r["pages_duplicate"], 0, "{r}");
    assert_eq!(r["pages_already_present"], 0, "{r}");
    let installed = r["pages_by_fault"].as_u64().unwrap() + r["pages_background"].as_u64().unwrap();
    assert_eq!(installed, pages as u64, "every page installed once: {r}");
    let s: serde_json::Value =
        serde_json::from_str(send_out.lines().last().unwrap()).expect("send's report");
    let pc = &s["postcopy"];
    assert_eq!(pc["reconnects"], 2, "{pc}");
    let kept = pc["pending_at_switch"].as_u64().unwrap();
    let resent = pc["pages_resent"].as_u64().unwrap();
    let sent = pc["pages_requested"].as_u64().unwrap() + pc["pages_background"].as_u64().unwrap();
    assert_eq!(
        sent,
        kept + resent,
        "only what the receiver lacked went again: {pc}"
    );
    assert!(resent < kept / 2, "{pc}");

    let until = Instant::now() + Duration::from_secs(60);
    while !std::path::Path::new(&done).exists() {
        assert!(Instant::now() < until, "the destination read every page");
        std::thread::sleep(Duration::from_millis(50));
    }
    let want = std::fs::read(&src).unwrap();
    let got_seen = std::fs::read(&seen).unwrap();
    let got_file = std::fs::read(&dst).unwrap();
    for p in 0..pages {
        let r = p * PAGE..(p + 1) * PAGE;
        assert!(
            got_seen[r.clone()] == want[r.clone()],
            "page {p} as read, {cuts:?}"
        );
        assert!(got_file[r.clone()] == want[r], "page {p} of FILE, {cuts:?}");
    }
}

#[test]
fn a_sender_whose_receiver_never_comes_back_keeps_the_source_stopped_and_says_so() {
    if !usable() {
        return;
    }
    let pages = 4096;
    let scratch = Scratch::new("postcopy-gone");
    let (src, dst, seen) = (scratch.p("src"), scratch.p("dst"), scratch.p("seen"));
    let origin = source(&src, pages);
    let mut dest = destination(&dst, pages, &seen);
    let (mut recv, addr, _recv_err) = receiver(&dst, dest.0.id());
    writeln!(dest.0.stdin.as_mut().unwrap(), "go").unwrap();
    let mut send = send_args(origin.0.id(), &addr, &src)
        .args(["--postcopy-after", "0", "--bandwidth", "4M"])
        .args(["--reconnect-wait", "1s"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut send_err = BufReader::new(send.stderr.take().unwrap());
    until_stopped(&mut send_err);
    std::thread::sleep(Duration::from_millis(500));
    recv.kill().unwrap();
    let _ = recv.wait();

    let rc = wait(&mut send, 30, "send");
    let mut msg = String::new();
    send_err.read_to_string(&mut msg).unwrap();
    assert_eq!(rc, CONNECTION, "{msg}");
    assert!(msg.contains("no receiver took a new one"), "{msg}");
    assert!(msg.contains("the source is left stopped"), "{msg}");
    assert_eq!(state(origin.0.id()), 'T', "the source is left stopped");
}

#[test]
fn a_mapping_the_destination_makes_later_is_found_and_served() {
    if !usable() {
        return;
    }
    let pages = 4096;
    let scratch = Scratch::new("postcopy-remap");
    let (src, dst, seen) = (scratch.p("src"), scratch.p("dst"), scratch.p("seen"));
    let origin = source(&src, pages);
    let (mut dest, line) = start(Command::new("python3").args([
        &program("postcopy_dest_remap.py"),
        &dst,
        &pages.to_string(),
        &seen,
        "0.3",
    ]));
    assert_eq!(line, "ready");
    let pid = dest.0.id().to_string();
    let (mut recv, addr, recv_err) = listening(&dst, &["--json", "--postcopy", "--pid", &pid]);
    let mut send = send_args(origin.0.id(), &addr, &src)
        .args(["--postcopy-after", "0", "--bandwidth", "8M"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut send_err = BufReader::new(send.stderr.take().unwrap());
    until_stopped(&mut send_err);
    // The new mapping is made during post-copy (the receiver is running).
    writeln!(dest.0.stdin.as_mut().unwrap(), "go").unwrap();
    let send_rc = wait(&mut send, 120, "send");
    let mut send_rest = String::new();
    send_err.read_to_string(&mut send_rest).unwrap();
    let recv_rc = wait(&mut recv, 60, "receive");
    let recv_out = report_of(&mut recv);
    let recv_err = rest(recv_err);
    assert_eq!(send_rc, 0, "send: {send_rest}\nreceive: {recv_err}");
    assert_eq!(recv_rc, 0, "receive: {recv_err}");
    let r: serde_json::Value = serde_json::from_str(&recv_out).expect("receive's report");
    assert_eq!(r["mappings_added"], 1, "{r}");
    assert_eq!(r["pages_already_present"], 0, "{r}");

    assert_read_as_source(&seen, &src, pages, None);
}

#[test]
fn held_precopy_pages_past_the_bound_are_spilled_and_still_arrive() {
    if !usable() {
        return;
    }
    let pages = 8192;
    let scratch = Scratch::new("postcopy-spill");
    let (src, dst, seen) = (scratch.p("src"), scratch.p("dst"), scratch.p("seen"));
    let origin = source(&src, pages);
    let mut dest = destination(&dst, pages, &seen);
    let pid = dest.0.id().to_string();
    let (mut recv, addr, recv_err) = listening(
        &dst,
        &[
            "--json",
            "--postcopy",
            "--pid",
            &pid,
            "--hold-in-memory",
            "1M",
        ],
    );
    writeln!(dest.0.stdin.as_mut().unwrap(), "go").unwrap();
    let send = send_args(origin.0.id(), &addr, &src)
        .args(["--postcopy-after", "2", "--max-downtime", "10ms"])
        .output()
        .unwrap();
    let recv_rc = wait(&mut recv, 60, "receive");
    let recv_out = report_of(&mut recv);
    let recv_err = rest(recv_err);
    let send_err = String::from_utf8_lossy(&send.stderr);
    assert_eq!(
        send.status.code(),
        Some(0),
        "send: {send_err}\nreceive: {recv_err}"
    );
    assert_eq!(recv_rc, 0, "receive: {recv_err}");
    let r: serde_json::Value = serde_json::from_str(&recv_out).expect("receive's report");
    assert!(r["held_peak_bytes"].as_u64().unwrap() <= 1 << 20, "{r}");
    assert!(r["pages_spilled"].as_u64().unwrap() > 0, "{r}");

    assert_read_as_source(&seen, &src, pages, Some(&dst));
}

/// A page of FILE that something other than the receiver filled during
/// post-copy (here a plain write to FILE; in the field a mapping not yet
/// registered) is never overwritten, and the receive does not pass for a
/// clean one: it installs every other page, then exits 26 naming it.
#[test]
fn a_page_filled_behind_the_receivers_back_fails_the_receive_naming_it() {
    if !usable() {
        return;
    }
    let pages = 256;
    let scratch = Scratch::new("postcopy-filled");
    let (src, dst, seen) = (scratch.p("src"), scratch.p("dst"), scratch.p("seen"));
    let source = source(&src, pages);
    let dest = destination(&dst, pages, &seen);
    let (mut recv, addr, recv_err) = receiver(&dst, dest.0.id());
    let f = std::fs::OpenOptions::new().write(true).open(&dst).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x5a; PAGE], 5 * PAGE as u64).unwrap();
    let send_rc = send_args(source.0.id(), &addr, &src)
        .args(["--postcopy-after", "1", "--max-downtime", "10ms"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .code();
    let recv_rc = wait(&mut recv, 60, "receive");
    let recv_err = rest(recv_err);
    assert_eq!(
        send_rc,
        Some(0),
        "the transfer itself completed: {recv_err}"
    );
    assert_eq!(recv_rc, 26, "{recv_err}");
    assert!(
        recv_err.contains("1 pages of") && recv_err.contains("[5]"),
        "{recv_err}"
    );
    let got = std::fs::read(&dst).unwrap();
    assert!(
        got[5 * PAGE..6 * PAGE].iter().all(|&b| b == 0x5a),
        "never overwritten"
    );
}

#[test]
fn requested_pages_overtake_a_slow_background_over_the_urgent_channel() {
    if !usable() {
        return;
    }
    // 8 MiB at 512 KiB/s: the background alone needs 16 s to reach every
    // page; the destination touches them all in random order.
    let (pages, rate) = (2048u64, 512u64 << 10);
    let scratch = Scratch::new("postcopy-preempt");
    let (src, dst, seen) = (scratch.p("src"), scratch.p("dst"), scratch.p("seen"));
    let origin = source(&src, pages as usize);
    let mut dest = destination(&dst, pages as usize, &seen);
    let pid = dest.0.id().to_string();
    let (mut recv, addr, recv_err) = listening(&dst, &["--json", "--postcopy", "--pid", &pid]);
    writeln!(dest.0.stdin.as_mut().unwrap(), "go").unwrap();
    let out = send_args(origin.0.id(), &addr, &src)
        .args(["--postcopy-after", "0", "--postcopy-preempt", "--json"])
        .args(["--bandwidth", &rate.to_string()])
        .output()
        .unwrap();
    let send_err = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        let _ = recv.kill();
    }
    let recv_rc = wait(&mut recv, 60, "receive");
    let recv_out = report_of(&mut recv);
    let recv_err = rest(recv_err);
    assert!(
        out.status.success(),
        "send: {send_err}\nreceive: {recv_err}"
    );
    assert_eq!(recv_rc, 0, "receive: {recv_err}");

    let r: serde_json::Value = serde_json::from_str(&recv_out).expect("receive's report");
    let s: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap())
            .expect("send's report");
    let pc = &s["postcopy"];
    assert_eq!(r["urgent_channel"], true, "{r}");
    assert_eq!(pc["urgent_channel"], true, "{pc}");
    let kept = pc["pending_at_switch"].as_u64().unwrap();
    let asked = pc["pages_requested"].as_u64().unwrap();
    let background = pc["pages_background"].as_u64().unwrap();
    assert_eq!(asked + background, kept, "{pc}");
    let again = pc["pages_urgent_again"].as_u64().unwrap();
    let urgent = r["pages_urgent"].as_u64().unwrap();
    assert!(urgent > 0 && urgent <= asked + again, "{r} {pc}");
    // Behind the paced stream, a requested page would wait for the
    // background frames ahead of it, and the stream would carry every
    // page at the cap: post-copy would last the background's whole time.
    // Over the urgent channel each faulting page overtakes the paced
    // stream, and the destination's reads pull every page long before
    // the background alone would reach them.
    let background_alone = (kept * PAGE as u64) as f64 / rate as f64;
    let took = r["postcopy_seconds"].as_f64().unwrap();
    eprintln!("post-copy {took:.2} s (background alone {background_alone:.1} s): {r} {pc}");
    assert!(
        took < background_alone / 4.0,
        "post-copy took {took:.1} s; the background alone {background_alone:.1} s: {r} {pc}"
    );
    assert!(asked > 2 * background, "most pages were asked for: {pc}");
    let duplicate = r["pages_duplicate"].as_u64().unwrap();
    assert!(
        duplicate <= again,
        "only pages sent again arrive twice: {r} {pc}"
    );
    let installed = r["pages_by_fault"].as_u64().unwrap() + r["pages_background"].as_u64().unwrap();
    assert_eq!(installed, pages, "every page installed once: {r}");

    assert_read_as_source(&seen, &src, pages as usize, None);
}
