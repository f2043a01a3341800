//! `cargo xtask bench audit`: the audit path's speed. Spool appends per
//! second and rows per second shipped into a real ClickHouse 18.16 (a
//! release build of interceptor-user/examples/audit_bench.rs), and
//! pgbench -S through interceptor with audit off, on (spool only) and on
//! with shipping to ClickHouse, interleaved in one run, with direct
//! PostgreSQL for scale.
//!
//! Prints a table and writes target/bench/audit.json.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use interceptor_tests::clickhouse::ClickHouse;
use interceptor_tests::pg::PgCluster;
use interceptor_tests::proxy::{Proxy, ProxyOptions};
use interceptor_tests::{run_ok, workspace_root};
use serde_json::json;

use crate::bench::{RunResult, pgbench, pgbench_init, run_lengths, target, write_report};

pub fn run() -> Result<()> {
    let ch = ClickHouse::start()?;
    eprintln!("bench: spool appends and shipping (release build of examples/audit_bench.rs)");
    let out = run_ok(crate::cargo().args([
        "run",
        "--quiet",
        "--release",
        "-p",
        "interceptor-user",
        "--example",
        "audit_bench",
        "--",
        "--rows",
        "1000000",
        "--clickhouse",
        &ch.url(),
    ]))?;
    let micro: serde_json::Value =
        serde_json::from_str(out.trim()).context("audit_bench output")?;
    let f = |k: &str| micro[k].as_f64().unwrap_or(f64::NAN);

    let (seconds, rounds) = run_lengths(3);
    let pg = PgCluster::start()?;
    pgbench_init(&pg, 10)?;
    let start = |audit: &str| {
        Proxy::start(
            &pg,
            ProxyOptions {
                client_tls: false,
                sections: vec![audit.to_owned()],
                ..Default::default()
            },
        )
    };
    let off = start("[audit]\nenabled = false\n")?;
    let spool = start("[audit]\n")?;
    // Shipping as configured by default (every second), not the tests'
    // 200 ms.
    let shipped = start(&format!(
        "[audit]\n\n{}",
        ch.config_section("audit_pgbench")
            .replace("flush_interval = \"200ms\"", "flush_interval = \"1s\"")
    ))?;
    let routes = [
        ("direct", pg.port, None),
        ("audit off", off.port, Some(&off)),
        ("spool only", spool.port, Some(&spool)),
        ("clickhouse", shipped.port, Some(&shipped)),
    ];
    let logdir = workspace_root().join("target/bench/pgbench-logs");
    let mut results: BTreeMap<(&str, u32, &str), Vec<RunResult>> = BTreeMap::new();
    let mut cpu_per_txn: BTreeMap<(&str, u32, &str), Vec<f64>> = BTreeMap::new();
    let mut transactions = 0.0;
    for round in 0..rounds {
        for mode in ["simple", "prepared"] {
            for clients in [1u32, 10] {
                for (name, port, proxy) in routes {
                    eprintln!("bench: round {} {mode} c={clients} {name}", round + 1);
                    let cpu = proxy.map(|p| p.cpu_time());
                    let r = pgbench(port, mode, clients, seconds, &logdir)?;
                    if name == "clickhouse" {
                        transactions += r.tps * f64::from(seconds);
                    }
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
    // Everything pgbench ran through the shipping proxy reached ClickHouse.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let in_clickhouse = ch.count("SELECT count() FROM audit_pgbench.statements")?;
    let best = |k: (&str, u32, &str)| {
        results[&k]
            .iter()
            .cloned()
            .max_by(|a, b| a.tps.total_cmp(&b.tps))
            .unwrap_or_default()
    };
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };

    println!(
        "\naudit path (release build, 1M statement rows of {:.0} bytes):",
        f("spool_bytes_per_row")
    );
    println!(
        "  spool appends:      {:>12.0} rows/s  ({:.0} MB/s)",
        f("spool_appends_per_s"),
        f("spool_mb_per_s")
    );
    println!(
        "  through the queue:  {:>12.0} rows/s  (one producer task -> writer thread -> spool)",
        f("queued_appends_per_s")
    );
    println!(
        "  into ClickHouse:    {:>12.0} rows/s  (shipper CPU {:.2} s per 1M rows; {} rows landed)",
        f("clickhouse_rows_per_s"),
        f("shipper_cpu_s_per_million"),
        f("clickhouse_rows")
    );
    println!(
        "\n{:<9} {:>3} {:<11} {:>10} {:>8} {:>8} {:>10} {:>15}",
        "mode", "c", "path", "tps", "p50 ms", "p99 ms", "on / off", "proxy cpu µs/tx"
    );
    let mut rows = Vec::new();
    let mut min_ratio = f64::MAX;
    let mut min_spool = f64::MAX;
    for mode in ["simple", "prepared"] {
        for clients in [1u32, 10] {
            let off_tps = best((mode, clients, "audit off")).tps;
            for (name, _, _) in routes {
                let r = best((mode, clients, name));
                let ratio = r.tps / off_tps;
                match name {
                    "clickhouse" => min_ratio = min_ratio.min(ratio),
                    "spool only" => min_spool = min_spool.min(ratio),
                    _ => {}
                }
                let cpu = cpu_per_txn
                    .get(&(mode, clients, name))
                    .map_or(f64::NAN, |v| median(v));
                println!(
                    "{:<9} {:>3} {:<11} {:>10.0} {:>8.3} {:>8.3} {:>9.3}x {:>15.2}",
                    mode, clients, name, r.tps, r.p50_ms, r.p99_ms, ratio, cpu
                );
                let every: Vec<f64> = results[&(mode, clients, name)]
                    .iter()
                    .map(|r| r.tps)
                    .collect();
                rows.push(
                    json!({"mode": mode, "clients": clients, "path": name, "tps": r.tps,
                    "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "ratio_to_audit_off": ratio,
                    "tps_each_round": every, "proxy_cpu_us_per_txn_median": cpu}),
                );
            }
        }
    }
    println!(
        "\npgbench through the shipping proxy: about {transactions:.0} statements; {in_clickhouse} rows in ClickHouse"
    );
    let ch_rate = f("clickhouse_rows_per_s");
    let spool_rate = f("spool_appends_per_s");
    let targets = vec![
        target(
            "rows/s into ClickHouse",
            ch_rate,
            ">= 200000",
            ch_rate >= 200_000.0,
        ),
        target(
            "spool appends/s",
            spool_rate,
            ">= 1000000",
            spool_rate >= 1_000_000.0,
        ),
        target(
            "min pgbench -S tps, audit spooled / off",
            min_spool,
            ">= 0.95",
            min_spool >= 0.95,
        ),
        target(
            "min pgbench -S tps, audit to local ClickHouse / off",
            min_ratio,
            ">= 0.95",
            min_ratio >= 0.95,
        ),
    ];
    let report = json!({
        "figures": {"audit_path": micro, "seconds_per_run": seconds, "rounds": rounds,
            "pgbench": rows, "pgbench_rows_in_clickhouse": in_clickhouse},
        "targets": targets,
    });
    write_report("audit", &report)
}
