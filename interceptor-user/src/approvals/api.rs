//! The approvals API and web console, served by the daemon.
//!
//! - `GET /api/approvals[?all=true]`, `GET /api/approvals/{id}`,
//!   `POST /api/approvals/{id}/approve` (`{"reason", "grant_minutes"}`),
//!   `POST /api/approvals/{id}/deny` (`{"reason"}`), `GET /api/whoami`:
//!   JSON, authenticated by `Authorization: Bearer TOKEN`.
//! - `/login`, `/approvals`, `/approvals/{id}`: the console, which logs
//!   approvers in with the same tokens or through an OIDC provider
//!   (`/login/oidc`, see [`super::sso`]), keeps them in an HttpOnly,
//!   SameSite=Strict cookie, and checks a per-login CSRF token on every
//!   form.
//!
//! Every call, whoever makes it and however it ends, is an audit row.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Form, Path, Query, Request as HttpRequest, State as AxumState};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use super::sso::{self, Sso, SsoError};
use super::{ApprovalError, ApprovalStore, Approver, Request, State, event, when};
use crate::audit::cli::hex;
use crate::audit::{ApprovalRow, Event, now_us};
use crate::config::ConsoleOidc;
use crate::runtime::Shared;

/// How long a console login lasts.
const CONSOLE_LOGIN: Duration = Duration::from_secs(8 * 3600);
const COOKIE: &str = "interceptor_console";
/// The `state` of a console sign-in through OIDC.
const SSO_COOKIE: &str = "interceptor_sso";

struct Login {
    approver: Approver,
    csrf: String,
    until: Instant,
}

#[derive(Clone)]
struct Api {
    shared: Arc<Shared>,
    store: Arc<ApprovalStore>,
    logins: Arc<Mutex<HashMap<String, Login>>>,
    sso: Arc<Sso>,
    secure_cookie: bool,
}

/// SHA-256 of a token, as `token_sha256` holds it.
pub fn token_hash(token: &str) -> String {
    hex(&Sha256::digest(token.trim().as_bytes()))
}

fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    hex(&bytes)
}

/// A new API token and its hash.
pub fn new_token() -> (String, String) {
    let token = format!("ia_{}", random_token());
    let hash = token_hash(&token);
    (token, hash)
}

impl Api {
    /// The approver a token belongs to, by the current config.
    fn approver_for_token(&self, token: &str) -> Option<Approver> {
        let hash = token_hash(token);
        let runtime = self.shared.runtime.load();
        let config = runtime.config.approvals.as_ref()?.get_ref();
        config
            .approvers
            .iter()
            .find(|a| {
                a.token_sha256
                    .as_deref()
                    .is_some_and(|t| t.eq_ignore_ascii_case(&hash))
            })
            .map(|a| Approver {
                name: a.name.clone(),
                groups: a.groups.clone(),
                identities: a.identities.clone(),
            })
    }

    fn bearer(&self, headers: &HeaderMap) -> Option<Approver> {
        let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
        let token = value.strip_prefix("Bearer ")?;
        self.approver_for_token(token)
    }

    /// The console's OIDC provider, and the console's base URL.
    fn console_oidc(&self) -> Option<(ConsoleOidc, String)> {
        let runtime = self.shared.runtime.load();
        let a = runtime.config.approvals.as_ref()?.get_ref();
        Some((a.oidc.clone()?, a.base_url()))
    }

