//! The audit trail shipped to a real ClickHouse 18.16 that the harness
//! starts on private ports: rows arrive with their fields, spool segments
//! go once acknowledged, a mismatched table stops the daemon with a clear
//! error, and nothing is lost or doubled when ClickHouse is down for a
//! minute or the daemon is killed with -9 mid-load.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use interceptor_tests::audit::{events, interceptor, spool};
use interceptor_tests::clickhouse::ClickHouse;
use interceptor_tests::pg;
use interceptor_tests::proxy::{Proxy, ProxyOptions};
use interceptor_tests::wire::{RawClient, first_error, frame};
use interceptor_tests::workspace_root;

fn proxy_with(ch: &ClickHouse, db: &str, policy: bool, audit: &str) -> Proxy {
    proxy_with_sections(ch, db, policy, audit, vec![])
}

fn proxy_with_sections(
    ch: &ClickHouse,
    db: &str,
    policy: bool,
    audit: &str,
    mut sections: Vec<String>,
) -> Proxy {
    let _ = pg::shared().psql_admin("postgres", "CREATE ROLE agent LOGIN NOSUPERUSER");
    sections.push(format!("[audit]\n{audit}\n\n{}", ch.config_section(db)));
    Proxy::start(
        pg::shared(),
        ProxyOptions {
            client_tls: false,
            policy: policy.then(|| workspace_root().join("policies/examples/agent.toml")),
            sections,
            ..Default::default()
        },
    )
    .expect("start proxy")
}

/// Polls `sql` until it gives `want` (ClickHouse receives a batch every
/// flush_interval).
fn wait_count(ch: &ClickHouse, sql: &str, want: u64, within: Duration) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        let n = ch.count(sql).unwrap_or(0);
        if n >= want || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn segment_count(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".spool"))
            })
            .count()
        })
        .unwrap_or(0)
}

