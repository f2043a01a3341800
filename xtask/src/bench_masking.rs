//! `cargo xtask bench masking`: what masking costs.
//!
//! - Per core, with criterion (`interceptor-user/benches/masking.rs`): MB/s
//!   of DataRows through column rules, of DataRows with nothing to mask,
//!   and of text through the reference policy's content detectors.
//! - End to end: a 1M-row SELECT (`SELECT * FROM people`, 5 columns, ~80 MB
//!   of rows) with pgbench, direct, through interceptor with no masks, and
//!   through interceptor masking two columns by rule and scanning the rest
//!   with detectors; interleaved round by round.
//!
//! Prints a table and writes target/bench/masking.json.

use anyhow::{Context, Result};
use interceptor_tests::pg::{ADMIN_USER, PgCluster};
use interceptor_tests::proxy::Proxy;
use interceptor_tests::{run_ok, workspace_root};
use serde_json::json;

use crate::bench::{median, pgbench_on, run_lengths, target, write_report};

/// Bytes per second, in MB/s, of one criterion benchmark.
fn criterion_mb_per_s(id: &str) -> Result<f64> {
    let dir = workspace_root()
        .join("target/criterion/masking")
        .join(id)
        .join("new");
    let read = |f: &str| -> Result<serde_json::Value> {
        let p = dir.join(f);
        let text = std::fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))?;
        Ok(serde_json::from_str(&text)?)
    };
    let ns = read("estimates.json")?["mean"]["point_estimate"]
        .as_f64()
        .context("criterion mean")?;
    let bytes = read("benchmark.json")?["throughput"]["Bytes"]
        .as_f64()
        .context("criterion throughput")?;
    Ok(bytes / ns * 1e3)
}

const OFF: &str = "version = 1\n[[rule]]\nid = \"all\"\ndecision = \"allow\"\n";

const MASKS: &str = "
[[mask]]
id = \"columns\"
columns = [\"people.email\", \"people.card\"]

[[mask]]
id = \"detected\"
detectors = [\"card\", \"ssn\", \"email\", \"iban\", \"aws-key-id\", \"jwt\", \"pem-private-key\", \"api-key\"]
";

pub fn run() -> Result<()> {
    eprintln!("bench: masking per core (criterion, interceptor-user/benches/masking.rs)");
    run_ok(crate::cargo().args([
        "bench",
        "-p",
        "interceptor-user",
        "--bench",
        "masking",
        "--",
        "--warm-up-time",
        "1",
        "--measurement-time",
        "4",
    ]))?;
    let column_rules = criterion_mb_per_s("column_rules")?;
    let passthrough = criterion_mb_per_s("passthrough")?;
    let detectors = criterion_mb_per_s("detectors")?;

    let (_, rounds) = run_lengths(3, 5);
    let pg = PgCluster::start()?;
    pg.psql_admin(
        "postgres",
        &format!("CREATE DATABASE bench OWNER {ADMIN_USER}"),
    )?;
    pg.psql_admin(
        "bench",
        "CREATE TABLE people AS SELECT g AS id, 'Customer ' || g AS name, \
         'customer' || g || '@example.com' AS email, \
         '4111 1111 1111 ' || lpad((g % 10000)::text, 4, '0') AS card, \
         'a note about customer ' || g AS notes FROM generate_series(1, 1000000) g",
    )?;
    pg.psql_admin("bench", "VACUUM ANALYZE people")?;
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("select.sql");
    std::fs::write(&script, "SELECT * FROM people;\n")?;
    let start = |policy: &str| Proxy::with_policy(&pg, policy);
    let off = start(OFF)?;
    let on = start(&format!("{OFF}{MASKS}"))?;
    let routes = [
        ("direct", pg.port, None),
        ("no masks", off.port, Some(&off)),
        ("masked", on.port, Some(&on)),
    ];
    let mut seconds: Vec<(&str, Vec<f64>)> = routes.iter().map(|r| (r.0, Vec::new())).collect();
    let mut cpu: Vec<(&str, Vec<f64>)> = routes.iter().map(|r| (r.0, Vec::new())).collect();
    const SELECTS: u32 = 3;
    for round in 0..rounds {
        for (i, (name, port, proxy)) in routes.iter().enumerate() {
            let cpu_before = proxy.map(|p| p.cpu_time());
            let started = std::time::Instant::now();
            let script = script.to_string_lossy();
            let transactions = format!("-t{SELECTS}");
            run_ok(&mut pgbench_on(
                *port,
                &["-n", "-c1", "-f", &script, &transactions],
            ))?;
            let per_select = started.elapsed().as_secs_f64() / f64::from(SELECTS);
            seconds[i].1.push(per_select);
            if let (Some(p), Some(before)) = (proxy, cpu_before) {
                cpu[i]
                    .1
                    .push((p.cpu_time() - before).as_secs_f64() / f64::from(SELECTS));
            }
            eprintln!(
                "  round {}: {name:<9} {per_select:.3} s per 1M-row SELECT",
                round + 1
            );
        }
    }
    let secs = |name: &str| median(&seconds.iter().find(|s| s.0 == name).expect("route").1);
    let cpus = |name: &str| median(&cpu.iter().find(|s| s.0 == name).expect("route").1);
    let ratio = secs("no masks") / secs("masked");
    let vs_direct = secs("direct") / secs("masked");

    println!("\nmasking per core (criterion, release):");
    println!("  column rules:   {column_rules:>8.0} MB/s  (DataRows, 2 of 7 columns masked)");
    println!("  passthrough:    {passthrough:>8.0} MB/s  (DataRows, nothing masked)");
    println!(
        "  detectors:      {detectors:>8.0} MB/s  (reference policy's 8 detectors over log text)"
    );
    println!("\n1M-row SELECT * FROM people (median of {rounds} rounds, {SELECTS} SELECTs each):");
    println!(
        "  {:<10} {:>10} {:>16}",
        "route", "s/SELECT", "proxy CPU s/SELECT"
    );
    for (name, _, _) in &routes {
        println!("  {name:<10} {:>10.3} {:>16.3}", secs(name), cpus(name));
    }
    println!("  masked vs no masks: {ratio:.2}x throughput; masked vs direct: {vs_direct:.2}x");

    let report = json!({
        "figures": {
            "column_rules_mb_per_s": column_rules,
            "passthrough_mb_per_s": passthrough,
            "detectors_mb_per_s": detectors,
            "select_1m_seconds": {
                "direct": secs("direct"),
                "no_masks": secs("no masks"),
                "masked": secs("masked"),
            },
            "proxy_cpu_seconds_per_select": {
                "no_masks": cpus("no masks"),
                "masked": cpus("masked"),
            },
            "masked_vs_unmasked": ratio,
            "masked_vs_direct": vs_direct,
        },
        "targets": [
            target("column rules MB/s per core", column_rules, ">= 1000", column_rules >= 1000.0),
            target("detector scanning MB/s per core", detectors, ">= 200", detectors >= 200.0),
            target("1M-row SELECT masked/unmasked", ratio, ">= 0.8", ratio >= 0.8),
        ],
    });
    write_report("masking", &report)
}
