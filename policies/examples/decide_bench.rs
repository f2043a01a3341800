//! Decision cost, for `cargo xtask bench policy` (run in release): an
//! agent's statement mix decided from the analysis cache (hits), and
//! 200-byte SELECTs never seen before (misses). Prints one JSON object.

use std::hint::black_box;
use std::time::{Duration, Instant};

use policies::{Analyzer, Check, Policy, Principal, SessionPolicy};

/// What an agent sends: reads with joins and CTEs, transaction control,
/// settings, the audit insert the reference policy allows, and catalog
/// lookups drivers make.
const MIX: &[&str] = &[
    "SELECT id, name, email FROM customers WHERE plan = 'enterprise' ORDER BY id LIMIT 50",
    "SELECT c.name, sum(o.amount) FROM customers c JOIN orders o ON o.customer_id = c.id GROUP BY c.name ORDER BY 2 DESC",
    "WITH recent AS (SELECT * FROM orders WHERE placed_at > now() - interval '7 days') SELECT count(*) FROM recent",
    "BEGIN",
    "SELECT count(*) FROM orders WHERE amount > 100",
    "COMMIT",
    "SET statement_timeout = '5s'",
    "SHOW server_version",
    "INSERT INTO audit_log (actor, action) VALUES ('agent', 'looked at orders')",
    "SELECT t.typname, t.oid FROM pg_catalog.pg_type t WHERE t.typname = 'numeric'",
    "EXPLAIN SELECT * FROM orders WHERE customer_id = 3",
    "SELECT id FROM customers WHERE id IN (SELECT customer_id FROM orders WHERE amount > 500)",
];

fn pct(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)].as_nanos() as f64
}

fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let policy = Policy::load(&root.join("examples/agent.toml")).expect("reference policy");
    let subject = policy.subject(&Principal::default(), "main", "app");
    let mut session = SessionPolicy::new(subject);
    let analyzer = Analyzer::new(10_000);
    let mut decide = |sql: &str| {
        let allowed = matches!(
            session.check(&policy, &analyzer.analyze(sql)),
            Check::Allowed(_)
        );
        black_box(allowed)
    };
    for sql in MIX {
        assert!(decide(sql), "the mix is allowed: {sql}");
    }

    // Hits: the mix over and over, as a driver repeats its statements.
    let n_hit = 400_000;
    let mut hits = Vec::with_capacity(n_hit);
    let start = Instant::now();
    for i in 0..n_hit {
        let t = Instant::now();
        decide(MIX[i % MIX.len()]);
        hits.push(t.elapsed());
    }
    let hit_total = start.elapsed();

    // Misses: 200-byte SELECTs, each text new (a different literal).
    let n_miss = 20_000;
    let texts: Vec<String> = (0..n_miss)
        .map(|i| {
            let mut s = format!(
                "SELECT o.id, o.amount, o.placed_at, c.name, c.plan FROM orders o JOIN customers c ON c.id = o.customer_id WHERE o.amount > {i} AND c.plan IN ('team', 'enterprise') ORDER BY o.placed_at DESC LIMIT 20"
            );
            s.truncate(200);
            while s.len() < 200 {
                s.push(' ');
            }
            s
        })
        .collect();
    let mut misses = Vec::with_capacity(n_miss);
    let start = Instant::now();
    for sql in &texts {
        let t = Instant::now();
        decide(sql);
        misses.push(t.elapsed());
    }
    let miss_total = start.elapsed();
    hits.sort_unstable();
    misses.sort_unstable();
    let report = serde_json::json!({
        "hit_mean_ns": hit_total.as_nanos() as f64 / n_hit as f64,
        "hit_p50_ns": pct(&hits, 0.50),
        "hit_p99_ns": pct(&hits, 0.99),
        "hit_decisions_per_s": n_hit as f64 / hit_total.as_secs_f64(),
        "miss_mean_ns": miss_total.as_nanos() as f64 / n_miss as f64,
        "miss_p50_ns": pct(&misses, 0.50),
        "miss_p99_ns": pct(&misses, 0.99),
        "miss_decisions_per_s": n_miss as f64 / miss_total.as_secs_f64(),
        "miss_sql_bytes": texts[0].len(),
    });
    println!("{report}");
}
