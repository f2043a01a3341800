//! A private ClickHouse server (Debian's 18.16) on free loopback ports,
//! with its own config, data and logs in a temp dir. It can be stopped
//! and started again on the same ports and data, as an outage would.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{free_port, run_ok};

pub struct ClickHouse {
    pub http_port: u16,
    pub tcp_port: u16,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
}

/// The server binary: Debian's package puts it in /usr/sbin.
fn server_bin() -> PathBuf {
    ["/usr/sbin/clickhouse-server", "/usr/bin/clickhouse-server"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("clickhouse-server"))
}

impl ClickHouse {
    pub fn start() -> Result<ClickHouse> {
        let dir = tempfile::Builder::new()
            .prefix("interceptor-clickhouse-")
            .tempdir()?;
        let mut ch = ClickHouse {
            http_port: free_port(),
            tcp_port: free_port(),
            dir,
            child: None,
        };
        ch.write_config()?;
        ch.spawn()?;
        Ok(ch)
    }

    fn write_config(&self) -> Result<()> {
        let d = self.dir.path().display();
        std::fs::write(
            self.dir.path().join("config.xml"),
            format!(
                "<yandex>\n  <logger><level>warning</level><log>{d}/server.log</log><errorlog>{d}/error.log</errorlog><console>0</console></logger>\n  \
                 <listen_host>127.0.0.1</listen_host>\n  <http_port>{}</http_port>\n  <tcp_port>{}</tcp_port>\n  \
                 <path>{d}/data/</path>\n  <tmp_path>{d}/tmp/</tmp_path>\n  <user_files_path>{d}/user_files/</user_files_path>\n  \
                 <format_schema_path>{d}/format_schemas/</format_schema_path>\n  <users_config>{d}/users.xml</users_config>\n  \
                 <default_profile>default</default_profile>\n  <default_database>default</default_database>\n  \
                 <timezone>UTC</timezone>\n  <mark_cache_size>268435456</mark_cache_size>\n</yandex>\n",
                self.http_port, self.tcp_port
            ),
        )?;
        std::fs::write(
            self.dir.path().join("users.xml"),
            "<yandex>\n  <profiles><default></default></profiles>\n  <users><default><password></password>\
             <networks><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota></default></users>\n  \
             <quotas><default></default></quotas>\n</yandex>\n",
        )?;
        Ok(())
    }

    fn spawn(&mut self) -> Result<()> {
        let out = File::create(self.dir.path().join("stdout.log"))?;
        let child = Command::new(server_bin())
            .arg(format!(
                "--config-file={}",
                self.dir.path().join("config.xml").display()
            ))
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("start clickhouse-server (apt-get install clickhouse-server)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.query("SELECT 1").map(|s| s.trim() == "1").ok() != Some(true) {
            if let Some(c) = &mut self.child
                && let Some(status) = c.try_wait()?
            {
                bail!("clickhouse-server exited with {status}:\n{}", self.log());
            }
            if Instant::now() > deadline {
                bail!("clickhouse-server not ready after 30 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    pub fn log(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
        format!("{}{}", read("stdout.log"), read("error.log"))
    }

    /// Kills the server (an outage); its data stays.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn()
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// An `[audit.clickhouse]` table for the daemon's config.
    pub fn config_section(&self, database: &str) -> String {
        format!(
            "[audit.clickhouse]\nurl = \"{}\"\ndatabase = \"{database}\"\nflush_interval = \"200ms\"\n",
            self.url()
        )
    }

    /// Runs SQL with the real client; returns its TSV output.
    pub fn query(&self, sql: &str) -> Result<String> {
        run_ok(
            Command::new("clickhouse-client")
                .args(["--host", "127.0.0.1", "--port"])
                .arg(self.tcp_port.to_string())
                .args(["--query", sql]),
        )
    }

    /// One number from a query.
    pub fn count(&self, sql: &str) -> Result<u64> {
        let out = self.query(sql)?;
        out.trim()
            .parse()
            .with_context(|| format!("{sql} gave {out:?}"))
    }

    /// CPU time the server has used so far (zero while it is stopped).
    pub fn cpu_time(&self) -> Duration {
        self.child
            .as_ref()
            .map_or(Duration::ZERO, |c| crate::proxy::cpu_time(c.id()))
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for ClickHouse {
    fn drop(&mut self) {
        self.stop();
    }
}
