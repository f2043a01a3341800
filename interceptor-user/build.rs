//! Builds the kernel programs (`interceptor-ebpf`) and leaves the object in
//! OUT_DIR for `include_bytes_aligned!`.
//!
//! Like aya-build, but with the toolchain pinned (the aya versions we use
//! need nightly-2026-05-19, see shared/notes/ebpf.md) and one target dir for
//! every profile, so dev, test, clippy and release builds share one eBPF
//! build instead of repeating it.

use std::env;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};

/// The nightly the eBPF crate is built with; bpf-linker is linked against
/// this toolchain's own LLVM.
const NIGHTLY_DATE: &str = "2026-05-19";
const BPF_LINKER_VERSION: &str = "0.13.0";

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest.parent().context("workspace root")?.to_owned();
    for p in [
        "interceptor-ebpf/src",
        "interceptor-ebpf/Cargo.toml",
        "common/src",
        "common/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    println!("cargo:rerun-if-env-changed=INTERCEPTOR_BPF_TOOLCHAIN");
    let out = PathBuf::from(env::var("OUT_DIR")?).join("interceptor.bpf.o");

    let toolchain = toolchain()?;
    let linker_dir = bpf_linker_dir()?;
    let path = env::join_paths(
        std::iter::once(linker_dir)
            .chain(env::split_paths(&env::var_os("PATH").unwrap_or_default())),
    )?;
    let target_dir = root.join("target/bpf");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&root)
        .arg(format!("+{toolchain}"))
        .args([
            "build",
            "--package",
            "interceptor-ebpf",
            "-Z",
            "build-std=core",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "--quiet",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("PATH", path)
        // Kernel code gets no lint exceptions.
        .env("RUSTFLAGS", "-D warnings");
    // The outer build's compiler settings must not leak into the nested one.
    for key in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTUP_TOOLCHAIN",
    ] {
        cmd.env_remove(key);
    }
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("building interceptor-ebpf failed ({status}); the command was {cmd:?}");
    }
    let built = target_dir.join("bpfel-unknown-none/release/interceptor");
    std::fs::copy(&built, &out)
        .with_context(|| format!("cannot copy {} to {}", built.display(), out.display()))?;
    Ok(())
}

/// `INTERCEPTOR_BPF_TOOLCHAIN`, else `nightly-DATE`, else a `nightly` that
/// is that date.
fn toolchain() -> anyhow::Result<String> {
    if let Ok(t) = env::var("INTERCEPTOR_BPF_TOOLCHAIN") {
        return Ok(t);
    }
    for candidate in [format!("nightly-{NIGHTLY_DATE}"), "nightly".to_owned()] {
        let out = Command::new("rustc")
            .arg(format!("+{candidate}"))
            .arg("--version")
            .env_remove("RUSTUP_TOOLCHAIN")
            .output();
        if let Ok(o) = out
            && o.status.success()
            && String::from_utf8_lossy(&o.stdout).contains(NIGHTLY_DATE)
        {
            return Ok(candidate);
        }
    }
    bail!(
        "the eBPF programs need Rust nightly-{NIGHTLY_DATE} with rust-src; run `cargo xtask setup` \
         (or: rustup toolchain install nightly-{NIGHTLY_DATE} --component rust-src)"
    )
}

/// bpf-linker from PATH, or where `cargo xtask setup` caches it.
fn bpf_linker_dir() -> anyhow::Result<PathBuf> {
    let cached = env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default()
        .join(format!(
            ".cache/interceptor/bpf-linker-{BPF_LINKER_VERSION}-nightly-{NIGHTLY_DATE}/bin"
        ));
    if cached.join("bpf-linker").exists() {
        return Ok(cached);
    }
    for dir in env::split_paths(&env::var_os("PATH").unwrap_or_default()) {
        if dir.join("bpf-linker").exists() {
            return Ok(dir);
        }
    }
    bail!(
        "bpf-linker {BPF_LINKER_VERSION} (built against nightly-{NIGHTLY_DATE}'s LLVM) was not found \
         in PATH or {}; run `cargo xtask setup`",
        cached.display()
    )
}
