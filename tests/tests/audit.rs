//! The audit trail through the real proxy to a real PostgreSQL 15: every
//! session and statement lands in the local spool with its decision, rule,
//! row count and SQLSTATE; the hash chain verifies, and a changed row is
//! caught; a torn spool tail is cut on restart and nothing before it lost.

use std::path::Path;
use std::time::{Duration, Instant};

use interceptor_tests::audit::{events, interceptor, spool, statements};
use interceptor_tests::pg;
use interceptor_tests::proxy::{Proxy, ProxyOptions};
use interceptor_tests::wire::{RawClient, frame};
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