    /// Starts a console login for `who`, setting its cookie on a response.
    fn sign_in(&self, who: Approver, headers: &mut HeaderMap) {
        let id = random_token();
        self.logins
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id.clone(),
                Login {
                    approver: who,
                    csrf: random_token(),
                    until: Instant::now() + CONSOLE_LOGIN,
                },
            );
        self.set_cookie(
            headers,
            &format!(
                "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
                CONSOLE_LOGIN.as_secs()
            ),
        );
    }

    /// Adds a Set-Cookie, marked Secure when the console is on HTTPS.
    fn set_cookie(&self, headers: &mut HeaderMap, cookie: &str) {
        let secure = if self.secure_cookie { "; Secure" } else { "" };
        if let Ok(v) = HeaderValue::from_str(&format!("{cookie}{secure}")) {
            headers.append(header::SET_COOKIE, v);
        }
    }

    fn login_of(&self, headers: &HeaderMap) -> Option<(String, Approver, String)> {
        let id = cookie(headers, COOKIE)?;
        let mut logins = self.logins.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        logins.retain(|_, l| l.until > now);
        let l = logins.get(&id)?;
        Some((id, l.approver.clone(), l.csrf.clone()))
    }

    /// Waits while the audit queue is full, as sessions do: an API call's
    /// row is never dropped.
    async fn record(&self, event: Event) {
        if let Some(a) = &self.shared.audit {
            a.record(event).await;
        }
    }

    async fn decided(&self, r: &Request, actor: &str, reason: &str) {
        let what = match r.state {
            State::Approved => "approved",
            State::Denied => "denied",
            _ => "vote",
        };
        self.record(event(r, what, actor, reason)).await;
        if r.state != State::Pending {
            super::webhook::notify(&self.shared.runtime.load(), r, what);
        }
    }
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// Who made a call, and why it failed when that is not plain from its
/// status, for its audit row: set by the handlers.
#[derive(Clone)]
struct Caller(Arc<Mutex<(String, String)>>);

impl Caller {
    fn set(&self, name: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).0 = name.to_owned();
    }

    fn note(&self, why: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).1 = why.to_owned();
    }
}

/// Audits every call: method, path, status, and who.
async fn audit_calls(AxumState(api): AxumState<Api>, mut req: HttpRequest, next: Next) -> Response {
    let caller = Caller(Arc::new(Mutex::new(("anonymous".into(), String::new()))));
    req.extensions_mut().insert(caller.clone());
    let line = format!("{} {}", req.method(), req.uri().path());
    let mut response = next.run(req).await;
    let (actor, note) = caller.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
    api.record(Event::Approval(Box::new(ApprovalRow {
        session: uuid::Uuid::nil(),
        ts_us: now_us(),
        approval: String::new(),
        event: "api".into(),
        actor,
        reason: if note.is_empty() {
            format!("{line} -> {}", response.status().as_u16())
        } else {
            format!("{line} -> {}: {note}", response.status().as_u16())
        },
        principal: String::new(),
        target: String::new(),
        database: String::new(),
        statement: String::new(),
        binding: String::new(),
        rule: String::new(),
    })))
    .await;
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert("x-frame-options", HeaderValue::from_static("DENY"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"),
    );
    response
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        axum::Json(serde_json::json!({"error": "missing or unknown API token (Authorization: Bearer TOKEN)"})),
    )
        .into_response()
}

fn api_error(e: ApprovalError) -> Response {
    let status = match e {
        ApprovalError::NotFound(_) => StatusCode::NOT_FOUND,
        ApprovalError::Decided { .. } | ApprovalError::AlreadyVoted { .. } => StatusCode::CONFLICT,
        ApprovalError::OwnRequest { .. } | ApprovalError::NotQualified { .. } => {
            StatusCode::FORBIDDEN
        }
        ApprovalError::NoReason => StatusCode::BAD_REQUEST,
    };
    (
        status,
        axum::Json(serde_json::json!({"error": e.to_string()})),
    )
        .into_response()
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    all: bool,
}

/// The approver a call's bearer token names; the call is refused with 401
/// without one, and audited under the approver's name with one.
struct Bearer(Approver);

impl axum::extract::FromRequestParts<Api> for Bearer {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        api: &Api,
    ) -> Result<Self, Response> {
        let who = api.bearer(&parts.headers).ok_or_else(unauthorized)?;
        if let Some(caller) = parts.extensions.get::<Caller>() {
            caller.set(&who.name);
        }
        Ok(Bearer(who))
    }
}

