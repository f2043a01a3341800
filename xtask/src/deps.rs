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
    "postgresql-15",
    "postgresql-client-15",
    "postgresql-server-dev-15",
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
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
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
        if !nix::unistd::geteuid().is_root() {
            bail!(
                "missing packages: {}; run `sudo apt-get install -y {}`",
                missing.join(" "),
                missing.join(" ")
            );
        }
        eprintln!("xtask: installing {}", missing.join(" "));
        exec(Command::new("apt-get").args(["update", "-qq"]))?;
        exec(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&missing),
        )?;
    }
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
