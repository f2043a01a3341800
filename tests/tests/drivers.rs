//! The drivers agents use, through the proxy, with TLS on and off:
//! psycopg 3, asyncpg, node-postgres and pgjdbc. Each script asserts on its
//! own results and prints "<driver> OK" only when all of them held.
//!
//! The drivers are installed by `cargo xtask setup` (which `cargo xtask
//! test` and `.ci/run` call); a missing driver fails the test, it is never
//! skipped. The last test runs each driver against a masking policy.

use std::path::{Path, PathBuf};
use std::process::Command;

use interceptor_tests::pg;
use interceptor_tests::proxy::{Proxy, ProxyOptions};
use interceptor_tests::workspace_root;

fn drivers_dir() -> PathBuf {
    workspace_root().join("tests/drivers")
}

fn require(path: &Path) -> &Path {
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask setup` first",
        path.display()
    );
    path
}

fn run(cmd: &mut Command, expect: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(expect),
        "{cmd:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn proxy() -> Proxy {
    Proxy::start(pg::shared(), ProxyOptions::default()).expect("start proxy")
}

/// Compiles a check in tests/drivers against pgjdbc: the classpath to run
/// it with, and the directory that holds the classes.
fn compile_java(source: &str) -> (String, tempfile::TempDir) {
    let jar = require(Path::new("/usr/share/java/postgresql.jar")).to_owned();
    let classes = tempfile::tempdir().unwrap();
    run(
        Command::new("javac")
            .arg("-cp")
            .arg(&jar)
            .arg("-d")
            .arg(classes.path())
            .arg(drivers_dir().join(source))
            .env("JAVA_TOOL_OPTIONS", ""),
        "",
    );
    let cp = format!("{}:{}", jar.display(), classes.path().display());
    (cp, classes)
}

fn python() -> PathBuf {
    require(&workspace_root().join("target/venv/bin/python")).to_owned()
}

#[test]
fn psycopg3_plain_and_tls() {
    let p = proxy();
    let script = drivers_dir().join("psycopg3_check.py");
    run(
        Command::new(python())
            .arg(&script)
            .arg(p.conninfo("app", "disable"))
            .arg("plain"),
        "psycopg3 OK",
    );
    let tls = format!(
        "host=localhost port={} dbname=app user=agent sslmode=verify-full sslrootcert={}",
        p.port,
        p.ca_file().display()
    );
    run(
        Command::new(python()).arg(&script).arg(tls).arg("tls"),
        "psycopg3 OK",
    );
}

#[test]
fn asyncpg_plain_and_tls() {
    let p = proxy();
    let script = drivers_dir().join("asyncpg_check.py");
    let dsn = format!("postgresql://agent@localhost:{}/app", p.port);
    run(
        Command::new(python()).arg(&script).arg(&dsn).arg("plain"),
        "asyncpg OK",
    );
    run(
        Command::new(python())
            .arg(&script)
            .arg(&dsn)
            .arg("tls")
            .arg(p.ca_file()),
        "asyncpg OK",
    );
}

#[test]
fn node_pg_plain_and_tls() {
    let p = proxy();
    let modules = workspace_root().join("target/node/node_modules");
    require(&modules.join("pg-copy-streams"));
    let script = drivers_dir().join("node_pg_check.js");
    let conn = format!("postgresql://agent@localhost:{}/app", p.port);
    run(
        Command::new("node")
            .env("NODE_PATH", &modules)
            .arg(&script)
            .arg(&conn)
            .arg("plain"),
        "node pg OK",
    );
    run(
        Command::new("node")
            .env("NODE_PATH", &modules)
            .arg(&script)
            .arg(&conn)
            .arg("tls")
            .arg(p.ca_file()),
        "node pg OK",
    );
}

#[test]
fn pgjdbc_plain_and_tls() {
    let p = proxy();
    let (cp, _classes) = compile_java("JdbcCheck.java");
    let base = format!(
        "jdbc:postgresql://localhost:{}/app?user=agent&prepareThreshold=1",
        p.port
    );
    run(
        Command::new("java")
            .args(["-cp", &cp, "JdbcCheck"])
            .arg(format!("{base}&sslmode=disable"))
            .arg("plain"),
        "pgjdbc OK",
    );
    let tls = format!(
        "{base}&sslmode=verify-full&sslrootcert={}",
        p.ca_file().display()
    );
    run(
        Command::new("java")
            .args(["-cp", &cp, "JdbcCheck"])
            .arg(tls)
            .arg("tls"),
        "pgjdbc OK",
    );
}

const MASKING_POLICY: &str = r#"
version = 1

[[rule]]
id = "all"
decision = "allow"

[[mask]]
id = "cards"
columns = ["masked_t.card"]
strategy = "partial"
keep_last = 4

[[mask]]
id = "others"
columns = ["masked_t.profile", "masked_t.pin", "masked_t.raw"]
"#;

/// A proxy whose policy masks the columns of `masked_t` (made here).
fn masking_proxy() -> Proxy {
    let pg = pg::shared();
    pg.psql_admin(
        "app",
        "DROP TABLE IF EXISTS masked_t;
         CREATE TABLE masked_t (id int PRIMARY KEY, card text, profile jsonb, pin int, raw bytea);
         INSERT INTO masked_t VALUES (1, '4111 1111 1111 1111', '{\"ssn\": \"123-45-6789\"}', 4321, '\\x0102');",
    )
    .unwrap();
    Proxy::with_policy(pg, MASKING_POLICY).expect("start proxy")
}

/// Every driver decodes masked values as values of the column's type: the
/// card as text, the jsonb as JSON, the int as NULL, the bytea as bytes.
#[test]
fn masked_values_keep_their_types_in_every_driver() {
    let p = masking_proxy();
    let dsn = format!("postgresql://agent@localhost:{}/app", p.port);
    run(
        Command::new(python())
            .arg(drivers_dir().join("masking_check.py"))
            .arg(p.conninfo("app", "disable"))
            .arg(&dsn),
        "asyncpg masking OK",
    );
    let modules = workspace_root().join("target/node/node_modules");
    run(
        Command::new("node")
            .env("NODE_PATH", &modules)
            .arg(drivers_dir().join("masking_check.js"))
            .arg(&dsn),
        "node pg masking OK",
    );
    let (cp, _classes) = compile_java("MaskingCheck.java");
    run(
        Command::new("java")
            .args(["-cp", &cp, "MaskingCheck"])
            .arg(format!(
                "jdbc:postgresql://localhost:{}/app?user=agent&prepareThreshold=1&binaryTransfer=true&sslmode=disable",
                p.port
            )),
        "pgjdbc masking OK",
    );
}
