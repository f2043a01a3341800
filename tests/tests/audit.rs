//! The audit trail through the real proxy to a real PostgreSQL 15: every
//! session and statement lands in the local spool with its decision, rule,
//! row count and SQLSTATE; the hash chain verifies, and a changed row is
//! caught; a torn spool tail is cut on restart and nothing before it lost.

use std::path::Path;
use std::time::{Duration, Instant};

use interceptor_tests::audit::{events, interceptor, spool, statements};
use interceptor_tests::pg;
use interceptor_tests::proxy::{Proxy, ProxyOptions};
use interceptor_tests::wire::{RawClient, first_error, frame};
use interceptor_tests::workspace_root;
use serde_json::Value;

#[test]
fn statements_decisions_and_results_are_recorded_and_chained() {
    let pg = pg::shared();
    pg.psql_admin(
        "postgres",
        "DROP TABLE IF EXISTS audit_demo; CREATE TABLE audit_demo(id int, v text); \
         INSERT INTO audit_demo SELECT g, 'v' || g FROM generate_series(1, 7) g",
    )
    .unwrap();
    let _ = pg.psql_admin("postgres", "CREATE ROLE agent LOGIN NOSUPERUSER");
    let proxy = Proxy::start(
        pg,
        ProxyOptions {
            client_tls: false,
            policy: Some(workspace_root().join("policies/examples/agent.toml")),
            ..Default::default()
        },
    )
    .unwrap();
    let (mut c, _) = RawClient::login(proxy.port, "agent", "postgres").unwrap();
    c.query("SELECT * FROM audit_demo WHERE id <= 5").unwrap();
    c.query("DROP TABLE audit_demo").unwrap();
    c.query("SELECT 1/0").unwrap();
    // Extended protocol: Parse/Bind/Execute twice, then Sync.
    let mut out = frame(b'P', b"s1\0SELECT id FROM audit_demo WHERE id > $1\0\0\0");
    for arg in [b"4", b"6"] {
        let mut bind = b"\0s1\0\0\0\0\x01".to_vec();
        bind.extend_from_slice(&1i32.to_be_bytes());
        bind.extend_from_slice(arg);
        bind.extend_from_slice(b"\0\0");
        out.extend(frame(b'B', &bind));
        out.extend(frame(b'E', b"\0\0\0\0\0"));
    }
    out.extend(frame(b'S', b""));
    c.send(&out).unwrap();
    c.read_until_ready().unwrap();
    c.send(&frame(b'X', b"")).unwrap();
    drop(c);

    let dir = spool(&proxy);
    let rows = statements(&dir, 5);
    assert_eq!(rows.len(), 5, "{rows:#?}");
    let field = |i: usize, k: &str| rows[i][k].clone();
    let session = field(0, "session").as_str().unwrap().to_owned();
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r["session"], session.as_str());
        assert_eq!(r["seq"], i as u64 + 1);
    }
    assert_eq!(field(0, "text"), "SELECT * FROM audit_demo WHERE id <= 5");
    assert_eq!(
        (field(0, "decision"), field(0, "rule"), field(0, "rows")),
        ("allow".into(), "read".into(), 5.into())
    );
    assert_eq!(field(0, "kind"), "read");
    assert_eq!(field(0, "tables"), serde_json::json!(["audit_demo"]));
    assert!(field(0, "bytes").as_u64().unwrap() > 0);
    assert_eq!(
        (field(1, "decision"), field(1, "rule"), field(1, "sqlstate")),
        ("deny".into(), "no-schema-changes".into(), "42501".into())
    );
    assert_eq!(
        (field(2, "decision"), field(2, "sqlstate")),
        ("allow".into(), "22012".into())
    );
    assert_eq!(
        (field(3, "text"), field(3, "rows")),
        ("SELECT id FROM audit_demo WHERE id > $1".into(), 3.into())
    );
    assert_eq!(field(4, "rows"), 1);
    // Same shape, different literal: one fingerprint.
    c_fingerprints_match(&proxy, &dir);

    let all = events(&dir);
    assert!(all.iter().any(|e| e.get("DaemonStart").is_some()));
    let start = all
        .iter()
        .find_map(|e| {
            e.get("SessionStart")
                .filter(|s| s["session"] == session.as_str())
        })
        .expect("session start");
    assert_eq!(start["user"], "agent");
    assert_eq!(start["principal"], "interceptor:user=agent");
    let deadline = Instant::now() + Duration::from_secs(10);
    let end = loop {
        let found = events(&dir).into_iter().find_map(|e| {
            e.get("SessionEnd")
                .filter(|s| s["session"] == session.as_str())
                .cloned()
        });
        if let Some(e) = found {
            break e;
        }
        assert!(Instant::now() < deadline, "no session end");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(end["outcome"], "terminated");
    assert_eq!(end["statements"], 5);
    assert!(end["bytes_to_client"].as_u64().unwrap() > 0);

    // The chain verifies...
    let (ok, out, err) = interceptor(&[
        "audit",
        "verify",
        "--spool",
        dir.to_str().unwrap(),
        &session,
    ]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("5 statement rows, hash chain intact"), "{out}");

    // ...and a changed row does not. Change the denied DROP's text in a
    // copy of the spool, keeping its frame checksum valid so only the
    // chain can tell.
    let copy = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let p = entry.unwrap().path();
        let data = std::fs::read(&p).unwrap();
        let changed = tamper(&data, b"DROP TABLE audit_demo", b"SELECT 1 FROM audit_d");
        std::fs::write(copy.path().join(p.file_name().unwrap()), changed).unwrap();
    }
    let (ok, out, err) = interceptor(&[
        "audit",
        "verify",
        "--spool",
        copy.path().to_str().unwrap(),
        &session,
    ]);
    assert!(!ok, "tampering not caught: {out}");
    assert!(err.contains("row #2 was changed"), "{err}");
}

