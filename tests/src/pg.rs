//! A private PostgreSQL 15 cluster.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result};

use crate::{free_port, pg_bin, run_ok};

/// The superuser the harness creates; the proxy logs in upstream as it
/// (the worst case: a team that gave the agent an admin password).
pub const ADMIN_USER: &str = "interceptor_admin";
pub const ADMIN_PASSWORD: &str = "admin-Secret-42";

pub struct PgCluster {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub socket_dir: PathBuf,
    pub password_file: PathBuf,
}

fn postgres_ids() -> Result<(u32, u32)> {
    let user = nix::unistd::User::from_name("postgres")?
        .context("the `postgres` OS user is missing (install postgresql-15)")?;
    Ok((user.uid.as_raw(), user.gid.as_raw()))
}

/// initdb and postgres refuse to run as root; run them as `postgres`.
fn as_postgres(cmd: &mut Command) -> Result<&mut Command> {
    if nix::unistd::geteuid().is_root() {
        let (uid, gid) = postgres_ids()?;
        cmd.uid(uid).gid(gid);
    }
    Ok(cmd)
}

impl PgCluster {
    /// initdb in a fresh temp dir, start on a free loopback port, create the
    /// SCRAM superuser and a database `app`.
    pub fn start() -> Result<PgCluster> {
        Self::start_with(300)
    }

    /// Like [`PgCluster::start`], with room for `max_connections` sessions.
    pub fn start_with(max_connections: u32) -> Result<PgCluster> {
        let dir = tempfile::Builder::new()
            .prefix("interceptor-pg-")
            .tempdir()?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))?;
        let data = dir.path().join("data");
        let socket_dir = dir.path().join("sock");
        std::fs::create_dir(&socket_dir)?;
        std::fs::set_permissions(&socket_dir, std::fs::Permissions::from_mode(0o777))?;
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, ADMIN_PASSWORD)?;
        std::fs::set_permissions(&pwfile, std::fs::Permissions::from_mode(0o644))?;
        run_ok(as_postgres(
            Command::new(pg_bin("initdb"))
                .arg("-D")
                .arg(&data)
                .args([
                    "-U",
                    "postgres",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "-E",
                    "UTF8",
                ])
                .args(["--locale=C.UTF-8", "--no-sync"])
                .arg(format!("--pwfile={}", pwfile.display())),
        )?)?;
        let port = free_port();
        let log = dir.path().join("postgres.log");
        run_ok(as_postgres(
            Command::new(pg_bin("pg_ctl"))
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t", "60", "start", "-o"])
                .arg(format!(
                    "-p {port} -k {} -c listen_addresses=127.0.0.1,::1 -c fsync=off -c synchronous_commit=off \
                     -c full_page_writes=off -c max_connections={max_connections} -c password_encryption=scram-sha-256",
                    socket_dir.display()
                )),
        )?)
        .with_context(|| format!("postgres did not start; see {}", log.display()))?;
        let cluster = PgCluster {
            dir,
            port,
            socket_dir,
            password_file: pwfile,
        };
        cluster.psql_admin(
            "postgres",
            &format!("CREATE ROLE {ADMIN_USER} SUPERUSER LOGIN PASSWORD '{ADMIN_PASSWORD}'"),
        )?;
        cluster.psql_admin(
            "postgres",
            &format!("CREATE DATABASE app OWNER {ADMIN_USER}"),
        )?;
        Ok(cluster)
    }

    /// Runs SQL as the `postgres` superuser over the Unix socket (trust).
    pub fn psql_admin(&self, db: &str, sql: &str) -> Result<String> {
        run_ok(
            Command::new(pg_bin("psql"))
                .args([
                    "-X",
                    "-q",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-At",
                    "-U",
                    "postgres",
                    "-d",
                    db,
                ])
                .arg("-h")
                .arg(&self.socket_dir)
                .arg("-p")
                .arg(self.port.to_string())
                .arg("-c")
                .arg(sql),
        )
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn stop(&self) {
        let mut cmd = Command::new(pg_bin("pg_ctl"));
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "-w", "stop"]);
        if let Ok(cmd) = as_postgres(&mut cmd) {
            let _ = cmd.output();
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

static SHARED: OnceLock<&'static PgCluster> = OnceLock::new();

extern "C" fn stop_shared() {
    if let Some(cluster) = SHARED.get() {
        cluster.stop();
        // The leaked cluster's TempDir is never dropped: remove its files
        // here, or every test process leaves a data directory behind.
        let _ = std::fs::remove_dir_all(cluster.path());
    }
}

/// One cluster per test process, stopped when the process exits. Tests
/// that need a pristine server start their own with [`PgCluster::start`].
pub fn shared() -> &'static PgCluster {
    SHARED.get_or_init(|| {
        let cluster: &'static PgCluster =
            Box::leak(Box::new(PgCluster::start().expect("start PostgreSQL 15")));
        // SAFETY: registering a plain extern "C" fn with no captured state.
        unsafe { libc::atexit(stop_shared) };
        cluster
    })
}

/// PostgreSQL 15's psql, as a string for command lines.
pub fn psql_path() -> String {
    pg_bin("psql").to_string_lossy().into_owned()
}
