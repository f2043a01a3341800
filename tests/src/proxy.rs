//! The real `interceptor` daemon, started with a generated config.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::pg::{ADMIN_USER, PgCluster};
use crate::{free_port, run_ok, workspace_root};

/// The daemon under test. `cargo xtask` builds it once and passes its path
/// in `INTERCEPTOR_BIN`; a plain `cargo test` builds it here, once per
/// process, in its own target dir: this build resolves features for
/// `interceptor-user` alone, and sharing `target/` with the test build would
/// make each rebuild the crates the other just built.
pub fn binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("INTERCEPTOR_BIN") {
            return PathBuf::from(p);
        }
        let target = workspace_root().join("target/harness");
        let mut cmd = build_command(false);
        cmd.arg("--target-dir").arg(&target);
        run_ok(&mut cmd).expect("build the interceptor binary");
        target.join("debug/interceptor")
    })
    .clone()
}

/// `cargo build` of the `interceptor` binary alone (debug or release).
pub fn build_command(release: bool) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root()).args([
        "build",
        "--quiet",
        "-p",
        "interceptor-user",
        "--bin",
        "interceptor",
    ]);
    if release {
        cmd.arg("--release");
    }
    cmd
}

/// How to configure a test proxy. `Default` is: plain listener on
/// 127.0.0.1, client TLS enabled with generated certs, trust client auth,
/// databases `app` and `postgres` (and the regression ones).
#[derive(Clone)]
pub struct ProxyOptions {
    pub client_tls: bool,
    /// `client_auth = { ... }` inline table body, e.g. `method = "scram-sha-256", secret_file = "..."`.
    pub client_auth: Option<String>,
    pub databases: Vec<String>,
    /// Upstream port; defaults to the cluster's.
    pub upstream_port: Option<u16>,
    pub upstream_tls: Option<String>,
    /// Extra lines for the `[limits]` table.
    pub limits: Vec<String>,
    pub listen_v6: bool,
    /// Upstream role and its password file; default: the harness superuser.
    pub upstream_login: Option<(String, PathBuf)>,
    /// An `[intercept]` table (see `intercept::Interception::config_section`).
    pub intercept: Option<String>,
    /// A statement policy file for `[policy]`.
    pub policy: Option<PathBuf>,
    /// More top-level sections, appended as given (e.g. `[oidc]`).
    pub sections: Vec<String>,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            client_tls: true,
            client_auth: None,
            databases: vec!["*".into()],
            upstream_port: None,
            upstream_tls: None,
            limits: vec![],
            listen_v6: false,
            upstream_login: None,
            intercept: None,
            policy: None,
            sections: vec![],
        }
    }
}

pub struct Proxy {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
}

impl Proxy {
    pub fn config_text(pg: &PgCluster, opts: &ProxyOptions, port: u16, state_dir: &Path) -> String {
        let mut listen = vec![format!("\"127.0.0.1:{port}\"")];
        if opts.listen_v6 {
            listen.push(format!("\"[::1]:{port}\""));
        }
        let dbs: Vec<String> = opts.databases.iter().map(|d| format!("\"{d}\"")).collect();
        let mut text = format!(
            "listen = [{}]\nstate_dir = \"{}\"\n\n[limits]\nconnect_timeout = \"2s\"\nshutdown_grace = \"5s\"\n{}\n\n[client_tls]\nmode = \"{}\"\n\n",
            listen.join(", "),
            state_dir.display(),
            opts.limits.join("\n"),
            if opts.client_tls {
                "enabled"
            } else {
                "disabled"
            },
        );
        let (user, password_file) = opts
            .upstream_login
            .clone()
            .unwrap_or_else(|| (ADMIN_USER.to_owned(), pg.password_file.clone()));
        text.push_str(&format!(
            "[[target]]\nname = \"main\"\ndestinations = [\"127.0.0.1:{port}\"]\nupstream = {{ host = \"127.0.0.1\", port = {} }}\ndatabases = [{}]\nupstream_auth = {{ user = \"{user}\", password_file = \"{}\" }}\n",
            opts.upstream_port.unwrap_or(pg.port),
            dbs.join(", "),
            password_file.display(),
        ));
        if let Some(auth) = &opts.client_auth {
            text.push_str(&format!("client_auth = {{ {auth} }}\n"));
        }
        if let Some(tls) = &opts.upstream_tls {
            text.push_str(&format!("upstream_tls = {{ {tls} }}\n"));
        }
        if let Some(file) = &opts.policy {
            text.push_str(&format!("\n[policy]\nfile = \"{}\"\n", file.display()));
        }
        for section in opts.intercept.iter().chain(&opts.sections) {
            text.push('\n');
            text.push_str(section);
        }
        text
    }

