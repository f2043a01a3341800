//! Transparent interception with the real kernel programs: unmodified
//! clients in a tagged cgroup reach PostgreSQL through the proxy without
//! knowing, untagged ones go direct, and nothing tagged ever goes direct.
//!
//! These need root (eBPF, cgroup moves). Each test has its own tagged
//! cgroup and pin directory, so they can run side by side. The clients are
//! given no password: PostgreSQL itself requires one (scram), so a client
//! that reaches it directly fails, and one that reaches it through the
//! proxy (which logs in with the vaulted credentials) succeeds.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use interceptor_tests::intercept::{Interception, cgroup2_mount, kernel_tests_possible};
use interceptor_tests::pg::{self, ADMIN_PASSWORD, ADMIN_USER};
use interceptor_tests::proxy::{Proxy, ProxyOptions};
use interceptor_tests::workspace_root;

fn start(ic: &Interception) -> Proxy {
    Proxy::start(
        pg::shared(),
        ProxyOptions {
            client_tls: false,
            intercept: Some(ic.config_section()),
            ..ProxyOptions::default()
        },
    )
    .expect("start the daemon with interception")
}

/// The client port PostgreSQL saw for the session, as psql reports it.
const CLIENT_PORT_SQL: &str =
    "SELECT client_port FROM pg_stat_activity WHERE pid = pg_backend_pid()";

fn psql_args(host: &str) -> Vec<String> {
    psql_args_as(host, "agent")
}

fn psql_args_as(host: &str, user: &str) -> Vec<String> {
    vec![
        format!(
            "host={host} port={} dbname=app user={user} sslmode=disable connect_timeout=5",
            pg::shared().port
        ),
        "-XtAc".into(),
        CLIENT_PORT_SQL.into(),
    ]
}

