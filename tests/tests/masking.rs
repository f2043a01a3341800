//! Masking through the real proxy and a real PostgreSQL 15, under the
//! reference policy (`policies/examples/agent.toml`).
//!
//! One of the fixture's secrets here is a value no content detector
//! recognises (`opensesame`): only column rules and output-column lineage
//! can keep it from the client, so these tests fail if lineage misses a
//! channel, not just if detectors do.

use std::process::Command;
use std::sync::OnceLock;

use interceptor_tests::audit::json_lines_until;
use interceptor_tests::pg::{self, PgCluster};
use interceptor_tests::proxy::{Proxy, ProxyOptions};
use interceptor_tests::wire::parse_bind_execute;
use interceptor_tests::workspace_root;

const DB: &str = "masking";

/// Forms of the secrets a client must never see (lower case).
const LEAKS: &[&str] = &[
    "opensesame",
    "childsecret",
    "emasesnepo",
    // base64 of "opensesame"
    "b3blbnnlc2ftzq",
    // hex of "opensesame"
    "6f70656e736573616d65",
    "sk_live_0123456789abcdef",
    "@example.com",
];

fn setup(pg: &PgCluster) {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        fixture_db_again(DB);
        pg.psql_admin(
            DB,
            "INSERT INTO secrets VALUES (2, 'opensesame');
             CREATE VIEW v_keys AS SELECT id, api_key AS k FROM secrets;
             CREATE VIEW v_mail AS SELECT id, upper(email) AS e FROM users;
             CREATE VIEW v_nested AS SELECT k AS kk FROM v_keys;
             CREATE SCHEMA archive;
             CREATE TABLE archive.secrets (id int, api_key text);
             CREATE TABLE archive.secrets_2024 () INHERITS (archive.secrets);
             INSERT INTO archive.secrets_2024 VALUES (3, 'childsecret');",
        )
        .unwrap();
    });
}

fn proxy() -> &'static Proxy {
    static P: OnceLock<Proxy> = OnceLock::new();
    P.get_or_init(|| {
        let pg = pg::shared();
        setup(pg);
        Proxy::start(
            pg,
            ProxyOptions {
                client_tls: false,
                policy: Some(workspace_root().join("policies/examples/agent.toml")),
                ..Default::default()
            },
        )
        .expect("start proxy")
    })
}

/// psql through the proxy: (stdout, stderr), whatever the exit status.
fn psql(sql: &str) -> (String, String) {
    psql_in(DB, sql)
}

fn psql_in(db: &str, sql: &str) -> (String, String) {
    let out = Command::new(pg::psql_path())
        .args(["-X", "-At", "-c", sql])
        .arg(proxy().conninfo(db, "disable"))
        .output()
        .expect("run psql");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `db`, dropped (whoever is connected) and made again with the fixture.
fn fixture_db_again(db: &str) {
    let pg = pg::shared();
    let fixture =
        std::fs::read_to_string(workspace_root().join("tests/corpus/fixture.sql")).unwrap();
    pg.psql_admin(
        "postgres",
        &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
    )
    .unwrap();
    pg.psql_admin("postgres", &format!("CREATE DATABASE {db}"))
        .unwrap();
    pg.psql_admin(db, &fixture).unwrap();
}

fn leaks(text: &str) -> Vec<&'static str> {
    let lower = text.to_lowercase();
    LEAKS
        .iter()
        .copied()
        .filter(|l| lower.contains(l))
        .collect()
}

