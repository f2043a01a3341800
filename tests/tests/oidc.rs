//! OIDC-bound identity through the real proxy: tokens from a local issuer
//! (keys made here, JWKS served over HTTPS with a test CA) are verified by
//! the daemon, their claims pick the policy groups, and every way a token
//! can be wrong is refused with SQLSTATE 28000 and the exact reason.

use std::path::PathBuf;
use std::process::{Command, Output};

use interceptor_tests::oidc::{SigningKey, TestIssuer};
use interceptor_tests::pg;
use interceptor_tests::proxy::{Proxy, ProxyOptions};
use interceptor_tests::wire::{RawClient, first_error};
use jsonwebtoken::Algorithm;
use serde_json::json;

/// Reads for tokens from acme's main branch; everything else denied.
const POLICY: &str = r#"
version = 1
require_token = true

[[group]]
name = "acme-main"
claims = { repository = ["acme/*"], ref = ["refs/heads/main"] }

[[group]]
name = "admins"
claims = { groups = ["dba"] }

[[rule]]
id = "admins-anything"
groups = ["admins"]
decision = "allow"

[[rule]]
id = "main-reads"
groups = ["acme-main"]
kinds = ["read", "session", "transaction"]
decision = "allow"
"#;

fn policy_file(dir: &std::path::Path) -> PathBuf {
    let p = dir.join("policy.toml");
    std::fs::write(&p, POLICY).unwrap();
    p
}

fn proxy(issuer: &TestIssuer, token_auth: bool) -> Proxy {
    Proxy::start(
        pg::shared(),
        ProxyOptions {
            client_tls: true,
            client_auth: token_auth.then(|| "method = \"oidc\"".to_owned()),
            policy: Some(policy_file(issuer.dir.path())),
            sections: vec![issuer.config_section()],
            ..Default::default()
        },
    )
    .expect("start proxy")
}

