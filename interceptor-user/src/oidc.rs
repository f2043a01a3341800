//! OIDC token verification: a session's token is checked against its
//! issuer's published keys (JWKS), found through the issuer's discovery
//! document and cached. A token with an unknown key id makes the cache
//! refresh once, so an issuer's key rotation needs no restart.
//!
//! Every rejection says exactly why, because the reason goes back to the
//! client in the refusal: expired at T, wrong audience, unknown issuer, bad
//! signature.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use policies::TokenIdentity;
use serde::Deserialize;
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::config::{Oidc, OidcIssuer};

/// Asymmetric algorithms only: with HS256 the "key" in a JWKS would be a
/// shared secret anyone who fetched it could sign with.
const ACCEPTED: [Algorithm; 7] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Why a token was not accepted. The Display text is what the client sees.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("no OIDC token was presented")]
    Missing,
    #[error("no OIDC issuers are configured, so the token cannot be verified")]
    NoIssuers,
    #[error("the token is malformed: {0}")]
    Malformed(String),
    #[error("the token's algorithm {0} is not accepted (use RS256, ES256 or EdDSA)")]
    Algorithm(String),
    #[error("the token's issuer \"{0}\" is not a trusted issuer")]
    UnknownIssuer(String),
    #[error("the token's signing key \"{kid}\" is not among issuer {issuer}'s keys")]
    UnknownKey { issuer: String, kid: String },
    #[error("the token's signature does not verify with issuer {issuer}'s key \"{kid}\"")]
    BadSignature { issuer: String, kid: String },
    #[error("the token expired at {0}")]
    Expired(String),
    #[error("the token is not valid before {0}")]
    NotYetValid(String),
    #[error("the token's audience {got} is not accepted (allowed: {allowed})")]
    WrongAudience { got: String, allowed: String },
    #[error("the token has no `{0}` claim")]
    MissingClaim(String),
    #[error("cannot fetch issuer {issuer}'s signing keys: {error}")]
    Unreachable { issuer: String, error: String },
}

/// Checks tokens for every configured issuer.
pub struct Verifier {
    issuers: HashMap<String, Issuer>,
    leeway: Duration,
}

struct Issuer {
    config: OidcIssuer,
    client: reqwest::Client,
    cache_for: Duration,
    min_refresh: Duration,
    keys: Mutex<KeyCache>,
}

