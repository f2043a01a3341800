//! Console sign-in through an OpenID Connect provider: the authorization
//! code flow with PKCE, a `state` bound to the browser by a cookie, and a
//! `nonce` bound to the ID token. `oauth2` builds the authorization URL
//! and makes the code exchange; the ID token is checked by the same
//! verifier as session tokens (the provider's JWKS, `iss`, `aud` = the
//! client id, `exp`), then its `nonce`, `azp` and the configured claim.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use oauth2::basic::{
    BasicErrorResponse, BasicRevocationErrorResponse, BasicTokenIntrospectionResponse,
    BasicTokenType,
};
use oauth2::{
    AuthUrl, AuthorizationCode, Client, ClientId, ClientSecret, CsrfToken, EndpointNotSet,
    EndpointSet, ExtraTokenFields, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, Scope,
    StandardRevocableToken, StandardTokenResponse, TokenUrl,
};
use serde::{Deserialize, Serialize};

use super::Approver;
use crate::config::{ApproverConfig, ConsoleOidc, Oidc, OidcIssuer};
use crate::oidc::{TokenError, Verifier, error_chain, get_json};

/// How long a browser has to come back from the provider.
pub const PENDING_FOR: Duration = Duration::from_secs(600);
/// Sign-ins started and not finished, at most; the oldest go first.
const PENDING_MAX: usize = 1024;

/// The ID token, which `oauth2`'s standard response leaves out.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct IdTokenField {
    id_token: Option<String>,
}

impl ExtraTokenFields for IdTokenField {}

type OidcClient = Client<
    BasicErrorResponse,
    StandardTokenResponse<IdTokenField, BasicTokenType>,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

/// Why a sign-in failed. The Display text is shown on the console page
/// and in the call's audit row.
#[derive(Debug, thiserror::Error)]
pub enum SsoError {
    #[error("the console has no [approvals.oidc] provider")]
    NotConfigured,
    #[error("cannot reach the sign-in provider {issuer}: {error}")]
    Provider { issuer: String, error: String },
    #[error("this sign-in was not started from this browser, or took over 10 minutes; start again")]
    UnknownState,
    #[error("the provider refused the sign-in: {0}")]
    Refused(String),
    #[error("the provider's token endpoint failed: {0}")]
    Exchange(String),
    #[error("the provider returned no ID token (is \"openid\" among the scopes?)")]
    NoIdToken,
    #[error("the provider's ID token was not accepted: {0}")]
    Token(#[from] TokenError),
    #[error("the ID token's nonce does not match this sign-in")]
    Nonce,
    #[error("the ID token was issued to {0}, not to this console")]
    Azp(String),
    #[error("the ID token has no `{0}` claim to name the approver")]
    NoClaim(String),
    #[error("{0} is not verified by the provider (email_verified is false)")]
    Unverified(String),
    #[error(
        "{0} signed in, but is not an approver here (list it in an [[approvals.approver]]'s `oidc`)"
    )]
    NotApprover(String),
}

impl SsoError {
    pub fn status(&self) -> u16 {
        match self {
            SsoError::NotConfigured => 404,
            SsoError::UnknownState => 400,
            SsoError::Provider { .. } | SsoError::Exchange(_) | SsoError::NoIdToken => 502,
            SsoError::NotApprover(_) | SsoError::Unverified(_) => 403,
            _ => 401,
        }
    }
}

/// A provider, set up for one `[approvals.oidc]` and redirect URL.
struct Provider {
    config: ConsoleOidc,
    redirect: String,
    http: reqwest::Client,
    verifier: Verifier,
    /// Found through discovery at the first sign-in.
    client: Option<OidcClient>,
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
}

struct Pending {
    nonce: String,
    pkce: PkceCodeVerifier,
    started: Instant,
}

/// Sign-ins in progress, and the provider as last configured. The
/// provider is behind one lock for its discovery and code exchanges, so a
/// slow provider makes concurrent sign-ins queue (each call is bounded by
/// a 10 s timeout).
#[derive(Default)]
pub struct Sso {
    provider: tokio::sync::Mutex<Option<Provider>>,
    pending: Mutex<HashMap<String, Pending>>,
}

/// What the provider sent the browser back with.
#[derive(Debug, Deserialize)]
pub struct Callback {
    pub code: Option<String>,
    pub state: Option<String>,
    pub error: Option<String>,
    pub error_description: Option<String>,
}

