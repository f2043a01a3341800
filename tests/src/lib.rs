//! Test harness: a real PostgreSQL 15 cluster in a temp dir on a free
//! loopback port, the real `interceptor` daemon, and the real client tools.
//!
//! Used by the integration tests in `tests/tests/` and by `cargo xtask`
//! (demo, bench, regress), so that every one of them starts things the same
//! way.

pub mod approvals;
pub mod audit;
pub mod clickhouse;
#[path = "../corpus/corpus.rs"]
pub mod corpus;
pub mod intercept;
pub mod oidc;
pub mod pg;
pub mod proxy;
pub mod wire;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (where Cargo.toml with [workspace] lives).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

/// Where PostgreSQL 15's programs are.
pub fn pg_bin(name: &str) -> PathBuf {
    let debian = Path::new("/usr/lib/postgresql/15/bin").join(name);
    if debian.exists() {
        debian
    } else {
        PathBuf::from(name)
    }
}

/// Runs a command, failing with its output if it does not succeed.
pub fn run_ok(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run {cmd:?}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        anyhow::bail!(
            "{cmd:?} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}