fn psql_with_token(proxy: &Proxy, token: &str, sql: &str) -> Output {
    Command::new(pg::psql_path())
        .args(["-X", "-At", "-c", sql])
        .arg(format!(
            "{} sslrootcert={}",
            proxy.conninfo("postgres", "verify-full"),
            proxy.ca_file().display()
        ))
        .env("PGPASSWORD", token)
        .output()
        .expect("run psql")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn tokens_of_every_algorithm_bind_the_session_to_their_claims() {
    let issuer = TestIssuer::start().unwrap();
    let proxy = proxy(&issuer, true);
    for key in [&issuer.rsa, &issuer.ec, &issuer.ed] {
        let token = issuer.token(key, json!({}));
        let out = psql_with_token(&proxy, &token, "SELECT current_setting('application_name')");
        assert!(out.status.success(), "{:?}: {}", key.alg, text(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "interceptor:sub=repo:acme/app:ref:refs/heads/main",
            "{:?}",
            key.alg
        );
    }
    // The JWKS was fetched once and served every later token from cache.
    assert_eq!(issuer.jwks_fetches(), 1);

    // Claims decide the groups: main-branch tokens read but may not write...
    let token = issuer.token(&issuer.ec, json!({}));
    let out = psql_with_token(&proxy, &token, "CREATE TABLE oidc_nope (x int)");
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no policy rule allows this ddl statement"),
        "{}",
        text(&out)
    );
    // ...a branch outside the group is in no group at all...
    let token = issuer.token(&issuer.ec, json!({"ref": "refs/heads/feature"}));
    let out = psql_with_token(&proxy, &token, "SELECT 1");
    assert!(!out.status.success());
    assert!(
        text(&out).contains("may not run any statements"),
        "{}",
        text(&out)
    );
    // ...and an array claim (`groups`) matches on any of its values.
    let token = issuer.token(&issuer.ed, json!({"groups": ["ci", "dba"], "ref": "x"}));
    let out = psql_with_token(
        &proxy,
        &token,
        "CREATE TEMP TABLE oidc_ok (x int); SELECT 'created'",
    );
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn every_bad_token_is_refused_with_its_exact_reason() {
    let issuer = TestIssuer::start().unwrap();
    let proxy = proxy(&issuer, true);
    let expired_at = interceptor_tests::oidc::now() - 3600;
    let stranger = SigningKey::generate(Algorithm::ES256, "ec-1", issuer.dir.path()).unwrap();
    let unpublished = SigningKey::generate(Algorithm::EdDSA, "ed-2", issuer.dir.path()).unwrap();
    let cases: Vec<(&str, String, String)> = vec![
        (
            "expired",
            issuer.token(&issuer.rsa, json!({"exp": expired_at})),
            "the token expired at ".to_owned(),
        ),
        (
            "wrong audience",
            issuer.token(&issuer.ec, json!({"aud": "someone-else"})),
            "the token's audience [\"someone-else\"] is not accepted (allowed: interceptor)"
                .to_owned(),
        ),
        (
            "unknown issuer",
            issuer.token(&issuer.ec, json!({"iss": "https://evil.example"})),
            "the token's issuer \"https://evil.example\" is not a trusted issuer".to_owned(),
        ),
        (
            "bad signature",
            // Signed by a key that claims the published key's id.
            stranger.sign(&issuer.claims()),
            format!(
                "the token's signature does not verify with issuer {}'s key \"ec-1\"",
                issuer.url
            ),
        ),
        (
            "unknown key",
            unpublished.sign(&issuer.claims()),
            format!(
                "the token's signing key \"ed-2\" is not among issuer {}'s keys",
                issuer.url
            ),
        ),
        (
            "not yet valid",
            issuer.token(
                &issuer.rsa,
                json!({"nbf": interceptor_tests::oidc::now() + 3600}),
            ),
            "the token is not valid before ".to_owned(),
        ),
        (
            "not a JWT",
            "hunter2".to_owned(),
            "the token is malformed".to_owned(),
        ),
    ];
    for (name, token, want) in cases {
        let out = psql_with_token(&proxy, &token, "SELECT 1");
        let t = text(&out);
        assert!(!out.status.success(), "{name}: accepted: {t}");
        assert!(
            t.contains("interceptor: OIDC token rejected: "),
            "{name}: {t}"
        );
        assert!(t.contains(&want), "{name}: want {want:?} in {t}");
    }
    // The expiry is given as a time an operator can read.
    let out = psql_with_token(
        &proxy,
        &issuer.token(&issuer.rsa, json!({"exp": 1_700_000_000})),
        "SELECT 1",
    );
    assert!(
        text(&out).contains("expired at 2023-11-14T22:13:20Z"),
        "{}",
        text(&out)
    );

    // A key published after the JWKS was cached is found by one refresh.
    let fetches = issuer.jwks_fetches();
    issuer.publish(&unpublished);
    let out = psql_with_token(&proxy, &unpublished.sign(&issuer.claims()), "SELECT 1");
    assert!(out.status.success(), "after rotation: {}", text(&out));
    assert_eq!(issuer.jwks_fetches(), fetches + 1);
    assert!(
        proxy
            .log()
            .contains("unknown signing key; refreshing the JWKS")
    );
}

#[test]
fn a_policy_that_requires_a_token_refuses_sessions_without_one_with_28000() {
    let issuer = TestIssuer::start().unwrap();
    // Trust client auth: the only token source is the job record, and a
    // listener connection has none.
    let mut proxy = proxy(&issuer, false);
    let mut c = RawClient::connect(proxy.port).unwrap();
    c.send(&interceptor_tests::wire::startup_packet(
        "agent", "postgres",
    ))
    .unwrap();
    let msgs = c.read_to_end().unwrap();
    let (code, msg) = first_error(&msgs).expect("refused");
    assert_eq!(code, "28000");
    assert_eq!(
        msg,
        "interceptor: OIDC token rejected: no OIDC token was presented"
    );
    assert!(proxy.is_running());
}

/// The job's own token, fetched by `interceptor run` from a GitHub
/// Actions-style ID-token endpoint, binds intercepted sessions; jobs
/// without a valid one are refused. Needs root: eBPF and cgroup moves.
#[test]
fn interceptor_run_carries_the_jobs_token_to_intercepted_sessions() {
    use interceptor_tests::intercept::{Interception, kernel_tests_possible};
    if !kernel_tests_possible("interceptor_run_carries_the_jobs_token_to_intercepted_sessions") {
        return;
    }
    let issuer = TestIssuer::start().unwrap();
    let ic = Interception::named("interceptor-oidc");
    let proxy = Proxy::start(
        pg::shared(),
        ProxyOptions {
            client_tls: false,
            intercept: Some(ic.config_section()),
            policy: Some(policy_file(issuer.dir.path())),
            sections: vec![issuer.config_section()],
            ..Default::default()
        },
    )
    .expect("start proxy");
    let psql = |cmd: &mut Command| {
        cmd.arg("-XtAc")
            .arg("SELECT current_setting('application_name')")
            .arg(format!(
                "host=127.0.0.1 port={} dbname=postgres user=agent sslmode=disable connect_timeout=5",
                pg::shared().port
            ))
            .env_remove("PGPASSWORD")
            .output()
            .unwrap()
    };

    let out = psql(
        ic.run_with("gha", &["--token-github", "interceptor"], &pg::psql_path())
            .env("ACTIONS_ID_TOKEN_REQUEST_URL", issuer.gha_request_url())
            .env(
                "ACTIONS_ID_TOKEN_REQUEST_TOKEN",
                interceptor_tests::oidc::GHA_REQUEST_TOKEN,
            )
            .env("SSL_CERT_FILE", &issuer.ca_file),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "interceptor:job=gha"
    );
    assert!(
        proxy
            .log()
            .contains("subject=repo:acme/app:ref:refs/heads/main"),
        "{}",
        proxy.log()
    );

    let out = psql(&mut ic.run("no-token", &pg::psql_path()));
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no OIDC token was presented"),
        "{}",
        text(&out)
    );

    let expired = issuer.dir.path().join("expired.jwt");
    std::fs::write(
        &expired,
        issuer.token(&issuer.rsa, json!({"exp": 1_700_000_000})),
    )
    .unwrap();
    let out = psql(&mut ic.run_with(
        "stale",
        &["--token-file", expired.to_str().unwrap()],
        &pg::psql_path(),
    ));
    assert!(!out.status.success());
    assert!(
        text(&out).contains("expired at 2023-11-14T22:13:20Z"),
        "{}",
        text(&out)
    );
}