impl Provider {
    fn new(config: &ConsoleOidc, redirect: String) -> Result<Provider, SsoError> {
        let failed = |error: String| SsoError::Provider {
            issuer: config.issuer.clone(),
            error,
        };
        let tls = crate::tls::https_client_config(config.ca_file.as_deref())
            .map_err(|e| failed(e.to_string()))?;
        // No redirects: a token endpoint that redirects would carry the
        // code and the client secret elsewhere.
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| failed(error_chain(&e)))?;
        let verifier = Verifier::new(&Oidc {
            issuers: vec![OidcIssuer {
                issuer: config.issuer.clone(),
                audiences: vec![config.client_id.clone()],
                discovery_url: config.discovery_url.clone(),
                jwks_url: None,
                ca_file: config.ca_file.clone(),
            }],
            leeway: Duration::from_secs(30),
            jwks_cache: Duration::from_secs(3600),
            min_refresh: Duration::from_secs(10),
            fetch_timeout: Duration::from_secs(5),
        })
        .map_err(|e| failed(format!("{e:#}")))?;
        Ok(Provider {
            config: config.clone(),
            redirect,
            http,
            verifier,
            client: None,
        })
    }

    async fn client(&mut self) -> Result<&OidcClient, SsoError> {
        if self.client.is_none() {
            let c = &self.config;
            let failed = |error: String| SsoError::Provider {
                issuer: c.issuer.clone(),
                error,
            };
            let url = c.discovery_url.clone().unwrap_or_else(|| {
                format!(
                    "{}/.well-known/openid-configuration",
                    c.issuer.trim_end_matches('/')
                )
            });
            let d: Discovery = get_json(&self.http, &url).await.map_err(failed)?;
            if d.issuer != c.issuer {
                return Err(failed(format!(
                    "discovery document {url} is for issuer \"{}\"",
                    d.issuer
                )));
            }
            let mut client =
                Client::new(ClientId::new(c.client_id.clone()))
                    .set_auth_uri(AuthUrl::new(d.authorization_endpoint).map_err(|e| {
                        failed(format!("its authorization_endpoint is not a URL: {e}"))
                    })?)
                    .set_token_uri(
                        TokenUrl::new(d.token_endpoint)
                            .map_err(|e| failed(format!("its token_endpoint is not a URL: {e}")))?,
                    )
                    .set_redirect_uri(
                        RedirectUrl::new(self.redirect.clone())
                            .map_err(|e| failed(format!("the redirect URL is not a URL: {e}")))?,
                    );
            if let Some(secret) = c.client_secret() {
                let secret = secret
                    .load()
                    .map_err(|e| failed(format!("the client secret: {e}")))?;
                client = client.set_client_secret(ClientSecret::new(secret.expose().to_owned()));
            }
            self.client = Some(client);
        }
        self.client.as_ref().ok_or(SsoError::NotConfigured)
    }
}

/// The approver whose `oidc` list holds `login`. E-mail addresses compare
/// without case; other claims (opaque subjects) exactly.
pub fn approver_for_login(
    approvers: &[ApproverConfig],
    claim: &str,
    login: &str,
) -> Option<Approver> {
    approvers
        .iter()
        .find(|a| {
            a.oidc.iter().any(|l| {
                if claim == "email" {
                    l.eq_ignore_ascii_case(login)
                } else {
                    l == login
                }
            })
        })
        .map(|a| {
            let mut identities = a.identities.clone();
            identities.push(login.to_owned());
            Approver {
                name: a.name.clone(),
                groups: a.groups.clone(),
                identities,
            }
        })
}

