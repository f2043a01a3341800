//! A local OIDC issuer for tests and the demo: RSA, P-256 and Ed25519
//! signing keys, a private CA, and the discovery document, the JWKS, a
//! GitHub Actions-style ID-token endpoint, and an authorization server
//! for the console's sign-in (a form to pick the user, the code flow with
//! PKCE checked, ID tokens with the nonce) served over HTTPS on loopback.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use axum::extract::Form;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::run_ok;

/// The audience tokens are minted for, and the daemon accepts.
pub const AUDIENCE: &str = "interceptor";
/// The bearer the ID-token endpoint wants (ACTIONS_ID_TOKEN_REQUEST_TOKEN).
pub const GHA_REQUEST_TOKEN: &str = "gha-request-token-for-tests";
/// The console's client at the authorization server.
pub const CONSOLE_CLIENT_ID: &str = "interceptor-console";
pub const CONSOLE_CLIENT_SECRET: &str = "console-secret-for-tests";

/// One signing key, with its public half as a JWK.
#[derive(Clone)]
pub struct SigningKey {
    pub kid: String,
    pub alg: Algorithm,
    encoding: EncodingKey,
    pub jwk: Value,
}

impl SigningKey {
    /// A fresh key for `alg` (RS256, ES256 or EdDSA).
    pub fn generate(alg: Algorithm, kid: &str, dir: &std::path::Path) -> Result<SigningKey> {
        let (encoding, jwk) = match alg {
            Algorithm::RS256 => {
                // ring cannot generate RSA keys; openssl is on every machine
                // that has PostgreSQL.
                let pem = dir.join(format!("{kid}.pem"));
                run_ok(
                    Command::new("openssl")
                        .args([
                            "genpkey",
                            "-algorithm",
                            "RSA",
                            "-pkeyopt",
                            "rsa_keygen_bits:2048",
                            "-out",
                        ])
                        .arg(&pem),
                )?;
                let modulus = run_ok(
                    Command::new("openssl")
                        .args(["rsa", "-noout", "-modulus", "-in"])
                        .arg(&pem),
                )?;
                let hex = modulus.trim().trim_start_matches("Modulus=");
                let n: Vec<u8> = (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
                    .collect::<Result<_, _>>()
                    .context("openssl modulus")?;
                let key = EncodingKey::from_rsa_pem(&std::fs::read(&pem)?)?;
                (
                    key,
                    json!({"kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid, "n": URL_SAFE_NO_PAD.encode(n), "e": "AQAB"}),
                )
            }
            Algorithm::ES256 => {
                let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
                let raw = pair.public_key_raw();
                let key = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes())?;
                (
                    key,
                    json!({"kty": "EC", "use": "sig", "alg": "ES256", "kid": kid, "crv": "P-256",
                           "x": URL_SAFE_NO_PAD.encode(&raw[1..33]), "y": URL_SAFE_NO_PAD.encode(&raw[33..65])}),
                )
            }
            Algorithm::EdDSA => {
                let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
                let key = EncodingKey::from_ed_pem(pair.serialize_pem().as_bytes())?;
                (
                    key,
                    json!({"kty": "OKP", "use": "sig", "alg": "EdDSA", "kid": kid, "crv": "Ed25519",
                           "x": URL_SAFE_NO_PAD.encode(pair.public_key_raw())}),
                )
            }
            other => anyhow::bail!("the test issuer has no {other:?} keys"),
        };
        Ok(SigningKey {
            kid: kid.to_owned(),
            alg,
            encoding,
            jwk,
        })
    }

    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("sign a test token")
    }
}

struct Shared {
    issuer: String,
    /// The keys published in the JWKS.
    published: Mutex<Vec<Value>>,
    jwks_fetches: AtomicUsize,
    /// The key the ID-token endpoint signs with.
    gha_key: SigningKey,
    /// Authorization codes not yet exchanged.
    codes: Mutex<HashMap<String, Grant>>,
    /// The nonce the next ID token carries instead of the sign-in's.
    forged_nonce: Mutex<Option<String>>,
}

/// What an authorization code stands for.
struct Grant {
    redirect_uri: String,
    nonce: String,
    challenge: String,
    email: String,
}

pub struct TestIssuer {
    /// The issuer URL (`iss`), `https://127.0.0.1:PORT`.
    pub url: String,
    /// PEM CA that signed the server certificate.
    pub ca_file: PathBuf,
    pub rsa: SigningKey,
    pub ec: SigningKey,
    pub ed: SigningKey,
    shared: Arc<Shared>,
    pub dir: tempfile::TempDir,
    _rt: tokio::runtime::Runtime,
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn discovery(State(s): State<Arc<Shared>>) -> Json<Value> {
    Json(json!({
        "issuer": s.issuer,
        "jwks_uri": format!("{}/jwks", s.issuer),
        "authorization_endpoint": format!("{}/authorize", s.issuer),
        "token_endpoint": format!("{}/token", s.issuer),
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
    }))
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The sign-in page: the test types who signs in, as a person would.
async fn authorize_form(Query(q): Query<HashMap<String, String>>) -> Response {
    let get = |k: &str| q.get(k).map(String::as_str).unwrap_or_default();
    let bad = |why: &str| (StatusCode::BAD_REQUEST, why.to_owned()).into_response();
    if get("response_type") != "code" {
        return bad("response_type must be code");
    }
    if get("client_id") != CONSOLE_CLIENT_ID {
        return bad("unknown client_id");
    }
    if get("code_challenge_method") != "S256" || get("code_challenge").is_empty() {
        return bad("PKCE with S256 is required");
    }
    if !get("scope").split(' ').any(|s| s == "openid") || get("nonce").is_empty() {
        return bad("scope openid and a nonce are required");
    }
    let hidden: String = ["redirect_uri", "state", "nonce", "code_challenge"]
        .iter()
        .map(|k| {
            format!(
                "<input type=\"hidden\" name=\"{k}\" value=\"{}\">",
                html_escape(get(k))
            )
        })
        .collect();
    Html(format!(
        "<!doctype html><title>test issuer</title><form method=\"post\" action=\"/authorize\">{hidden}\
<label>E-mail <input name=\"email\" id=\"email\"></label>\
<button type=\"submit\" id=\"idp-signin\">Sign in</button>\
<button type=\"submit\" name=\"deny\" value=\"1\" id=\"idp-deny\">Cancel</button></form>"
    ))
    .into_response()
}

#[derive(serde::Deserialize)]
struct AuthorizeForm {
    redirect_uri: String,
    state: String,
    nonce: String,
    code_challenge: String,
    email: String,
    deny: Option<String>,
}

fn with_query(base: &str, params: &[(&str, &str)]) -> String {
    let mut url = reqwest::Url::parse(base).expect("redirect_uri is a URL");
    url.query_pairs_mut().extend_pairs(params);
    url.to_string()
}

async fn authorize(State(s): State<Arc<Shared>>, Form(f): Form<AuthorizeForm>) -> Redirect {
    if f.deny.is_some() {
        return Redirect::to(&with_query(
            &f.redirect_uri,
            &[
                ("error", "access_denied"),
                ("error_description", "the user cancelled"),
                ("state", &f.state),
            ],
        ));
    }
    let code = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 24]>());
    s.codes.lock().expect("codes").insert(
        code.clone(),
        Grant {
            redirect_uri: f.redirect_uri.clone(),
            nonce: f.nonce,
            challenge: f.code_challenge,
            email: f.email,
        },
    );
    Redirect::to(&with_query(
        &f.redirect_uri,
        &[("code", &code), ("state", &f.state)],
    ))
}

#[derive(serde::Deserialize)]
struct TokenForm {
    grant_type: String,
    code: String,
    redirect_uri: String,
    code_verifier: String,
}

/// The code exchange, checked as RFC 6749 and 7636 say: the client's
/// credentials, one use per code, the same redirect URI, and the PKCE
/// verifier that hashes to the challenge.
async fn token(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Form(f): Form<TokenForm>,
) -> Response {
    let refuse = |error: &str, why: &str| {
        (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": error, "error_description": why})),
        )
            .into_response()
    };
    let basic = base64::engine::general_purpose::STANDARD
        .encode(format!("{CONSOLE_CLIENT_ID}:{CONSOLE_CLIENT_SECRET}"));
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if auth != format!("Basic {basic}") {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "invalid_client", "error_description": "bad client credentials"})),
        )
            .into_response();
    }
    if f.grant_type != "authorization_code" {
        return refuse("unsupported_grant_type", "only authorization_code");
    }
    let Some(grant) = s.codes.lock().expect("codes").remove(&f.code) else {
        return refuse("invalid_grant", "unknown or already used code");
    };
    if grant.redirect_uri != f.redirect_uri {
        return refuse(
            "invalid_grant",
            "redirect_uri differs from the authorization's",
        );
    }
    use sha2::Digest;
    if URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(f.code_verifier.as_bytes())) != grant.challenge {
        return refuse(
            "invalid_grant",
            "PKCE verifier does not match the challenge",
        );
    }
    let nonce = s
        .forged_nonce
        .lock()
        .expect("nonce")
        .take()
        .unwrap_or(grant.nonce);
    let now = now();
    let claims = json!({
        "iss": s.issuer,
        "aud": CONSOLE_CLIENT_ID,
        "azp": CONSOLE_CLIENT_ID,
        "sub": format!("user:{}", grant.email),
        "email": grant.email,
        "email_verified": !grant.email.starts_with("unverified"),
        "nonce": nonce,
        "iat": now,
        "exp": now + 300,
    });
    Json(json!({
        "access_token": URL_SAFE_NO_PAD.encode(rand::random::<[u8; 24]>()),
        "token_type": "Bearer",
        "expires_in": 300,
        "id_token": s.gha_key.sign(&claims),
    }))
    .into_response()
}

