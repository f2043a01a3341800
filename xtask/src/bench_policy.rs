//! `cargo xtask bench policy`: what a statement decision costs (cache hits
//! and misses, mean and p99, measured in a release build of the policies
//! crate), and pgbench -S through interceptor with the reference policy on
//! vs off, interleaved in one run, with direct PostgreSQL for scale.
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

    let (seconds, rounds) = run_lengths(3);
    let pg = PgCluster::start()?;
    pgbench_init(&pg, 10)?;
    let policy = workspace_root().join("policies/examples/agent.toml");
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
    let on = start(Some(policy))?;
    let routes = [
        ("direct", pg.port, None),
        ("policy off", off.port, Some(&off)),
        ("policy on", on.port, Some(&on)),
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
    let min_ratio = min_ratio.get("policy on").copied().unwrap_or(f64::NAN);
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
        "figures": {"decisions": micro, "seconds_per_run": seconds, "rounds": rounds, "pgbench": rows},
        "targets": targets,
    });
    write_report("policy", &report)
}