    pub fn start(pg: &PgCluster, opts: ProxyOptions) -> Result<Proxy> {
        let dir = tempfile::Builder::new()
            .prefix("interceptor-proxy-")
            .tempdir()?;
        Self::start_in(dir, pg, opts)
    }

    /// A proxy without client TLS whose policy file holds `policy`.
    pub fn with_policy(pg: &PgCluster, policy: &str) -> Result<Proxy> {
        let dir = tempfile::Builder::new()
            .prefix("interceptor-proxy-")
            .tempdir()?;
        let file = dir.path().join("policy.toml");
        std::fs::write(&file, policy)?;
        let opts = ProxyOptions {
            client_tls: false,
            policy: Some(file),
            ..Default::default()
        };
        Self::start_in(dir, pg, opts)
    }

    fn start_in(dir: tempfile::TempDir, pg: &PgCluster, opts: ProxyOptions) -> Result<Proxy> {
        let port = free_port();
        let config_path = dir.path().join("interceptor.toml");
        std::fs::write(
            &config_path,
            Self::config_text(pg, &opts, port, &dir.path().join("state")),
        )?;
        Self::start_with(dir, config_path, port)
    }

    /// Starts the daemon on an existing config file and waits until it is ready.
    pub fn start_with(dir: tempfile::TempDir, config_path: PathBuf, port: u16) -> Result<Proxy> {
        let log_path = dir.path().join("interceptor.log");
        let log = File::create(&log_path)?;
        let child = Command::new(binary())
            .arg("daemon")
            .arg("--config")
            .arg(&config_path)
            .env(
                "RUST_LOG",
                std::env::var("INTERCEPTOR_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn interceptor")?;
        running(|pids| pids.push(child.id()));
        let mut proxy = Proxy {
            child,
            port,
            dir,
            config_path,
            log_path,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if proxy.log().contains("interceptor: ready") {
                return Ok(proxy);
            }
            if let Some(status) = proxy.child.try_wait()? {
                bail!(
                    "interceptor exited with {status} before it was ready:\n{}",
                    proxy.log()
                );
            }
            if Instant::now() > deadline {
                bail!("interceptor not ready after 30 s:\n{}", proxy.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig);
    }

    /// Waits for the daemon to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Stops the daemon (SIGTERM, then SIGKILL after 10 s) and starts it
    /// again on the same config and state, as an operator's restart would.
    pub fn restart(mut self) -> Result<Proxy> {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        if self.wait_exit(Duration::from_secs(10)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir()?);
        let (config, port) = (self.config_path.clone(), self.port);
        // The old log is kept next to the new one.
        let _ = std::fs::rename(&self.log_path, self.log_path.with_extension("log.1"));
        Proxy::start_with(dir, config, port)
    }

    /// The generated CA clients verify the proxy with.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("state/tls/ca.pem")
    }

    /// A libpq connection string through the proxy.
    pub fn conninfo(&self, db: &str, sslmode: &str) -> String {
        format!(
            "host=127.0.0.1 port={} dbname={db} user=agent sslmode={sslmode}",
            self.port
        )
    }

    /// CPU time the daemon has used so far (user + system).
    pub fn cpu_time(&self) -> Duration {
        cpu_time(self.pid())
    }

    /// Peak resident memory of the daemon so far, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        status_field(self.pid(), "VmHWM:")
    }
}

/// User and system CPU time a process has used so far (zero once it is
/// gone).
pub fn cpu_time(pid: u32) -> Duration {
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the parenthesised command name; utime and
            // stime are the 14th and 15th of the whole line.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    Duration::from_micros(ticks * 1_000_000 / hz)
}

/// A numeric field of /proc/PID/status (`VmRSS:`, `VmHWM:`), in KiB.
pub fn status_field(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Out of the list before it is reaped: a reaped pid can be reused.
        let pid = self.child.id();
        running(|pids| pids.retain(|p| *p != pid));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Daemons started and not yet dropped. A test file's shared proxy lives
/// in a static, which is never dropped: at exit, the hook kills what is
/// left, or every test process would leave a daemon running.
fn running(f: impl FnOnce(&mut Vec<u32>)) {
    static PIDS: Mutex<Vec<u32>> = Mutex::new(Vec::new());
    static HOOK: OnceLock<()> = OnceLock::new();
    extern "C" fn kill_running() {
        running(|pids| {
            for pid in pids.drain(..) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        });
    }
    HOOK.get_or_init(|| {
        // SAFETY: registers a plain function with no captured state; it
        // only takes a lock and sends signals.
        unsafe { libc::atexit(kill_running) };
    });
    f(&mut PIDS.lock().unwrap_or_else(|p| p.into_inner()));
}
