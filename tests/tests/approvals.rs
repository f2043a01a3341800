//! Approval of held statements, end to end: a real PostgreSQL 15, the
//! daemon with `[approvals]`, psql and psycopg 3 as clients, and approvers
//! using `interceptor approvals` against the daemon's HTTPS API.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use interceptor_tests::audit::json_lines_until;
use interceptor_tests::pg::{self, PgCluster};
use interceptor_tests::proxy::{Proxy, ProxyOptions, binary};
use interceptor_tests::{free_port, workspace_root};
use serde_json::Value;

const DB: &str = "approvals";

const POLICY: &str = r#"
version = 1

[[group]]
name = "agents"

[[rule]]
id = "read"
groups = ["agents"]
kinds = ["read", "session", "transaction"]
decision = "allow"

[[rule]]
id = "two-for-deletes"
groups = ["agents"]
commands = ["delete"]
decision = "hold"
reason = "deletes need two reviewers"
approvers = ["dba"]
approvals = 2

[[rule]]
id = "hold-writes"
groups = ["agents"]
kinds = ["write"]
decision = "hold"
reason = "writes need a reviewer"
"#;

struct Approvals {
    proxy: Proxy,
    /// The API and console.
    url: String,
    /// Tokens of alice and carol (group dba) and of the agent's owner,
    /// who is the requester under another name.
    alice: String,
    carol: String,
    owner: String,
}

fn new_token(name: &str, groups: &[&str], identities: &[&str]) -> (String, String) {
    interceptor_tests::approvals::new_token(name, groups, identities).unwrap()
}

fn setup(pg: &PgCluster) {
    let _ = pg.psql_admin("postgres", &format!("CREATE DATABASE {DB}"));
    pg.psql_admin(
        DB,
        "DROP TABLE IF EXISTS approval_t; CREATE TABLE approval_t (id int PRIMARY KEY, v int); \
         INSERT INTO approval_t SELECT g, g FROM generate_series(1, 100) g; \
         GRANT ALL ON approval_t TO PUBLIC",
    )
    .unwrap();
}

fn start(pg: &PgCluster, timeout: &str) -> Approvals {
    start_with(pg, timeout, "")
}

/// `extra` is appended to the `[approvals]` section.
fn start_with(pg: &PgCluster, timeout: &str, extra: &str) -> Approvals {
    setup(pg);
    let dir = tempfile::Builder::new()
        .prefix("interceptor-approvals-")
        .tempdir()
        .unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, POLICY).unwrap();
    let (alice, alice_entry) = new_token("alice", &["dba"], &[]);
    let (carol, carol_entry) = new_token("carol", &["dba"], &[]);
    let (owner, owner_entry) = new_token("owner", &["dba"], &["agent"]);
    let api = free_port();
    let section = format!(
        "[approvals]\nlisten = \"127.0.0.1:{api}\"\ntimeout = \"{timeout}\"\n\n{alice_entry}\n{carol_entry}\n{owner_entry}\n{extra}"
    );
    let opts = ProxyOptions {
        client_tls: false,
        policy: Some(policy),
        sections: vec![section],
        ..Default::default()
    };
    let port = free_port();
    let config_path = dir.path().join("interceptor.toml");
    std::fs::write(
        &config_path,
        Proxy::config_text(pg, &opts, port, &dir.path().join("state")),
    )
    .unwrap();
    let proxy = Proxy::start_with(dir, config_path, port).unwrap();
    Approvals {
        proxy,
        url: format!("https://127.0.0.1:{api}"),
        alice,
        carol,
        owner,
    }
}

impl Approvals {
    fn cli(&self, token: &str, args: &[&str]) -> Output {
        Command::new(binary())
            .arg("approvals")
            .args(args)
            .env("INTERCEPTOR_CONFIG", &self.proxy.config_path)
            .env("INTERCEPTOR_APPROVER_TOKEN", token)
            .output()
            .unwrap()
    }

