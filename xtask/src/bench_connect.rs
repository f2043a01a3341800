//! `cargo xtask bench connect`: what interception costs at connect time.
//!
//! - connect + first query (pgbench -C -S: every transaction is a new
//!   connection), tagged through the proxy vs direct, in the same run;
//! - a plain TCP connect+close to an unprotected port: without programs,
//!   untagged with programs attached, and tagged (the programs run and
//!   pass);
//! - the kernel's own ns per program run, from kernel.bpf_stats_enabled
//!   (switched on for the run and restored afterwards).

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use aya::programs::ProgramInfo;
use interceptor_tests::intercept::Interception;
use interceptor_tests::pg::{ADMIN_PASSWORD, ADMIN_USER, PgCluster};
use interceptor_tests::proxy::{Proxy, ProxyOptions};
use interceptor_tests::{pg_bin, run_ok};

use crate::bench::{target, write_report};
use serde_json::json;

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";
const PROGRAMS: [&str; 3] = [
    "intercept_connect4",
    "intercept_connect6",
    "intercept_sockops",
];

/// `cargo xtask probe-connect ADDR N`: N connect+close to ADDR, prints the
/// mean in ns. Run as a child so it can be put in a cgroup.
pub fn probe(addr: std::net::SocketAddr, n: u32) -> Result<()> {
    // The sink closes first, so TIME_WAIT lands on its side: thousands of
    // client-side TIME_WAIT sockets would slow each later run's source port
    // allocation and make the runs incomparable.
    let once = || -> Result<()> {
        let mut s = std::net::TcpStream::connect(addr)?;
        let _ = std::io::Read::read(&mut s, &mut [0u8; 1])?;
        Ok(())
    };
    // Warm the path (route cache, ephemeral port allocator).
    for _ in 0..100 {
        once()?;
    }
    let start = Instant::now();
    for _ in 0..n {
        once()?;
    }
    println!("{}", start.elapsed().as_nanos() / u128::from(n));
    Ok(())
}

fn probe_cmd(addr: &str, n: u32) -> Result<Command> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["probe-connect", addr, &n.to_string()]);
    Ok(cmd)
}

/// A listener the kernel completes handshakes for; a thread drains it.
fn sink(addr: &str) -> Result<String> {
    let l = TcpListener::bind(addr)?;
    let a = l.local_addr()?.to_string();
    std::thread::spawn(move || {
        for s in l.incoming() {
            drop(s);
        }
    });
    Ok(a)
}

fn mean_ns(cmd: &mut Command) -> Result<f64> {
    run_ok(cmd)?
        .trim()
        .parse()
        .context("probe output is not a number")
}

/// The best (lowest) of `rounds` runs: the least disturbed by the other core.
fn best_of(rounds: u32, mut f: impl FnMut() -> Result<f64>) -> Result<f64> {
    let mut best = f64::MAX;
    for _ in 0..rounds {
        best = best.min(f()?);
    }
    Ok(best)
}

struct ConnectQuery {
    /// Mean latency of connect + SELECT + disconnect, ms.
    latency_ms: f64,
    /// pgbench's "average connection time", ms.
    connect_ms: f64,
    tps: f64,
}

fn pgbench_connect(cmd: &mut Command, seconds: u32) -> Result<ConnectQuery> {
    let out = run_ok(
        cmd.args(["-n", "-S", "-C", "-c1", "-j1"])
            .arg(format!("-T{seconds}"))
            .env("PGSSLMODE", "disable"),
    )?;
    let value = |prefix: &str| -> Result<f64> {
        out.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no `{prefix}` in pgbench output:\n{out}"))
    };
    Ok(ConnectQuery {
        latency_ms: value("latency average = ")?,
        connect_ms: value("average connection time = ")?,
        tps: value("tps = ")?,
    })
}

fn program_stats(pin_dir: &Path) -> Result<Vec<(u64, u64)>> {
    PROGRAMS
        .iter()
        .map(|p| {
            let info = ProgramInfo::from_pin(pin_dir.join("progs").join(p))
                .with_context(|| format!("no pinned program {p}"))?;
            Ok((info.run_time().as_nanos() as u64, info.run_count()))
        })
        .collect()
}

pub fn run() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!("bench connect loads eBPF programs: run it as root");
    }
    let (seconds, rounds) = crate::bench::run_lengths(3, 5);
    let n = 5000;
    let pg = PgCluster::start()?;
    crate::bench::pgbench_init(&pg, 1)?;
    // Unprotected ports for plain connects.
    let sink4 = sink("127.0.0.1:0")?;
    let sink6 = sink("[::1]:0")?;

    println!("connect+close to an unprotected port, {n} per run, best of {rounds}:");
    let no_programs = best_of(rounds, || mean_ns(&mut probe_cmd(&sink4, n)?))?;
    println!("  no programs loaded        {no_programs:>8.0} ns");

    let ic = Interception::named("interceptor-bench");
    let proxy = Proxy::start(
        &pg,
        ProxyOptions {
            client_tls: false,
            intercept: Some(ic.config_section()),
            ..ProxyOptions::default()
        },
    )?;
    let old_stats = std::fs::read_to_string(STATS_SYSCTL)?;
    std::fs::write(STATS_SYSCTL, "1")?;
    let result = measure(
        &pg,
        &proxy,
        &ic,
        (&sink4, &sink6),
        n,
        seconds,
        rounds,
        no_programs,
    );
    // Restored whatever happened: stats cost every program on the host.
    std::fs::write(STATS_SYSCTL, old_stats.trim())?;
    result
}

