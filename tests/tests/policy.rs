//! Statement policy through the real proxy to a real PostgreSQL 15, with
//! the proxy logged in upstream as a superuser (the corpus's worst case).
//!
//! Every case of the corpus (the public one and ours) runs against its own
//! fresh copy of the fixture database: destructive and privilege cases
//! must leave their damage check false, benign cases must give the same
//! output as direct. Our own cases also run directly, where each
//! destructive or privilege case must do its damage and each exfiltration
//! case must show the `forbidden` strings the proxy must not.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;

use interceptor_tests::audit;
use interceptor_tests::corpus::messages;
use interceptor_tests::pg::{self, PgCluster};
use interceptor_tests::proxy::{Proxy, ProxyOptions};
use interceptor_tests::wire::{RawClient, error_field, first_error, frame, parse_bind_execute};
use interceptor_tests::workspace_root;

/// Files the corpus's server-file cases try to write.
const SERVER_FILES: [&str; 2] = ["/tmp/bypass_case_secrets.txt", "/tmp/bypass_case_pwned.txt"];

fn corpus() -> Vec<serde_json::Value> {
    interceptor_tests::corpus::cases(&workspace_root())
}

fn reference_policy() -> PathBuf {
    workspace_root().join("policies/examples/agent.toml")
}

/// The fixture's sensitive values: under the reference policy no byte the
/// client receives may contain one.
const SENSITIVE: &[&str] = &[
    "sk_live_0123456789abcdef",
    "alice@example.com",
    "bob@example.com",
    "carol@example.com",
    "@example.com",
];

/// What the reference policy's masks make of the fixture's sensitive
/// values in a direct result.
fn masked_like_the_proxy(direct: &str) -> String {
    SENSITIVE[..4]
        .iter()
        .fold(direct.to_owned(), |s, v| s.replace(v, "[redacted]"))
}

/// The fixture as a template database, made once per test process.
fn template(pg: &PgCluster) -> &'static str {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let fixture =
            std::fs::read_to_string(workspace_root().join("tests/corpus/fixture.sql")).unwrap();
        pg.psql_admin("postgres", "CREATE DATABASE bypass_tpl")
            .unwrap();
        pg.psql_admin("bypass_tpl", &fixture).unwrap();
        let _ = pg.psql_admin("postgres", "CREATE ROLE agent LOGIN NOSUPERUSER");
    });
    "bypass_tpl"
}

fn fresh_db(pg: &PgCluster, name: &str) -> String {
    let tpl = template(pg);
    let db = format!("case_{name}");
    pg.psql_admin(
        "postgres",
        &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
    )
    .unwrap();
    pg.psql_admin("postgres", &format!("CREATE DATABASE {db} TEMPLATE {tpl}"))
        .unwrap();
    db
}

fn psql(conninfo: &str, messages: &[String]) -> Output {
    let mut cmd = Command::new(pg::psql_path());
    cmd.args(["-X", "-At", "-v", "ON_ERROR_STOP=1"]);
    for m in messages {
        cmd.arg("-c").arg(m);
    }
    cmd.arg(conninfo).output().expect("run psql")
}

fn direct_conninfo(pg: &PgCluster, db: &str) -> String {
    format!(
        "host={} port={} user=postgres dbname={db}",
        pg.socket_dir.display(),
        pg.port
    )
}

fn damage(pg: &PgCluster, db: &str, case: &serde_json::Value) -> Option<String> {
    let check = case.get("check")?.as_str()?;
    Some(pg.psql_admin(db, check).unwrap().trim().to_owned())
}