/// Rewrites `from` to `to` (same length) inside each frame and fixes the
/// frame's CRC, as someone editing the spool would.
fn tamper(data: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = data.to_vec();
    let mut off = 0;
    while off + 8 <= out.len() {
        let len = u32::from_le_bytes(out[off..off + 4].try_into().unwrap()) as usize;
        let body = off + 8..off + 8 + len;
        if let Some(at) = out[body.clone()]
            .windows(from.len())
            .position(|w| w == from)
        {
            let s = body.start + at;
            out[s..s + to.len()].copy_from_slice(to);
            let crc = crc32(&out[body.clone()]);
            out[off + 4..off + 8].copy_from_slice(&crc.to_le_bytes());
        }
        off = body.end;
    }
    out
}

fn crc32(data: &[u8]) -> u32 {
    // CRC-32 (IEEE), bitwise: a test-only check of the spool's own frames.
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn c_fingerprints_match(proxy: &Proxy, dir: &Path) {
    let (mut c, _) = RawClient::login(proxy.port, "agent", "postgres").unwrap();
    c.query("SELECT id FROM audit_demo WHERE id = 1").unwrap();
    c.query("SELECT id FROM audit_demo WHERE id = 2").unwrap();
    c.query("SELECT v FROM audit_demo WHERE id = 2").unwrap();
    drop(c);
    let rows = statements(dir, 8);
    let fp: Vec<&str> = rows[5..8]
        .iter()
        .map(|r| r["fingerprint"].as_str().unwrap())
        .collect();
    assert_eq!(fp[0], fp[1], "{rows:#?}");
    assert_ne!(fp[1], fp[2]);
    assert_ne!(fp[0], "0000000000000000");
}

#[test]
fn a_torn_spool_tail_is_cut_on_restart_and_nothing_before_it_is_lost() {
    let pg = pg::shared();
    let proxy = Proxy::start(
        pg,
        ProxyOptions {
            client_tls: false,
            ..Default::default()
        },
    )
    .unwrap();
    let (mut c, _) = RawClient::login(proxy.port, "postgres", "postgres").unwrap();
    for i in 0..20 {
        c.query(&format!("SELECT {i}")).unwrap();
    }
    drop(c);
    let dir = spool(&proxy);
    let before = statements(&dir, 20);
    assert_eq!(before.len(), 20);
    assert_eq!(before[0]["decision"], "unchecked");
    // Stopped, with half a frame after the last whole one (a crash mid-write).
    let mut proxy = proxy;
    proxy.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(proxy.wait_exit(Duration::from_secs(10)).is_some());
    let seg = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .max()
        .unwrap();
    let mut data = std::fs::read(&seg).unwrap();
    data.extend_from_slice(&[200, 0, 0, 0, 1, 2, 3, 4, 5, 6]);
    std::fs::write(&seg, &data).unwrap();

    let restarted = proxy.restart().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !restarted.log().contains("cut a torn tail of 10 bytes") {
        assert!(Instant::now() < deadline, "{}", restarted.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let after: Vec<Value> = events(&dir)
        .into_iter()
        .filter_map(|e| e.get("Statement").cloned())
        .collect();
    assert_eq!(after, before);
}

/// A tmpfs of `size` mounted on a temp dir, unmounted when dropped: a
/// disk that fills up.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::Builder::new()
            .prefix("interceptor-full-")
            .tempdir()
            .unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size}").as_str()),
        )
        .expect("mount a tmpfs (root only)");
        SmallDisk { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the disk up: writes until the write fails.
    fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.path().join("filler")).unwrap();
        let chunk = vec![0u8; 4096];
        while f.write_all(&chunk).is_ok() {}
    }

    fn free(&self) {
        std::fs::remove_file(self.path().join("filler")).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

fn full_disk_proxy(disk: &SmallDisk, extra: &str) -> Proxy {
    Proxy::start(
        pg::shared(),
        ProxyOptions {
            client_tls: false,
            sections: vec![format!(
                "[audit]\nspool_dir = \"{}\"\n{extra}\n",
                disk.path().join("spool").display()
            )],
            ..Default::default()
        },
    )
    .unwrap()
}

/// Runs `SELECT n` until `until` says stop; returns how many ran, and the
/// first error.
fn run_until(
    c: &mut RawClient,
    max: usize,
    mut until: impl FnMut(&Option<(String, String)>) -> bool,
) -> (usize, Option<(String, String)>) {
    for i in 0..max {
        let r = c.query(&format!("SELECT {i}")).unwrap();
        let err = interceptor_tests::wire::first_error(&r);
        if until(&err) {
            return (i + 1, err);
        }
    }
    (max, None)
}

/// Every statement of the one session in the spool, 1..n with no gap.
fn session_rows_complete(dir: &Path, n: usize) {
    let rows = statements(dir, n);
    assert_eq!(rows.len(), n);
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r["seq"], i as u64 + 1);
    }
}

