//! `cargo xtask fuzz TARGET`: the cargo-fuzz targets in fuzz/, on the
//! pinned nightly, seeded from the public corpus.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Result, bail};

use crate::deps;
use crate::exec;

const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// cargo-fuzz, installed once under ~/.cache/interceptor.
fn cargo_fuzz_root() -> Result<PathBuf> {
    let home = PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()));
    let root = home.join(format!(
        ".cache/interceptor/cargo-fuzz-{CARGO_FUZZ_VERSION}"
    ));
    if !root.join("bin/cargo-fuzz").exists() {
        exec(Command::new("cargo").args([
            "install",
            "--locked",
            &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
            "--root",
            &root.to_string_lossy(),
        ]))?;
    }
    Ok(root)
}

/// Every SQL text of the public corpus, one file each.
fn seed(dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let cases = interceptor_tests::corpus::cases(&interceptor_tests::workspace_root());
    let sqls = cases.iter().flat_map(interceptor_tests::corpus::messages);
    for (n, sql) in sqls.enumerate() {
        std::fs::write(dir.join(format!("seed-{n:04}.sql")), sql)?;
    }
    Ok(())
}

pub fn run(target: &str, seconds: u64) -> Result<()> {
    if target != "analysis" {
        bail!("unknown fuzz target `{target}`; available: analysis");
    }
    let toolchain = deps::bpf_toolchain()?;
    let root = cargo_fuzz_root()?;
    let fuzz_dir = interceptor_tests::workspace_root().join("fuzz");
    let corpus = fuzz_dir.join("corpus").join(target);
    seed(&corpus)?;
    let path = format!(
        "{}:{}",
        root.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    exec(
        Command::new("cargo")
            .current_dir(&fuzz_dir)
            .env("PATH", path)
            .env("RUSTUP_TOOLCHAIN", &toolchain)
            .args(["fuzz", "run", target])
            .arg(&corpus)
            .args(["--", &format!("-max_total_time={seconds}"), "-max_len=4096"]),
    )
}