#[test]
fn statements_reach_clickhouse_with_their_fields_and_shipped_segments_are_deleted() {
    let ch = ClickHouse::start().unwrap();
    pg::shared()
        .psql_admin(
            "postgres",
            "DROP TABLE IF EXISTS ch_demo; CREATE TABLE ch_demo(id int); \
             INSERT INTO ch_demo SELECT generate_series(1, 7)",
        )
        .unwrap();
    // Small segments, so that shipping has some to delete. The approvals
    // API, whose every call is an audit row.
    let api = interceptor_tests::free_port();
    let proxy = proxy_with_sections(
        &ch,
        "audit_a",
        true,
        "segment_bytes = 2048",
        vec![format!(
            "[approvals]\nlisten = \"127.0.0.1:{api}\"\ntls = false\n"
        )],
    );
    {
        use std::io::{Read, Write};
        let mut http = std::net::TcpStream::connect(("127.0.0.1", api)).unwrap();
        http.write_all(b"GET /api/approvals HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        http.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    }
    let (mut c, _) = RawClient::login(proxy.port, "agent", "postgres").unwrap();
    c.query("SELECT * FROM ch_demo WHERE id <= 5").unwrap();
    let r = c.query("DROP TABLE ch_demo").unwrap();
    assert_eq!(first_error(&r).unwrap().0, "42501");
    c.query("SELECT 1/0").unwrap();
    // The first padding statement holds an email: masked, and counted.
    c.query("SELECT 'mail eve@example.org' AS padding_to_fill_segments")
        .unwrap();
    for i in 1..40 {
        c.query(&format!("SELECT {i} AS padding_to_fill_segments"))
            .unwrap();
    }
    c.send(&frame(b'X', b"")).unwrap();
    drop(c);

    let n = wait_count(
        &ch,
        "SELECT count() FROM audit_a.statements",
        43,
        Duration::from_secs(20),
    );
    assert_eq!(n, 43, "{}", proxy.log());
    let first = ch
        .query(
            "SELECT principal, text, kind, tables, decision, rule, rows, sqlstate, length(hex(hash)) \
             FROM audit_a.statements WHERE seq <= 3 ORDER BY seq FORMAT TSV",
        )
        .unwrap();
    let lines: Vec<&str> = first.lines().collect();
    assert_eq!(
        lines,
        [
            "interceptor:user=agent\tSELECT * FROM ch_demo WHERE id <= 5\tread\t['ch_demo']\tallow\tread\t5\t\t64",
            "interceptor:user=agent\tDROP TABLE ch_demo\tddl\t['ch_demo']\tdeny\tno-schema-changes\t0\t42501\t64",
            "interceptor:user=agent\tSELECT 1/0\tread\t[]\tallow\tread\t0\t22012\t64",
        ],
        "{first}"
    );
    let session = ch
        .query("SELECT toString(session) FROM audit_a.statements LIMIT 1")
        .unwrap()
        .trim()
        .to_owned();
    // The session, its end, and the daemon's start are there too.
    let s = ch
        .query(&format!(
            "SELECT user, database, outcome, statements FROM audit_a.sessions WHERE session = toUUID('{session}') FORMAT TSV"
        ))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = s;
    while !s.contains("terminated") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        s = ch
            .query(&format!(
                "SELECT user, database, outcome, statements FROM audit_a.sessions WHERE session = toUUID('{session}') FORMAT TSV"
            ))
            .unwrap();
    }
    assert_eq!(s.trim(), "agent\tpostgres\tterminated\t43");
    // What masking hid: by rule, column and detector, never the value.
    let masks = ch
        .query(&format!(
            "SELECT seq, rule, column, detector, count FROM audit_a.masks WHERE session = toUUID('{session}') FORMAT TSV"
        ))
        .unwrap();
    assert_eq!(
        masks.trim(),
        "4\tdetected-secrets\tpadding_to_fill_segments\temail\t1"
    );
    assert_eq!(
        ch.count("SELECT count() FROM audit_a.daemon WHERE kind = 'start'")
            .unwrap(),
        1
    );
    let calls = ch
        .query("SELECT event, actor, reason FROM audit_a.approvals FORMAT TSV")
        .unwrap();
    assert_eq!(calls.trim(), "api\tanonymous\tGET /api/approvals -> 401");

    // Shipped segments are gone; the newest stays for the writer.
    let dir = spool(&proxy);
    let deadline = Instant::now() + Duration::from_secs(10);
    while segment_count(&dir) > 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(segment_count(&dir), 1, "shipped segments not deleted");
    assert!(dir.join("shipped").exists());

    // The tools read ClickHouse: the chain verifies, replay tells the story,
    // and queries filter.
    let config = proxy.config_path.to_str().unwrap();
    let (ok, out, err) = interceptor(&["audit", "verify", "--config", config, &session]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("43 statement rows, hash chain intact"),
        "{out}"
    );
    let (ok, out, err) = interceptor(&["replay", "--config", config, &session]);
    assert!(ok, "{err}");
    assert!(
        out.contains("principal=\"interceptor:user=agent\""),
        "{out}"
    );
    assert!(
        out.contains("deny      [no-schema-changes] DROP TABLE ch_demo"),
        "{out}"
    );
    assert!(out.contains("-> 5 rows"), "{out}");
    assert!(out.contains("SQLSTATE 22012"), "{out}");
    let (ok, out, err) = interceptor(&["audit", "query", "--config", config, "--decision", "deny"]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains("DROP TABLE ch_demo"), "{out}");
    let (ok, out, err) = interceptor(&[
        "audit",
        "query",
        "--config",
        config,
        "--sql",
        "SELECT decision, count() AS n FROM audit_a.statements GROUP BY decision ORDER BY decision",
        "--format",
        "TSV",
    ]);
    assert!(ok, "{err}");
    assert_eq!(out, "allow\t42\ndeny\t1\n");
    // Nothing is left only in the spool: the shipping cursor is at the
    // end of the one segment left (the writer's).
    let newest = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "spool"))
        .max()
        .unwrap();
    let index: u64 = newest.file_stem().unwrap().to_str().unwrap()[4..]
        .parse()
        .unwrap();
    let cursor = std::fs::read_to_string(dir.join("shipped")).unwrap();
    assert_eq!(
        cursor.trim(),
        format!("{index} {}", std::fs::metadata(&newest).unwrap().len()),
        "{} events in the spool",
        events(&dir).len()
    );
}

