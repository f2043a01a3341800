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
];

const PIP: &[&str] = &["psycopg[binary]>=3.1,<4", "asyncpg>=0.29"];
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

pub fn ensure() -> Result<()> {
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
        .args(["-c", "import psycopg, asyncpg"])
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

/// What the demo needs: only a PostgreSQL 15 server and client.
pub fn ensure_demo() -> Result<()> {
    let missing: Vec<&str> = ["postgresql-15", "postgresql-client-15"]
        .into_iter()
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