#[test]
fn no_channel_of_the_simple_protocol_carries_a_secret() {
    let cases = [
        "SELECT api_key FROM secrets",
        "SELECT api_key AS k FROM secrets ORDER BY id",
        "SELECT upper(api_key) FROM secrets",
        "SELECT reverse(api_key) FROM secrets",
        "SELECT encode(convert_to(api_key, 'UTF8'), 'base64') FROM secrets",
        "SELECT encode(convert_to(api_key, 'UTF8'), 'hex') FROM secrets",
        "SELECT string_agg(api_key, ',') FROM secrets",
        "SELECT row_to_json(s) FROM secrets s",
        "SELECT json_agg(s) FROM secrets s",
        "SELECT s::text FROM secrets s",
        "SELECT (SELECT api_key FROM secrets WHERE id = 2)",
        "SELECT x FROM (SELECT api_key AS x FROM secrets) t",
        "SELECT reverse(x) FROM (SELECT api_key AS x FROM secrets) t",
        "WITH c AS (SELECT api_key AS a FROM secrets) SELECT a || '' FROM c",
        "SELECT api_key FROM secrets UNION ALL SELECT 'x'",
        "TABLE secrets",
        "SELECT * FROM v_keys",
        "SELECT k || '' FROM v_keys",
        "SELECT kk FROM v_nested",
        "SELECT lower(kk) FROM v_nested",
        "SELECT e FROM v_mail",
        "SELECT lower(e) FROM v_mail",
        "SELECT b FROM secrets s(a, b)",
        "SELECT upper(b) FROM secrets s(a, b)",
        "SELECT query_to_xml('SELECT api_key FROM secrets', true, true, '')",
        "SELECT table_to_xml('secrets', true, true, '')",
        "SELECT schema_to_xml('public', true, true, '')",
        "SELECT database_to_xml(true, true, '')",
        "BEGIN; DECLARE x CURSOR FOR SELECT * FROM secrets; SELECT cursor_to_xml('x', 10, true, true, ''); COMMIT",
        "SELECT (s).* FROM secrets s",
        "SELECT t.* FROM (VALUES ((SELECT api_key FROM secrets WHERE id = 2))) t",
        "SELECT * FROM secrets, LATERAL (SELECT upper(api_key)) x",
        "SELECT lag(api_key) OVER (ORDER BY id) FROM secrets",
        "SELECT jsonb_path_query(to_jsonb(s), '$.api_key') FROM secrets s",
        "SELECT xmlagg(xmlelement(name k, api_key)) FROM secrets",
        "SELECT api_key::int FROM secrets WHERE id = 2",
        "SELECT 1 / 0 FROM secrets WHERE api_key = 'opensesame'",
        "COPY secrets TO STDOUT",
        "COPY secrets (api_key) TO STDOUT WITH (FORMAT csv, HEADER)",
        "COPY (SELECT id, upper(api_key) FROM secrets) TO STDOUT WITH (FORMAT csv)",
        "COPY (SELECT * FROM v_keys) TO STDOUT WITH (DELIMITER '|')",
        "COPY secrets TO STDOUT WITH (FORMAT binary)",
        "PREPARE p AS SELECT api_key || '!' FROM secrets; EXECUTE p",
        "PREPARE q(text) AS SELECT upper($1); EXECUTE q((SELECT api_key FROM secrets WHERE id = 2))",
        "PREPARE w(text) AS INSERT INTO audit_log(action) VALUES ($1); EXECUTE w((SELECT api_key FROM secrets WHERE id = 2)); SELECT action FROM audit_log",
        "BEGIN; DECLARE c CURSOR FOR SELECT lower(api_key) FROM secrets; FETCH ALL FROM c; COMMIT",
        "SELECT email, upper(email) FROM users",
        // A child of a masked table (partitions are children too).
        "SELECT api_key FROM archive.secrets_2024",
        "SELECT * FROM ONLY archive.secrets_2024",
        "SELECT upper(api_key) FROM archive.secrets_2024",
        "SELECT upper(api_key) FROM archive.secrets",
        // Laundering: masked data stored where masking cannot follow it.
        "CREATE TEMP TABLE t1 AS SELECT api_key FROM secrets; SELECT * FROM t1",
        "SELECT api_key INTO TEMP t2 FROM secrets; TABLE t2",
        "INSERT INTO audit_log(action) SELECT api_key FROM secrets",
        "SELECT action FROM audit_log",
        "BEGIN; CREATE TEMP TABLE t3 (k text); INSERT INTO t3 SELECT api_key FROM secrets; SELECT k FROM t3; COMMIT",
        "SELECT set_config('application_name', api_key, false) FROM secrets WHERE id = 2; SHOW application_name",
        "LISTEN c; SELECT pg_notify('c', api_key) FROM secrets",
        "CREATE TEMP VIEW v9 AS SELECT id, api_key AS k FROM secrets; SELECT k, lower(k) FROM v9",
        // Planner statistics sample every column's values.
        "ANALYZE secrets; SELECT attname, most_common_vals::text, histogram_bounds::text FROM pg_stats WHERE tablename = 'secrets'",
    ];
    let mut failures = Vec::new();
    for sql in cases {
        let (out, err) = psql(sql);
        let found = leaks(&format!("{out}{err}"));
        if !found.is_empty() {
            failures.push(format!("{sql}\n  leaked {found:?}: {out:?} {err:?}"));
        }
    }
    // One character per row: every row masked, none a bare character.
    let (out, _) = psql("SELECT substr(api_key, g, 1) FROM secrets, generate_series(1, 10) g");
    if out.lines().any(|l| l.chars().count() == 1) {
        failures.push(format!("one character per row came through: {out:?}"));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn what_is_not_sensitive_stays_as_it_is() {
    let (out, err) = psql("SELECT id, name FROM users ORDER BY id");
    assert_eq!(out, "1|Alice\n2|Bob\n3|Carol\n", "{err}");
    let (out, _) = psql("SELECT count(*), max(id) FROM secrets");
    assert_eq!(out, "2|2\n");
    let (out, _) = psql("SELECT api_key FROM secrets ORDER BY id");
    assert_eq!(out, "[redacted]\n[redacted]\n");
    let (out, _) = psql("SELECT id, k FROM v_keys ORDER BY id");
    assert_eq!(out, "1|[redacted]\n2|[redacted]\n");
    let (out, _) = psql("COPY (SELECT id, total FROM orders ORDER BY id) TO STDOUT");
    assert_eq!(out, "1\t10.5\n2\t99\n3\t3\n");
    // A plan of a statement that reads masked columns holds none of their
    // values: it is sent as it is.
    let (out, _) = psql("EXPLAIN (COSTS OFF) SELECT * FROM users WHERE id = 1");
    assert_eq!(
        out,
        "Index Scan using users_pkey on users\n  Index Cond: (id = 1)\n"
    );
    // A detector finds an email in a column no rule names.
    let (out, _) = psql("SELECT 'write to dora@example.org please'");
    assert_eq!(out, "write to [redacted:email] please\n");
    // Errors of statements that read nothing masked keep their text.
    let (_, err) = psql("SELECT 1 / 0");
    assert!(err.contains("division by zero"), "{err}");
    // Storing what is not masked is still allowed.
    let (out, err) =
        psql("CREATE TEMP TABLE ok AS SELECT id FROM secrets; SELECT count(*) FROM ok");
    assert_eq!(out, "SELECT 2\n2\n", "{err}");
    let (_, err) = psql("CREATE TEMP TABLE bad AS SELECT id, api_key FROM secrets");
    assert!(err.contains("would store masked data"), "{err}");
}

/// A permanent view over a masked column, named here for the first time:
/// the laundering check looks it up before deciding, instead of taking it
/// for a table (and letting what it reads be stored in clear).
#[test]
fn storing_through_a_view_not_yet_looked_up_is_refused() {
    let pg = pg::shared();
    proxy();
    pg.psql_admin(
        DB,
        "CREATE VIEW v_fresh AS SELECT id, api_key AS k FROM secrets;
         CREATE VIEW v_fresh2 AS SELECT id, api_key AS k FROM secrets;",
    )
    .unwrap();
    let (_, err) = psql("INSERT INTO audit_log(action) SELECT upper(k) FROM v_fresh");
    assert!(err.contains("would store masked data"), "{err}");
    // Through the session's own view of it, in the same text.
    let (_, err) = psql(
        "CREATE TEMP VIEW mine AS SELECT k FROM v_fresh2; INSERT INTO audit_log(action) SELECT lower(k) FROM mine",
    );
    assert!(err.contains("would store masked data"), "{err}");
    // What the view reads from unmasked columns is stored as before.
    let (out, err) = psql(
        "INSERT INTO audit_log(action) SELECT 'id ' || id FROM v_fresh2 WHERE id = 2; SELECT count(*) FROM audit_log WHERE action = 'id 2'",
    );
    assert_eq!(out, "INSERT 0 1\n1\n", "{err}");
}

#[test]
fn extended_protocol_text_and_binary_without_describe() {
    for (sql, format) in [
        ("SELECT id, api_key FROM secrets", 0),
        ("SELECT id, api_key FROM secrets", 1),
        ("SELECT convert_to(api_key, 'UTF8') FROM secrets", 1),
        ("SELECT to_jsonb(s) FROM secrets s", 1),
        ("SELECT length(api_key), md5(api_key) FROM secrets", 1),
    ] {
        // No Describe: the proxy must still know the row shape.
        let replies = parse_bind_execute(proxy().port, "agent", DB, sql, format).unwrap();
        let bytes: String = replies
            .iter()
            .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
            .collect();
        assert!(leaks(&bytes).is_empty(), "{sql} ({format}): {bytes:?}");
        let tags: Vec<u8> = replies.iter().map(|(t, _)| *t).collect();
        // The proxy's own Describe is not seen by the client.
        assert!(!tags.contains(&b'T'), "{sql}: {tags:?}");
        assert_eq!(
            tags.iter().filter(|t| **t == b'D').count(),
            2,
            "{sql}: {tags:?}"
        );
        assert_eq!(tags.last(), Some(&b'Z'));
    }
}

/// Errors at Parse and Bind (a missing relation, a constant folded at
/// planning) keep their text when the statement reads nothing masked, as
/// errors at Execute do; an error quoting masked data does not show it.
#[test]
fn extended_protocol_errors_are_masked_by_their_statement() {
    use interceptor_tests::wire::first_error;
    for (sql, code, text) in [
        ("SELECT * FROM no_such_table", "42P01", "does not exist"),
        ("SELECT 1/0", "22012", "division by zero"),
        (
            "SELECT id FROM users WHERE id = 1/0",
            "22012",
            "division by zero",
        ),
    ] {
        let replies = parse_bind_execute(proxy().port, "agent", DB, sql, 0).unwrap();
        let (c, m) = first_error(&replies).expect("an error");
        assert_eq!(c, code, "{sql}: {m}");
        assert!(m.contains(text), "{sql}: {m}");
    }
    let replies = parse_bind_execute(
        proxy().port,
        "agent",
        DB,
        "SELECT api_key::int FROM secrets",
        0,
    )
    .unwrap();
    let (c, m) = first_error(&replies).expect("an error");
    assert_eq!(c, "22P02");
    assert!(leaks(&m).is_empty(), "{m}");
}

/// A cursor DECLAREd in SQL and run by a protocol-level Execute (no Bind,
/// no Describe): its rows are masked and the session goes on.
#[test]
fn sql_cursors_executed_as_portals_are_masked() {
    use interceptor_tests::wire::{RawClient, frame};
    let (mut c, _) = RawClient::login(proxy().port, "agent", DB).unwrap();
    c.query("BEGIN").unwrap();
    c.query("DECLARE cur CURSOR FOR SELECT id, upper(api_key), api_key FROM secrets ORDER BY id")
        .unwrap();
    let mut out = frame(b'E', b"cur\0\0\0\0\0");
    out.extend(frame(b'S', b""));
    c.send(&out).unwrap();
    let replies = c.read_until_ready().unwrap();
    let bytes: String = replies
        .iter()
        .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
        .collect();
    assert!(leaks(&bytes).is_empty(), "{bytes:?}");
    let rows = replies.iter().filter(|(t, _)| *t == b'D').count();
    assert_eq!(rows, 2, "{replies:?}");
    let r = c.query("SELECT 1").unwrap();
    assert!(r.iter().any(|(t, _)| *t == b'D'), "session alive: {r:?}");
}

#[test]
fn masked_counts_reach_the_audit_trail() {
    let (out, _) = psql("SELECT id, api_key FROM secrets ORDER BY id");
    assert_eq!(out, "1|[redacted]\n2|[redacted]\n");
    let p = proxy();
    let config = p.config_path.to_str().expect("utf-8 path");
    let query = [
        "audit", "query", "--json", "--limit", "500", "--config", config,
    ];
    let tail = ["audit", "tail", "--json", "-n", "2000", "--config", config];
    let is_row = |v: &serde_json::Value| {
        v["Statement"]["text"]
            .as_str()
            .is_some_and(|t| t.contains("SELECT id, api_key FROM secrets ORDER BY id"))
    };
    let rows = json_lines_until(&query, |l| l.iter().any(is_row));
    let v = rows
        .iter()
        .rfind(|v| is_row(v))
        .unwrap_or_else(|| panic!("no audit row: {rows:?}"));
    assert_eq!(v["Statement"]["masked"], 2, "{v}");
    let seq = v["Statement"]["seq"].clone();
    let session = v["Statement"]["session"].clone();

    // Per rule and column, after the row; never the value.
    let masks_of = |l: &[serde_json::Value]| -> Vec<serde_json::Value> {
        l.iter()
            .filter_map(|v| v.get("Masked").cloned())
            .filter(|m| m["session"] == session && m["seq"] == seq)
            .collect()
    };
    let events = json_lines_until(&tail, |l| !masks_of(l).is_empty());
    let masks = masks_of(&events);
    assert_eq!(masks.len(), 1, "{masks:?}");
    assert_eq!(masks[0]["rule"], "secret-columns");
    assert_eq!(masks[0]["column"], "api_key");
    assert_eq!(masks[0]["count"], 2);
    assert!(leaks(&serde_json::to_string(&events).unwrap()).is_empty());
    // A detector's findings are counted by detector.
    let (out, _) = psql("SELECT 'mail eve@example.org or fay@example.org' AS note");
    assert_eq!(out, "mail [redacted:email] or [redacted:email]\n");
    let detected = |l: &[serde_json::Value]| {
        l.iter().filter_map(|v| v.get("Masked")).any(|m| {
            m["rule"] == "detected-secrets"
                && m["detector"] == "email"
                && m["column"] == "note"
                && m["count"] == 2
        })
    };
    assert!(
        detected(&json_lines_until(&tail, detected)),
        "no detector count"
    );
    // COPY's counts name its columns too.
    let (out, _) = psql("COPY (SELECT id, api_key AS k FROM secrets) TO STDOUT");
    assert_eq!(out, "1\t[redacted]\n2\t[redacted]\n");
    let copied = |l: &[serde_json::Value]| {
        l.iter()
            .filter_map(|v| v.get("Masked"))
            .any(|m| m["rule"] == "secret-columns" && m["column"] == "k" && m["count"] == 2)
    };
    assert!(
        copied(&json_lines_until(&tail, copied)),
        "no COPY count by column"
    );
}

/// `binary = "deny"`: a masked column of a non-text type asked for in
/// binary format ends the statement with 42501 instead of sending NULL;
/// in text format it is masked as usual.
#[test]
fn binary_deny_refuses_masked_binary_columns() {
    let pg = pg::shared();
    setup(pg);
    let proxy = Proxy::with_policy(
        pg,
        "version = 1\n[[rule]]\nid = \"all\"\ndecision = \"allow\"\n\
         [[mask]]\nid = \"order-totals\"\ncolumns = [\"orders.total\"]\nbinary = \"deny\"\n",
    )
    .unwrap();
    let sql = "SELECT id, total FROM orders ORDER BY id";
    let binary = parse_bind_execute(proxy.port, "agent", DB, sql, 1).unwrap();
    let tags: Vec<u8> = binary.iter().map(|(t, _)| *t).collect();
    assert!(!tags.contains(&b'D'), "{tags:?}");
    let err = binary.iter().find(|(t, _)| *t == b'E').expect("an error");
    let text = String::from_utf8_lossy(&err.1);
    assert!(
        text.contains("42501") && text.contains("binary format"),
        "{text}"
    );
    assert_eq!(tags.last(), Some(&b'Z'));
    let text_rows = parse_bind_execute(proxy.port, "agent", DB, sql, 0).unwrap();
    let rows: Vec<&Vec<u8>> = text_rows
        .iter()
        .filter(|(t, _)| *t == b'D')
        .map(|(_, b)| b)
        .collect();
    assert_eq!(rows.len(), 3);
    // total (numeric) masked by redact in text format: NULL.
    assert!(
        rows.iter().all(|r| r.ends_with(&(-1i32).to_be_bytes())),
        "{rows:?}"
    );
}

/// The proxy's catalog connection for a database is gone when the
/// database is dropped and made again (or the server restarts): the next
/// lookup opens a new one rather than mask every column it was for.
#[test]
fn a_database_made_again_is_looked_up_afresh() {
    let db = "masking_remade";
    let through_proxy = |sql: &str| psql_in(db, sql).0;
    fixture_db_again(db);
    let names = "SELECT id, name FROM users ORDER BY id";
    assert_eq!(through_proxy(names), "1|Alice\n2|Bob\n3|Carol\n");
    fixture_db_again(db);
    // Other relations than before: not cached by OID.
    assert_eq!(
        through_proxy("SELECT id, total FROM orders ORDER BY id"),
        "1|10.5\n2|99\n3|3\n"
    );
    assert_eq!(through_proxy(names), "1|Alice\n2|Bob\n3|Carol\n");
    assert_eq!(
        through_proxy("SELECT email FROM users ORDER BY id"),
        "[redacted]\n[redacted]\n[redacted]\n"
    );
}

/// The proxy's catalog connection does not outstay the sessions that
/// used it: a plain DROP DATABASE (which waits up to 5 s for other
/// sessions) succeeds after a masked read.
#[test]
fn the_catalog_connection_does_not_hold_the_database() {
    let db = "masking_dropped";
    fixture_db_again(db);
    assert_eq!(
        psql_in(db, "SELECT email FROM users ORDER BY id").0,
        "[redacted]\n[redacted]\n[redacted]\n"
    );
    pg::shared()
        .psql_admin("postgres", &format!("DROP DATABASE {db}"))
        .unwrap();
}