/// A console page's signed-in approver and their login's CSRF token;
/// without a login, the browser is sent to the sign-in form.
struct Signed {
    who: Approver,
    csrf: String,
}

impl axum::extract::FromRequestParts<Api> for Signed {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        api: &Api,
    ) -> Result<Self, Response> {
        let (_, who, csrf) = api
            .login_of(&parts.headers)
            .ok_or_else(|| Redirect::to("/login").into_response())?;
        if let Some(caller) = parts.extensions.get::<Caller>() {
            caller.set(&who.name);
        }
        Ok(Signed { who, csrf })
    }
}

async fn api_list(
    AxumState(api): AxumState<Api>,
    _: Bearer,
    Query(q): Query<ListQuery>,
) -> Response {
    axum::Json(api.store.list(q.all)).into_response()
}

async fn api_show(AxumState(api): AxumState<Api>, _: Bearer, Path(id): Path<String>) -> Response {
    match api.store.get(&id) {
        Some(r) => axum::Json(r).into_response(),
        None => api_error(ApprovalError::NotFound(id)),
    }
}

async fn api_whoami(Bearer(who): Bearer) -> Response {
    axum::Json(serde_json::json!({"name": who.name, "groups": who.groups})).into_response()
}

#[derive(Deserialize, Default)]
pub struct Decision {
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub grant_minutes: Option<u32>,
}

/// What an approver does to a request.
#[derive(Clone, Copy)]
enum Verb {
    Approve,
    Deny,
}

impl Api {
    /// Applies `verb` for `who`, and records and announces the outcome.
    async fn decide(
        &self,
        id: &str,
        who: &Approver,
        verb: Verb,
        reason: &str,
        grant_minutes: Option<u32>,
    ) -> Result<Request, ApprovalError> {
        let r = match verb {
            Verb::Approve => self.store.approve(id, who, reason, grant_minutes),
            Verb::Deny => self.store.deny(id, who, reason),
        }?;
        info!(approval = %id, approver = %who.name, state = r.state.as_str(), "decision");
        self.decided(&r, &who.name, reason).await;
        Ok(r)
    }
}

async fn api_decide(
    api: &Api,
    who: &Approver,
    id: &str,
    body: Option<axum::Json<Decision>>,
    verb: Verb,
) -> Response {
    let d = body.map(|b| b.0).unwrap_or_default();
    match api.decide(id, who, verb, &d.reason, d.grant_minutes).await {
        Ok(r) => axum::Json(r).into_response(),
        Err(e) => api_error(e),
    }
}

async fn api_approve(
    AxumState(api): AxumState<Api>,
    Bearer(who): Bearer,
    Path(id): Path<String>,
    body: Option<axum::Json<Decision>>,
) -> Response {
    api_decide(&api, &who, &id, body, Verb::Approve).await
}

async fn api_deny(
    AxumState(api): AxumState<Api>,
    Bearer(who): Bearer,
    Path(id): Path<String>,
    body: Option<axum::Json<Decision>>,
) -> Response {
    api_decide(&api, &who, &id, body, Verb::Deny).await
}

// The console.

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const KEYWORDS: &[&str] = &[
    "select",
    "from",
    "where",
    "update",
    "set",
    "insert",
    "into",
    "values",
    "delete",
    "drop",
    "table",
    "alter",
    "create",
    "and",
    "or",
    "not",
    "null",
    "join",
    "on",
    "group",
    "by",
    "order",
    "limit",
    "returning",
    "truncate",
    "grant",
    "revoke",
    "with",
    "as",
    "in",
    "is",
    "begin",
    "commit",
    "rollback",
    "merge",
    "using",
    "when",
    "then",
    "else",
    "end",
    "case",
    "copy",
    "to",
    "index",
    "cascade",
    "role",
    "user",
    "execute",
    "prepare",
    "do",
];

