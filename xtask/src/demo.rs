//! `cargo xtask demo`: the product on embedded defaults, end to end.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use interceptor_tests::clickhouse::ClickHouse;
use interceptor_tests::intercept::Interception;
use interceptor_tests::oidc::{GHA_REQUEST_TOKEN, TestIssuer};
use interceptor_tests::pg::{ADMIN_USER, PgCluster};
use interceptor_tests::pg_bin;
use interceptor_tests::proxy::{Proxy, ProxyOptions};
use interceptor_tests::wire::{RawClient, first_error, frame};

const SAMPLE: &str = "
CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL, email text NOT NULL, plan text NOT NULL);
INSERT INTO customers (name, email, plan) VALUES
  ('Ada Lovelace', 'ada@example.com', 'enterprise'),
  ('Alan Turing', 'alan@example.com', 'team'),
  ('Grace Hopper', 'grace@example.com', 'enterprise'),
  ('Edsger Dijkstra', 'edsger@example.com', 'free');
CREATE TABLE orders (id serial PRIMARY KEY, customer_id int REFERENCES customers, amount numeric(10,2), placed_at timestamptz DEFAULT now());
INSERT INTO orders (customer_id, amount) SELECT 1 + g % 4, (g * 7.31)::numeric(10,2) FROM generate_series(1, 10000) g;
CREATE TABLE secrets (id int PRIMARY KEY, service text, api_key text);
INSERT INTO secrets VALUES (1, 'payments', 'sk_live_51Hd0mOqT9xV2'), (2, 'legacy', 'opensesame');
";

fn step(title: &str) {
    println!("\n\x1b[1m== {title}\x1b[0m");
}

fn psql(conninfo: &str, args: &[&str]) -> Result<String> {
    collect(
        Command::new(pg_bin("psql"))
            .args(["-X", "-d", conninfo])
            .args(args),
    )
}

/// psql as an agent's CI step runs it: unmodified, wrapped in `interceptor run`.
/// `sql` run directly as postgres, unaligned: what is really there.
fn direct(pg: &PgCluster, sql: &str) -> Result<String> {
    psql(
        &format!(
            "host={} port={} user=postgres dbname=app",
            pg.socket_dir.display(),
            pg.port
        ),
        &["-At", "-c", sql],
    )
}

fn agent_cmd(ic: &Interception, conninfo: &str, args: &[&str]) -> Command {
    let mut cmd = ic.run("demo-agent", &pg_bin("psql").to_string_lossy());
    cmd.args(["-X", "-d", conninfo])
        .args(args)
        .env("GITHUB_REPOSITORY", "acme/shop")
        .env("GITHUB_RUN_ID", "1001")
        .env("GITHUB_ACTOR", "ai-agent[bot]")
        .env_remove("PGPASSWORD");
    cmd
}

fn agent(ic: &Interception, conninfo: &str, args: &[&str]) -> Result<String> {
    collect(&mut agent_cmd(ic, conninfo, args))
}

/// One statement as the agent, with errors in psql's terse form.
fn agent_terse(ic: &Interception, conninfo: &str, sql: &str) -> Result<String> {
    agent(ic, conninfo, &["-v", "VERBOSITY=terse", "-c", sql])
}

fn collect(cmd: &mut Command) -> Result<String> {
    let out = cmd.output()?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok(text)
}

/// The daemon's log lines that mention `needle`, indented.
fn print_log_lines(proxy: &Proxy, needle: &str) {
    for line in proxy.log().lines().filter(|l| l.contains(needle)) {
        println!("  {line}");
    }
}

fn wait_for_log(proxy: &Proxy, needle: &str) -> Result<()> {
    wait_for_log_count(proxy, needle, 1)
}

