//! Reading what the daemon audited, through `interceptor audit`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::proxy::{Proxy, binary};

/// The spool of a proxy started with the harness's default config.
pub fn spool(proxy: &Proxy) -> PathBuf {
    proxy.dir.path().join("state/audit")
}

/// Runs `interceptor ARGS`: (success, stdout, stderr).
pub fn interceptor(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(binary())
        .args(args)
        .output()
        .expect("run interceptor");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every event in the spool, as `audit tail --json` prints them.
pub fn events(dir: &Path) -> Vec<Value> {
    let (ok, out, err) = interceptor(&[
        "audit",
        "tail",
        "--spool",
        dir.to_str().expect("utf-8 path"),
        "-n",
        "10000000",
        "--json",
    ]);
    assert!(ok, "{err}");
    out.lines()
        .map(|l| serde_json::from_str(l).expect("audit tail --json prints JSON lines"))
        .collect()
}

/// Statement rows, once `n` of them are in the spool (the writer batches;
/// it is not instant) or after 10 s.
pub fn statements(dir: &Path, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rows: Vec<Value> = events(dir)
            .into_iter()
            .filter_map(|e| e.get("Statement").cloned())
            .collect();
        if rows.len() >= n || Instant::now() > deadline {
            return rows;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `interceptor ARGS` (an `audit tail --json` or `audit query
/// --json`) until `done` holds of the JSON lines it prints, or 10 s have
/// passed, and returns the last of them. The writer collects events every
/// few ms under load, so a test that reads as soon as its client has
/// finished may find the newest not yet in the spool.
pub fn json_lines_until(args: &[&str], done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, out, _) = interceptor(args);
        let lines: Vec<Value> = out
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if done(&lines) || Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
