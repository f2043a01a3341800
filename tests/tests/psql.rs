//! psql through the proxy: the features users notice first when a proxy
//! gets the protocol wrong.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use interceptor_tests::pg::{self, PgCluster};
use interceptor_tests::pg_bin;
use interceptor_tests::proxy::{Proxy, ProxyOptions};
use interceptor_tests::wire::{RawClient, first_error};

fn psql(proxy: &Proxy, conninfo: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let _ = proxy;
    let mut child = Command::new(pg_bin("psql"))
        .args(["-X", "-v", "VERBOSITY=verbose", "-d", conninfo])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn psql");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    } else {
        drop(child.stdin.take());
    }
    child.wait_with_output().expect("psql output")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn start(opts: ProxyOptions) -> (&'static PgCluster, Proxy) {
    let pg = pg::shared();
    (pg, Proxy::start(pg, opts).expect("start proxy"))
}

#[test]
fn multi_statement_strings_and_errors_inside_transactions() {
    let (_pg, proxy) = start(ProxyOptions::default());
    let ci = proxy.conninfo("app", "disable");
    let o = psql(
        &proxy,
        &ci,
        &["-At", "-c", "select 1 as a; select 'two' as b; select 3"],
        None,
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(out.lines().collect::<Vec<_>>(), vec!["1", "two", "3"]);

    let script = "BEGIN;\nSELECT 1/0;\nSELECT 1;\nROLLBACK;\nSELECT 'after' AS x;\n";
    let o = psql(&proxy, &ci, &["-At"], Some(script));
    let (out, err) = text(&o);
    assert!(
        err.contains("22012"),
        "division by zero must reach the client: {err}"
    );
    assert!(
        err.contains("25P02"),
        "the failed transaction must be reported: {err}"
    );
    assert!(out.contains("ROLLBACK") || out.contains("after"), "{out}");
    assert!(
        out.lines().any(|l| l == "after"),
        "session must be usable after ROLLBACK: {out}"
    );
}

#[test]
fn copy_both_ways_with_backslash_copy() {
    let (pg, proxy) = start(ProxyOptions::default());
    pg.psql_admin(
        "app",
        "CREATE TABLE IF NOT EXISTS copy_t (id int, name text)",
    )
    .unwrap();
    pg.psql_admin("app", "TRUNCATE copy_t").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.csv");
    let rows: String = (1..=5000)
        .map(|i| format!("{i},\"name {i} with \"\"quotes\"\" and, commas\"\n"))
        .collect();
    std::fs::write(&input, &rows).unwrap();
    let output = dir.path().join("out.csv");
    let ci = proxy.conninfo("app", "disable");
    let o = psql(
        &proxy,
        &ci,
        &[
            "-c",
            &format!("\\copy copy_t FROM '{}' WITH (FORMAT csv)", input.display()),
            "-c",
            &format!(
                "\\copy (SELECT * FROM copy_t ORDER BY id) TO '{}' WITH (FORMAT csv)",
                output.display()
            ),
        ],
        None,
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("COPY 5000"), "{out}{err}");
    let back = std::fs::read_to_string(&output).unwrap();
    assert_eq!(back, rows);
    assert_eq!(
        pg.psql_admin("app", "SELECT count(*) FROM copy_t")
            .unwrap()
            .trim(),
        "5000"
    );

    // COPY FROM STDIN that the client aborts: CopyFail must roll it back.
    let o = psql(
        &proxy,
        &ci,
        &["-c", "COPY copy_t FROM STDIN WITH (FORMAT csv)"],
        Some("1,ok\nnot-a-number,x\n"),
    );
    let (_, err) = text(&o);
    assert!(
        err.contains("22P02"),
        "bad input row must fail the COPY: {err}"
    );
    assert_eq!(
        pg.psql_admin("app", "SELECT count(*) FROM copy_t")
            .unwrap()
            .trim(),
        "5000"
    );
}

#[test]
fn lo_import_uses_fast_path_function_calls() {
    let (pg, proxy) = start(ProxyOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("blob.bin");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&file, &data).unwrap();
    let exported = dir.path().join("exported.bin");
    let ci = proxy.conninfo("app", "disable");
    let o = psql(
        &proxy,
        &ci,
        &["-c", &format!("\\lo_import '{}'", file.display())],
        None,
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    let oid: u32 = out
        .trim()
        .strip_prefix("lo_import ")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    let o = psql(
        &proxy,
        &ci,
        &["-c", &format!("\\lo_export {oid} '{}'", exported.display())],
        None,
    );
    assert!(o.status.success(), "{:?}", text(&o));
    assert_eq!(
        std::fs::read(&exported).unwrap(),
        data,
        "large object must round-trip byte for byte"
    );
    pg.psql_admin("app", &format!("SELECT lo_unlink({oid})"))
        .unwrap();
}

#[test]
fn gdesc_describes_without_executing() {
    let (_pg, proxy) = start(ProxyOptions::default());
    let ci = proxy.conninfo("app", "disable");
    let o = psql(
        &proxy,
        &ci,
        &["-At"],
        Some("SELECT 1::int AS n, 'x'::text AS t, now() AS ts \\gdesc\n"),
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("n|integer"), "{out}");
    assert!(out.contains("t|text"), "{out}");
    assert!(out.contains("ts|timestamp with time zone"), "{out}");
}

#[test]
fn cancel_reaches_the_right_backend() {
    let (_pg, proxy) = start(ProxyOptions::default());
    let ci = proxy.conninfo("app", "disable");
    let child = Command::new(pg_bin("psql"))
        .args([
            "-X",
            "-v",
            "VERBOSITY=verbose",
            "-d",
            &ci,
            "-c",
            "SELECT pg_sleep(60)",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the statement runs, then ^C psql, which sends a CancelRequest.
    let pg = pg::shared();
    for _ in 0..200 {
        let n = pg
            .psql_admin("app", "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'")
            .unwrap();
        if n.trim() == "1" {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let o = child.wait_with_output().unwrap();
    let (_, err) = text(&o);
    assert!(
        err.contains("57014"),
        "the cancel must interrupt the statement: {err}"
    );
    assert!(
        proxy.log().contains("forwarding cancel request"),
        "{}",
        proxy.log()
    );
}

#[test]
fn unknown_cancel_key_is_dropped() {
    let (_pg, proxy) = start(ProxyOptions::default());
    let mut c = interceptor_tests::wire::RawClient::connect(proxy.port).unwrap();
    let mut p = 16i32.to_be_bytes().to_vec();
    p.extend_from_slice(&80877102i32.to_be_bytes());
    p.extend_from_slice(&1234i32.to_be_bytes());
    p.extend_from_slice(&5678i32.to_be_bytes());
    c.send(&p).unwrap();
    assert!(
        c.read_to_end().unwrap().is_empty(),
        "an unknown cancel gets no answer"
    );
    assert!(
        !proxy.log().contains("forwarding cancel request"),
        "{}",
        proxy.log()
    );
}

#[test]
fn tls_verify_full_against_the_generated_ca() {
    let (_pg, proxy) = start(ProxyOptions::default());
    let ci = format!(
        "host=localhost port={} dbname=app user=agent sslmode=verify-full sslrootcert={}",
        proxy.port,
        proxy.ca_file().display()
    );
    let o = psql(
        &proxy,
        &ci,
        &["-c", "\\conninfo", "-At", "-c", "select 42"],
        None,
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("SSL connection (protocol: TLSv1.3"), "{out}");
    assert!(out.contains("42"), "{out}");
}

#[test]
fn tls_disabled_answers_n_and_plain_works() {
    let (_pg, proxy) = start(ProxyOptions {
        client_tls: false,
        ..Default::default()
    });
    let o = psql(
        &proxy,
        &proxy.conninfo("app", "require"),
        &["-c", "select 1"],
        None,
    );
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("server does not support SSL"), "{err}");
    let o = psql(
        &proxy,
        &proxy.conninfo("app", "prefer"),
        &["-At", "-c", "select 7"],
        None,
    );
    assert_eq!(text(&o).0.trim(), "7");
}

#[test]
fn scram_client_secret_is_checked_and_never_sent_upstream() {
    let pg = pg::shared();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("client-secret");
    std::fs::write(&secret, "agent-pass-1\n").unwrap();
    let opts = ProxyOptions {
        client_auth: Some(format!(
            "method = \"scram-sha-256\", secret_file = \"{}\"",
            secret.display()
        )),
        ..Default::default()
    };
    let proxy = Proxy::start(pg, opts).unwrap();
    let ci = proxy.conninfo("app", "disable");
    let ok = Command::new(pg_bin("psql"))
        .args(["-X", "-At", "-d", &ci, "-c", "select current_user"])
        .env("PGPASSWORD", "agent-pass-1")
        .output()
        .unwrap();
    assert!(ok.status.success(), "{:?}", ok);
    // Upstream the session runs as the vaulted role, not as the client.
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), pg::ADMIN_USER);
    let bad = Command::new(pg_bin("psql"))
        .args(["-X", "-At", "-d", &ci, "-c", "select 1"])
        .env("PGPASSWORD", "wrong")
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr)
            .contains("password authentication failed for user \"agent\"")
    );
    assert!(!proxy.log().contains("agent-pass-1"));
    assert!(!proxy.log().contains(pg::ADMIN_PASSWORD));
}

#[test]
fn cleartext_client_auth_only_over_tls() {
    let pg = pg::shared();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("s");
    std::fs::write(&secret, "clear-pass").unwrap();
    let opts = ProxyOptions {
        client_auth: Some(format!(
            "method = \"password\", secret_file = \"{}\"",
            secret.display()
        )),
        ..Default::default()
    };
    let proxy = Proxy::start(pg, opts).unwrap();
    let run = |sslmode: &str| {
        Command::new(pg_bin("psql"))
            .args([
                "-X",
                "-At",
                "-d",
                &proxy.conninfo("app", sslmode),
                "-c",
                "select 5",
            ])
            .env("PGPASSWORD", "clear-pass")
            .output()
            .unwrap()
    };
    let tls = run("require");
    assert_eq!(String::from_utf8_lossy(&tls.stdout).trim(), "5", "{tls:?}");
    let plain = run("disable");
    assert!(
        String::from_utf8_lossy(&plain.stderr).contains("only over TLS"),
        "{plain:?}"
    );
}

#[test]
fn login_refusals_are_precise() {
    let (_pg, proxy) = start(ProxyOptions {
        databases: vec!["app".into()],
        ..Default::default()
    });
    let o = psql(
        &proxy,
        &proxy.conninfo("postgres", "disable"),
        &["-c", "select 1"],
        None,
    );
    let (_, err) = text(&o);
    assert!(
        err.contains("not allowed through target `main`") && err.contains("Allowed databases: app"),
        "{err}"
    );
    let (_, msgs) = RawClient::login(proxy.port, "agent", "postgres").unwrap();
    assert_eq!(first_error(&msgs).map(|e| e.0).as_deref(), Some("42501"));

    let o = psql(
        &proxy,
        &format!("{} replication=database", proxy.conninfo("app", "disable")),
        &["-c", "select 1"],
        None,
    );
    let (_, err) = text(&o);
    assert!(
        err.contains("replication connections are not allowed"),
        "{err}"
    );

    let o = psql(
        &proxy,
        &proxy.conninfo("app", "disable"),
        &["-c", "select 1"],
        None,
    );
    assert!(
        o.status.success(),
        "allowed database still works: {:?}",
        text(&o)
    );
}

#[test]
fn unreachable_upstream_gets_08006_naming_the_target() {
    let pg = pg::shared();
    let dead = interceptor_tests::free_port();
    let proxy = Proxy::start(
        pg,
        ProxyOptions {
            upstream_port: Some(dead),
            ..Default::default()
        },
    )
    .unwrap();
    let o = psql(
        &proxy,
        &proxy.conninfo("app", "disable"),
        &["-c", "select 1"],
        None,
    );
    let (_, err) = text(&o);
    assert!(
        err.contains("cannot reach the server of target `main`"),
        "{err}"
    );
    let (_, msgs) = RawClient::login(proxy.port, "agent", "app").unwrap();
    assert_eq!(first_error(&msgs).map(|e| e.0).as_deref(), Some("08006"));
}

#[test]
fn upstream_error_during_login_is_relayed() {
    let (_pg, proxy) = start(ProxyOptions::default());
    let o = psql(
        &proxy,
        &proxy.conninfo("no_such_db", "disable"),
        &["-c", "select 1"],
        None,
    );
    let (_, err) = text(&o);
    assert!(
        err.contains("database \"no_such_db\" does not exist"),
        "{err}"
    );
    let (_, msgs) = RawClient::login(proxy.port, "agent", "no_such_db").unwrap();
    assert_eq!(first_error(&msgs).map(|e| e.0).as_deref(), Some("3D000"));
}

#[test]
fn listens_on_ipv6_too() {
    let (_pg, proxy) = start(ProxyOptions {
        listen_v6: true,
        ..Default::default()
    });
    let o = psql(
        &proxy,
        &format!(
            "host=::1 port={} dbname=app user=agent sslmode=disable",
            proxy.port
        ),
        &["-At", "-c", "select 6"],
        None,
    );
    assert_eq!(text(&o).0.trim(), "6", "{:?}", text(&o));
}