#[derive(Default)]
struct KeyCache {
    jwks_url: Option<String>,
    set: Option<Arc<JwkSet>>,
    fetched: Option<Instant>,
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

/// The claims read before the signature is checked, to find the issuer
/// and to word the error precisely. Nothing here is trusted until
/// `jsonwebtoken` has verified the signature.
#[derive(Deserialize)]
struct Unverified {
    iss: Option<String>,
    aud: Option<serde_json::Value>,
    exp: Option<f64>,
    nbf: Option<f64>,
}

fn rfc3339(secs: f64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(secs.max(0.0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn audiences(v: &Option<serde_json::Value>) -> Vec<String> {
    match v {
        Some(serde_json::Value::String(s)) => vec![s.clone()],
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

impl Verifier {
    pub fn new(config: &Oidc) -> anyhow::Result<Verifier> {
        let mut issuers = HashMap::new();
        for i in &config.issuers {
            let tls = crate::tls::https_client_config(i.ca_file.as_deref())?;
            let client = reqwest::Client::builder()
                .use_preconfigured_tls(tls)
                .timeout(config.fetch_timeout)
                .redirect(reqwest::redirect::Policy::limited(3))
                .build()?;
            issuers.insert(
                i.issuer.clone(),
                Issuer {
                    config: i.clone(),
                    client,
                    cache_for: config.jwks_cache,
                    min_refresh: config.min_refresh,
                    keys: Mutex::new(KeyCache {
                        jwks_url: i.jwks_url.clone(),
                        ..KeyCache::default()
                    }),
                },
            );
        }
        Ok(Verifier {
            issuers,
            leeway: config.leeway,
        })
    }

    /// Verifies a token and returns what it says about its bearer.
    pub async fn verify(&self, token: &str) -> Result<TokenIdentity, TokenError> {
        let token = token.trim();
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
        if !ACCEPTED.contains(&header.alg) {
            return Err(TokenError::Algorithm(format!("{:?}", header.alg)));
        }
        let payload = token
            .split('.')
            .nth(1)
            .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
            .ok_or_else(|| TokenError::Malformed("the payload is not base64url".into()))?;
        let _: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&payload)
            .map_err(|e| TokenError::Malformed(format!("the payload is not a JSON object: {e}")))?;
        let seen: Unverified = serde_json::from_slice(&payload).map_err(|e| {
            TokenError::Malformed(format!("a registered claim has the wrong type: {e}"))
        })?;
        let iss = seen
            .iss
            .clone()
            .ok_or(TokenError::MissingClaim("iss".into()))?;
        let issuer = self
            .issuers
            .get(&iss)
            .ok_or_else(|| TokenError::UnknownIssuer(iss.clone()))?;
        let kid = header.kid.clone().unwrap_or_default();
        let jwk = issuer.key(&kid, header.alg).await?;
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| TokenError::Unreachable {
            issuer: iss.clone(),
            error: format!("key \"{kid}\" is unusable: {e}"),
        })?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_issuer(&[&iss]);
        validation.set_audience(&issuer.config.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &key,
            &validation,
        ) {
            Ok(data) => {
                let sub = data
                    .claims
                    .get("sub")
                    .and_then(|s| s.as_str())
                    .unwrap_or_default()
                    .to_owned();
                Ok(TokenIdentity::from_claims(iss, sub, &data.claims))
            }
            Err(e) => Err(match e.kind() {
                ErrorKind::InvalidSignature => TokenError::BadSignature { issuer: iss, kid },
                ErrorKind::ExpiredSignature => {
                    TokenError::Expired(seen.exp.map_or_else(|| "?".into(), rfc3339))
                }
                ErrorKind::ImmatureSignature => {
                    TokenError::NotYetValid(seen.nbf.map_or_else(|| "?".into(), rfc3339))
                }
                ErrorKind::InvalidAudience => TokenError::WrongAudience {
                    got: format!("{:?}", audiences(&seen.aud)),
                    allowed: issuer.config.audiences.join(", "),
                },
                ErrorKind::MissingRequiredClaim(c) => TokenError::MissingClaim(c.clone()),
                ErrorKind::InvalidAlgorithm => {
                    TokenError::Algorithm(format!("{:?} (not the key's)", header.alg))
                }
                _ => TokenError::Malformed(e.to_string()),
            }),
        }
    }
}

impl Issuer {
    /// The key for `kid`, refetching the JWKS when it is stale or lacks the
    /// key (at most once per `min_refresh`). A token without `kid` uses the
    /// issuer's only key for its algorithm family.
    async fn key(&self, kid: &str, alg: Algorithm) -> Result<Jwk, TokenError> {
        let mut cache = self.keys.lock().await;
        let fresh = cache.fetched.is_some_and(|t| t.elapsed() < self.cache_for);
        if !fresh {
            self.refresh(&mut cache).await?;
        }
        if let Some(k) = find(cache.set.as_deref(), kid, alg) {
            return Ok(k);
        }
        if cache
            .fetched
            .is_some_and(|t| t.elapsed() >= self.min_refresh)
        {
            info!(issuer = %self.config.issuer, kid, "unknown signing key; refreshing the JWKS");
            self.refresh(&mut cache).await?;
            if let Some(k) = find(cache.set.as_deref(), kid, alg) {
                return Ok(k);
            }
        }
        Err(TokenError::UnknownKey {
            issuer: self.config.issuer.clone(),
            kid: kid.to_owned(),
        })
    }

    async fn refresh(&self, cache: &mut KeyCache) -> Result<(), TokenError> {
        let unreachable = |error: String| TokenError::Unreachable {
            issuer: self.config.issuer.clone(),
            error,
        };
        let jwks_url = match &cache.jwks_url {
            Some(u) => u.clone(),
            None => {
                let url = self.config.discovery_url.clone().unwrap_or_else(|| {
                    format!(
                        "{}/.well-known/openid-configuration",
                        self.config.issuer.trim_end_matches('/')
                    )
                });
                let d: Discovery = self.get_json(&url).await.map_err(unreachable)?;
                // OIDC Discovery 4.3: the document must name the issuer it
                // was fetched for, or its keys are someone else's.
                if d.issuer != self.config.issuer {
                    return Err(unreachable(format!(
                        "discovery document {url} is for issuer \"{}\"",
                        d.issuer
                    )));
                }
                if !d.jwks_uri.starts_with("https://") {
                    return Err(unreachable(format!("jwks_uri {} is not https", d.jwks_uri)));
                }
                cache.jwks_url = Some(d.jwks_uri.clone());
                d.jwks_uri
            }
        };
        // A failed refresh keeps the keys already fetched: an issuer outage
        // must not reject tokens signed with known keys.
        match self.get_json::<JwkSet>(&jwks_url).await {
            Ok(set) => {
                cache.set = Some(Arc::new(set));
                cache.fetched = Some(Instant::now());
                Ok(())
            }
            Err(e) if cache.set.is_some() => {
                warn!(issuer = %self.config.issuer, "JWKS refresh failed, keeping cached keys: {e}");
                cache.fetched = Some(Instant::now());
                Ok(())
            }
            Err(e) => Err(unreachable(e)),
        }
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, String> {
        get_json(&self.client, url).await
    }
}

/// A JSON document from an issuer; the error names the URL and the cause.
pub async fn get_json<T: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    url: &str,
) -> Result<T, String> {
    let resp = client
        .get(url)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {}", error_chain(&e)))?;
    if !resp.status().is_success() {
        return Err(format!("GET {url}: HTTP {}", resp.status()));
    }
    resp.json::<T>()
        .await
        .map_err(|e| format!("GET {url}: {}", error_chain(&e)))
}

fn find(set: Option<&JwkSet>, kid: &str, alg: Algorithm) -> Option<Jwk> {
    let set = set?;
    if !kid.is_empty() {
        return set.find(kid).cloned();
    }
    let family = |k: &Jwk| {
        use jsonwebtoken::jwk::AlgorithmParameters as P;
        matches!(
            (&k.algorithm, alg),
            (
                P::RSA(_),
                Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 | Algorithm::PS256
            ) | (P::EllipticCurve(_), Algorithm::ES256 | Algorithm::ES384)
                | (P::OctetKeyPair(_), Algorithm::EdDSA)
        )
    };
    let mut candidates = set.keys.iter().filter(|k| family(k));
    match (candidates.next(), candidates.next()) {
        (Some(k), None) => Some(k.clone()),
        _ => None,
    }
}

/// reqwest's top-level errors say "error sending request"; the cause
/// (refused, certificate unknown, timeout) is further down.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
