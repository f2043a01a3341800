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

/// Seeds for the rewriter: a column-plan byte and a DataRow or CopyData
/// body (text, CSV, binary COPY).
fn seed_rows(dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut row = vec![0x5a, 0, 3];
    for v in [&b"1"[..], b"sk_live_0123456789abcdef", b"bob@example.com"] {
        row.extend_from_slice(&(v.len() as i32).to_be_bytes());
        row.extend_from_slice(v);
    }
    let seeds: [&[u8]; 4] = [
        &row,
        b"\x331\tsecret\t\\N\n",
        b"\x46\"a,\"\"b\",4111111111111111\n",
        b"\x93PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0\0\x02\0\0\0\x01x\xff\xff\xff\xff",
    ];
    for (n, s) in seeds.iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{n}")), s)?;
    }
    Ok(())
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
    if !matches!(target, "analysis" | "rewrite") {
        bail!("unknown fuzz target `{target}`; available: analysis, rewrite");
    }
    let toolchain = deps::bpf_toolchain()?;
    let root = cargo_fuzz_root()?;
    let fuzz_dir = interceptor_tests::workspace_root().join("fuzz");
    let corpus = fuzz_dir.join("corpus").join(target);
    if target == "rewrite" {
        seed_rows(&corpus)?;
    } else {
        seed(&corpus)?;
    }
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
