//! `cargo xtask demo`: the product on embedded defaults, end to end.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use interceptor_tests::pg::{ADMIN_USER, PgCluster};
use interceptor_tests::pg_bin;
use interceptor_tests::proxy::{Proxy, ProxyOptions};
use interceptor_tests::wire::{RawClient, first_error, frame};

const SAMPLE: &str = "
CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL, email text NOT NULL, plan text NOT NULL);
INSERT INTO customers (name, email, plan) VALUES
  ('Ada Lovelace', 'ada@example.com', 'enterprise'),
  ('Alan Turing', 'alan@example.com', 'team'),
  ('Grace Hopper', 'grace@example.com', 'enterprise'),
  ('Edsger Dijkstra', 'edsger@example.com', 'free');
CREATE TABLE orders (id serial PRIMARY KEY, customer_id int REFERENCES customers, amount numeric(10,2), placed_at timestamptz DEFAULT now());
INSERT INTO orders (customer_id, amount) SELECT 1 + g % 4, (g * 7.31)::numeric(10,2) FROM generate_series(1, 10000) g;
";

fn step(title: &str) {
    println!("\n\x1b[1m== {title}\x1b[0m");
}

fn psql(conninfo: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(pg_bin("psql"))
        .args(["-X", "-d", conninfo])
        .args(args)
        .output()?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok(text)
}

fn show(cmdline: &str, output: &str) {
    println!("$ {cmdline}");
    for line in output.lines() {
        println!("  {line}");
    }
}

pub fn run(keep: bool) -> Result<()> {
    step("Starting a private PostgreSQL 15 with sample data");
    let pg = PgCluster::start().context("start PostgreSQL")?;
    pg.psql_admin("app", SAMPLE)?;
    println!(
        "PostgreSQL on 127.0.0.1:{} (data in {})",
        pg.port,
        pg.path().display()
    );
    println!(
        "interceptor logs in upstream as `{ADMIN_USER}` with a SCRAM password read from a file the agent never sees."
    );

    step("Starting interceptor in front of it");
    let proxy = Proxy::start(
        &pg,
        ProxyOptions {
            databases: vec!["app".into()],
            ..Default::default()
        },
    )?;
    println!("config: {}", proxy.config_path.display());
    println!(
        "{}",
        std::fs::read_to_string(&proxy.config_path)?
            .lines()
            .map(|l| format!("  | {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    let tls = format!(
        "host=localhost port={} dbname=app user=agent sslmode=verify-full sslrootcert={}",
        proxy.port,
        proxy.ca_file().display()
    );
    step(
        "An agent connects with TLS, verified against interceptor's generated CA, and no password",
    );
    show(
        &format!("psql \"{tls}\" -c '\\conninfo'"),
        &psql(&tls, &["-c", "\\conninfo"])?,
    );
    show(
        "SELECT current_user, inet_server_port()",
        &psql(
            &tls,
            &[
                "-c",
                "SELECT current_user AS upstream_role, inet_server_port() AS server_port",
            ],
        )?,
    );

    step("Queries, transactions and COPY work as if direct");
    show(
        "top customers by revenue",
        &psql(
            &tls,
            &[
                "-c",
                "SELECT c.name, c.plan, count(*) AS orders, sum(o.amount) AS revenue FROM customers c JOIN orders o ON o.customer_id = c.id GROUP BY 1, 2 ORDER BY revenue DESC",
            ],
        )?,
    );
    show(
        "BEGIN; SELECT 1/0; SELECT 1; ROLLBACK;",
        &psql(
            &tls,
            &[
                "-v",
                "VERBOSITY=terse",
                "-c",
                "BEGIN",
                "-c",
                "SELECT 1/0",
                "-c",
                "SELECT 1",
                "-c",
                "ROLLBACK",
            ],
        )?,
    );
    let copy = psql(
        &tls,
        &["-At", "-c", "COPY (SELECT * FROM orders) TO STDOUT"],
    )?;
    show(
        "COPY orders TO STDOUT | wc -l",
        &format!("{} rows", copy.lines().count()),
    );

    step("Cancel reaches the right backend through interceptor's own cancel keys");
    let child = Command::new(pg_bin("psql"))
        .args([
            "-X",
            "-v",
            "VERBOSITY=terse",
            "-d",
            &tls,
            "-c",
            "SELECT pg_sleep(30)",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(700));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )?;
    let out = child.wait_with_output()?;
    show(
        "SELECT pg_sleep(30)   # then ^C",
        &String::from_utf8_lossy(&out.stderr),
    );

    step("Bad input gets a precise error and never takes the daemon down");
    let (mut c, _) = RawClient::login(proxy.port, "agent", "app")?;
    c.send(&frame(b'Q', b"SELECT 1"))?; // no NUL terminator
    let msgs = c.read_to_end()?;
    if let Some((code, msg)) = first_error(&msgs) {
        show(
            "Query message without its NUL terminator",
            &format!("ERROR {code}: {msg}"),
        );
    }
    show(
        "connect to a database the target does not allow",
        &psql(&proxy.conninfo("postgres", "disable"), &["-c", "select 1"])?,
    );
    show(
        "and the next client is served normally",
        &psql(&tls, &["-At", "-c", "SELECT 'still serving'"])?,
    );

    step("What interceptor logged");
    for line in proxy
        .log()
        .lines()
        .filter(|l| l.contains("session"))
        .take(12)
    {
        println!("  {line}");
    }

    if keep {
        step("Running until Ctrl-C");
        println!("Try: psql \"{tls}\"");
        let mut signals = nix::sys::signal::SigSet::empty();
        signals.add(nix::sys::signal::Signal::SIGINT);
        signals.thread_block()?;
        signals.wait()?;
    }
    println!(
        "\nDone. Everything ran under {}, and is removed now.",
        pg.path().display()
    );
    Ok(())
}