#[allow(clippy::too_many_arguments)]
fn measure(
    pg: &PgCluster,
    proxy: &Proxy,
    ic: &Interception,
    (sink4, sink6): (&str, &str),
    n: u32,
    seconds: u32,
    rounds: u32,
    no_programs: f64,
) -> Result<()> {
    let untagged = best_of(rounds, || mean_ns(&mut probe_cmd(sink4, n)?))?;
    println!("  untagged, programs loaded {untagged:>8.0} ns");
    let before = program_stats(&ic.pin_dir)?;
    let exe = std::env::current_exe()?;
    let tagged_probe = |addr: &str| {
        best_of(rounds, || {
            mean_ns(ic.run("bench", &exe.to_string_lossy()).args([
                "probe-connect",
                addr,
                &n.to_string(),
            ]))
        })
    };
    let tagged = tagged_probe(sink4)?;
    println!("  tagged, not protected     {tagged:>8.0} ns");
    let tagged6 = tagged_probe(sink6)?;
    println!("  tagged, not protected, v6 {tagged6:>8.0} ns");

    println!("\nconnect + first query (pgbench -S -C, one client, {seconds} s, best of {rounds}):");
    let pgbench = pg_bin("pgbench").to_string_lossy().into_owned();
    let direct_args = |port: u16| {
        let mut c = Command::new(&pgbench);
        c.args(["-h", "127.0.0.1", "-U", ADMIN_USER, "-p"])
            .arg(port.to_string())
            .arg("bench")
            .env("PGPASSWORD", ADMIN_PASSWORD);
        c
    };
    let best = |make: &mut dyn FnMut() -> Command| -> Result<ConnectQuery> {
        let mut winner: Option<ConnectQuery> = None;
        for _ in 0..rounds {
            let r = pgbench_connect(&mut make(), seconds)?;
            if winner.as_ref().is_none_or(|w| r.latency_ms < w.latency_ms) {
                winner = Some(r);
            }
        }
        Ok(winner.expect("rounds > 0"))
    };
    let direct = best(&mut || direct_args(pg.port))?;
    let listener = best(&mut || direct_args(proxy.port))?;
    let pg_port = pg.port;
    let intercepted = best(&mut || {
        let mut c = ic.run("bench", &pgbench);
        // The agent's view: the database's own address, no password.
        c.args(["-h", "127.0.0.1", "-U", "agent", "-p"])
            .arg(pg_port.to_string())
            .arg("bench")
            .env_remove("PGPASSWORD");
        c
    })?;
    let after = program_stats(&ic.pin_dir)?;

    println!(
        "  {:<28} {:>10} {:>12} {:>8} {:>9}",
        "path", "latency ms", "connect ms", "tps", "vs direct"
    );
    for (name, r) in [
        ("direct", &direct),
        ("proxy listener (no eBPF)", &listener),
        ("tagged, intercepted", &intercepted),
    ] {
        println!(
            "  {:<28} {:>10.3} {:>12.3} {:>8.0} {:>8.2}x",
            name,
            r.latency_ms,
            r.connect_ms,
            r.tps,
            r.latency_ms / direct.latency_ms
        );
    }

    println!("\nin-kernel cost per program run (kernel.bpf_stats_enabled):");
    let mut per_run = serde_json::Map::new();
    for (i, name) in PROGRAMS.iter().enumerate() {
        let runs = after[i].1.saturating_sub(before[i].1);
        let ns = after[i].0.saturating_sub(before[i].0) as f64 / runs.max(1) as f64;
        println!("  {name:<20} {ns:>8.0} ns/run over {runs} runs");
        per_run.insert((*name).to_owned(), json!({"ns_per_run": ns, "runs": runs}));
    }
    let connect4_ns = per_run["intercept_connect4"]["ns_per_run"]
        .as_f64()
        .unwrap_or(0.0);

    let latency_ratio = intercepted.latency_ms / direct.latency_ms;
    let untagged_ratio = untagged / no_programs;
    let targets = vec![
        target(
            "intercepted/direct connect+first-query latency",
            latency_ratio,
            "<= 1.50",
            latency_ratio <= 1.5,
        ),
        target(
            "untagged connect with/without programs",
            untagged_ratio,
            "<= 1.05",
            untagged_ratio <= 1.05,
        ),
        target(
            "connect4 ns per run (redirect and pass mixed)",
            connect4_ns,
            "<= 1000",
            connect4_ns <= 1000.0,
        ),
    ];
    let cq = |r: &ConnectQuery| json!({"latency_ms": r.latency_ms, "connect_ms": r.connect_ms, "tps": r.tps});
    let report = json!({
        "figures": {
            "seconds_per_run": seconds, "rounds": rounds, "connects_per_probe": n,
            "plain_connect_ns": {"no_programs": no_programs, "untagged_programs_loaded": untagged, "tagged_unprotected": tagged, "tagged_unprotected_v6": tagged6},
            "connect_first_query": {"direct": cq(&direct), "proxy_listener": cq(&listener), "intercepted": cq(&intercepted), "ratio_intercepted_to_direct": latency_ratio},
            "kernel_ns_per_run": per_run,
        },
        "targets": targets,
    });
    write_report("connect", &report)
}
