//! `cargo xtask bench approvals`: what approvals cost.
//!
//! - pgbench -S through interceptor with the same policy, without and with
//!   `[approvals]` (so allowed statements pay for hold support only),
//!   interleaved, with direct PostgreSQL for scale;
//! - how long a held statement takes to finish once the console's Approve
//!   is pressed;
//! - the daemon's memory per parked session.
//!
//! Prints a table and writes target/bench/approvals.json.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use interceptor_tests::approvals::{Console, new_token};
use interceptor_tests::free_port;
use interceptor_tests::pg::PgCluster;
use interceptor_tests::proxy::{Proxy, ProxyOptions, status_field};
use interceptor_tests::wire::{RawClient, frame};
use serde_json::json;

use crate::bench::{OnOff, pgbench_init, run_lengths, target, write_report};

/// Reads are allowed; writes to `held_t` are held.
const POLICY: &str = r#"
version = 1

[[group]]
name = "everyone"

[[rule]]
id = "hold-held-t"
groups = ["everyone"]
kinds = ["write"]
writes = ["held_t"]
decision = "hold"
reason = "bench"

[[rule]]
id = "rest"
groups = ["everyone"]
decision = "allow"
"#;

const PARKED: usize = 100;
const DECISIONS: usize = 20;

pub fn run() -> Result<()> {
    let (seconds, rounds) = run_lengths(9, 3);
    let pg = PgCluster::start_with(PARKED as u32 + 100)?;
    pgbench_init(&pg, 10)?;
    pg.psql_admin(
        "bench",
        "CREATE TABLE held_t (id int PRIMARY KEY, v int); \
         INSERT INTO held_t SELECT g, 0 FROM generate_series(1, 1000) g; \
         GRANT ALL ON held_t TO PUBLIC",
    )?;
    let dir = tempfile::tempdir()?;
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, POLICY)?;
    let (token, entry) = new_token("bench", &[], &[])?;
    let api = free_port();
    let start = |approvals: bool| {
        Proxy::start(
            &pg,
            ProxyOptions {
                client_tls: false,
                policy: Some(policy.clone()),
                limits: vec![format!("max_connections = {}", PARKED + 50)],
                sections: if approvals {
                    vec![format!(
                        "[approvals]\nlisten = \"127.0.0.1:{api}\"\ntimeout = \"10m\"\n\n{entry}"
                    )]
                } else {
                    vec![]
                },
                ..Default::default()
            },
        )
    };
    let off = start(false)?;
    let on = start(true)?;
    let routes = [
        ("direct", pg.port, None),
        ("approvals off", off.port, Some(&off)),
        ("approvals on", on.port, Some(&on)),
    ];
    let runs = OnOff::run(&routes, rounds, seconds)?;
    let (rows, min_ratio) = runs.table("approvals off");

    let console = Console::login(&format!("https://127.0.0.1:{api}"), &on.ca_file(), &token)?;
    let wait_pending = |n: usize| -> Result<Vec<String>> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ids = console.pending()?;
            if ids.len() >= n {
                return Ok(ids);
            }
            if Instant::now() > deadline {
                bail!("{} of {n} requests pending after 60 s", ids.len());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    };

    // From pressing Approve to the client holding its result.
    let mut latencies = Vec::new();
    for i in 0..DECISIONS {
        let (mut c, _) = RawClient::login(on.port, "agent", "bench")?;
        let sql = format!("UPDATE held_t SET v = v + 1 WHERE id = {}", i + 1);
        let mut q = sql.into_bytes();
        q.push(0);
        c.send(&frame(b'Q', &q))?;
        let id = wait_pending(1)?.remove(0);
        let t = Instant::now();
        console.decide(&id, "approve", "bench")?;
        let msgs = c.read_until_ready()?;
        latencies.push(t.elapsed().as_secs_f64() * 1e3);
        if !msgs.iter().any(|m| m.0 == b'C') {
            bail!("approved UPDATE did not complete");
        }
    }
    latencies.sort_by(f64::total_cmp);
    let p50 = latencies[latencies.len() / 2];
    let max = latencies[latencies.len() - 1];

    // Memory per parked session: the daemon's RSS with PARKED held
    // statements waiting, against the same sessions idle.
    let mut clients = Vec::new();
    for _ in 0..PARKED {
        clients.push(RawClient::login(on.port, "agent", "bench")?.0);
    }
    std::thread::sleep(Duration::from_millis(300));
    let idle = status_field(on.pid(), "VmRSS:");
    for (i, c) in clients.iter_mut().enumerate() {
        let mut q = format!("UPDATE held_t SET v = 1 WHERE id = {}", i + 1).into_bytes();
        q.push(0);
        c.send(&frame(b'Q', &q))?;
    }
    wait_pending(PARKED).context("parking")?;
    std::thread::sleep(Duration::from_millis(300));
    let parked = status_field(on.pid(), "VmRSS:");
    let per_parked_kib = parked.saturating_sub(idle) as f64 / PARKED as f64;

    let ratio = min_ratio.get("approvals on").copied().unwrap_or(f64::NAN);
    println!("\nheld statements:");
    println!(
        "  Approve pressed -> result at the client: p50 {p50:.1} ms, max {max:.1} ms ({DECISIONS} decisions)"
    );
    println!(
        "  memory per parked statement: {per_parked_kib:.1} KiB ({PARKED} parked; idle sessions {idle} KiB RSS, parked {parked} KiB)"
    );
    let targets = vec![
        target(
            "min pgbench -S tps, approvals on / off",
            ratio,
            ">= 0.97",
            ratio >= 0.97,
        ),
        target("approve to result p50, ms", p50, "<= 50", p50 <= 50.0),
        target(
            "KiB per parked statement",
            per_parked_kib,
            "<= 64",
            per_parked_kib <= 64.0,
        ),
    ];
    write_report(
        "approvals",
        &json!({
            "figures": {
                "pgbench": rows,
                "approve_to_result_ms": {"p50": p50, "max": max, "decisions": DECISIONS},
                "parked": {"sessions": PARKED, "rss_idle_kib": idle, "rss_parked_kib": parked,
                           "kib_per_parked": per_parked_kib},
            },
            "targets": targets,
        }),
    )
}