#[test]
fn a_table_that_does_not_match_stops_the_daemon_with_the_column_named() {
    let ch = ClickHouse::start().unwrap();
    ch.query("CREATE DATABASE audit_b").unwrap();
    ch.query(
        "CREATE TABLE audit_b.statement_rows (session UUID, seq UInt32, ts_us Int64) \
         ENGINE = MergeTree ORDER BY session",
    )
    .unwrap();
    let pg = pg::shared();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("interceptor.toml");
    let port = interceptor_tests::free_port();
    let mut text = Proxy::config_text(
        pg,
        &ProxyOptions {
            client_tls: false,
            ..Default::default()
        },
        port,
        &dir.path().join("state"),
    );
    text.push_str(&format!("\n[audit]\n{}", ch.config_section("audit_b")));
    std::fs::write(&config, text).unwrap();
    let err = match Proxy::start_with(dir, config, port) {
        Ok(_) => panic!("started with a mismatched table"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("ClickHouse table audit_b.statement_rows: column 2 is `seq UInt32`, expected `seq UInt64`"),
        "{err}"
    );
}

/// Clients running statements through the proxy until told to stop,
/// counting the ones answered (ReadyForQuery came back).
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<u64>>,
    answered: Arc<AtomicU64>,
}

impl Load {
    fn start(port: u16, clients: usize, pause: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let threads = (0..clients)
            .map(|k| {
                let (stop, answered) = (stop.clone(), answered.clone());
                std::thread::spawn(move || {
                    let (mut c, _) = RawClient::login(port, "postgres", "postgres").unwrap();
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        if c.query(&format!("SELECT {k}, {n}")).is_err() {
                            return n;
                        }
                        n += 1;
                        answered.fetch_add(1, Ordering::Relaxed);
                        if !pause.is_zero() {
                            std::thread::sleep(pause);
                        }
                    }
                    let _ = c.send(&frame(b'X', b""));
                    n
                })
            })
            .collect();
        Load {
            stop,
            threads,
            answered,
        }
    }

    /// Statements answered per client.
    fn stop(self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect()
    }
}

/// Every statement row is there once: the deduplicated view holds as
/// many rows as there are distinct (session, seq) pairs, and each
/// session's rows run 1..n with no gap.
fn assert_exactly_once(ch: &ClickHouse, db: &str, want: u64) {
    let n = wait_count(
        ch,
        &format!("SELECT count() FROM {db}.statements"),
        want,
        Duration::from_secs(60),
    );
    assert_eq!(n, want, "rows in ClickHouse");
    let distinct = ch
        .count(&format!(
            "SELECT uniqExact(session, seq) FROM {db}.statement_rows"
        ))
        .unwrap();
    assert_eq!(distinct, want, "distinct (session, seq)");
    let gaps = ch
        .count(&format!(
            "SELECT count() FROM (SELECT session, max(seq) AS m, count() AS c FROM {db}.statements GROUP BY session) WHERE m != c"
        ))
        .unwrap();
    assert_eq!(gaps, 0, "sessions with missing sequence numbers");
}

