//! PostgreSQL's own tools through the proxy: pgbench, pg_dump, pg_restore,
//! and result sets too big to buffer.

use std::process::{Command, Stdio};

use interceptor_tests::pg::{self, ADMIN_PASSWORD, ADMIN_USER, PgCluster};
use interceptor_tests::pg_bin;
use interceptor_tests::proxy::{Proxy, ProxyOptions};
use interceptor_tests::run_ok;

fn libpq_env<'a>(cmd: &'a mut Command, proxy: &Proxy, db: &str) -> &'a mut Command {
    cmd.env("PGHOST", "127.0.0.1")
        .env("PGPORT", proxy.port.to_string())
        .env("PGUSER", "agent")
        .env("PGDATABASE", db)
        .env("PGSSLMODE", "require")
}

#[test]
fn pgbench_init_and_short_run() {
    let pg = PgCluster::start().unwrap();
    pg.psql_admin(
        "postgres",
        &format!("CREATE DATABASE bench OWNER {ADMIN_USER}"),
    )
    .unwrap();
    let proxy = Proxy::start(&pg, ProxyOptions::default()).unwrap();
    let out = run_ok(libpq_env(
        Command::new(pg_bin("pgbench")).args(["-i", "-s", "2", "-q"]),
        &proxy,
        "bench",
    ))
    .unwrap();
    let _ = out;
    assert_eq!(
        pg.psql_admin("bench", "SELECT count(*) FROM pgbench_accounts")
            .unwrap()
            .trim(),
        "200000"
    );
    for mode in ["simple", "extended", "prepared"] {
        let out = run_ok(libpq_env(
            Command::new(pg_bin("pgbench")).args(["-c", "4", "-j", "2", "-t", "200", "-M", mode]),
            &proxy,
            "bench",
        ))
        .unwrap();
        assert!(
            out.contains("number of transactions actually processed: 800/800"),
            "{mode}: {out}"
        );
        assert!(
            out.contains("number of failed transactions: 0"),
            "{mode}: {out}"
        );
    }
    // pgbench truncates the history before each run: the last run's 800 remain.
    assert_eq!(
        pg.psql_admin("bench", "SELECT count(*) FROM pgbench_history")
            .unwrap()
            .trim(),
        "800"
    );
}