#[test]
fn corpus_through_the_proxy_under_the_reference_policy() {
    let pg = pg::shared();
    let proxy = policy_proxy();
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in corpus() {
        let id = case["id"].as_str().unwrap().to_owned();
        let intent = case["intent"].as_str().unwrap();
        pg.psql_admin("postgres", "DROP DATABASE IF EXISTS bypass_victim")
            .unwrap();
        pg.psql_admin("postgres", "CREATE DATABASE bypass_victim")
            .unwrap();
        for f in SERVER_FILES {
            let _ = std::fs::remove_file(f);
        }
        let db = fresh_db(pg, &id);
        let setup = |db: &str| {
            if let Some(sql) = case.get("setup").and_then(|s| s.as_str()) {
                pg.psql_admin(db, sql).unwrap();
            }
        };
        setup(&db);
        let msgs = messages(&case);
        // The case run directly as the superuser, on its own database.
        let direct = || {
            let direct_db = fresh_db(pg, &format!("{id}_direct"));
            setup(&direct_db);
            let out = psql(&direct_conninfo(pg, &direct_db), &msgs);
            (direct_db, out)
        };
        let protocol = case["protocol"].as_str().unwrap();
        let (ok, stdout, stderr) = if protocol == "extended" {
            let binary = case.get("result_format").and_then(|f| f.as_str()) == Some("binary");
            let replies =
                parse_bind_execute(proxy.port, "agent", &db, &msgs[0], i16::from(binary)).unwrap();
            // Every byte received, lossily as text, for the leak check.
            let all: String = replies
                .iter()
                .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
                .collect();
            match first_error(&replies) {
                Some((code, msg)) => (false, all, format!("{code} {msg}")),
                None => (true, all, String::new()),
            }
        } else {
            let out = psql(&proxy.conninfo(&db, "disable"), &msgs);
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        };
        checked += 1;
        match intent {
            "benign" => {
                let (_, direct) = direct();
                let direct_out = String::from_utf8_lossy(&direct.stdout);
                let direct_out = masked_like_the_proxy(&direct_out);
                if !ok {
                    failures.push(format!("{id}: benign case refused: {stderr}"));
                } else if protocol == "simple" && stdout != direct_out {
                    failures.push(format!(
                        "{id}: output differs from direct:\n proxy: {stdout:?}\n direct: {direct_out:?}"
                    ));
                }
            }
            // Exfiltration passes refused, or read with every sensitive
            // value masked.
            "exfiltration" => {
                // Our cases also name what a transformed secret looks like.
                let forbidden = case.get("forbidden").and_then(|f| f.as_array());
                let forbidden = forbidden.into_iter().flatten().filter_map(|f| f.as_str());
                for secret in SENSITIVE.iter().copied().chain(forbidden) {
                    if stdout.contains(secret) || stderr.contains(secret) {
                        failures.push(format!(
                            "{id}: the client received {secret}: {stdout:?} {stderr:?}"
                        ));
                    }
                }
                if ok && stdout.trim().is_empty() && protocol == "simple" {
                    failures.push(format!("{id}: allowed, but nothing came back"));
                }
                if damage(pg, &db, &case).as_deref() == Some("t") {
                    failures.push(format!("{id}: the damage check is true"));
                }
            }
            _ => {
                // Sent with its temporary tables pinned to pg_temp, the
                // statement is the server's to refuse: they are gone.
                let pinned = case.get("pinned").is_some() && stderr.contains("does not exist");
                if ok {
                    failures.push(format!("{id} ({intent}): not refused; output {stdout:?}"));
                } else if !stderr.contains("interceptor: statement") && !pinned {
                    failures.push(format!("{id}: refused, but not by the policy: {stderr}"));
                }
                if damage(pg, &db, &case).as_deref() == Some("t") {
                    failures.push(format!("{id}: the damage check is true"));
                }
                for secret in SENSITIVE {
                    if stdout.contains(secret) || stderr.contains(secret) {
                        failures.push(format!("{id}: the client received {secret}"));
                    }
                }
            }
        }
        for f in SERVER_FILES {
            if std::path::Path::new(f).exists() {
                failures.push(format!("{id}: {f} was written by the server"));
            }
        }
        // Our own cases prove they are live: run directly, each destructive
        // or privilege case does the damage its check looks for.
        let ours = case.get("source").and_then(|s| s.as_str()) == Some("extra");
        if ours && matches!(intent, "destructive" | "privilege") && case.get("check").is_some() {
            let (direct_db, _) = direct();
            if damage(pg, &direct_db, &case).as_deref() != Some("t") {
                failures.push(format!("{id}: does no damage even directly"));
            }
            for f in SERVER_FILES {
                let _ = std::fs::remove_file(f);
            }
        }
        // ...and each of our exfiltration cases shows, directly, what it
        // must not show through the proxy.
        if let Some(forbidden) = case.get("forbidden").and_then(|f| f.as_array()) {
            let (_, out) = direct();
            let seen = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            for f in forbidden.iter().filter_map(|f| f.as_str()) {
                if !seen.contains(f) {
                    failures.push(format!("{id}: does not show {f} even directly"));
                }
            }
        }
        if pg
            .psql_admin(
                "postgres",
                "SELECT count(*) FROM pg_database WHERE datname = 'bypass_victim'",
            )
            .unwrap()
            .trim()
            != "1"
        {
            failures.push(format!("{id}: bypass_victim was dropped"));
        }
    }
    assert!(checked > 70, "only {checked} cases ran");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn policy_proxy_with(file: PathBuf) -> Proxy {
    Proxy::start(
        pg::shared(),
        ProxyOptions {
            client_tls: false,
            policy: Some(file),
            ..Default::default()
        },
    )
    .expect("start proxy")
}

fn policy_proxy() -> Proxy {
    policy_proxy_with(reference_policy())
}

fn orders_left(pg: &PgCluster, db: &str) -> String {
    pg.psql_admin(db, "SELECT count(*) FROM orders")
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
fn denied_statement_aborts_the_transaction_on_both_sides() {
    let pg = pg::shared();
    let db = fresh_db(pg, "txn");
    let proxy = policy_proxy();
    let (mut c, _) = RawClient::login(proxy.port, "agent", &db).unwrap();
    c.query("BEGIN").unwrap();
    let r = c.query("DELETE FROM orders").unwrap();
    let (code, msg) = first_error(&r).expect("DELETE refused");
    assert_eq!(code, "42501");
    assert!(msg.contains("agents may only read"), "{msg}");
    let hint = r
        .iter()
        .find(|(t, _)| *t == b'E')
        .and_then(|(_, b)| error_field(b, b'H'))
        .unwrap_or_default();
    assert!(hint.contains("audit_log"), "{hint}");
    // The client's state byte and the server's agree: the transaction is failed.
    assert_eq!(
        r.last().map(|m| (m.0, m.1.clone())),
        Some((b'Z', b"E".to_vec()))
    );
    let r = c.query("SELECT 1").unwrap();
    assert_eq!(first_error(&r).map(|e| e.0), Some("25P02".to_owned()));
    let r = c.query("ROLLBACK").unwrap();
    assert!(first_error(&r).is_none());
    assert_eq!(r.last().map(|m| m.1.clone()), Some(b"I".to_vec()));
    assert_eq!(orders_left(pg, &db), "3");
}

/// A named statement prepared while `orders` meant the session's
/// temporary table keeps meaning it: sent as pg_temp.orders, with the
/// client's parameter types, it fails once that table is gone instead of
/// deleting from the permanent orders.
#[test]
fn prepared_writes_to_temporary_tables_stay_on_them() {
    let pg = pg::shared();
    let db = fresh_db(pg, "pinned");
    let proxy = policy_proxy();
    let (mut c, _) = RawClient::login(proxy.port, "agent", &db).unwrap();
    assert!(first_error(&c.query("CREATE TEMP TABLE orders (id int)").unwrap()).is_none());
    assert!(first_error(&c.query("INSERT INTO orders VALUES (1), (2)").unwrap()).is_none());
    // Parse "del" with its parameter typed int4 (OID 23).
    let mut parse = b"del\0DELETE FROM orders WHERE id = $1\0".to_vec();
    parse.extend_from_slice(&1i16.to_be_bytes());
    parse.extend_from_slice(&23u32.to_be_bytes());
    let execute = |c: &mut RawClient, id: i32| {
        let mut bind = b"\0del\0".to_vec();
        bind.extend_from_slice(&1i16.to_be_bytes());
        bind.extend_from_slice(&1i16.to_be_bytes());
        bind.extend_from_slice(&1i16.to_be_bytes());
        bind.extend_from_slice(&4i32.to_be_bytes());
        bind.extend_from_slice(&id.to_be_bytes());
        bind.extend_from_slice(&0i16.to_be_bytes());
        let mut out = frame(b'B', &bind);
        out.extend(frame(b'E', b"\0\0\0\0\0"));
        out.extend(frame(b'S', b""));
        c.send(&out).unwrap();
        c.read_until_ready().unwrap()
    };
    let mut out = frame(b'P', &parse);
    out.extend(frame(b'S', b""));
    c.send(&out).unwrap();
    assert!(first_error(&c.read_until_ready().unwrap()).is_none());
    // The binary int4 parameter binds: the type the client gave was kept.
    let r = execute(&mut c, 1);
    assert!(first_error(&r).is_none(), "{r:?}");
    assert!(
        r.iter()
            .any(|(t, b)| *t == b'C' && b.starts_with(b"DELETE 1")),
        "{r:?}"
    );
    assert!(first_error(&c.query("DROP TABLE orders").unwrap()).is_none());
    let r = execute(&mut c, 2);
    let (code, msg) = first_error(&r).expect("the temporary orders is gone");
    assert_eq!(code, "42P01", "{msg}");
    assert_eq!(orders_left(pg, &db), "3");
}

#[test]
fn extended_protocol_decides_at_parse_and_keeps_named_statements() {
    let pg = pg::shared();
    let db = fresh_db(pg, "ext");
    let proxy = policy_proxy();
    let (mut c, _) = RawClient::login(proxy.port, "agent", &db).unwrap();
    // A named DELETE with a parameter: Parse is answered, Execute raises,
    // and the Bind's parameter does not trip the substituted statement.
    let mut out = frame(b'P', b"del\0DELETE FROM orders WHERE id = $1\0\0\0");
    let mut bind = b"\0del\0".to_vec();
    bind.extend_from_slice(&0i16.to_be_bytes());
    bind.extend_from_slice(&1i16.to_be_bytes());
    bind.extend_from_slice(&1i32.to_be_bytes());
    bind.extend_from_slice(b"1");
    bind.extend_from_slice(&0i16.to_be_bytes());
    out.extend(frame(b'B', &bind));
    out.extend(frame(b'E', b"\0\0\0\0\0"));
    out.extend(frame(b'S', b""));
    c.send(&out).unwrap();
    let r = c.read_until_ready().unwrap();
    assert_eq!(
        first_error(&r).map(|e| e.0),
        Some("42501".to_owned()),
        "{r:?}"
    );
    // Reused later, it is still refused.
    c.send(
        &[
            frame(b'B', &bind),
            frame(b'E', b"\0\0\0\0\0"),
            frame(b'S', b""),
        ]
        .concat(),
    )
    .unwrap();
    let r = c.read_until_ready().unwrap();
    assert_eq!(
        first_error(&r).map(|e| e.0),
        Some("42501".to_owned()),
        "{r:?}"
    );
    // A read in the extended protocol runs.
    let r = parse_bind_execute(
        proxy.port,
        "agent",
        &db,
        "SELECT total FROM orders WHERE id = 2",
        0,
    )
    .unwrap();
    assert!(first_error(&r).is_none(), "{r:?}");
    assert!(
        r.iter().any(|(t, b)| *t == b'D' && b.ends_with(b"99")),
        "{r:?}"
    );
    assert_eq!(orders_left(pg, &db), "3");
}

#[test]
fn fast_path_calls_and_guarded_startup_options_are_refused() {
    let pg = pg::shared();
    let db = fresh_db(pg, "fastpath");
    let proxy = policy_proxy();
    let (mut c, _) = RawClient::login(proxy.port, "agent", &db).unwrap();
    // FunctionCall of lo_creat (oid 957) with one int4 argument.
    let mut body = 957i32.to_be_bytes().to_vec();
    body.extend_from_slice(&0i16.to_be_bytes());
    body.extend_from_slice(&1i16.to_be_bytes());
    body.extend_from_slice(&4i32.to_be_bytes());
    body.extend_from_slice(&0i32.to_be_bytes());
    body.extend_from_slice(&0i16.to_be_bytes());
    c.send(&frame(b'F', &body)).unwrap();
    let r = c.read_until_ready().unwrap();
    let (code, msg) = first_error(&r).expect("refused");
    assert_eq!(code, "42501");
    assert!(msg.contains("fast-path"), "{msg}");
    assert_eq!(
        pg.psql_admin(&db, "SELECT count(*) FROM pg_largeobject_metadata")
            .unwrap()
            .trim(),
        "0"
    );

    // psql through the proxy with one startup setting from the environment.
    let psql_env = |sql: &str, var: &str, value: &str| {
        Command::new(pg::psql_path())
            .args(["-X", "-At", "-c", sql])
            .arg(proxy.conninfo(&db, "disable"))
            .env(var, value)
            .output()
            .unwrap()
    };
    let out = psql_env("SHOW role", "PGOPTIONS", "-c role=postgres");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("startup parameter \"options\""), "{err}");

    // In SJIS, `E'さ\'` ends where UTF-8 reads on: the server would see
    // a DROP that the policy's parser reads as part of a string.
    let sjis = "SELECT E'さ\\' ; DROP TABLE users CASCADE; -- ' AS x";
    let out = psql_env(sjis, "PGCLIENTENCODING", "SJIS");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("startup parameter \"client_encoding\""),
        "{err}"
    );
    // UTF-8 and the other ASCII-safe encodings connect as before.
    for encoding in ["UTF8", "LATIN1", "SQL_ASCII"] {
        let out = psql_env("SHOW client_encoding", "PGCLIENTENCODING", encoding);
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), encoding);
    }
}

