//! `cargo xtask bench policy`: what a statement decision costs (cache hits
//! and misses, mean and p99, measured in a release build of the policies
//! crate), and pgbench -S through interceptor with the reference policy on
//! vs off, interleaved in one run, with direct PostgreSQL for scale.
//!
//! "policy on" is the reference policy's groups, limits and statement
//! rules: what this bench's target is about. "policy + masks" adds its
//! masking rules as well (every row scanned by eight detectors), reported
//! for scale; `cargo xtask bench masking` holds masking's own targets.
//!
//! Prints a table and writes target/bench/policy.json.

use anyhow::{Context, Result};
use interceptor_tests::pg::PgCluster;
use interceptor_tests::proxy::{Proxy, ProxyOptions};
use interceptor_tests::{run_ok, workspace_root};
use serde_json::json;

use crate::bench::{OnOff, pgbench_init, run_lengths, target, write_report};

pub fn run() -> Result<()> {
    eprintln!("bench: decision cost (release build of policies/examples/decide_bench.rs)");
    let out = run_ok(crate::cargo().args([
        "run",
        "--quiet",
        "--release",
        "-p",
        "policies",
        "--example",
        "decide_bench",
    ]))?;
    let micro: serde_json::Value =
        serde_json::from_str(out.trim()).context("decide_bench output")?;
    let f = |k: &str| micro[k].as_f64().unwrap_or(f64::NAN);

    let (seconds, rounds) = run_lengths(9, 3);
    let pg = PgCluster::start()?;
    pgbench_init(&pg, 10)?;
    let policy = workspace_root().join("policies/examples/agent.toml");
    let text = std::fs::read_to_string(&policy)?;
    let rules_only = tempfile::NamedTempFile::new()?;
    let cut = text
        .find("\n[[mask]]")
        .context("agent.toml has masking rules")?;
    std::fs::write(rules_only.path(), &text[..cut])?;
    let start = |policy: Option<std::path::PathBuf>| {
        Proxy::start(
            &pg,
            ProxyOptions {
                client_tls: false,
                policy,
                ..Default::default()
            },
        )
    };
    let off = start(None)?;
    let on = start(Some(rules_only.path().to_owned()))?;
    let masked = start(Some(policy))?;
    let routes = [
        ("direct", pg.port, None),
        ("policy off", off.port, Some(&off)),
        ("policy on", on.port, Some(&on)),
        ("policy + masks", masked.port, Some(&masked)),
    ];
    let runs = OnOff::run(&routes, rounds, seconds)?;

    println!("\ndecisions (reference policy, one core):");
    println!(
        "  cache hit:  mean {:>8.0} ns  p50 {:>8.0} ns  p99 {:>8.0} ns  {:>12.0} decisions/s",
        f("hit_mean_ns"),
        f("hit_p50_ns"),
        f("hit_p99_ns"),
        f("hit_decisions_per_s")
    );
    println!(
        "  cache miss: mean {:>8.0} ns  p50 {:>8.0} ns  p99 {:>8.0} ns  {:>12.0} decisions/s  ({} -byte SELECT)",
        f("miss_mean_ns"),
        f("miss_p50_ns"),
        f("miss_p99_ns"),
        f("miss_decisions_per_s"),
        f("miss_sql_bytes")
    );
    println!(
        "  shape hit:  mean {:>8.0} ns  p50 {:>8.0} ns  p99 {:>8.0} ns  {:>12.0} decisions/s  (new text, known shape)",
        f("shape_hit_mean_ns"),
        f("shape_hit_p50_ns"),
        f("shape_hit_p99_ns"),
        f("shape_hit_decisions_per_s"),
    );
    let (rows, min_ratio) = runs.table("policy off");
    let min_masked = min_ratio.get("policy + masks").copied().unwrap_or(f64::NAN);
    let min_ratio = min_ratio.get("policy on").copied().unwrap_or(f64::NAN);
    println!("\npolicy + masks / policy off, smallest of the four cases: {min_masked:.3}");
    let hit_us = f("hit_mean_ns") / 1000.0;
    let miss_us = f("miss_mean_ns") / 1000.0;
    let targets = vec![
        target("cache-hit decision, mean µs", hit_us, "<= 2", hit_us <= 2.0),
        target(
            "cache-miss decision (200-byte SELECT), mean µs",
            miss_us,
            "<= 30",
            miss_us <= 30.0,
        ),
        target(
            "min pgbench -S tps, policy on / off",
            min_ratio,
            ">= 0.97",
            min_ratio >= 0.97,
        ),
    ];
    let report = json!({
        "figures": {"decisions": micro, "seconds_per_run": seconds, "rounds": rounds, "pgbench": rows,
            "min_ratio_policy_and_masks_to_off": min_masked},
        "targets": targets,
    });
    write_report("policy", &report)
}