fn wait_for_log_count(proxy: &Proxy, needle: &str, n: usize) -> Result<()> {
    for _ in 0..200 {
        if proxy.log().matches(needle).count() >= n {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    bail!("`{needle}` never appeared in the daemon log")
}

fn show(cmdline: &str, output: &str) {
    println!("$ {cmdline}");
    for line in output.lines() {
        println!("  {line}");
    }
}

pub fn run(keep: bool, with_clickhouse: bool) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the demo loads eBPF programs and moves processes between cgroups: run it as root (sudo -E cargo xtask demo)"
        );
    }
    step("Starting a private PostgreSQL 15 with sample data");
    let pg = PgCluster::start().context("start PostgreSQL")?;
    pg.psql_admin("app", SAMPLE)?;
    println!(
        "PostgreSQL on 127.0.0.1:{} (data in {})",
        pg.port,
        pg.path().display()
    );
    println!(
        "interceptor logs in upstream as `{ADMIN_USER}` with a SCRAM password read from a file the agent never sees."
    );

    step("Starting a local OIDC issuer (stands in for GitHub Actions' token service)");
    let issuer = TestIssuer::start()?;
    println!(
        "issuer {} serves its discovery document and JWKS (RS256, ES256, EdDSA keys) over HTTPS",
        issuer.url
    );

    let clickhouse = if with_clickhouse {
        step("Starting a private ClickHouse (the audit trail's warehouse)");
        let ch = ClickHouse::start().context("start ClickHouse")?;
        println!(
            "ClickHouse {} on 127.0.0.1:{} (HTTP; data in {})",
            ch.query("SELECT version()")?.trim(),
            ch.http_port,
            ch.data_dir().display()
        );
        Some(ch)
    } else {
        None
    };

    step("Starting interceptor with transparent interception");
    let ic = Interception::named("interceptor-demo");
    // A copy of the reference policy, so the demo can edit it live.
    let policy_file = issuer.dir.path().join("agent.toml");
    let reference = std::fs::read_to_string(
        interceptor_tests::workspace_root().join("policies/examples/agent.toml"),
    )?;
    std::fs::write(&policy_file, &reference)?;
    // A reviewer who approves held statements, with an API token.
    let (reviewer, reviewer_entry) =
        interceptor_tests::approvals::new_token("reviewer", &["dba"], &[])?;
    let approvals_port = interceptor_tests::free_port();
    let proxy = Proxy::start(
        &pg,
        ProxyOptions {
            databases: vec!["app".into()],
            intercept: Some(ic.config_section()),
            policy: Some(policy_file.clone()),
            sections: vec![
                match &clickhouse {
                    Some(ch) => format!(
                        "{}\n[audit]\n\n{}",
                        issuer.config_section(),
                        ch.config_section("interceptor")
                    ),
                    None => issuer.config_section(),
                },
                // A second reviewer, dana, signs in to the console through
                // the OIDC issuer rather than with a token.
                format!(
                    "[approvals]\nlisten = \"127.0.0.1:{approvals_port}\"\ntimeout = \"2m\"\n\n{reviewer_entry}\n\
                     [[approvals.approver]]\nname = \"dana\"\ngroups = [\"dba\"]\noidc = [\"dana@example.com\"]\n\n{}",
                    issuer.console_section(&issuer.dir.path().join("console-secret"))?
                ),
            ],
            ..Default::default()
        },
    )?;
    println!("config: {}", proxy.config_path.display());
    println!(
        "{}",
        std::fs::read_to_string(&proxy.config_path)?
            .lines()
            .map(|l| format!("  | {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    print_log_lines(&proxy, "interception installed");

    // What the agent was given: PostgreSQL's own address, no password.
    let db = format!("host=127.0.0.1 port={} dbname=app user=agent", pg.port);
    let wrapped = format!("interceptor run --job demo-agent -- psql \"{db}\"");
    step(
        "An unmodified psql in a CI step, wrapped with `interceptor run`, connects to PostgreSQL's own address",
    );
    show(
        &format!("{wrapped} -c '\\conninfo' -c 'SELECT current_user, client_port ...'"),
        &agent(
            &ic,
            &db,
            &[
                "-c",
                "\\conninfo",
                "-c",
                "SELECT current_user AS upstream_role, client_port AS port_postgres_sees FROM pg_stat_activity WHERE pid = pg_backend_pid()",
            ],
        )?,
    );
    println!(
        "The kernel sent it to interceptor, which logged in with the vaulted credentials. The session record:"
    );
    print_log_lines(&proxy, "session started");

    step(
        "The same psql outside `interceptor run` goes straight to PostgreSQL, which wants a password",
    );
    show(
        &format!("psql \"{db}\" -c 'SELECT 1'"),
        &collect(
            Command::new(pg_bin("psql"))
                .args(["-X", "-w", "-d", &db, "-c", "SELECT 1"])
                .env_remove("PGPASSWORD"),
        )?,
    );

    let tls = db.clone();
    step("Queries, transactions and COPY work as if direct");
    show(
        "top customers by revenue",
        &agent(
            &ic,
            &tls,
            &[
                "-c",
                "SELECT c.name, c.plan, count(*) AS orders, sum(o.amount) AS revenue FROM customers c JOIN orders o ON o.customer_id = c.id GROUP BY 1, 2 ORDER BY revenue DESC",
            ],
        )?,
    );
    show(
        "BEGIN; SELECT 1/0; SELECT 1; ROLLBACK;",
        &agent(
            &ic,
            &tls,
            &[
                "-v",
                "VERBOSITY=terse",
                "-c",
                "BEGIN",
                "-c",
                "SELECT 1/0",
                "-c",
                "SELECT 1",
                "-c",
                "ROLLBACK",
            ],
        )?,
    );
    let copy = agent(
        &ic,
        &tls,
        &["-At", "-c", "COPY (SELECT * FROM orders) TO STDOUT"],
    )?;
    show(
        "COPY orders TO STDOUT | wc -l",
        &format!("{} rows", copy.lines().count()),
    );

    step("Masking: values the agent may read but never sees in clear, on any channel");
    show(
        "emails found by a content detector, in a column no rule names",
        &agent(
            &ic,
            &tls,
            &[
                "-c",
                "SELECT name, email FROM customers ORDER BY id LIMIT 2",
            ],
        )?,
    );
    show(
        "secrets.api_key by its column rule, followed through an expression and base64 ('opensesame' matches no detector)",
        &agent(
            &ic,
            &tls,
            &[
                "-c",
                "SELECT service, api_key, upper(api_key) AS shouted, encode(convert_to(api_key, 'UTF8'), 'base64') AS b64 FROM secrets ORDER BY id",
            ],
        )?,
    );
    show(
        "through the agent's own temporary view, which only its session can see; a count says how many, not what, and comes back as it is",
        &agent(
            &ic,
            &tls,
            &[
                "-c",
                "CREATE TEMP VIEW keys AS SELECT service, api_key FROM secrets",
                "-c",
                "SELECT service, reverse(api_key) AS backwards, count(api_key) OVER () AS keys FROM keys ORDER BY service",
            ],
        )?,
    );
    show(
        "COPY secrets TO STDOUT WITH (FORMAT csv, HEADER)",
        &agent(
            &ic,
            &tls,
            &["-c", "COPY secrets TO STDOUT WITH (FORMAT csv, HEADER)"],
        )?,
    );
    show(
        "an error that would quote the value: SELECT api_key::int FROM secrets",
        &agent_terse(&ic, &tls, "SELECT api_key::int FROM secrets WHERE id = 2")?,
    );
    show(
        "laundering refused: CREATE TEMP TABLE stash AS SELECT service, api_key FROM secrets",
        &agent_terse(
            &ic,
            &tls,
            "CREATE TEMP TABLE stash AS SELECT service, api_key FROM secrets",
        )?,
    );
    let real = direct(&pg, "SELECT api_key FROM secrets WHERE id = 2")?;
    println!(
        "the value itself, read directly as postgres: {}",
        real.trim()
    );

    step(
        "Every statement is decided by PostgreSQL's own grammar under policies/examples/agent.toml",
    );
    show(
        "allowed (rule `read`): SELECT ... with the identity PostgreSQL sees in application_name",
        &agent(
            &ic,
            &tls,
            &[
                "-c",
                "SELECT count(*) AS customers, current_setting('application_name') AS principal FROM customers",
            ],
        )?,
    );
    show(
        "denied (rule `no-schema-changes`), with a hint the agent can act on: DROP/**/TABLE customers",
        &agent(&ic, &tls, &["-c", "DROP/**/TABLE customers"])?,
    );
    show(
        "denied: the whole batch, when one statement hides a DELETE in a writable CTE",
        &agent(
            &ic,
            &tls,
            &[
                "-c",
                "SELECT 1; WITH d AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM d",
            ],
        )?,
    );
    show(
        "denied: opaque code (DO block) and role changes by set_config",
        &agent(
            &ic,
            &tls,
            &[
                "-c",
                "DO $$ BEGIN EXECUTE 'DROP TABLE orders'; END $$",
                "-c",
                "SELECT set_config('role', 'postgres', false)",
            ],
        )?,
    );
    show(
        "denied: calls hidden where libpg_query's summary does not look (a cursor's query, EXECUTE's arguments)",
        &agent(
            &ic,
            &tls,
            &[
                "-c",
                "DECLARE c CURSOR WITH HOLD FOR SELECT pg_read_file('/etc/passwd')",
                "-c",
                "PREPARE p(text) AS SELECT $1; EXECUTE p(pg_read_file('/etc/passwd'))",
            ],
        )?,
    );
    show(
        "refused by the server: a temporary orders, rolled back, no longer shadows the real one (sent as DROP TABLE pg_temp.orders)",
        &agent(
            &ic,
            &tls,
            &[
                "-c",
                "BEGIN",
                "-c",
                "CREATE TEMP TABLE orders (id int)",
                "-c",
                "ROLLBACK",
                "-c",
                "DROP TABLE orders",
            ],
        )?,
    );
    let explain = collect(Command::new(interceptor_tests::proxy::binary()).args([
        "policy",
        "explain",
        "--policy",
        &interceptor_tests::workspace_root()
            .join("policies/examples/agent.toml")
            .to_string_lossy(),
        "--identity",
        "job=demo-agent,uid=1000",
        "--sql",
        "CREATE TEMP TABLE scratch AS SELECT * FROM orders; DROP TABLE scratch; TRUNCATE orders",
    ]))?;
    show(
        "interceptor policy explain --identity job=demo-agent --sql 'CREATE TEMP TABLE ...; DROP TABLE scratch; TRUNCATE orders'",
        &explain,
    );
    let left = direct(&pg, "SELECT count(*) FROM orders")?;
    println!(
        "orders still in the table (checked directly as postgres): {}",
        left.trim()
    );

    step("A token-bound identity: the job's OIDC token, verified, decides its groups");
    // psql in job `release`, with the job's token from the runner endpoint.
    let token_cmd = |sql: &str| -> Command {
        let mut cmd = ic.run_with(
            "release",
            &["--token-github", interceptor_tests::oidc::AUDIENCE],
            &pg_bin("psql").to_string_lossy(),
        );
        cmd.args(["-X", "-v", "VERBOSITY=terse", "-d", &db, "-c", sql])
            .env_remove("PGPASSWORD")
            .env("ACTIONS_ID_TOKEN_REQUEST_URL", issuer.gha_request_url())
            .env("ACTIONS_ID_TOKEN_REQUEST_TOKEN", GHA_REQUEST_TOKEN)
            .env("SSL_CERT_FILE", &issuer.ca_file);
        cmd
    };
    let token_run = |sql: &str| -> Result<String> { collect(&mut token_cmd(sql)) };
    let token_wrapped = "interceptor run --job release --token-github interceptor -- psql";
    show(
        &format!("{token_wrapped} -c 'SELECT current_setting(''application_name'')'"),
        &token_run("SELECT current_setting('application_name') AS principal")?,
    );
    print_log_lines(&proxy, "OIDC token verified");
    println!(
        "The token's claims (repository acme/app, ref main) put it in group release-jobs, whose writes are held for approval."
    );
    show(
        "the same UPDATE from a job without a token is denied outright (rule no-writes)",
        &agent_terse(&ic, &tls, "UPDATE orders SET amount = 0 WHERE id = 1")?,
    );
    std::fs::write(
        &policy_file,
        reference.replace("version = 1\n", "version = 1\nrequire_token = true\n"),
    )?;
    wait_for_log(&proxy, "statement policy reloaded")?;
    println!("edited the policy file: `require_token = true` (reloaded on change, no restart)");
    show(
        &format!("{wrapped} -c 'SELECT 1'    # no token"),
        &agent(&ic, &tls, &["-c", "SELECT 1"])?,
    );
    let expired = issuer.dir.path().join("expired.jwt");
    std::fs::write(
        &expired,
        issuer.token(
            &issuer.ec,
            serde_json::json!({"exp": interceptor_tests::oidc::now() - 60}),
        ),
    )?;
    let mut cmd = ic.run_with(
        "stale",
        &["--token-file", &expired.to_string_lossy()],
        &pg_bin("psql").to_string_lossy(),
    );
    cmd.args(["-X", "-d", &db, "-c", "SELECT 1"])
        .env_remove("PGPASSWORD");
    show(
        "interceptor run --token-file expired.jwt -- psql -c 'SELECT 1'",
        &collect(&mut cmd)?,
    );
    show(
        &format!("{token_wrapped} -c 'SELECT count(*) FROM orders'    # valid token"),
        &token_run("SELECT count(*) FROM orders")?,
    );
    std::fs::write(&policy_file, &reference)?;
    wait_for_log_count(&proxy, "statement policy reloaded", 2)?;

    step("Just-in-time approval: a held UPDATE waits, connection open, while a reviewer decides");
    let held = |sql: &str| -> Result<std::process::Child> {
        Ok(token_cmd(sql)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?)
    };
    let approvals = |args: &[&str]| -> Result<String> {
        let out = Command::new(interceptor_tests::proxy::binary())
            .arg("approvals")
            .args(args)
            .env("INTERCEPTOR_CONFIG", &proxy.config_path)
            .env("INTERCEPTOR_APPROVER_TOKEN", &reviewer)
            .output()?;
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    };
    // The id of the pending request whose statement contains `needle`.
    let pending = |needle: &str| -> Result<String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let found = approvals(&["list", "--json"])?
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|r| r["statement"].as_str().is_some_and(|s| s.contains(needle)))
                .and_then(|r| r["id"].as_str().map(str::to_owned));
            match found {
                Some(id) => return Ok(id),
                None if std::time::Instant::now() > deadline => {
                    bail!("no approval request for {needle}")
                }
                None => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    };
    let finished = |child: std::process::Child| -> Result<String> {
        let out = child.wait_with_output()?;
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        ))
    };
    let sql = "UPDATE orders SET amount = 0 WHERE id = 1";
    println!("$ {token_wrapped} -c '{sql}' &    # waits");
    let child = held(sql)?;
    let id = pending("id = 1")?;
    show("interceptor approvals list", &approvals(&["list"])?);
    // The planner's estimate arrives just after the request.
    std::thread::sleep(Duration::from_millis(500));
    show(
        &format!("interceptor approvals show {id}"),
        &approvals(&["show", &id])?,
    );
    show(
        &format!("interceptor approvals approve {id} --reason 'one order, checked'"),
        &approvals(&["approve", &id, "--reason", "one order, checked"])?,
    );
    show("the waiting psql then prints", &finished(child)?);

    let sql = "UPDATE orders SET amount = 1 WHERE id = 2";
    println!("$ {token_wrapped} -c '{sql}' &    # waits");
    let child = held(sql)?;
    let id = pending("id = 2")?;
    let console_url = format!("https://127.0.0.1:{approvals_port}");
    let sign_in = interceptor_tests::approvals::OidcSignIn::start(
        &console_url,
        &proxy.ca_file(),
        &issuer.ca_file,
        "dana@example.com",
        false,
    )?;
    let console = sign_in.finish()?;
    console.decide(&id, "approve", "approved in the console")?;
    println!(
        "dana opens {console_url}/login, presses \"Sign in with the test issuer\", signs in at {} as dana@example.com \
(code flow with PKCE; the ID token's signature, audience and nonce checked), and presses Approve on {id} (CSRF-checked form)",
        issuer.url
    );
    show("the waiting psql then prints", &finished(child)?);

    let sql = "UPDATE orders SET amount = 2 WHERE id = 3";
    println!("$ {token_wrapped} -c '{sql}' &    # waits");
    let child = held(sql)?;
    let id = pending("id = 3")?;
    show(
        &format!("interceptor approvals deny {id} --reason 'not during the freeze'"),
        &approvals(&["deny", &id, "--reason", "not during the freeze"])?,
    );
    show("the waiting psql then prints", &finished(child)?);
    show(
        "orders 1-3 now (checked directly as postgres)",
        &direct(
            &pg,
            "SELECT id, amount FROM orders WHERE id <= 3 ORDER BY id",
        )?,
    );

    step("Per-identity limits: no statement hands an agent more than 100 000 rows");
    let out = agent(
        &ic,
        &tls,
        &[
            "-At",
            "-v",
            "VERBOSITY=terse",
            "-c",
            "SELECT g FROM generate_series(1, 250000) g",
        ],
    )?;
    let error = out.lines().find(|l| l.contains("ERROR")).unwrap_or("");
    show(
        &format!("{wrapped} -c 'SELECT g FROM generate_series(1, 250000) g'"),
        &format!(
            "{error}\n(interceptor forwarded the first 100000 rows and withheld the rest; psql drops a failed result's rows)"
        ),
    );

    step("Cancel reaches the right backend through interceptor's own cancel keys");
    let child = agent_cmd(
        &ic,
        &tls,
        &["-v", "VERBOSITY=terse", "-c", "SELECT pg_sleep(30)"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()?;
    std::thread::sleep(Duration::from_millis(900));
    // ^C goes to the whole foreground job; `interceptor run` forwards it.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )?;
    let out = child.wait_with_output()?;
    show(
        "SELECT pg_sleep(30)   # then ^C",
        &String::from_utf8_lossy(&out.stderr),
    );

    step("Fail closed: with interceptor killed, tagged connections are refused, never direct");
    let mut proxy = proxy;
    proxy.signal(nix::sys::signal::Signal::SIGKILL);
    proxy.wait_exit(Duration::from_secs(5));
    show(
        &format!("kill -9 <daemon>; {wrapped} -c 'SELECT 1'"),
        &agent(&ic, &db, &["-c", "SELECT 1"])?,
    );
    let dir = tempfile::Builder::new()
        .prefix("interceptor-proxy-")
        .tempdir()?;
    let config = dir.path().join("interceptor.toml");
    std::fs::copy(&proxy.config_path, &config)?;
    let proxy = Proxy::start_with(dir, config, proxy.port)?;
    show(
        &format!(
            "interceptor daemon (restarted; reuses the pinned programs); {wrapped} -c 'SELECT ...'"
        ),
        &agent(&ic, &db, &["-At", "-c", "SELECT 'intercepted again'"])?,
    );

    step("Bad input gets a precise error and never takes the daemon down");
    let (mut c, _) = RawClient::login(proxy.port, "agent", "app")?;
    c.send(&frame(b'Q', b"SELECT 1"))?; // no NUL terminator
    let msgs = c.read_to_end()?;
    if let Some((code, msg)) = first_error(&msgs) {
        show(
            "Query message without its NUL terminator",
            &format!("ERROR {code}: {msg}"),
        );
    }
    show(
        "connect to a database the target does not allow",
        &psql(&proxy.conninfo("postgres", "disable"), &["-c", "select 1"])?,
    );
    show(
        "and the next client is served normally",
        &agent(&ic, &tls, &["-At", "-c", "SELECT 'still serving'"])?,
    );

    step(if clickhouse.is_some() {
        "The audit trail: spooled durably on local disk, then shipped to ClickHouse"
    } else {
        "The audit trail: every session and statement, spooled durably on local disk"
    });
    let cli = |args: &[&str]| -> Result<String> {
        let out = Command::new(interceptor_tests::proxy::binary())
            .args(args)
            .arg("--config")
            .arg(&proxy.config_path)
            .output()?;
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    };
    // The writer collects queued events every millisecond: give it a moment.
    std::thread::sleep(Duration::from_millis(200));
    let tail = cli(&["audit", "tail", "-n", "14"])?;
    show("interceptor audit tail -n 14", &tail);
    let last_session = cli(&["audit", "tail", "--json", "-n", "100000"])?
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|e| {
            e.get("Statement")?
                .get("session")?
                .as_str()
                .map(str::to_owned)
        })
        .next_back();
    if let Some(ch) = &clickhouse {
        // Shipped every 200 ms here (flush_interval); wait for the rows.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while ch
            .count("SELECT count() FROM interceptor.statements")
            .unwrap_or(0)
            == 0
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    if let Some(session) = &last_session {
        show(
            &format!("interceptor audit verify {session}"),
            &cli(&["audit", "verify", session])?,
        );
        show(
            &format!("interceptor replay {session}"),
            &cli(&["replay", session])?,
        );
    }
    let decisions: Vec<String> = cli(&["audit", "tail", "-n", "100000"])?
        .lines()
        .filter(|l| l.contains(" approval ") && !l.contains(" api by "))
        .map(str::to_owned)
        .collect();
    show(
        "interceptor audit tail | grep approval    (every request and decision; API calls are rows too)",
        &decisions.join("\n"),
    );
    show(
        "interceptor audit query --decision deny --limit 5",
        &cli(&["audit", "query", "--decision", "deny", "--limit", "5"])?,
    );
    if clickhouse.is_some() {
        let sql = "SELECT principal, decision, count() AS statements, sum(rows) AS rows_read \
                   FROM interceptor.statements WHERE ts > now() - 3600 \
                   GROUP BY principal, decision ORDER BY principal, decision";
        show(
            &format!(
                "interceptor audit query --sql \"{sql}\"   (an analyst's question: who did what in the last hour)"
            ),
            &cli(&["audit", "query", "--sql", sql])?,
        );
        let sql = "SELECT rule, column, detector, sum(count) AS values_masked \
                   FROM interceptor.masks GROUP BY rule, column, detector ORDER BY values_masked DESC";
        show(
            &format!(
                "interceptor audit query --sql \"{sql}\"   (what masking hid, never the values)"
            ),
            &cli(&["audit", "query", "--sql", sql])?,
        );
    }

    step("What interceptor logged");
    for line in proxy
        .log()
        .lines()
        .filter(|l| l.contains("session"))
        .take(12)
    {
        println!("  {line}");
    }

    if keep {
        step("Running until Ctrl-C");
        println!(
            "Try: {} run --cgroup {} --pin-dir {} --runtime-dir {} -- psql \"{db}\"",
            interceptor_tests::proxy::binary().display(),
            ic.cgroup,
            ic.pin_dir.display(),
            ic.runtime_dir.path().display()
        );
        let mut signals = nix::sys::signal::SigSet::empty();
        signals.add(nix::sys::signal::Signal::SIGINT);
        signals.thread_block()?;
        signals.wait()?;
    }
    println!(
        "\nDone. Everything ran under {}, and is removed now.",
        pg.path().display()
    );
    Ok(())
}