/// SQL as HTML: keywords, strings, numbers and comments marked up.
pub fn highlight(sql: &str) -> String {
    let mut out = String::new();
    let chars: Vec<char> = sql.chars().collect();
    let mut i = 0;
    let span = |class: &str, text: &str| format!("<span class=\"{class}\">{}</span>", esc(text));
    while i < chars.len() {
        let c = chars[i];
        let start = i;
        if c == '\'' {
            i += 1;
            while i < chars.len() {
                if chars[i] == '\'' {
                    if chars.get(i + 1) == Some(&'\'') {
                        i += 2;
                        continue;
                    }
                    i += 1;
                    break;
                }
                i += 1;
            }
            out.push_str(&span("s", &chars[start..i].iter().collect::<String>()));
        } else if c == '-' && chars.get(i + 1) == Some(&'-') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
            out.push_str(&span("c", &chars[start..i].iter().collect::<String>()));
        } else if c.is_ascii_digit() {
            while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                i += 1;
            }
            out.push_str(&span("n", &chars[start..i].iter().collect::<String>()));
        } else if c.is_alphabetic() || c == '_' {
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            if KEYWORDS.contains(&word.to_lowercase().as_str()) {
                out.push_str(&span("k", &word));
            } else {
                out.push_str(&esc(&word));
            }
        } else {
            out.push_str(&esc(&c.to_string()));
            i += 1;
        }
    }
    out
}