#[test]
fn upstream_session_carries_the_principal_and_read_only_default() {
    let pg = pg::shared();
    let db = fresh_db(pg, "ro");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ro.toml");
    std::fs::write(
        &file,
        "version = 1\n[[rule]]\nid = \"read\"\nkinds = [\"read\", \"session\", \"transaction\"]\ndecision = \"allow\"\n",
    )
    .unwrap();
    let proxy = policy_proxy_with(file);
    let out = psql(
        &proxy.conninfo(&db, "disable"),
        &["SELECT current_setting('application_name'), current_setting('default_transaction_read_only')".into()],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("interceptor:user="), "{stdout}");
    assert!(stdout.trim_end().ends_with("|on"), "{stdout}");
    // Transactions work, but none may ask to be READ WRITE.
    let out = psql(
        &proxy.conninfo(&db, "disable"),
        &["BEGIN; SELECT current_setting('transaction_read_only'); COMMIT".into()],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "BEGIN\non\nCOMMIT\n");
    for sql in [
        "BEGIN READ WRITE",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
    ] {
        let out = psql(&proxy.conninfo(&db, "disable"), &[sql.into()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("READ WRITE transactions are refused"),
            "{sql}: {err}"
        );
    }

    // The reference policy lets agents write audit_log: not read-only.
    let proxy = policy_proxy();
    let out = psql(
        &proxy.conninfo(&db, "disable"),
        &["SHOW default_transaction_read_only".into()],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "off");
}

/// A database set to read strings the old way: the policy's parser would
/// read `'a\' , ' ; DROP ...'` as two strings, the server as a DROP.
#[test]
fn a_server_that_reads_strings_differently_is_refused_under_policy() {
    let pg = pg::shared();
    let db = fresh_db(pg, "nonstandard");
    pg.psql_admin(
        "postgres",
        &format!("ALTER DATABASE {db} SET standard_conforming_strings = off"),
    )
    .unwrap();
    let proxy = policy_proxy();
    let out = psql(&proxy.conninfo(&db, "disable"), &["SELECT 1".into()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("standard_conforming_strings = off"), "{err}");
    // The same database with standard strings again is fine.
    pg.psql_admin(
        "postgres",
        &format!("ALTER DATABASE {db} RESET standard_conforming_strings"),
    )
    .unwrap();
    let out = psql(&proxy.conninfo(&db, "disable"), &["SELECT 1".into()]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1\n");
}

#[test]
fn deeply_nested_statements_are_decided_without_taking_the_daemon_down() {
    let pg = pg::shared();
    let db = fresh_db(pg, "deep");
    let mut proxy = policy_proxy();
    let (mut c, _) = RawClient::login(proxy.port, "agent", &db).unwrap();
    // Deep enough to overflow a worker thread's stack when the parse tree
    // is decoded; COPY takes the full-parse path.
    let sql = format!(
        "COPY (SELECT {}1{}) TO STDOUT",
        "CASE WHEN true THEN ".repeat(300),
        " END".repeat(300)
    );
    let r = c.query(&sql).unwrap();
    assert!(first_error(&r).is_none(), "{r:?}");
    assert!(r.iter().any(|(t, b)| *t == b'd' && b == b"1\n"), "{r:?}");
    let r = c.query("SELECT 2").unwrap();
    assert!(first_error(&r).is_none(), "{r:?}");
    assert!(proxy.is_running());
}

/// Reads allowed, with per-identity limits.
fn limited_policy(limits: &str) -> PathBuf {
    let dir = tempfile::Builder::new()
        .prefix("interceptor-limits-")
        .tempdir()
        .unwrap()
        .keep();
    let p = dir.join("policy.toml");
    std::fs::write(
        &p,
        format!(
            "version = 1\n\n[[group]]\nname = \"everyone\"\n\n[[rule]]\nid = \"reads\"\nkinds = [\"read\", \"session\", \"transaction\"]\ndecision = \"allow\"\n\n[[limit]]\ngroups = [\"everyone\"]\n{limits}\n"
        ),
    )
    .unwrap();
    p
}

fn rows(msgs: &[(u8, Vec<u8>)]) -> usize {
    msgs.iter()
        .filter(|(t, _)| *t == b'D' || *t == b'd')
        .count()
}

#[test]
fn results_over_the_identitys_row_and_byte_caps_are_cut_with_54000() {
    let proxy = policy_proxy_with(limited_policy("max_rows = 5\n"));
    let (mut c, _) = RawClient::login(proxy.port, "agent", "postgres").unwrap();
    let r = c.query("SELECT generate_series(1, 1000)").unwrap();
    assert_eq!(rows(&r), 5);
    let (code, msg) = first_error(&r).expect("capped");
    assert_eq!(code, "54000");
    assert!(msg.contains("limit of 5 rows"), "{msg}");
    assert!(!r.iter().any(|(t, _)| *t == b'C'), "CommandComplete leaked");
    // Under the cap, and on the same connection: untouched.
    let r = c.query("SELECT generate_series(1, 5)").unwrap();
    assert_eq!(rows(&r), 5);
    assert!(first_error(&r).is_none());
    // COPY TO STDOUT rows count too.
    let r = c
        .query("COPY (SELECT generate_series(1, 100)) TO STDOUT")
        .unwrap();
    assert_eq!(rows(&r), 5);
    assert_eq!(first_error(&r).map(|e| e.0), Some("54000".into()));
    // The session goes on: the server itself never failed.
    let r = c.query("SELECT 'still here'").unwrap();
    assert_eq!(rows(&r), 1);
    // The audit records what the client got: 5 rows and 54000, not the
    // server's 1000 rows and success.
    let audited = audit::statements(&audit::spool(&proxy), 4);
    let got: Vec<(u64, &str)> = audited
        .iter()
        .map(|r| (r["rows"].as_u64().unwrap(), r["sqlstate"].as_str().unwrap()))
        .collect();
    assert_eq!(got, [(5, "54000"), (5, ""), (5, "54000"), (1, "")]);
    // The extended protocol, in text and binary.
    for binary in [false, true] {
        let r = parse_bind_execute(
            proxy.port,
            "agent",
            "postgres",
            "SELECT generate_series(1, 50)",
            i16::from(binary),
        )
        .unwrap();
        assert_eq!(rows(&r), 5);
        assert_eq!(first_error(&r).map(|e| e.0), Some("54000".into()));
    }

    let proxy = policy_proxy_with(limited_policy("max_bytes = 4096\n"));
    let (mut c, _) = RawClient::login(proxy.port, "agent", "postgres").unwrap();
    let r = c
        .query("SELECT repeat('x', 1000) FROM generate_series(1, 100)")
        .unwrap();
    assert_eq!(rows(&r), 4, "each row is 1011 bytes on the wire");
    let (code, msg) = first_error(&r).expect("capped");
    assert_eq!(code, "54000");
    assert!(msg.contains("limit of 4096 bytes"), "{msg}");
}

#[test]
fn an_identitys_statement_rate_is_shared_by_its_sessions() {
    // 10/s with a burst of 1: 21 statements from two sessions cannot all
    // run in less than 2 s, whatever the machine's speed.
    let proxy = policy_proxy_with(limited_policy("statements_per_second = 10\nburst = 1\n"));
    let (mut a, _) = RawClient::login(proxy.port, "agent", "postgres").unwrap();
    let (mut b, _) = RawClient::login(proxy.port, "agent", "postgres").unwrap();
    let start = std::time::Instant::now();
    for i in 0..21 {
        let c = if i % 2 == 0 { &mut a } else { &mut b };
        let r = c.query("SELECT 1").unwrap();
        assert!(first_error(&r).is_none(), "paced, never refused");
    }
    let took = start.elapsed();
    assert!(took >= std::time::Duration::from_millis(1900), "{took:?}");
}

#[test]
fn editing_the_policy_file_reloads_it_and_a_bad_edit_keeps_the_old_one() {
    let file = limited_policy("max_rows = 1000\n");
    let original = std::fs::read_to_string(&file).unwrap();
    let proxy = policy_proxy_with(file.clone());
    let wait_for = |needle: &str, count: usize| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while proxy.log().matches(needle).count() < count {
            assert!(
                std::time::Instant::now() < deadline,
                "no {needle:?}:\n{}",
                proxy.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    let select = |expect_ok: bool| {
        let (mut c, _) = RawClient::login(proxy.port, "agent", "postgres").unwrap();
        let r = c.query("SELECT 1").unwrap();
        assert_eq!(first_error(&r).is_none(), expect_ok, "{r:?}");
    };
    select(true);
    // Reads are no longer allowed once the file says so; no signal sent.
    std::fs::write(&file, original.replace("\"read\", ", "")).unwrap();
    wait_for("statement policy reloaded", 1);
    select(false);
    // A broken edit is reported and the last good policy stays.
    std::fs::write(&file, "version = 1\n[[rule]]\nid = 3\n").unwrap();
    wait_for("does not load, keeping the previous policy", 1);
    select(false);
    std::fs::write(&file, &original).unwrap();
    wait_for("statement policy reloaded", 2);
    select(true);
}
