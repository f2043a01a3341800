//! The proxy's own login upstream: every password method PostgreSQL offers
//! it, and TLS in `require` and `verify-full` modes.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use interceptor_tests::pg::PgCluster;
use interceptor_tests::pg_bin;
use interceptor_tests::proxy::{Proxy, ProxyOptions};
use interceptor_tests::wire::{RawClient, first_error};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

/// A cluster with TLS on, and roles that each log in by one method.
struct Fixture {
    pg: PgCluster,
    ca: PathBuf,
    other_ca: PathBuf,
}

fn write(path: &Path, data: &str, mode: u32) {
    std::fs::write(path, data).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn make_ca() -> (CertificateParams, KeyPair, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let pem = params.self_signed(&key).unwrap().pem();
    (params, key, pem)
}

fn fixture() -> Fixture {
    let pg = PgCluster::start().unwrap();
    let data = pg.data_dir();
    let (ca_params, ca_key, ca_pem) = make_ca();
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    write(&data.join("server.crt"), &server.pem(), 0o644);
    write(&data.join("server.key"), &server_key.serialize_pem(), 0o600);
    let uid = nix::unistd::User::from_name("postgres").unwrap().unwrap();
    std::os::unix::fs::chown(
        data.join("server.key"),
        Some(uid.uid.as_raw()),
        Some(uid.gid.as_raw()),
    )
    .unwrap();
    let ca = pg.path().join("ca.pem");
    write(&ca, &ca_pem, 0o644);
    let other_ca = pg.path().join("other-ca.pem");
    write(&other_ca, &make_ca().2, 0o644);

    let hba = data.join("pg_hba.conf");
    let rules = "hostnossl all md5_user 127.0.0.1/32 md5\n\
                 host all clear_user 127.0.0.1/32 password\n\
                 hostssl all tls_user 127.0.0.1/32 scram-sha-256\n\
                 hostnossl all tls_user 127.0.0.1/32 reject\n";
    let old = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(&hba, format!("{rules}{old}")).unwrap();
    pg.psql_admin(
        "postgres",
        "SET password_encryption = 'md5'; CREATE ROLE md5_user LOGIN PASSWORD 'md5-pass';
         RESET password_encryption; CREATE ROLE clear_user LOGIN PASSWORD 'clear-pass';
         CREATE ROLE tls_user LOGIN PASSWORD 'tls-pass';",
    )
    .unwrap();
    pg.psql_admin("postgres", "ALTER SYSTEM SET ssl = on")
        .unwrap();
    pg.psql_admin("postgres", "SELECT pg_reload_conf()")
        .unwrap();
    // The reload is asynchronous; wait until the server reports TLS on.
    for _ in 0..100 {
        if pg.psql_admin("postgres", "SHOW ssl").unwrap().trim() == "on" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Fixture { pg, ca, other_ca }
}

fn password_file(f: &Fixture, name: &str, password: &str) -> PathBuf {
    let p = f.pg.path().join(format!("{name}.pass"));
    std::fs::write(&p, password).unwrap();
    p
}

fn whoami(proxy: &Proxy) -> String {
    let out = Command::new(pg_bin("psql"))
        .args(["-X", "-At", "-d", &proxy.conninfo("postgres", "disable")])
        .args([
            "-c",
            "SELECT current_user || ' ssl=' || ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        ])
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

#[test]
fn md5_cleartext_scram_and_tls_logins() {
    let f = fixture();
    let start = |user: &str, pass: &str, tls: Option<String>| {
        Proxy::start(
            &f.pg,
            ProxyOptions {
                upstream_login: Some((user.to_owned(), password_file(&f, user, pass))),
                upstream_tls: tls,
                ..Default::default()
            },
        )
        .unwrap()
    };
    assert_eq!(
        whoami(&start("md5_user", "md5-pass", None)),
        "md5_user ssl=false"
    );
    assert_eq!(
        whoami(&start("clear_user", "clear-pass", None)),
        "clear_user ssl=false"
    );
    assert_eq!(
        whoami(&start(
            "tls_user",
            "tls-pass",
            Some("mode = \"require\"".into())
        )),
        "tls_user ssl=true"
    );
    let verify = format!("mode = \"verify-full\", ca_file = \"{}\"", f.ca.display());
    assert_eq!(
        whoami(&start("tls_user", "tls-pass", Some(verify))),
        "tls_user ssl=true"
    );

    // A role that must use TLS is rejected without it: the proxy never
    // falls back, and the client learns only that the login was refused.
    let proxy = start("tls_user", "tls-pass", None);
    let (_, msgs) = RawClient::login(proxy.port, "agent", "postgres").unwrap();
    let (code, message) = first_error(&msgs).unwrap();
    assert_eq!(code, "08004");
    assert!(message.contains("refused interceptor's login"), "{message}");
    assert!(
        !message.contains("tls_user"),
        "upstream role names stay in the daemon log: {message}"
    );

    // Wrong password.
    let proxy = start("md5_user", "wrong", None);
    let (_, msgs) = RawClient::login(proxy.port, "agent", "postgres").unwrap();
    assert_eq!(first_error(&msgs).unwrap().0, "08004");
    assert!(
        proxy.log().contains("password authentication failed"),
        "{}",
        proxy.log()
    );
    assert!(
        !proxy.log().contains("wrong"),
        "the password itself is never logged"
    );
}

#[test]
fn verify_full_rejects_a_server_signed_by_another_ca() {
    let f = fixture();
    let proxy = Proxy::start(
        &f.pg,
        ProxyOptions {
            upstream_login: Some(("tls_user".into(), password_file(&f, "tls_user", "tls-pass"))),
            upstream_tls: Some(format!(
                "mode = \"verify-full\", ca_file = \"{}\"",
                f.other_ca.display()
            )),
            ..Default::default()
        },
    )
    .unwrap();
    let (_, msgs) = RawClient::login(proxy.port, "agent", "postgres").unwrap();
    let (code, message) = first_error(&msgs).unwrap();
    assert_eq!(code, "08006");
    assert!(message.contains("TLS handshake"), "{message}");
}