async fn jwks(State(s): State<Arc<Shared>>) -> Json<Value> {
    s.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    Json(json!({"keys": *s.published.lock().expect("keys")}))
}

/// Like the Actions runtime's endpoint: `?audience=` and a bearer token.
async fn gha_token(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Result<Json<Value>, StatusCode> {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !auth.eq_ignore_ascii_case(&format!("bearer {GHA_REQUEST_TOKEN}")) {
        return Err(StatusCode::UNAUTHORIZED);
    }
    let aud = q
        .get("audience")
        .cloned()
        .unwrap_or_else(|| "https://github.com/acme".into());
    let claims = github_claims(&s.issuer, &aud, "acme/app", "refs/heads/main");
    Ok(Json(json!({"value": s.gha_key.sign(&claims), "count": 1})))
}

/// The claims GitHub Actions puts in a job's ID token.
pub fn github_claims(issuer: &str, aud: &str, repository: &str, git_ref: &str) -> Value {
    let now = now();
    json!({
        "iss": issuer,
        "aud": aud,
        "sub": format!("repo:{repository}:ref:{git_ref}"),
        "repository": repository,
        "repository_owner": repository.split('/').next().unwrap_or_default(),
        "workflow": "ci",
        "ref": git_ref,
        "actor": "octocat",
        "run_id": "4242",
        "groups": ["agents", "ci"],
        "iat": now,
        "nbf": now - 5,
        "exp": now + 600,
    })
}

impl TestIssuer {
    pub fn start() -> Result<TestIssuer> {
        let dir = tempfile::Builder::new()
            .prefix("interceptor-oidc-")
            .tempdir()?;
        let rsa = SigningKey::generate(Algorithm::RS256, "rsa-1", dir.path())?;
        let ec = SigningKey::generate(Algorithm::ES256, "ec-1", dir.path())?;
        let ed = SigningKey::generate(Algorithm::EdDSA, "ed-1", dir.path())?;

        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "interceptor test issuer CA");
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let ca = rcgen::Issuer::new(ca_params, ca_key);
        let server_key = rcgen::KeyPair::generate()?;
        let server_cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])?
            .signed_by(&server_key, &ca)?;
        let ca_file = dir.path().join("issuer-ca.pem");
        std::fs::write(&ca_file, ca_cert.pem())?;

        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![server_cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into()),
        )?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let addr: SocketAddr = listener.local_addr()?;
        let url = format!("https://127.0.0.1:{}", addr.port());
        let shared = Arc::new(Shared {
            issuer: url.clone(),
            published: Mutex::new(vec![rsa.jwk.clone(), ec.jwk.clone(), ed.jwk.clone()]),
            jwks_fetches: AtomicUsize::new(0),
            gha_key: rsa.clone(),
            codes: Mutex::new(HashMap::new()),
            forged_nonce: Mutex::new(None),
        });
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(jwks))
            .route("/gha/token", get(gha_token))
            .route("/authorize", get(authorize_form).post(authorize))
            .route("/token", axum::routing::post(token))
            .with_state(shared.clone());
        rt.spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let app = app.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper_util::service::TowerToHyperService::new(app);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Ok(TestIssuer {
            url,
            ca_file,
            rsa,
            ec,
            ed,
            shared,
            dir,
            _rt: rt,
        })
    }

    /// Claims of a valid GitHub Actions job token for this issuer.
    pub fn claims(&self) -> Value {
        github_claims(&self.url, AUDIENCE, "acme/app", "refs/heads/main")
    }

    /// A valid token signed with `key`, with `changes` merged into the claims.
    pub fn token(&self, key: &SigningKey, changes: Value) -> String {
        let mut claims = self.claims();
        if let (Some(c), Value::Object(m)) = (claims.as_object_mut(), changes) {
            c.extend(m);
        }
        key.sign(&claims)
    }

    /// Publishes another key in the JWKS (a rotation).
    pub fn publish(&self, key: &SigningKey) {
        self.shared
            .published
            .lock()
            .expect("keys")
            .push(key.jwk.clone());
    }

    /// How many times the JWKS was fetched.
    pub fn jwks_fetches(&self) -> usize {
        self.shared.jwks_fetches.load(Ordering::SeqCst)
    }

    /// The `[oidc]` section of a daemon config trusting this issuer.
    pub fn config_section(&self) -> String {
        format!(
            "[oidc]\nleeway = \"5s\"\nmin_refresh = \"0s\"\n\n[[oidc.issuer]]\nissuer = \"{}\"\naudiences = [\"{AUDIENCE}\"]\nca_file = \"{}\"\n",
            self.url,
            self.ca_file.display()
        )
    }

    /// The `[approvals.oidc]` section of a daemon config whose console
    /// signs in here, with the client secret in `secret_file`.
    pub fn console_section(&self, secret_file: &std::path::Path) -> Result<String> {
        std::fs::write(secret_file, format!("{CONSOLE_CLIENT_SECRET}\n"))?;
        Ok(format!(
            "[approvals.oidc]\nissuer = \"{}\"\nclient_id = \"{CONSOLE_CLIENT_ID}\"\nclient_secret_file = \"{}\"\nca_file = \"{}\"\nname = \"the test issuer\"\n",
            self.url,
            secret_file.display(),
            self.ca_file.display()
        ))
    }

    /// The next ID token carries this nonce instead of the sign-in's.
    pub fn forge_next_nonce(&self, nonce: &str) {
        *self.shared.forged_nonce.lock().expect("nonce") = Some(nonce.to_owned());
    }

    /// ACTIONS_ID_TOKEN_REQUEST_URL for this issuer's ID-token endpoint.
    pub fn gha_request_url(&self) -> String {
        format!("{}/gha/token?api-version=2.0", self.url)
    }
}
