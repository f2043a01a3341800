//! Decision cost, for `cargo xtask bench policy` (run in release): an
//! agent's statement mix decided from the analysis cache (hits), 200-byte
//! SELECTs that differ only in literals (hits by token shape), and 200-byte
//! SELECTs of a shape never seen (misses). Prints one JSON object.

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
    let hits: Vec<&str> = (0..400_000).map(|i| MIX[i % MIX.len()]).collect();
    let hit = measure(&mut decide, &hits);

    // Shape hits: 200-byte SELECTs, each text new but only in its literals,
    // as clients that inline values send them (pgbench -S in simple mode).
    let literal_only = |i: usize| {
        padded(format!(
            "SELECT o.id, o.amount, o.placed_at, c.name, c.plan FROM orders o JOIN customers c ON c.id = o.customer_id WHERE o.amount > {i} AND c.plan IN ('team', 'enterprise') ORDER BY o.placed_at DESC LIMIT 20"
        ))
    };
    let texts: Vec<String> = (0..100_000).map(literal_only).collect();
    let shape_hit = measure(
        &mut decide,
        &texts.iter().map(String::as_str).collect::<Vec<_>>(),
    );

    // Misses: 200-byte SELECTs never seen in any shape (a new alias each).
    let texts: Vec<String> = (0..20_000)
        .map(|i| {
            padded(format!(
                "SELECT o.id AS r{i}, o.amount, o.placed_at, c.name, c.plan FROM orders o JOIN customers c ON c.id = o.customer_id WHERE o.amount > 10 AND c.plan IN ('team', 'enterprise') ORDER BY o.placed_at DESC"
            ))
        })
        .collect();
    let miss = measure(
        &mut decide,
        &texts.iter().map(String::as_str).collect::<Vec<_>>(),
    );

    let mut report = serde_json::Map::new();
    for (name, m) in [("hit", hit), ("shape_hit", shape_hit), ("miss", miss)] {
        report.insert(format!("{name}_mean_ns"), m.mean_ns.into());
        report.insert(format!("{name}_p50_ns"), m.p50_ns.into());
        report.insert(format!("{name}_p99_ns"), m.p99_ns.into());
        report.insert(format!("{name}_decisions_per_s"), m.per_s.into());
    }
    report.insert("miss_sql_bytes".into(), texts[0].len().into());
    println!("{}", serde_json::Value::Object(report));
}

struct Measured {
    mean_ns: f64,
    p50_ns: f64,
    p99_ns: f64,
    per_s: f64,
}

fn measure(decide: &mut impl FnMut(&str) -> bool, texts: &[&str]) -> Measured {
    let mut each = Vec::with_capacity(texts.len());
    let start = Instant::now();
    for sql in texts {
        let t = Instant::now();
        decide(sql);
        each.push(t.elapsed());
    }
    let total = start.elapsed();
    each.sort_unstable();
    Measured {
        mean_ns: total.as_nanos() as f64 / texts.len() as f64,
        p50_ns: pct(&each, 0.50),
        p99_ns: pct(&each, 0.99),
        per_s: texts.len() as f64 / total.as_secs_f64(),
    }
}

/// Exactly 200 bytes.
fn padded(mut s: String) -> String {
    s.truncate(200);
    while s.len() < 200 {
        s.push(' ');
    }
    s
}