    fn cli_ok(&self, token: &str, args: &[&str]) -> String {
        let out = self.cli(token, args);
        assert!(
            out.status.success(),
            "approvals {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn request(&self, id: &str) -> Value {
        serde_json::from_str(&self.cli_ok(&self.alice, &["show", id, "--json"])).unwrap()
    }

    /// Waits for a pending request whose statement contains `needle`.
    fn pending(&self, needle: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let list = self.cli_ok(&self.alice, &["list", "--json"]);
            if let Some(r) = list
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|r| r["statement"].as_str().unwrap_or("").contains(needle))
            {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "no pending request for {needle}: {}",
                self.proxy.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn psql(&self, sql: &str) -> Child {
        Command::new(pg::psql_path())
            .args([
                "-X",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-U",
                "agent",
                "-d",
                DB,
            ])
            .arg("-p")
            .arg(self.proxy.port.to_string())
            .arg("-c")
            .arg(sql)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn audit_events(&self) -> Vec<Value> {
        self.audit_events_until(|_| true)
    }

    /// The audit trail once `done` holds of it (or after 10 s): an event
    /// can reach the spool a few ms after the call that caused it returned.
    fn audit_events_until(&self, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let config = self.proxy.config_path.to_str().expect("utf-8 path");
        json_lines_until(
            &["audit", "tail", "--json", "-n", "5000", "--config", config],
            done,
        )
    }

    /// The audit trail's approval events for request `id`, in order.
    fn approval_events(&self, id: &str) -> Vec<String> {
        self.audit_events()
            .iter()
            .filter_map(|e| e.get("Approval"))
            .filter(|a| a["approval"] == id)
            .map(|a| a["event"].as_str().unwrap_or("").to_owned())
            .collect()
    }
}

fn value_of(pg: &PgCluster, id: i32) -> String {
    pg.psql_admin(DB, &format!("SELECT v FROM approval_t WHERE id = {id}"))
        .unwrap()
        .trim()
        .to_owned()
}

fn finish(child: Child) -> (bool, String, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Receives webhook POSTs: answers 500 to the first on each path (so the
/// sender must retry), then 200.
struct HookServer {
    port: u16,
    received: Arc<Mutex<Vec<(String, Value)>>>,
}

impl HookServer {
    fn start() -> HookServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let received: Arc<Mutex<Vec<(String, Value)>>> = Arc::default();
        let seen = received.clone();
        std::thread::spawn(move || {
            let mut failed = std::collections::HashSet::new();
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap_or(0);
                let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
                let mut len = 0;
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; len];
                let _ = reader.read_exact(&mut body);
                let status = if failed.insert(path.clone()) {
                    "500 Internal Server Error"
                } else {
                    seen.lock()
                        .unwrap()
                        .push((path, serde_json::from_slice(&body).unwrap_or(Value::Null)));
                    "200 OK"
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
            }
        });
        HookServer { port, received }
    }

    fn config(&self) -> String {
        format!(
            "[[approvals.webhook]]\nurl = \"http://127.0.0.1:{p}/generic\"\n\n[[approvals.webhook]]\nurl = \"http://127.0.0.1:{p}/slack\"\nformat = \"slack\"\n",
            p = self.port
        )
    }

    /// Waits for a delivery to `path` whose JSON contains `needle`.
    fn wait(&self, path: &str, needle: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some((_, v)) = self
                .received
                .lock()
                .unwrap()
                .iter()
                .find(|(p, v)| p == path && v.to_string().contains(needle))
            {
                return v.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no webhook to {path} with {needle}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn held_update_runs_once_approved_from_the_cli() {
    let pg = PgCluster::start().unwrap();
    let hooks = HookServer::start();
    let a = start_with(&pg, "5m", &hooks.config());
    let psql = a.psql("UPDATE approval_t SET v = 1000 WHERE id = 1");
    let r = a.pending("SET v = 1000");
    let id = r["id"].as_str().unwrap().to_owned();
    assert_eq!(r["state"], "pending");
    assert_eq!(r["target"], "main");
    assert_eq!(r["database"], DB);
    assert_eq!(r["user"], "agent");
    assert_eq!(r["rule"], "hold-writes");
    assert_eq!(r["binding"].as_str().unwrap().len(), 64);
    // Held, not run: the row is unchanged while the client waits.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(value_of(&pg, 1), "1");

    // The planner's estimate, made without running the statement.
    let deadline = Instant::now() + Duration::from_secs(10);
    let shown = loop {
        let shown = a.cli_ok(&a.alice, &["show", &id]);
        if shown.contains("about ") || Instant::now() > deadline {
            break shown;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        shown.contains("about 1 rows to update in approval_t"),
        "{shown}"
    );
    assert!(shown.contains("UPDATE approval_t SET v = 1000"), "{shown}");
    assert_eq!(value_of(&pg, 1), "1");

    // The requester, under another name, cannot approve it.
    let own = a.cli(&a.owner, &["approve", &id]);
    assert!(!own.status.success());
    assert!(
        String::from_utf8_lossy(&own.stderr).contains("their own statement"),
        "{own:?}"
    );
    // A wrong token is refused.
    let bad = a.cli("ia_not-a-token", &["list"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("unknown API token"),
        "{bad:?}"
    );

    let said = a.cli_ok(&a.alice, &["approve", &id, "--reason", "looks right"]);
    assert!(said.contains("approved"), "{said}");
    let (ok, stdout, stderr) = finish(psql);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("UPDATE 1"), "{stdout}");
    assert!(
        stderr.contains(&format!("held for approval {id}")),
        "the client is told: {stderr}"
    );
    assert_eq!(value_of(&pg, 1), "1000");
    let r = a.request(&id);
    assert_eq!(r["state"], "approved");
    assert_eq!(r["decided_by"][0], "alice");
    // Deciding twice is refused.
    let again = a.cli(&a.carol, &["deny", &id, "--reason", "late"]);
    assert!(!again.status.success());

    // Both webhooks were told, after a failed first try each.
    let generic = hooks.wait("/generic", "\"requested\"");
    assert_eq!(generic["request"]["id"], id.as_str());
    assert_eq!(generic["url"], format!("{}/approvals/{id}", a.url));
    let slack = hooks.wait("/slack", &id);
    assert!(
        slack["text"]
            .as_str()
            .unwrap()
            .contains("UPDATE approval_t SET v = 1000"),
        "{slack}"
    );
    hooks.wait("/generic", "\"approved\"");

    // The audit trail: the request, the decision, and the statement row
    // that names the approval.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events = a.approval_events(&id);
        if events.contains(&"requested".to_owned()) && events.contains(&"approved".to_owned()) {
            break;
        }
        assert!(Instant::now() < deadline, "{events:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let approved_row = |l: &[Value]| {
        l.iter()
            .filter_map(|e| e.get("Statement"))
            .find(|s| s["approval"] == id.as_str())
            .cloned()
    };
    let row = approved_row(&a.audit_events_until(|l| approved_row(l).is_some()))
        .expect("a statement row with the approval id");
    assert_eq!(row["decision"], "allow");
    assert_eq!(row["rule"], "hold-writes");
    assert_eq!(row["rows"], 1);
    let api = |l: &[Value]| {
        l.iter()
            .filter_map(|e| e.get("Approval"))
            .filter(|e| e["event"] == "api")
            .count()
    };
    let api_calls = api(&a.audit_events_until(|l| api(l) >= 5));
    assert!(api_calls >= 5, "every API call is audited: {api_calls}");
}

#[test]
fn denial_and_two_person_approval_through_psycopg() {
    let pg = PgCluster::start().unwrap();
    let a = start(&pg, "5m");
    let python = workspace_root().join("target/venv/bin/python");
    let script = workspace_root().join("tests/drivers/approval_check.py");
    let conninfo = a.proxy.conninfo(DB, "disable");
    let spawn = |mode: &str| {
        Command::new(&python)
            .arg(&script)
            .arg(&conninfo)
            .arg(mode)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };

    // Denied: the driver gets 42501 with the reason; nothing changed.
    let client = spawn("deny");
    let r = a.pending("UPDATE approval_t SET v = $1");
    let id = r["id"].as_str().unwrap().to_owned();
    assert_eq!(r["params"], serde_json::json!(["2000", "2"]), "{r}");
    let no_reason = a.cli(&a.alice, &["deny", &id, "--reason", " "]);
    assert!(!no_reason.status.success(), "a denial needs a reason");
    a.cli_ok(
        &a.alice,
        &["deny", &id, "--reason", "not during the freeze"],
    );
    let (ok, stdout, stderr) = finish(client);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("denied OK"), "{stdout}");
    assert_eq!(value_of(&pg, 2), "2");
    assert_eq!(a.request(&id)["state"], "denied");

    // A DELETE needs two approvers from group dba, neither the requester.
    let client = spawn("delete");
    let r = a.pending("DELETE FROM approval_t");
    let id = r["id"].as_str().unwrap().to_owned();
    assert_eq!(r["approvals_needed"], 2);
    let once = a.cli_ok(&a.alice, &["approve", &id]);
    assert!(once.contains("1 of 2"), "{once}");
    assert!(!a.cli(&a.alice, &["approve", &id]).status.success());
    assert!(!a.cli(&a.owner, &["approve", &id]).status.success());
    assert_eq!(value_of(&pg, 3), "3", "one approval of two runs nothing");
    a.cli_ok(&a.carol, &["approve", &id]);
    let (ok, stdout, stderr) = finish(client);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("deleted OK"), "{stdout}");
    assert_eq!(value_of(&pg, 3), "");
    assert_eq!(
        a.request(&id)["decided_by"],
        serde_json::json!(["alice", "carol"])
    );
}

#[test]
fn unanswered_requests_time_out_and_abandoned_ones_are_cancelled() {
    let pg = PgCluster::start().unwrap();
    let a = start(&pg, "2s");
    let started = Instant::now();
    let psql = a.psql("UPDATE approval_t SET v = 3000 WHERE id = 4");
    let r = a.pending("SET v = 3000");
    let id = r["id"].as_str().unwrap().to_owned();
    let (ok, _, stderr) = finish(psql);
    assert!(!ok);
    assert!(
        stderr.contains("42501") || stderr.contains("timed out"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("approval {id} timed out after 2s")),
        "{stderr}"
    );
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert_eq!(value_of(&pg, 4), "4");
    assert_eq!(a.request(&id)["state"], "timed_out");
    // Too late to approve.
    assert!(!a.cli(&a.alice, &["approve", &id]).status.success());

    // A client that goes away cancels its request.
    let mut psql = a.psql("UPDATE approval_t SET v = 4000 WHERE id = 5");
    let r = a.pending("SET v = 4000");
    let id = r["id"].as_str().unwrap().to_owned();
    psql.kill().unwrap();
    let _ = psql.wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.request(&id)["state"] != "cancelled" {
        assert!(Instant::now() < deadline, "{}", a.request(&id));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!a.cli(&a.alice, &["approve", &id]).status.success());
    assert_eq!(value_of(&pg, 5), "5");
}

#[test]
fn pending_requests_survive_a_restart_as_lost_sessions() {
    let pg = PgCluster::start().unwrap();
    let mut a = start(&pg, "5m");
    let psql = a.psql("UPDATE approval_t SET v = 5000 WHERE id = 6");
    let r = a.pending("SET v = 5000");
    let id = r["id"].as_str().unwrap().to_owned();
    a.proxy = a.proxy.restart().unwrap();
    let (ok, _, _) = finish(psql);
    assert!(!ok, "the held session ends with the daemon");
    let r = a.request(&id);
    assert_eq!(r["state"], "session_lost", "{r}");
    assert_eq!(
        r["statement"],
        "UPDATE approval_t SET v = 5000 WHERE id = 6"
    );
    assert!(!a.cli(&a.alice, &["approve", &id]).status.success());
    assert_eq!(value_of(&pg, 6), "6");
    let all = a.cli_ok(&a.alice, &["list", "--all"]);
    assert!(all.contains(&id) && all.contains("session_lost"), "{all}");
}

/// Approvers dana and "unverified" (no API tokens), who sign in to the
/// console through `issuer`.
fn dana_signs_in_through(issuer: &interceptor_tests::oidc::TestIssuer) -> String {
    let secret = issuer.dir.path().join("console-secret");
    format!(
        "[[approvals.approver]]\nname = \"dana\"\ngroups = [\"dba\"]\noidc = [\"dana@example.com\"]\n\n\
         [[approvals.approver]]\nname = \"unverified\"\ngroups = [\"dba\"]\noidc = [\"unverified@example.com\"]\n\n{}",
        issuer.console_section(&secret).unwrap()
    )
}

#[test]
fn the_console_approves_and_denies_in_a_headless_browser() {
    let chromium = std::path::Path::new("/usr/bin/chromium");
    if !chromium.exists() && std::env::var_os("CI").is_none() {
        eprintln!(
            "skipped: Debian's chromium is not installed (cargo xtask setup installs it; CI requires it)"
        );
        return;
    }
    let issuer = interceptor_tests::oidc::TestIssuer::start().unwrap();
    let pg = PgCluster::start().unwrap();
    let a = start_with(&pg, "5m", &dana_signs_in_through(&issuer));
    let approved = a.psql("UPDATE approval_t SET v = 7000 WHERE id = 7");
    let approve_id = a.pending("SET v = 7000")["id"].as_str().unwrap().to_owned();
    let denied = a.psql("UPDATE approval_t SET v = 8000 WHERE id = 8");
    let deny_id = a.pending("SET v = 8000")["id"].as_str().unwrap().to_owned();
    let out = Command::new(workspace_root().join("target/venv/bin/python"))
        .arg(workspace_root().join("tests/drivers/console_check.py"))
        .args([&a.url, &a.alice, &approve_id, &deny_id, "dana@example.com"])
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("console OK"),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, stdout, stderr) = finish(approved);
    assert!(ok && stdout.contains("UPDATE 1"), "{stdout}{stderr}");
    let (ok, _, stderr) = finish(denied);
    assert!(!ok);
    assert!(
        stderr.contains("denied by approver alice: wrong row"),
        "{stderr}"
    );
    assert_eq!(value_of(&pg, 7), "7000");
    assert_eq!(value_of(&pg, 8), "8");
    let r = a.request(&approve_id);
    assert_eq!(r["votes"][0]["reason"], "checked in the console");
    // The console's calls are in the audit trail under the approver.
    let console = |l: &[Value]| {
        l.iter()
            .filter_map(|e| e.get("Approval"))
            .filter(|e| e["event"] == "api" && e["actor"] == "alice")
            .filter(|e| e["reason"].as_str().unwrap_or("").contains("/decide"))
            .count()
    };
    let console_calls = console(&a.audit_events_until(|l| console(l) >= 2));
    assert!(console_calls >= 2, "{console_calls}");
}

#[test]
fn the_console_signs_in_through_an_oidc_provider() {
    use interceptor_tests::approvals::OidcSignIn;
    let issuer = interceptor_tests::oidc::TestIssuer::start().unwrap();
    let pg = PgCluster::start().unwrap();
    let a = start_with(&pg, "5m", &dana_signs_in_through(&issuer));
    let ca = a.proxy.ca_file();
    let sign_in = |email: &str| OidcSignIn::start(&a.url, &ca, &issuer.ca_file, email, false);

    let psql = a.psql("UPDATE approval_t SET v = 9000 WHERE id = 9");
    let id = a.pending("SET v = 9000")["id"].as_str().unwrap().to_owned();

    // Dana has no API token: the provider is her only way in.
    let dana = sign_in("Dana@example.com").unwrap();
    let console = dana.finish().unwrap();
    let list = console.page("/approvals").unwrap();
    assert!(list.contains("signed in as dana"), "{list}");
    assert_eq!(console.pending().unwrap(), vec![id.clone()]);
    console
        .decide(&id, "approve", "signed in with SSO")
        .unwrap();
    let (ok, stdout, stderr) = finish(psql);
    assert!(ok && stdout.contains("UPDATE 1"), "{stdout}{stderr}");
    assert_eq!(value_of(&pg, 9), "9000");
    assert_eq!(a.request(&id)["decided_by"], serde_json::json!(["dana"]));

    // Each way a sign-in can go wrong is refused with its reason.
    let refused = |s: &OidcSignIn, cookie: &str, status: u16, says: &str| {
        let (got, page, login) = s.finish_with(cookie).unwrap();
        assert_eq!(got, status, "{page}");
        assert!(page.contains(says), "{says:?} not in {page}");
        assert!(login.is_none(), "a refused sign-in set a login cookie");
    };
    let s = sign_in("mallory@example.com").unwrap();
    refused(
        &s,
        &s.state_cookie,
        403,
        "mallory@example.com signed in, but is not an approver here",
    );
    let s = sign_in("unverified@example.com").unwrap();
    refused(&s, &s.state_cookie, 403, "is not verified by the provider");
    // A used redirect cannot be replayed.
    refused(
        &dana,
        &dana.state_cookie,
        400,
        "not started from this browser",
    );
    // A redirect carried to another browser (login CSRF) is refused, and
    // spends the state.
    let s = sign_in("dana@example.com").unwrap();
    refused(
        &s,
        "interceptor_sso=someone-elses",
        400,
        "not started from this browser",
    );
    refused(&s, &s.state_cookie, 400, "not started from this browser");
    let s = sign_in("dana@example.com").unwrap();
    issuer.forge_next_nonce("replayed-token");
    refused(&s, &s.state_cookie, 401, "nonce does not match");
    let s = OidcSignIn::start(&a.url, &ca, &issuer.ca_file, "dana@example.com", true).unwrap();
    refused(
        &s,
        &s.state_cookie,
        401,
        "refused the sign-in: access_denied",
    );

    // The sign-ins are in the audit trail: who, and why one was refused.
    let reason = |e: &Value| e["reason"].as_str().unwrap_or("").to_owned();
    let sign_ins = |l: &[Value]| -> Vec<Value> {
        l.iter()
            .filter_map(|e| e.get("Approval").cloned())
            .filter(|e| e["event"] == "api" && reason(e).contains("/login/oidc/callback"))
            .collect()
    };
    let dana = format!("signed in at {} as Dana@example.com", issuer.url);
    let both = |calls: &[Value]| {
        calls
            .iter()
            .any(|e| e["actor"] == "dana" && reason(e).contains(&dana))
            && calls.iter().any(|e| {
                e["actor"] == "anonymous" && reason(e).contains("-> 403: mallory@example.com")
            })
    };
    let calls = sign_ins(&a.audit_events_until(|l| both(&sign_ins(l))));
    assert!(both(&calls), "{calls:?}");
}