#[test]
fn pg_dump_and_pg_restore_round_trip() {
    let pg = PgCluster::start().unwrap();
    pg.psql_admin(
        "postgres",
        &format!("CREATE DATABASE src OWNER {ADMIN_USER}"),
    )
    .unwrap();
    pg.psql_admin(
        "postgres",
        &format!("CREATE DATABASE dst OWNER {ADMIN_USER}"),
    )
    .unwrap();
    pg.psql_admin(
        "src",
        "CREATE TABLE t (id serial PRIMARY KEY, v text, b bytea, j jsonb, ts timestamptz DEFAULT now());
         INSERT INTO t (v, b, j) SELECT 'row ' || g, decode(md5(g::text), 'hex'), jsonb_build_object('g', g) FROM generate_series(1, 20000) g;
         CREATE VIEW v AS SELECT id, v FROM t WHERE id % 2 = 0;
         CREATE FUNCTION f(int) RETURNS int LANGUAGE sql AS 'SELECT $1 * 2';
         CREATE INDEX ON t (v);
         SELECT lo_from_bytea(0, 'large object payload'::bytea);",
    )
    .unwrap();
    let proxy = Proxy::start(&pg, ProxyOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("src.dump");
    run_ok(libpq_env(
        Command::new(pg_bin("pg_dump"))
            .args(["-Fc", "-f"])
            .arg(&dump),
        &proxy,
        "src",
    ))
    .unwrap();
    run_ok(libpq_env(
        Command::new(pg_bin("pg_restore"))
            .args(["--no-owner", "-d", "dst"])
            .arg(&dump),
        &proxy,
        "dst",
    ))
    .unwrap();
    let q = "SELECT count(*), sum(length(v)), md5(string_agg(b::text || j::text, ',' ORDER BY id)) FROM t";
    assert_eq!(
        pg.psql_admin("src", q).unwrap(),
        pg.psql_admin("dst", q).unwrap()
    );
    assert_eq!(
        pg.psql_admin("dst", "SELECT f(21), (SELECT count(*) FROM v)")
            .unwrap()
            .trim(),
        "42|10000"
    );
    assert_eq!(
        pg.psql_admin(
            "dst",
            "SELECT convert_from(lo_get(oid), 'UTF8') FROM pg_largeobject_metadata"
        )
        .unwrap()
        .trim(),
        "large object payload"
    );

    // Plain-format dump through the proxy equals the direct one.
    let via_proxy = run_ok(libpq_env(
        Command::new(pg_bin("pg_dump")).arg("--no-owner"),
        &proxy,
        "src",
    ))
    .unwrap();
    let direct = run_ok(
        Command::new(pg_bin("pg_dump"))
            .args([
                "--no-owner",
                "-h",
                "127.0.0.1",
                "-U",
                ADMIN_USER,
                "-d",
                "src",
                "-p",
            ])
            .arg(pg.port.to_string())
            .env("PGPASSWORD", ADMIN_PASSWORD),
    )
    .unwrap();
    // `\restrict` lines carry a random key per dump; everything else must match.
    let stable = |s: &str| {
        s.lines()
            .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let (via_proxy, direct) = (stable(&via_proxy), stable(&direct));
    assert!(
        via_proxy.len() > 1_000_000,
        "dump holds the data ({} bytes)",
        via_proxy.len()
    );
    assert!(
        via_proxy == direct,
        "plain dumps differ between proxy and direct"
    );
}

/// A million rows stream through; the daemon's memory stays bounded.
#[test]
fn million_row_select_and_copy_stream_in_bounded_memory() {
    let pg = pg::shared();
    let proxy = Proxy::start(pg, ProxyOptions::default()).unwrap();
    let before = proxy.peak_rss_kib();
    let sql = "SELECT g, repeat('x', 60) || g FROM generate_series(1, 1000000) g";
    assert_eq!(psql_line_count(&proxy, &["-At", "-c", sql]), 1_000_000);
    let copy = format!("COPY ({sql}) TO STDOUT");
    assert_eq!(psql_line_count(&proxy, &["-c", &copy]), 1_000_000);

    let peak = proxy.peak_rss_kib();
    // About 70 MB went through; buffering any real part of it would show.
    assert!(
        peak < 32 * 1024,
        "peak RSS {peak} KiB (was {before} KiB before the queries)"
    );
}

/// A million masked rows (a name rule on one column, a detector on
/// another) stream through, every one masked, in bounded memory.
#[test]
fn million_masked_rows_stream_in_bounded_memory() {
    let pg = pg::shared();
    let proxy = Proxy::with_policy(
        pg,
        "version = 1\n[[rule]]\nid = \"all\"\ndecision = \"allow\"\n\
         [[mask]]\nid = \"cards\"\nnames = [\"card\"]\nstrategy = \"partial\"\nkeep_last = 4\n\
         [[mask]]\nid = \"emails\"\ndetectors = [\"email\"]\n",
    )
    .unwrap();
    let sql = "SELECT g, '4111 1111 1111 ' || lpad((g % 10000)::text, 4, '0') AS card, \
               'user' || g || '@example.com' AS contact FROM generate_series(1, 1000000) g";
    let masked = |l: &str| {
        let f: Vec<&str> = l.split(['|', '\t']).collect();
        f.len() == 3 && f[1].starts_with("****") && f[1].len() == 8 && f[2] == "[redacted:email]"
    };
    assert_eq!(
        psql_lines(&proxy, &["-At", "-c", sql], masked),
        (1_000_000, 1_000_000)
    );
    let copy = format!("COPY ({sql}) TO STDOUT");
    assert_eq!(
        psql_lines(&proxy, &["-c", &copy], masked),
        (1_000_000, 1_000_000)
    );
    let peak = proxy.peak_rss_kib();
    assert!(peak < 32 * 1024, "peak RSS {peak} KiB");
}

/// Streams psql's output through the proxy, counting lines as they come.
fn psql_line_count(proxy: &Proxy, args: &[&str]) -> usize {
    psql_lines(proxy, args, |_| true).0
}

/// Streams psql's output: (lines, lines that `ok` holds for).
fn psql_lines(proxy: &Proxy, args: &[&str], ok: impl Fn(&str) -> bool) -> (usize, usize) {
    use std::io::BufRead;
    let mut child = libpq_env(
        Command::new(pg_bin("psql")).arg("-X").args(args),
        proxy,
        "app",
    )
    .env("PGSSLMODE", "disable")
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let out = child.stdout.take().unwrap();
    let mut counts = (0, 0);
    for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
        counts.0 += 1;
        counts.1 += usize::from(ok(&line));
    }
    assert!(child.wait().unwrap().success());
    counts
}