fn output(cmd: &mut Command) -> Output {
    if !cmd.get_envs().any(|(k, _)| k == "PGPASSWORD") {
        cmd.env_remove("PGPASSWORD");
    }
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn ok_stdout(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The "session started" records of the daemon log.
fn sessions(proxy: &Proxy) -> Vec<String> {
    proxy
        .log()
        .lines()
        .filter(|l| l.contains("session started"))
        .map(str::to_owned)
        .collect()
}

/// Waits for the n-th session record (the log is written asynchronously).
fn session_record(proxy: &Proxy, n: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = sessions(proxy);
        if s.len() > n {
            return s[n].clone();
        }
        assert!(
            Instant::now() < deadline,
            "no session record {n}:\n{}",
            proxy.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn field<'a>(record: &'a str, name: &str) -> &'a str {
    let at = record
        .find(&format!(" {name}="))
        .unwrap_or_else(|| panic!("no {name} in {record}"));
    record[at + name.len() + 2..]
        .split_whitespace()
        .next()
        .unwrap()
}

#[test]
fn psql_under_run_goes_through_the_proxy_with_its_identity() {
    if !kernel_tests_possible("psql_under_run_goes_through_the_proxy_with_its_identity") {
        return;
    }
    let ic = Interception::new();
    let proxy = start(&ic);
    let port = ok_stdout(
        ic.run("nightly-e2e", &pg::psql_path())
            .args(psql_args("127.0.0.1"))
            .env("GITHUB_REPOSITORY", "acme/agent")
            .env("GITHUB_RUN_ID", "4242"),
    );
    let record = session_record(&proxy, 0);
    assert!(record.contains("intercepted dst=127.0.0.1:"), "{record}");
    assert!(record.contains("comm=\"psql\""), "{record}");
    assert!(
        record.contains("exe=/usr/lib/postgresql/15/bin/psql"),
        "{record}"
    );
    assert!(record.contains("job=\"nightly-e2e\""), "{record}");
    assert!(
        record.contains("GITHUB_REPOSITORY=\"acme/agent\""),
        "{record}"
    );
    assert!(record.contains("GITHUB_RUN_ID=\"4242\""), "{record}");
    assert!(
        field(&record, "cgroup").starts_with(&format!("/{}/job-nightly-e2e-", ic.cgroup)),
        "{record}"
    );
    assert_eq!(field(&record, "uid"), "0");
    // PostgreSQL saw the proxy's upstream socket, not psql's.
    assert_eq!(port, field(&record, "upstream_port"), "{record}");
    // The job cgroup and its record are gone after the step.
    let parent = cgroup2_mount().join(&ic.cgroup);
    let leftovers: Vec<_> = std::fs::read_dir(&parent)
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().unwrap().is_dir())
        .collect();
    assert!(leftovers.is_empty(), "job cgroups left: {leftovers:?}");
    assert_eq!(
        std::fs::read_dir(ic.runtime_dir.path().join("jobs"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn psycopg_under_run_is_intercepted() {
    if !kernel_tests_possible("psycopg_under_run_is_intercepted") {
        return;
    }
    let python = workspace_root().join("target/venv/bin/python");
    assert!(python.exists(), "run `cargo xtask setup` first");
    let ic = Interception::new();
    let proxy = start(&ic);
    let script = "import sys, psycopg\n\
        with psycopg.connect(sys.argv[1]) as c:\n    \
        print(c.execute('SELECT client_port FROM pg_stat_activity WHERE pid = pg_backend_pid()').fetchone()[0])\n";
    let port = ok_stdout(ic.run("py", python.to_str().unwrap()).args([
        "-c",
        script,
        &format!(
            "host=127.0.0.1 port={} dbname=app user=agent sslmode=disable",
            pg::shared().port
        ),
    ]));
    let record = session_record(&proxy, 0);
    assert!(record.contains("job=\"py\""), "{record}");
    assert!(record.contains("comm=\"python"), "{record}");
    assert_eq!(port, field(&record, "upstream_port"));
}

#[test]
fn untagged_processes_go_direct() {
    if !kernel_tests_possible("untagged_processes_go_direct") {
        return;
    }
    let ic = Interception::new();
    let proxy = start(&ic);
    // Untagged and without a password: PostgreSQL itself refuses.
    let out = output(Command::new(pg::psql_path()).args(psql_args("127.0.0.1")));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("password"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // With the real password it works, straight to the server.
    let port = ok_stdout(
        Command::new(pg::psql_path())
            .args(psql_args_as("127.0.0.1", ADMIN_USER))
            .env("PGPASSWORD", ADMIN_PASSWORD),
    );
    assert!(!port.is_empty());
    assert!(sessions(&proxy).is_empty(), "{}", proxy.log());
}

#[test]
fn other_addresses_of_the_server_are_intercepted_too() {
    if !kernel_tests_possible("other_addresses_of_the_server_are_intercepted_too") {
        return;
    }
    let ic = Interception::new();
    let proxy = start(&ic);
    // IPv6, v4-mapped IPv6 and another loopback address all reach the same
    // local server; each must be redirected.
    for (i, host) in ["::1", "::ffff:127.0.0.1", "127.0.0.2"].iter().enumerate() {
        let port = ok_stdout(ic.run("addr", &pg::psql_path()).args(psql_args(host)));
        let record = session_record(&proxy, i);
        assert_eq!(port, field(&record, "upstream_port"), "{host}: {record}");
        let dst = field(&record, "dst");
        let expected = match *host {
            "::1" => format!("[::1]:{}", pg::shared().port),
            "::ffff:127.0.0.1" => format!("127.0.0.1:{}", pg::shared().port),
            h => format!("{h}:{}", pg::shared().port),
        };
        assert_eq!(dst, expected, "{record}");
    }
}

#[test]
fn nested_cgroups_are_intercepted_with_the_job_identity() {
    if !kernel_tests_possible("nested_cgroups_are_intercepted_with_the_job_identity") {
        return;
    }
    let ic = Interception::new();
    let proxy = start(&ic);
    let script = format!(
        "set -e; mkdir \"$INTERCEPTOR_JOB_CGROUP/inner\"; echo $$ > \"$INTERCEPTOR_JOB_CGROUP/inner/cgroup.procs\"; \
         exec {} '{}' -XtAc \"{CLIENT_PORT_SQL}\"",
        pg::psql_path(),
        psql_args("127.0.0.1")[0]
    );
    let port = ok_stdout(ic.run("nested", "sh").args(["-c", &script]));
    let record = session_record(&proxy, 0);
    assert!(field(&record, "cgroup").ends_with("/inner"), "{record}");
    assert!(record.contains("job=\"nested\""), "{record}");
    assert_eq!(port, field(&record, "upstream_port"));
}

#[test]
fn proxy_down_means_refused_and_a_restart_intercepts_again() {
    if !kernel_tests_possible("proxy_down_means_refused_and_a_restart_intercepts_again") {
        return;
    }
    let ic = Interception::new();
    let mut proxy = start(&ic);
    ok_stdout(
        ic.run("before", &pg::psql_path())
            .args(psql_args("127.0.0.1")),
    );

    proxy.signal(nix::sys::signal::Signal::SIGKILL);
    proxy
        .wait_exit(Duration::from_secs(5))
        .expect("daemon killed");
    // Even with the right password a tagged client can't go around.
    let out = output(
        ic.run("down", &pg::psql_path())
            .args(psql_args_as("127.0.0.1", ADMIN_USER))
            .env("PGPASSWORD", ADMIN_PASSWORD),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Connection refused"), "{err}");
    // Same through IPv6.
    let out = output(ic.run("down6", &pg::psql_path()).args(psql_args("::1")));
    assert!(!out.status.success());

    let dir = tempfile::Builder::new()
        .prefix("interceptor-proxy-")
        .tempdir()
        .unwrap();
    let config = dir.path().join("interceptor.toml");
    std::fs::copy(&proxy.config_path, &config).unwrap();
    let restarted = Proxy::start_with(dir, config, proxy.port).expect("restart");
    assert!(
        restarted.log().contains("interception installed"),
        "{}",
        restarted.log()
    );
    let port = ok_stdout(
        ic.run("after", &pg::psql_path())
            .args(psql_args("127.0.0.1")),
    );
    let record = session_record(&restarted, 0);
    assert_eq!(port, field(&record, "upstream_port"));
}

#[test]
fn the_proxys_own_upstream_connections_are_not_redirected() {
    if !kernel_tests_possible("the_proxys_own_upstream_connections_are_not_redirected") {
        return;
    }
    let ic = Interception::new();
    let proxy = start(&ic);
    // Put the daemon itself in the tagged cgroup: only its socket mark keeps
    // its upstream connections from being sent back to itself.
    std::fs::write(
        cgroup2_mount().join(&ic.cgroup).join("cgroup.procs"),
        proxy.pid().to_string(),
    )
    .unwrap();
    let port = ok_stdout(
        ic.run("marked", &pg::psql_path())
            .args(psql_args("127.0.0.1")),
    );
    let record = session_record(&proxy, 0);
    assert_eq!(port, field(&record, "upstream_port"));
    // Move it back out so the test's cleanup can remove the cgroup.
    std::fs::write(
        cgroup2_mount().join("cgroup.procs"),
        proxy.pid().to_string(),
    )
    .unwrap();
}

#[test]
fn a_direct_connection_to_the_interception_port_is_refused() {
    if !kernel_tests_possible("a_direct_connection_to_the_interception_port_is_refused") {
        return;
    }
    let ic = Interception::new();
    let proxy = start(&ic);
    let mut s = TcpStream::connect(("127.0.0.1", ic.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    assert_eq!(buf.first(), Some(&b'E'), "{text}");
    assert!(
        text.contains("08004") && text.contains("no origin record"),
        "{text}"
    );
    let _ = s.write_all(b"x");
    assert!(sessions(&proxy).is_empty());
    assert!(proxy.log().contains("no kernel origin record"));
}

#[test]
fn tag_and_untag_an_existing_cgroup() {
    if !kernel_tests_possible("tag_and_untag_an_existing_cgroup") {
        return;
    }
    let ic = Interception::new();
    let proxy = start(&ic);
    let name = format!("interceptor-test-scope-{}", std::process::id());
    let dir: PathBuf = cgroup2_mount().join(&name);
    std::fs::create_dir(&dir).unwrap();
    let in_scope = |direct: bool| {
        let user = if direct { ADMIN_USER } else { "agent" };
        let script = format!(
            "echo $$ > '{}/cgroup.procs' && exec {} '{}' -XtAc \"{CLIENT_PORT_SQL}\"",
            dir.display(),
            pg::psql_path(),
            psql_args_as("127.0.0.1", user)[0]
        );
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &script]);
        if direct {
            cmd.env("PGPASSWORD", ADMIN_PASSWORD);
        }
        cmd
    };
    ok_stdout(&mut ic.tag_command("tag", &name));
    let port = ok_stdout(&mut in_scope(false));
    let record = session_record(&proxy, 0);
    assert_eq!(port, field(&record, "upstream_port"));
    assert_eq!(field(&record, "cgroup"), format!("/{name}"));

    ok_stdout(&mut ic.tag_command("untag", &name));
    // Untagged again: direct, so only the real password works.
    let mut direct = in_scope(true);
    let out = direct.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sessions(&proxy).len(), 1);
    // An exited process leaves its cgroup asynchronously.
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::remove_dir(&dir).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!dir.exists(), "{} could not be removed", dir.display());
}

#[test]
fn a_burst_of_2000_connects_has_no_syn_retransmits() {
    if !kernel_tests_possible("a_burst_of_2000_connects_has_no_syn_retransmits") {
        return;
    }
    let ic = Interception::new();
    let _proxy = start(&ic);
    let python = workspace_root().join("target/venv/bin/python");
    // Opens 2000 connections as fast as it can, keeping them open, and
    // reports the slowest connect. A full accept backlog shows as a connect
    // that takes over 1 s (the first SYN retransmit).
    let script = r#"
import resource, socket, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
port = int(sys.argv[1])
socks, worst, failed = [], 0.0, 0
start = time.monotonic()
for _ in range(2000):
    t = time.monotonic()
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect(("127.0.0.1", port))
    except OSError:
        failed += 1
    worst = max(worst, time.monotonic() - t)
    socks.append(s)
print(f"{failed} {worst:.3f} {time.monotonic() - start:.3f}")
"#;
    let out = ok_stdout(ic.run("burst", python.to_str().unwrap()).args([
        "-c",
        script,
        &pg::shared().port.to_string(),
    ]));
    let parts: Vec<f64> = out.split_whitespace().map(|p| p.parse().unwrap()).collect();
    assert_eq!(parts[0], 0.0, "failed connects: {out}");
    assert!(
        parts[1] < 1.0,
        "a connect stalled for a SYN retransmit: {out}"
    );
    eprintln!("2000 connects: slowest {} s, all {} s", parts[1], parts[2]);
}

#[test]
fn the_daemon_refuses_to_start_when_the_interception_port_is_taken() {
    if !kernel_tests_possible("the_daemon_refuses_to_start_when_the_interception_port_is_taken") {
        return;
    }
    let ic = Interception::new();
    // Whoever holds the port would receive the redirected connections.
    let _squatter = std::net::TcpListener::bind(("127.0.0.1", ic.port)).unwrap();
    let err = match Proxy::start(
        pg::shared(),
        ProxyOptions {
            client_tls: false,
            intercept: Some(ic.config_section()),
            ..ProxyOptions::default()
        },
    ) {
        Ok(_) => panic!("the daemon started on a taken interception port"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{}", ic.port)),
        "{err}"
    );
    // Nothing was installed: the kernel state is untouched.
    assert!(!ic.pin_dir.exists());
}
