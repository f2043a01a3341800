//! What the tests, the demo and the benchmarks need on the machine, and
//! installing what is missing. The one list; `.ci/run` calls this too.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Result, bail};

use crate::exec;

/// Debian packages. PostgreSQL 15 with its server headers (pg_regress,
/// PGXS), pgbouncer for the benchmark baseline, a JDK and pgjdbc for the
/// Java driver test.
const APT: &[&str] = &[
    "pgbouncer",
    "build-essential",
    "default-jdk-headless",
    "libpostgresql-jdbc-java",
    "nodejs",
    "npm",
    "python3-venv",
    "xz-utils",
    "bzip2",
    // The audit trail's warehouse: the harness starts a private instance.
    "clickhouse-server",
    "clickhouse-client",
    // The test OIDC issuer makes its RSA key with openssl (ring can't).
    "openssl",
    // The approvals console is tested in a real headless browser.
    "chromium",
    "chromium-driver",
];

const PIP: &[&str] = &[
    "psycopg[binary]>=3.1,<4",
    "asyncpg>=0.29",
    "selenium>=4.10,<5",
];
const NPM: &[&str] = &["pg@8", "pg-copy-streams@6"];

fn installed(pkg: &str) -> bool {
    version_of(pkg).is_some()
}

/// The Python with the driver packages.
pub fn venv_python() -> PathBuf {
    interceptor_tests::workspace_root().join("target/venv/bin/python")
}

pub fn node_dir() -> PathBuf {
    interceptor_tests::workspace_root().join("target/node")
}

/// The nightly the kernel programs are built with, and the bpf-linker
/// built against its LLVM (see shared/notes/ebpf.md and
/// interceptor-user/build.rs, which looks for the same paths).
const NIGHTLY_DATE: &str = "2026-05-19";
const BPF_LINKER_VERSION: &str = "0.13.0";

fn rustup_output(args: &[&str]) -> Option<String> {
    Command::new("rustup")
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
}

/// The installed toolchain that is nightly-DATE: the dated one, or a plain
/// `nightly` of that date (how some images ship it). Installs it if neither.
pub fn bpf_toolchain() -> Result<String> {
    for candidate in [format!("nightly-{NIGHTLY_DATE}"), "nightly".to_owned()] {
        let ok = Command::new("rustc")
            .arg(format!("+{candidate}"))
            .arg("--version")
            .output()
            .is_ok_and(|o| {
                o.status.success() && String::from_utf8_lossy(&o.stdout).contains(NIGHTLY_DATE)
            });
        if ok {
            return Ok(candidate);
        }
    }
    let name = format!("nightly-{NIGHTLY_DATE}");
    eprintln!("xtask: installing Rust {name} for the eBPF programs");
    exec(Command::new("rustup").args([
        "toolchain",
        "install",
        &name,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))?;
    Ok(name)
}

/// rust-src for the nightly, and bpf-linker cached under
/// ~/.cache/interceptor keyed by the nightly (it loads that LLVM at run time).
pub fn ensure_bpf() -> Result<()> {
    let toolchain = bpf_toolchain()?;
    let has_src = rustup_output(&[
        "component",
        "list",
        "--installed",
        "--toolchain",
        &toolchain,
    ])
    .is_some_and(|l| l.lines().any(|c| c.starts_with("rust-src")));
    if !has_src {
        exec(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            &toolchain,
        ]))?;
    }
    let home = PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()));
    let cache = home.join(".cache/interceptor");
    let root = cache.join(format!(
        "bpf-linker-{BPF_LINKER_VERSION}-nightly-{NIGHTLY_DATE}"
    ));
    if root.join("bin/bpf-linker").exists() {
        return Ok(());
    }
    let sysroot = Command::new("rustc")
        .arg(format!("+{toolchain}"))
        .args(["--print", "sysroot"])
        .output()?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    let llvm = std::fs::read_dir(sysroot.join("lib"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        });
    let Some(llvm) = llvm else {
        bail!(
            "{} has no libLLVM.so.*; bpf-linker can't be built against it",
            sysroot.display()
        );
    };
    // bpf-linker's build finds LLVM as LLVM_PREFIX/lib/libLLVM.so.
    let prefix = cache.join(format!("llvm-nightly-{NIGHTLY_DATE}"));
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib)?;
    for name in [llvm.file_name().unwrap().to_owned(), "libLLVM.so".into()] {
        let link = lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm, &link)?;
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against {} (about a minute)",
        llvm.display()
    );
    exec(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--no-default-features",
                "--features",
                "llvm-22",
                "--root",
            ])
            .arg(&root)
            .env("LLVM_PREFIX", &prefix)
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO_TARGET_DIR"),
    )
}