impl Sso {
    /// The provider for this config, rebuilt when the config changed.
    fn provider<'a>(
        slot: &'a mut Option<Provider>,
        config: &ConsoleOidc,
        base_url: &str,
    ) -> Result<&'a mut Provider, SsoError> {
        let redirect = config
            .redirect_url
            .clone()
            .unwrap_or_else(|| format!("{base_url}/login/oidc/callback"));
        if slot
            .as_ref()
            .is_none_or(|p| &p.config != config || p.redirect != redirect)
        {
            *slot = Some(Provider::new(config, redirect)?);
        }
        slot.as_mut().ok_or(SsoError::NotConfigured)
    }

    /// Starts a sign-in: where to send the browser, and the `state` to
    /// bind to it.
    pub async fn begin(
        &self,
        config: &ConsoleOidc,
        base_url: &str,
    ) -> Result<(String, String), SsoError> {
        let mut slot = self.provider.lock().await;
        let provider = Self::provider(&mut slot, config, base_url)?;
        let client = provider.client().await?;
        let (challenge, pkce) = PkceCodeChallenge::new_random_sha256();
        let nonce = CsrfToken::new_random().secret().clone();
        let (url, state) = client
            .authorize_url(CsrfToken::new_random)
            .add_scopes(config.scopes.iter().cloned().map(Scope::new))
            .add_extra_param("nonce", nonce.clone())
            .set_pkce_challenge(challenge)
            .url();
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.retain(|_, p| p.started.elapsed() < PENDING_FOR);
        if pending.len() >= PENDING_MAX
            && let Some(oldest) = pending
                .iter()
                .min_by_key(|(_, p)| p.started)
                .map(|(k, _)| k.clone())
        {
            pending.remove(&oldest);
        }
        pending.insert(
            state.secret().clone(),
            Pending {
                nonce,
                pkce,
                started: Instant::now(),
            },
        );
        Ok((url.to_string(), state.secret().clone()))
    }

    /// Finishes a sign-in: the provider's answer, and the `state` the
    /// browser's cookie holds. Returns the approver and the login (the
    /// claim's value).
    pub async fn finish(
        &self,
        config: &ConsoleOidc,
        base_url: &str,
        approvers: &[ApproverConfig],
        callback: Callback,
        browser_state: Option<String>,
    ) -> Result<(Approver, String), SsoError> {
        // The state is spent by any attempt, right browser or not, so a
        // leaked redirect can be tried once at most.
        let pending = {
            let state = callback.state.as_deref().unwrap_or_default();
            let spent = self
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(state);
            match spent {
                Some(p)
                    if browser_state.as_deref() == Some(state)
                        && p.started.elapsed() < PENDING_FOR =>
                {
                    p
                }
                _ => return Err(SsoError::UnknownState),
            }
        };
        if let Some(error) = callback.error {
            return Err(SsoError::Refused(match callback.error_description {
                Some(d) => format!("{error}: {d}"),
                None => error,
            }));
        }
        let code = callback
            .code
            .ok_or_else(|| SsoError::Refused("no code in the redirect".into()))?;
        let mut slot = self.provider.lock().await;
        let provider = Self::provider(&mut slot, config, base_url)?;
        let client = provider.client().await?.clone();
        let response = client
            .exchange_code(AuthorizationCode::new(code))
            .set_pkce_verifier(pending.pkce)
            .request_async(&provider.http)
            .await
            .map_err(|e| SsoError::Exchange(token_error(&e)))?;
        let id_token = response
            .extra_fields()
            .id_token
            .clone()
            .ok_or(SsoError::NoIdToken)?;
        let identity = provider.verifier.verify(&id_token).await?;
        drop(slot);
        let first = |claim: &str| identity.claims.get(claim).and_then(|v| v.first()).cloned();
        if first("nonce").as_deref() != Some(pending.nonce.as_str()) {
            return Err(SsoError::Nonce);
        }
        // OIDC Core 3.1.3.7: an authorized party, when named, must be us.
        if let Some(azp) = first("azp")
            && azp != config.client_id
        {
            return Err(SsoError::Azp(azp));
        }
        let login = first(&config.claim).ok_or_else(|| SsoError::NoClaim(config.claim.clone()))?;
        if config.claim == "email" && first("email_verified").as_deref() == Some("false") {
            return Err(SsoError::Unverified(login));
        }
        let approver = approver_for_login(approvers, &config.claim, &login)
            .ok_or_else(|| SsoError::NotApprover(login.clone()))?;
        Ok((approver, login))
    }
}

/// The provider's own words when it answered with an OAuth error.
fn token_error<E: std::error::Error + 'static>(
    e: &oauth2::RequestTokenError<E, BasicErrorResponse>,
) -> String {
    match e {
        oauth2::RequestTokenError::ServerResponse(r) => r.to_string(),
        oauth2::RequestTokenError::Parse(e, _) => format!("unreadable response: {e}"),
        other => error_chain(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn approver(name: &str, oidc: &[&str]) -> ApproverConfig {
        ApproverConfig {
            name: name.into(),
            groups: vec!["dba".into()],
            token_sha256: None,
            oidc: oidc.iter().map(|s| s.to_string()).collect(),
            identities: vec!["db-alice".into()],
        }
    }

    #[test]
    fn logins_map_to_approvers() {
        let approvers = [
            approver("alice", &["Alice@Example.com"]),
            approver("bob", &["00u1bob"]),
        ];
        let a = approver_for_login(&approvers, "email", "alice@example.COM").expect("alice");
        assert_eq!(a.name, "alice");
        // The login counts as hers when she is the requester.
        assert!(a.identities.iter().any(|i| i == "alice@example.COM"));
        assert!(a.identities.iter().any(|i| i == "db-alice"));
        assert!(approver_for_login(&approvers, "sub", "00u1bob").is_some());
        // Subjects are opaque: no case folding.
        assert!(approver_for_login(&approvers, "sub", "00U1BOB").is_none());
        assert!(approver_for_login(&approvers, "email", "mallory@example.com").is_none());
    }

    #[test]
    fn errors_carry_their_status() {
        assert_eq!(SsoError::UnknownState.status(), 400);
        assert_eq!(SsoError::NotApprover("x".into()).status(), 403);
        assert_eq!(SsoError::Nonce.status(), 401);
        assert_eq!(SsoError::NoIdToken.status(), 502);
    }
}
