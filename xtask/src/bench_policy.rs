//! `cargo xtask bench policy`: what a statement decision costs (cache hits
//! and misses, mean and p99, measured in a release build of the policies
//! crate), and pgbench -S through interceptor with the reference policy on
//! vs off, interleaved in one run, with direct PostgreSQL for scale.
//!
//! Prints a table and writes target/bench/policy.json.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use interceptor_tests::pg::PgCluster;
use interceptor_tests::proxy::{Proxy, ProxyOptions};
use interceptor_tests::{run_ok, workspace_root};
use serde_json::json;

use crate::bench::{RunResult, pgbench, pgbench_init, run_lengths, target, write_report};

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
    let logdir = workspace_root().join("target/bench/pgbench-logs");
    let mut results: BTreeMap<(&str, u32, &str), Vec<RunResult>> = BTreeMap::new();
    // The proxy's own CPU per transaction: what policy costs, free of the
    // scheduling noise that 10 clients on 2 shared cores put into tps.
    let mut cpu_per_txn: BTreeMap<(&str, u32, &str), Vec<f64>> = BTreeMap::new();
    for round in 0..rounds {
        for mode in ["simple", "prepared"] {
            for clients in [1u32, 10] {
                for (name, port, proxy) in routes {
                    eprintln!("bench: round {} {mode} c={clients} {name}", round + 1);
                    let cpu = proxy.map(|p| p.cpu_time());
                    let r = pgbench(port, mode, clients, seconds, &logdir)?;
                    if let (Some(p), Some(before)) = (proxy, cpu) {
                        let used = p.cpu_time().saturating_sub(before).as_secs_f64();
                        cpu_per_txn
                            .entry((mode, clients, name))
                            .or_default()
                            .push(used * 1e6 / (r.tps * f64::from(seconds)));
                    }
                    results.entry((mode, clients, name)).or_default().push(r);
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&logdir);
    let best = |k: (&str, u32, &str)| {
        results[&k]
            .iter()
            .cloned()
            .max_by(|a, b| a.tps.total_cmp(&b.tps))
            .unwrap_or_default()
    };

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
    println!(
        "\n{:<9} {:>3} {:<11} {:>10} {:>8} {:>8} {:>10} {:>14}",
        "mode", "c", "path", "tps", "p50 ms", "p99 ms", "on / off", "proxy cpu µs/tx"
    );
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let mut rows = Vec::new();
    let mut min_ratio = f64::MAX;
    for mode in ["simple", "prepared"] {
        for clients in [1u32, 10] {
            let off_tps = best((mode, clients, "policy off")).tps;
            for (name, _, _) in routes {
                let r = best((mode, clients, name));
                let ratio = r.tps / off_tps;
                if name == "policy on" {
                    min_ratio = min_ratio.min(ratio);
                }
                let cpu = cpu_per_txn
                    .get(&(mode, clients, name))
                    .map_or(f64::NAN, |v| median(v));
                println!(
                    "{:<9} {:>3} {:<11} {:>10.0} {:>8.3} {:>8.3} {:>9.3}x {:>14.2}",
                    mode, clients, name, r.tps, r.p50_ms, r.p99_ms, ratio, cpu
                );
                let every: Vec<f64> = results[&(mode, clients, name)]
                    .iter()
                    .map(|r| r.tps)
                    .collect();
                rows.push(
                    json!({"mode": mode, "clients": clients, "path": name, "tps": r.tps,
                    "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "ratio_to_policy_off": ratio,
                    "tps_each_round": every, "proxy_cpu_us_per_txn_median": cpu}),
                );
            }
        }
    }
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