#[test]
fn a_full_spool_disk_refuses_statements_with_53100_until_there_is_room() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: mounting a small tmpfs to fill needs root (CI runs as root)");
        return;
    }
    let disk = SmallDisk::mount("1m");
    let proxy = full_disk_proxy(&disk, "");
    let (mut c, _) = RawClient::login(proxy.port, "postgres", "postgres").unwrap();
    c.query("SELECT 'before'").unwrap();
    disk.fill();
    // The first write that fails closes the gate; statements after it are
    // refused, not run.
    let (ran, err) = run_until(&mut c, 5000, |e| e.is_some());
    let (code, msg) = err.expect("no statement refused with the disk full");
    assert_eq!(code, "53100", "{msg}");
    assert!(msg.contains("audit spool cannot be written"), "{msg}");
    let r = c.query("SELECT 'refused too'").unwrap();
    assert_eq!(first_error(&r).map(|e| e.0).as_deref(), Some("53100"));
    disk.free();
    // Room again: statements run again once the held events are written.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut after = 0;
    loop {
        after += 1;
        let r = c.query("SELECT 'after'").unwrap();
        if first_error(&r).is_none() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still refused after the disk was freed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    c.send(&frame(b'X', b"")).unwrap();
    drop(c);
    // Nothing lost: every statement, run or refused, has its row.
    let dir = disk.path().join("spool");
    session_rows_complete(&dir, 1 + ran + 1 + after);
    let rows = statements(&dir, 1 + ran + 1 + after);
    assert_eq!(rows[ran]["decision"], "deny");
    assert_eq!(rows[ran]["rule"], "audit-spool-unwritable");
    assert_eq!(rows[ran]["sqlstate"], "53100");
    let log = proxy.log();
    assert!(log.contains("audit spool write failed"), "{log}");
    assert!(log.contains("audit spool is writable again"), "{log}");
}

#[test]
fn with_on_spool_failure_continue_a_full_disk_is_loud_but_statements_run_and_nothing_is_lost() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: mounting a small tmpfs to fill needs root (CI runs as root)");
        return;
    }
    let disk = SmallDisk::mount("1m");
    let proxy = full_disk_proxy(&disk, "on_spool_failure = \"continue\"");
    let (mut c, _) = RawClient::login(proxy.port, "postgres", "postgres").unwrap();
    disk.fill();
    let mut ran = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !proxy.log().contains("audit spool write failed") {
        let (n, err) = run_until(&mut c, 50, |e| e.is_some());
        assert!(err.is_none(), "refused: {err:?}");
        ran += n;
        assert!(Instant::now() < deadline, "the spool never failed");
    }
    let (n, err) = run_until(&mut c, 200, |e| e.is_some());
    assert!(err.is_none(), "refused while degraded: {err:?}");
    ran += n;
    disk.free();
    c.send(&frame(b'X', b"")).unwrap();
    drop(c);
    session_rows_complete(&disk.path().join("spool"), ran);
    assert!(
        proxy
            .log()
            .contains("statements go on (on_spool_failure = \"continue\")")
    );
}

#[test]
fn literals_are_redacted_from_audited_text_as_the_policy_says() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "version = 1\nredact_literals = true\n\n\
         [[rule]]\nid = \"session\"\nkinds = [\"session\"]\ndecision = \"allow\"\nredact_literals = false\n\n\
         [[rule]]\nid = \"reads\"\nkinds = [\"read\", \"transaction\"]\ndecision = \"allow\"\n",
    )
    .unwrap();
    let _ = pg::shared().psql_admin("postgres", "CREATE ROLE agent LOGIN NOSUPERUSER");
    let proxy = Proxy::start(
        pg::shared(),
        ProxyOptions {
            client_tls: false,
            policy: Some(policy),
            ..Default::default()
        },
    )
    .unwrap();
    let (mut c, _) = RawClient::login(proxy.port, "agent", "postgres").unwrap();
    c.query("SELECT 'ssn 123-45-6789' AS s, 42").unwrap();
    c.query("SET application_name = 'visible'").unwrap();
    // Refused by the default decision: redacted too.
    let r = c
        .query("DELETE FROM pg_class WHERE relname = 'secret'")
        .unwrap();
    assert!(first_error(&r).is_some());
    let rows = statements(&spool(&proxy), 3);
    let texts: Vec<&str> = rows.iter().map(|r| r["text"].as_str().unwrap()).collect();
    assert_eq!(
        texts,
        [
            "SELECT $1 AS s, $2",
            "SET application_name = 'visible'",
            "DELETE FROM pg_class WHERE relname = $1"
        ]
    );
}