fn page(title: &str, who: Option<&str>, body: &str) -> Html<String> {
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t} - interceptor</title>\
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:70em}}\
table{{border-collapse:collapse;width:100%}}td,th{{border-bottom:1px solid #ddd;padding:.4em;text-align:left;vertical-align:top}}\
pre{{background:#f6f8fa;padding:1em;white-space:pre-wrap}}.k{{color:#a626a4;font-weight:bold}}.s{{color:#50a14f}}.n{{color:#986801}}.c{{color:#a0a1a7}}\
.pending{{color:#c18401;font-weight:bold}}.approved{{color:#50a14f}}.denied,.timed_out{{color:#e45649}}\
button{{padding:.4em 1em;margin-right:.5em}}input[type=text]{{width:30em}}</style></head><body>\
<header><b>interceptor approvals</b>{w}</header><h1>{t}</h1>{body}</body></html>",
        t = esc(title),
        w = who.map_or_else(String::new, |n| format!(
            " &middot; signed in as {} &middot; <a href=\"/approvals\">requests</a> &middot; <a href=\"/approvals?all=true\">all</a> \
&middot; <form method=\"post\" action=\"/logout\" style=\"display:inline\"><button type=\"submit\" id=\"signout\">sign out</button></form>",
            esc(n)
        )),
    ))
}

async fn console_root() -> Redirect {
    Redirect::to("/approvals")
}

async fn login_form(AxumState(api): AxumState<Api>) -> Html<String> {
    let sso = api.console_oidc().map_or_else(String::new, |(o, _)| {
        format!(
            "<p><a href=\"/login/oidc\" id=\"oidc\">Sign in with {}</a></p><p>or</p>",
            esc(&o.name)
        )
    });
    page(
        "Sign in",
        None,
        &format!(
            "{sso}<form method=\"post\" action=\"/login\"><p><label>API token <input type=\"password\" name=\"token\" id=\"token\" autocomplete=\"off\"></label></p>\
<p><button type=\"submit\" id=\"signin\">Sign in</button></p></form>\
<p>Tokens are issued with <code>interceptor approvals new-token</code>.</p>"
        ),
    )
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(
    AxumState(api): AxumState<Api>,
    caller: axum::Extension<Caller>,
    Form(f): Form<LoginForm>,
) -> Response {
    let Some(who) = api.approver_for_token(&f.token) else {
        return (
            StatusCode::UNAUTHORIZED,
            page(
                "Sign in",
                None,
                "<p class=\"denied\">Unknown token.</p><p><a href=\"/login\">Try again</a></p>",
            ),
        )
            .into_response();
    };
    caller.set(&who.name);
    let mut r = Redirect::to("/approvals").into_response();
    api.sign_in(who, r.headers_mut());
    r
}

/// Sends the browser to the provider, with the sign-in's `state` in a
/// cookie that comes back with the provider's redirect (SameSite=Lax: it
/// is a top-level navigation from another site).
async fn oidc_begin(AxumState(api): AxumState<Api>, caller: axum::Extension<Caller>) -> Response {
    let Some((config, base)) = api.console_oidc() else {
        return sso_failed(&caller, SsoError::NotConfigured);
    };
    match api.sso.begin(&config, &base).await {
        Ok((to, state)) => {
            let mut r = Redirect::to(&to).into_response();
            api.set_cookie(
                r.headers_mut(),
                &format!(
                    "{SSO_COOKIE}={state}; Path=/login/oidc; HttpOnly; SameSite=Lax; Max-Age={}",
                    sso::PENDING_FOR.as_secs()
                ),
            );
            r
        }
        Err(e) => sso_failed(&caller, e),
    }
}

async fn oidc_callback(
    AxumState(api): AxumState<Api>,
    caller: axum::Extension<Caller>,
    headers: HeaderMap,
    Query(callback): Query<sso::Callback>,
) -> Response {
    let Some((config, base)) = api.console_oidc() else {
        return sso_failed(&caller, SsoError::NotConfigured);
    };
    let approvers = {
        let runtime = api.shared.runtime.load();
        runtime
            .config
            .approvals
            .as_ref()
            .map(|a| a.get_ref().approvers.clone())
            .unwrap_or_default()
    };
    let result = api
        .sso
        .finish(
            &config,
            &base,
            &approvers,
            callback,
            cookie(&headers, SSO_COOKIE),
        )
        .await;
    let mut r = match result {
        Ok((who, login)) => {
            caller.set(&who.name);
            caller.note(&format!("signed in at {} as {login}", config.issuer));
            info!(approver = %who.name, login, "console sign-in through OIDC");
            // The console's cookie is SameSite=Strict, and a browser holds
            // such cookies back for the whole redirect chain the provider
            // started; a page that moves on by itself starts a new one.
            let mut r = page(
                "Signed in",
                None,
                &format!(
                    "<p>Signed in as {}. <a href=\"/approvals\" id=\"continue\">Continue to the requests</a></p>",
                    esc(&who.name)
                ),
            )
            .into_response();
            if let Ok(v) = HeaderValue::from_str("0; url=/approvals") {
                r.headers_mut().insert(header::REFRESH, v);
            }
            api.sign_in(who, r.headers_mut());
            r
        }
        Err(e) => sso_failed(&caller, e),
    };
    api.set_cookie(
        r.headers_mut(),
        &format!("{SSO_COOKIE}=; Path=/login/oidc; HttpOnly; SameSite=Lax; Max-Age=0"),
    );
    r
}

fn sso_failed(caller: &Caller, e: SsoError) -> Response {
    warn!("console sign-in through OIDC failed: {e}");
    caller.note(&e.to_string());
    (
        StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNAUTHORIZED),
        page(
            "Sign-in failed",
            None,
            &format!(
                "<p class=\"denied\" id=\"error\">{}</p><p><a href=\"/login\">Back to sign-in</a></p>",
                esc(&e.to_string())
            ),
        ),
    )
        .into_response()
}

async fn console_list(
    AxumState(api): AxumState<Api>,
    Signed { who, .. }: Signed,
    Query(q): Query<ListQuery>,
) -> Response {
    let requests = api.store.list(q.all);
    let mut body = String::from(
        "<table id=\"requests\"><tr><th>id</th><th>state</th><th>requested</th><th>who</th><th>target</th><th>statement</th></tr>",
    );
    for r in &requests {
        body.push_str(&format!(
            "<tr class=\"request\" data-id=\"{id}\"><td><a href=\"/approvals/{id}\">{id}</a></td><td class=\"{st}\">{st}</td><td>{w}</td><td>{p}</td><td>{t}/{d}</td><td><code>{s}</code></td></tr>",
            id = esc(&r.id),
            st = r.state.as_str(),
            w = when(r.created_us),
            p = esc(&r.principal),
            t = esc(&r.target),
            d = esc(&r.database),
            s = highlight(&r.statement.chars().take(120).collect::<String>()),
        ));
    }
    body.push_str("</table>");
    if requests.is_empty() {
        body.push_str("<p id=\"none\">Nothing is waiting for approval.</p>");
    }
    page(
        if q.all {
            "All requests"
        } else {
            "Pending requests"
        },
        Some(&who.name),
        &body,
    )
    .into_response()
}

async fn console_show(
    AxumState(api): AxumState<Api>,
    Signed { who, csrf }: Signed,
    Path(id): Path<String>,
) -> Response {
    let Some(r) = api.store.get(&id) else {
        return (
            StatusCode::NOT_FOUND,
            page("Not found", Some(&who.name), "<p>No such request.</p>"),
        )
            .into_response();
    };
    let mut body = format!(
        "<p>State: <span id=\"state\" class=\"{st}\">{st}</span></p>\
<pre id=\"statement\">{sql}</pre>",
        st = r.state.as_str(),
        sql = highlight(&r.statement),
    );
    let row = |k: &str, v: &str| format!("<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(v));
    body.push_str("<table>");
    if !r.params.is_empty() {
        body.push_str(&row("parameters", &r.shown_params()));
    }
    body.push_str(&row(
        "estimate",
        r.estimate.as_deref().unwrap_or("(computing)"),
    ));
    body.push_str(&row("principal", &r.principal));
    body.push_str(&row("groups", &r.groups.join(", ")));
    body.push_str(&row("job", &r.job));
    body.push_str(&row("workload", &r.workload));
    body.push_str(&row(
        "target",
        &format!("{} / database {} as {}", r.target, r.database, r.user),
    ));
    body.push_str(&row("rule", &format!("{}: {}", r.rule, r.reason)));
    body.push_str(&row("needs", &r.needs()));
    body.push_str(&row("requested", &when(r.created_us)));
    body.push_str(&row("times out", &when(r.deadline_us)));
    for v in &r.votes {
        body.push_str(&row(
            "approved by",
            &format!("{} ({}) {}", v.by, when(v.ts_us), v.reason),
        ));
    }
    if let Some(d) = r.decided_us {
        body.push_str(&row(
            "decided",
            &format!(
                "{} by {}: {}",
                when(d),
                r.decided_by.join(", "),
                r.decision_reason
            ),
        ));
    }
    body.push_str(&row("binding", &r.binding));
    body.push_str("</table>");
    if r.is_pending() {
        body.push_str(&format!(
            "<form method=\"post\" action=\"/approvals/{id}/decide\" id=\"decide\">\
<input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
<p><label>Reason <input type=\"text\" name=\"reason\" id=\"reason\"></label></p>\
<p><label>Also allow this statement's fingerprint for this principal for <input type=\"number\" name=\"grant_minutes\" min=\"0\" max=\"1440\" value=\"0\"> minutes</label></p>\
<p><button type=\"submit\" name=\"action\" value=\"approve\" id=\"approve\">Approve</button>\
<button type=\"submit\" name=\"action\" value=\"deny\" id=\"deny\">Deny</button></p></form>",
            id = esc(&r.id),
            csrf = esc(&csrf),
        ));
    }
    page(&format!("Request {}", r.id), Some(&who.name), &body).into_response()
}

#[derive(Deserialize)]
struct DecideForm {
    csrf: String,
    action: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    grant_minutes: Option<String>,
}

async fn console_decide(
    AxumState(api): AxumState<Api>,
    Signed { who, csrf }: Signed,
    Path(id): Path<String>,
    Form(f): Form<DecideForm>,
) -> Response {
    if f.csrf != csrf {
        warn!(approver = %who.name, "console form with a wrong CSRF token refused");
        return (
            StatusCode::FORBIDDEN,
            page(
                "Refused",
                Some(&who.name),
                "<p>The form's CSRF token does not match this login; reload the page.</p>",
            ),
        )
            .into_response();
    }
    let grant = f
        .grant_minutes
        .as_deref()
        .and_then(|m| m.trim().parse::<u32>().ok())
        .filter(|m| *m > 0);
    let verb = match f.action.as_str() {
        "approve" => Verb::Approve,
        "deny" => Verb::Deny,
        _ => return (StatusCode::BAD_REQUEST, "unknown action").into_response(),
    };
    match api.decide(&id, &who, verb, &f.reason, grant).await {
        Ok(_) => Redirect::to(&format!("/approvals/{id}")).into_response(),
        Err(e) => (
            StatusCode::CONFLICT,
            page(
                "Not done",
                Some(&who.name),
                &format!("<p class=\"denied\" id=\"error\">{}</p><p><a href=\"/approvals/{}\">Back</a></p>", esc(&e.to_string()), esc(&id)),
            ),
        )
            .into_response(),
    }
}

async fn logout(AxumState(api): AxumState<Api>, headers: HeaderMap) -> Response {
    if let Some((id, _, _)) = api.login_of(&headers) {
        api.logins
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }
    let mut r = Redirect::to("/login").into_response();
    api.set_cookie(
        r.headers_mut(),
        &format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    r
}

fn router(api: Api) -> Router {
    Router::new()
        .route("/api/approvals", get(api_list))
        .route("/api/approvals/{id}", get(api_show))
        .route("/api/approvals/{id}/approve", post(api_approve))
        .route("/api/approvals/{id}/deny", post(api_deny))
        .route("/api/whoami", get(api_whoami))
        .route("/", get(console_root))
        .route("/login", get(login_form).post(login))
        .route("/login/oidc", get(oidc_begin))
        .route("/login/oidc/callback", get(oidc_callback))
        .route("/logout", post(logout))
        .route("/approvals", get(console_list))
        .route("/approvals/{id}", get(console_show))
        .route("/approvals/{id}/decide", post(console_decide))
        .layer(middleware::from_fn_with_state(api.clone(), audit_calls))
        .with_state(api)
}

/// Binds the API's listener (so a taken port fails the start).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    use anyhow::Context;
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for the approvals API on {addr}"))
}

/// Serves the API and console until the daemon stops.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    store: Arc<ApprovalStore>,
) {
    let api = Api {
        shared,
        store,
        logins: Arc::new(Mutex::new(HashMap::new())),
        sso: Arc::new(Sso::default()),
        secure_cookie: tls.is_some(),
    };
    let app = router(api);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let app = app.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let service = hyper_util::service::TowerToHyperService::new(app);
            let http = hyper::server::conn::http1::Builder::new();
            let served = match tls {
                Some(acceptor) => {
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                    {
                        Ok(Ok(s)) => {
                            http.serve_connection(hyper_util::rt::TokioIo::new(s), service)
                                .await
                        }
                        _ => return,
                    }
                }
                None => {
                    http.serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await
                }
            };
            if let Err(e) = served {
                tracing::debug!("approvals API connection: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn highlighting_escapes_everything() {
        let h = highlight("UPDATE t SET note = '<script>' -- </pre>\nWHERE id = 1");
        assert!(!h.contains("<script>"), "{h}");
        assert!(!h.contains("</pre>"), "{h}");
        assert!(h.contains("<span class=\"k\">UPDATE</span>"), "{h}");
        assert!(
            h.contains("<span class=\"s\">&#39;&lt;script&gt;&#39;</span>"),
            "{h}"
        );
        assert!(h.contains("<span class=\"n\">1</span>"), "{h}");
    }

    #[test]
    fn tokens_are_hashed_as_configured() {
        let (token, hash) = new_token();
        assert_eq!(hash.len(), 64);
        assert_eq!(token_hash(&format!("{token}\n")), hash);
        assert_ne!(token_hash("other"), hash);
    }
}
