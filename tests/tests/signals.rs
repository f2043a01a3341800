//! SIGHUP reloads atomically; SIGTERM drains, then closes.

use std::process::Command;
use std::time::Duration;

use interceptor_tests::pg;
use interceptor_tests::pg_bin;
use interceptor_tests::proxy::{Proxy, ProxyOptions};
use interceptor_tests::wire::{RawClient, first_error};
use nix::sys::signal::Signal;

fn wait_for_log(proxy: &Proxy, needle: &str) {
    for _ in 0..250 {
        if proxy.log().contains(needle) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("`{needle}` never appeared in the log:\n{}", proxy.log());
}

#[test]
fn sighup_with_a_bad_file_keeps_the_old_config_and_a_good_file_applies() {
    let mut proxy = Proxy::start(
        pg::shared(),
        ProxyOptions {
            databases: vec!["app".into()],
            ..Default::default()
        },
    )
    .unwrap();
    let good = std::fs::read_to_string(&proxy.config_path).unwrap();

    std::fs::write(
        &proxy.config_path,
        good.replace("[limits]", "[limits]\nbogus_key = 1"),
    )
    .unwrap();
    proxy.signal(Signal::SIGHUP);
    wait_for_log(&proxy, "configuration reload failed");
    assert!(
        proxy.log().contains("bogus_key"),
        "the log says why:\n{}",
        proxy.log()
    );
    let (mut c, _) = RawClient::login(proxy.port, "agent", "app").unwrap();
    assert!(c.query("SELECT 1").unwrap().iter().any(|(t, _)| *t == b'D'));

    // A good change (allow `postgres` too) takes effect for new sessions.
    std::fs::write(
        &proxy.config_path,
        good.replace(
            "databases = [\"app\"]",
            "databases = [\"app\", \"postgres\"]",
        ),
    )
    .unwrap();
    let (_, msgs) = RawClient::login(proxy.port, "agent", "postgres").unwrap();
    assert_eq!(first_error(&msgs).map(|e| e.0).as_deref(), Some("42501"));
    proxy.signal(Signal::SIGHUP);
    wait_for_log(&proxy, "configuration reloaded");
    let (_, msgs) = RawClient::login(proxy.port, "agent", "postgres").unwrap();
    assert!(first_error(&msgs).is_none(), "{msgs:?}");
    assert!(proxy.is_running());
}

#[test]
fn sigterm_lets_a_running_statement_finish_then_refuses_new_connections() {
    let mut proxy = Proxy::start(pg::shared(), ProxyOptions::default()).unwrap();
    let ci = proxy.conninfo("app", "disable");
    let running = Command::new(pg_bin("psql"))
        .args([
            "-X",
            "-At",
            "-d",
            &ci,
            "-c",
            "SELECT pg_sleep(1.5), 'finished'",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_log(&proxy, "session started");
    proxy.signal(Signal::SIGTERM);
    wait_for_log(&proxy, "shutting down");
    // The listeners close as the accept loops see the phase change; a
    // connection caught in that instant is reset, never served.
    let served = |p: &Proxy| {
        RawClient::login(p.port, "agent", "app")
            .is_ok_and(|(_, msgs)| msgs.iter().any(|(t, _)| *t == b'Z'))
    };
    assert!(!served(&proxy), "no new sessions after SIGTERM");
    let out = running.wait_with_output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("finished"),
        "{out:?}"
    );
    assert!(
        proxy
            .wait_exit(Duration::from_secs(10))
            .is_some_and(|s| s.success()),
        "{}",
        proxy.log()
    );
}

#[test]
fn sigterm_grace_expiry_ends_sessions_with_57p01() {
    let mut proxy = Proxy::start(
        pg::shared(),
        ProxyOptions {
            limits: vec![],
            ..Default::default()
        },
    )
    .unwrap();
    // shutdown_grace is 5s in the harness config; an idle session outlives it.
    let (mut c, _) = RawClient::login(proxy.port, "agent", "app").unwrap();
    proxy.signal(Signal::SIGTERM);
    let msgs = c.read_to_end().unwrap();
    assert_eq!(
        first_error(&msgs).map(|e| e.0).as_deref(),
        Some("57P01"),
        "{msgs:?}"
    );
    assert!(proxy.wait_exit(Duration::from_secs(10)).is_some());
}

#[test]
fn check_config_points_at_the_bad_line() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.toml");
    std::fs::write(
        &f,
        "listen = [\"127.0.0.1:1\"]\n\n[limits]\nmax_conections = 5\n",
    )
    .unwrap();
    let out = Command::new(interceptor_tests::proxy::binary())
        .arg("check-config")
        .arg(&f)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:4:1"), "{err}");
    assert!(err.contains("max_conections"), "{err}");
}

#[test]
fn refuses_to_start_when_the_port_is_taken() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let pg = pg::shared();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        Proxy::config_text(pg, &ProxyOptions::default(), port, &dir.path().join("s")),
    )
    .unwrap();
    let out = Command::new(interceptor_tests::proxy::binary())
        .args(["daemon", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{out:?}"
    );
}

#[test]
fn idle_timeout_closes_quiet_sessions_with_57p05() {
    let proxy = Proxy::start(
        pg::shared(),
        ProxyOptions {
            limits: vec!["idle_timeout = \"1s\"".into()],
            ..Default::default()
        },
    )
    .unwrap();
    let (mut c, _) = RawClient::login(proxy.port, "agent", "app").unwrap();
    let msgs = c.read_to_end().unwrap();
    assert_eq!(
        first_error(&msgs).map(|e| e.0).as_deref(),
        Some("57P05"),
        "{msgs:?}"
    );
}

#[test]
fn max_connections_refuses_with_53300() {
    let proxy = Proxy::start(
        pg::shared(),
        ProxyOptions {
            limits: vec!["max_connections = 2".into()],
            ..Default::default()
        },
    )
    .unwrap();
    let (_a, _) = RawClient::login(proxy.port, "agent", "app").unwrap();
    let (_b, _) = RawClient::login(proxy.port, "agent", "app").unwrap();
    let (_, msgs) = RawClient::login(proxy.port, "agent", "app").unwrap();
    assert_eq!(
        first_error(&msgs).map(|e| e.0).as_deref(),
        Some("53300"),
        "{msgs:?}"
    );
}