#[test]
fn clickhouse_down_for_a_minute_under_load_loses_nothing() {
    let mut ch = ClickHouse::start().unwrap();
    let proxy = proxy_with(&ch, "audit_c", false, "");
    let load = Load::start(proxy.port, 2, Duration::from_millis(2));
    std::thread::sleep(Duration::from_secs(2));
    ch.stop();
    let down_at = load.answered.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(60));
    let during = load.answered.load(Ordering::Relaxed) - down_at;
    ch.restart().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let answered: u64 = load.stop().iter().sum();
    // Clients were served all along: the data path never waits on
    // ClickHouse.
    assert!(during > 1000, "only {during} statements in the outage");
    assert_exactly_once(&ch, "audit_c", answered);
    let log = proxy.log();
    assert!(log.contains("cannot ship to ClickHouse"), "{log}");
    assert!(log.contains("ClickHouse answers again"), "{log}");
    eprintln!(
        "{answered} statements, {during} of them while ClickHouse was down; all in ClickHouse once"
    );
}

/// The (session, seq) of every statement row in `table`.
fn statement_ids(ch: &ClickHouse, table: &str) -> BTreeSet<(String, u64)> {
    ch.query(&format!(
        "SELECT toString(session), seq FROM {table} FORMAT TSV"
    ))
    .unwrap()
    .lines()
    .filter_map(|l| {
        let (s, n) = l.split_once('\t')?;
        Some((s.to_owned(), n.parse().ok()?))
    })
    .collect()
}

#[test]
fn a_daemon_killed_with_9_mid_load_ships_each_spooled_row_exactly_once_after_restart() {
    let ch = ClickHouse::start().unwrap();
    let mut proxy = proxy_with(&ch, "audit_d", false, "");
    let load = Load::start(proxy.port, 2, Duration::ZERO);
    std::thread::sleep(Duration::from_secs(3));
    proxy.signal(nix::sys::signal::Signal::SIGKILL);
    assert!(proxy.wait_exit(Duration::from_secs(10)).is_some());
    let answered: u64 = load.stop().iter().sum();

    // What the killed daemon had recorded: rows already in ClickHouse and
    // rows still in its spool.
    let mut recorded = statement_ids(&ch, "audit_d.statement_rows");
    let shipped_before = recorded.len();
    for e in events(&spool(&proxy)) {
        if let Some(s) = e.get("Statement") {
            recorded.insert((
                s["session"].as_str().unwrap().to_owned(),
                s["seq"].as_u64().unwrap(),
            ));
        }
    }
    assert!(
        recorded.len() > 1000,
        "only {} rows recorded",
        recorded.len()
    );

    let proxy = proxy.restart().unwrap();
    assert_exactly_once(&ch, "audit_d", recorded.len() as u64);
    assert_eq!(statement_ids(&ch, "audit_d.statements"), recorded);
    // Rows the clients saw answered but that were still in the daemon's
    // memory queue when it was killed are the only ones that can be
    // missing; say how many there were.
    eprintln!(
        "killed with -9: {answered} statements answered, {} recorded ({shipped_before} shipped before the kill), {} lost from the in-memory queue",
        recorded.len(),
        answered.saturating_sub(recorded.len() as u64)
    );
    drop(proxy);
}

#[test]
fn a_clickhouse_that_never_answers_does_not_hold_the_daemon_start() {
    // Accepts connections (the kernel completes the handshake) and never
    // replies.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let started = Instant::now();
    let mut proxy = Proxy::start(
        pg::shared(),
        ProxyOptions {
            client_tls: false,
            sections: vec![format!(
                "[audit]\n\n[audit.clickhouse]\nurl = \"{url}\"\ndatabase = \"silent\"\n"
            )],
            ..Default::default()
        },
    )
    .unwrap();
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(
        proxy.log().contains("did not answer within 5s"),
        "{}",
        proxy.log()
    );
    // Statements are served and spooled meanwhile.
    let (mut c, _) = RawClient::login(proxy.port, "postgres", "postgres").unwrap();
    let r = c.query("SELECT 1").unwrap();
    assert!(first_error(&r).is_none());
    assert!(proxy.is_running());
    // Nor its stop.
    let stopping = Instant::now();
    proxy.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        proxy.wait_exit(Duration::from_secs(20)).is_some(),
        "{}",
        proxy.log()
    );
    assert!(stopping.elapsed() < Duration::from_secs(15));
    drop(silent);
}