/// libpg_query's bindings (the policies crate) are generated by bindgen,
/// which loads libclang. Any installed libclang will do.
fn ensure_libclang() -> Result<()> {
    let known = Command::new("ldconfig")
        .arg("-p")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("libclang"));
    if !known {
        apt_install(&["libclang-dev"])?;
    }
    Ok(())
}

pub fn ensure() -> Result<()> {
    ensure_bpf()?;
    ensure_libclang()?;
    // Python's venv comes from pyenv on some images and from python3-venv on
    // Debian; only ask apt for it when the module is really missing.
    let have_venv = Command::new("python3")
        .args(["-m", "venv", "--help"])
        .output()
        .is_ok_and(|o| o.status.success());
    let have_node = Command::new("npm")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let missing: Vec<&str> = APT
        .iter()
        .copied()
        .filter(|p| {
            !(*p == "python3-venv" && have_venv) && !((*p == "nodejs" || *p == "npm") && have_node)
        })
        .filter(|p| !installed(p))
        .collect();
    if !missing.is_empty() {
        apt_install(&missing)?;
    }
    ensure_postgres()?;
    let python = venv_python();
    if !python.exists() {
        exec(
            Command::new("python3")
                .args(["-m", "venv"])
                .arg(python.parent().unwrap().parent().unwrap()),
        )?;
    }
    let have_py = Command::new(&python)
        .args(["-c", "import psycopg, asyncpg, selenium"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_py {
        exec(
            Command::new(&python)
                .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
                .args(PIP),
        )?;
    }
    let node = node_dir();
    if !node.join("node_modules/pg-copy-streams").exists() {
        std::fs::create_dir_all(&node)?;
        exec(
            Command::new("npm")
                .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
                .arg(&node)
                .args(NPM),
        )?;
    }
    Ok(())
}

/// PostgreSQL 15 server, client and server headers, all at one version
/// whose Debian source package (the regression suite's inputs) can be
/// downloaded here. A mirror may carry a security update's binaries but not
/// its source; then the newest version with both is installed instead.
const PG_PACKAGES: &[&str] = &[
    "postgresql-15",
    "postgresql-client-15",
    "postgresql-server-dev-15",
];

fn version_of(pkg: &str) -> Option<String> {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status} ${Version}", pkg])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .filter(|s| s.starts_with("install ok installed"))
        .and_then(|s| s.split_whitespace().last().map(str::to_owned))
}

/// What the demo needs: the eBPF toolchain and a PostgreSQL 15 server and
/// client; with `clickhouse`, a ClickHouse server and client too.
pub fn ensure_demo(clickhouse: bool) -> Result<()> {
    ensure_bpf()?;
    ensure_libclang()?;
    let ch: &[&str] = if clickhouse {
        &["clickhouse-server", "clickhouse-client"]
    } else {
        &[]
    };
    let missing: Vec<&str> = ["postgresql-15", "postgresql-client-15", "openssl"]
        .iter()
        .chain(ch)
        .copied()
        .filter(|p| !installed(p))
        .collect();
    if !missing.is_empty() {
        apt_install(&missing)?;
    }
    Ok(())
}

fn ensure_postgres() -> Result<()> {
    if version_of("postgresql-15").is_none() {
        apt_install(&["postgresql-15"])?;
    }
    let (version, _) = crate::regress::prepare_sources()?;
    let wanted: Vec<String> = PG_PACKAGES
        .iter()
        .filter(|p| version_of(p).as_deref() != Some(version.as_str()))
        .map(|p| format!("{p}={version}"))
        .collect();
    if !wanted.is_empty() {
        let args: Vec<&str> = wanted.iter().map(String::as_str).collect();
        apt_install(&args)?;
    }
    Ok(())
}

fn apt_install(pkgs: &[&str]) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "missing packages: {}; run `sudo apt-get install -y {}`",
            pkgs.join(" "),
            pkgs.join(" ")
        );
    }
    eprintln!("xtask: installing {}", pkgs.join(" "));
    static UPDATED: std::sync::Once = std::sync::Once::new();
    let mut updated = Ok(());
    UPDATED.call_once(|| updated = exec(Command::new("apt-get").args(["update", "-qq"])));
    updated?;
    exec(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args([
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "--allow-downgrades",
            ])
            .args(pkgs),
    )
}
