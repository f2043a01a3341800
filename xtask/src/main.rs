//! Developer commands. `cargo xtask --help` lists them.

mod bench;
mod bench_approvals;
mod bench_audit;
mod bench_connect;
mod bench_masking;
mod bench_policy;
mod demo;
mod deps;
mod fuzz;
mod regress;

use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "interceptor's developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the tests and the demo need (apt packages, Python and
    /// Node drivers). Idempotent; run as root.
    Setup,
    /// Run every test: unit, integration (real PostgreSQL 15, psql, pgbench,
    /// pg_dump, drivers, malformed input) and PostgreSQL's regression suite
    /// through the proxy.
    Test {
        /// Skip the regression suite (about 3 minutes).
        #[arg(long)]
        no_regress: bool,
    },
    /// Start a local PostgreSQL with sample data and interceptor in front of
    /// it, and show clients working through the proxy.
    Demo {
        /// Keep everything running until Ctrl-C, for trying it by hand.
        #[arg(long)]
        keep: bool,
        /// Also start a local ClickHouse, ship the audit trail to it, and
        /// run an analyst query (installs clickhouse-server if missing).
        #[arg(long)]
        clickhouse: bool,
    },
    /// Run PostgreSQL 15's own regression suite directly and through the
    /// proxy, and diff the two results folders.
    Regress,
    /// Run a benchmark; writes target/bench/NAME.json. `proxy`: pgbench
    /// throughput and latency vs direct, a bare relay and pgbouncer, idle
    /// memory, large results. `connect`: connect+first-query latency when
    /// intercepted, and what the eBPF programs cost per connect (root).
    /// `policy`: decision cost with cache hits and misses, and pgbench -S
    /// with the reference policy on vs off. `audit`: spool appends/s, rows/s
    /// into ClickHouse, and pgbench -S with audit off, spooled, and
    /// shipped to ClickHouse. `masking`: MB/s per core of column rules and
    /// detectors (criterion), and a 1M-row SELECT masked vs unmasked.
    /// `approvals`: pgbench -S without and with [approvals], Approve-to-result
    /// latency, and memory per parked statement.
    Bench {
        /// Which benchmark: `proxy`, `connect`, `policy`, `audit`,
        /// `masking` or `approvals`.
        name: String,
    },
    /// Run a cargo-fuzz target (nightly; installs cargo-fuzz once), seeded
    /// from the public corpus. `analysis`: arbitrary bytes through
    /// statement analysis and the reference policy; never panics, and
    /// anything unparseable is refused. `rewrite`: arbitrary DataRow and
    /// CopyData bodies through the masking rewriter; every rewrite is one
    /// well-formed frame, and redacted columns hold nothing else.
    Fuzz {
        target: String,
        /// Stop after this many seconds.
        #[arg(long, default_value_t = 60)]
        time: u64,
    },
    /// Helper for `bench connect`: N connect+close to 127.0.0.1:PORT.
    #[command(hide = true)]
    ProbeConnect { addr: std::net::SocketAddr, n: u32 },
}

/// Runs a command to completion, failing with its name if it fails.
pub fn exec(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Builds the daemon and tells the harness (in this process and in the
/// test processes it starts) to use that binary.
pub fn build_daemon(release: bool) -> Result<()> {
    exec(&mut interceptor_tests::proxy::build_command(release))?;
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| interceptor_tests::workspace_root().join("target"));
    let bin = target
        .join(if release { "release" } else { "debug" })
        .join("interceptor");
    // SAFETY: xtask has no other threads yet; nothing reads the environment concurrently.
    unsafe { std::env::set_var("INTERCEPTOR_BIN", bin) };
    Ok(())
}

pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(interceptor_tests::workspace_root());
    c
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => deps::ensure(),
        Cmd::ProbeConnect { addr, n } => bench_connect::probe(addr, n),
        Cmd::Test { no_regress } => {
            deps::ensure()?;
            exec(cargo().args(["fmt", "--all", "--check"]))?;
            // The eBPF crate builds only for bpfel-unknown-none (build.rs
            // does that, warnings denied); everything else is checked here.
            exec(cargo().args([
                "clippy",
                "--workspace",
                "--exclude",
                "interceptor-ebpf",
                "--all-targets",
                "--quiet",
                "--",
                "-D",
                "warnings",
            ]))?;
            build_daemon(false)?;
            exec(cargo().args([
                "test",
                "--workspace",
                "--exclude",
                "interceptor-ebpf",
                "--",
                "--test-threads=2",
            ]))?;
            if !no_regress {
                regress::run()?;
            }
            Ok(())
        }
        Cmd::Demo { keep, clickhouse } => {
            deps::ensure_demo(clickhouse)?;
            build_daemon(false)?;
            demo::run(keep, clickhouse)
        }
        Cmd::Regress => {
            deps::ensure()?;
            build_daemon(false)?;
            regress::run()
        }
        Cmd::Fuzz { target, time } => fuzz::run(&target, time),
        Cmd::Bench { name } => {
            deps::ensure()?;
            build_daemon(true)?;
            match name.as_str() {
                "proxy" => bench::proxy(),
                "connect" => bench_connect::run(),
                "policy" => bench_policy::run(),
                "audit" => bench_audit::run(),
                "masking" => bench_masking::run(),
                "approvals" => bench_approvals::run(),
                other => {
                    bail!(
                        "unknown benchmark `{other}`; available: proxy, connect, policy, audit, masking"
                    )
                }
            }
        }
    }
}
