//! The daemon's configuration file (TOML).
//!
//! Every table denies unknown fields so that a typo is an error, not a
//! silently ignored setting. Secrets are referenced, never inlined: the file
//! can be shown in a review or a bug report without leaking anything.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};
use toml::Spanned;

/// What can go wrong when loading a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}:{line}: `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Addresses the proxy accepts clients on, IPv4 and/or IPv6
    /// (`"127.0.0.1:6432"`, `"[::1]:6432"`). Clients that connect here
    /// know about the proxy; may be empty when `[intercept]` is set.
    #[serde(default)]
    pub listen: Vec<Spanned<SocketAddr>>,
    /// Transparent interception of tagged cgroups' connections.
    pub intercept: Option<Spanned<Intercept>>,
    /// Where generated TLS material and other daemon state are kept.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub client_tls: ClientTls,
    /// Statement policy. Without it every statement is relayed unchecked
    /// (and the daemon says so at start-up).
    pub policy: Option<PolicyConfig>,
    /// OIDC issuers whose tokens bind sessions to a verified workload
    /// identity (a CI job's ID token). Without it, tokens are not accepted.
    pub oidc: Option<Spanned<Oidc>>,
    /// The audit trail (on by default, spooled under `state_dir/audit`).
    #[serde(default)]
    pub audit: AuditConfig,
    /// Approval of statements that policy holds: the approvals API and
    /// web console, approvers, and notifications. Without it, held
    /// statements are refused.
    pub approvals: Option<Spanned<ApprovalsConfig>>,
    /// The databases this proxy stands in front of.
    #[serde(rename = "target")]
    pub targets: Vec<Spanned<Target>>,
}

/// The audit trail: every session and statement, written to a durable
/// local spool of append-only segment files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Record the audit trail.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The spool directory (default: `state_dir/audit`). A relative path is
    /// relative to this config file.
    pub spool_dir: Option<PathBuf>,
    /// When spooled events reach the disk: `batch` (fsync each batch, at
    /// most every `fsync_interval`), `always` (every batch at once) or
    /// `never` (the OS decides; a power cut can lose recent events).
    #[serde(default)]
    pub fsync: Fsync,
    #[serde(default = "default_fsync_interval", with = "humantime_serde")]
    pub fsync_interval: Duration,
    /// A segment file is closed and a new one started past this size.
    #[serde(default = "default_segment_bytes")]
    pub segment_bytes: u64,
    /// Events that may wait for the spool writer before sessions wait,
    /// split evenly among the session threads' queues.
    #[serde(default = "default_audit_queue")]
    pub queue: usize,
    /// When the spool cannot be written (a full disk): `refuse` new
    /// statements with SQLSTATE 53100 until it can again (fail closed, the
    /// default), or `continue` serving them while events wait in memory,
    /// with an error logged every few seconds.
    #[serde(default)]
    pub on_spool_failure: SpoolFailure,
    /// Days of audit the spool keeps when it is the store (no
    /// `[audit.clickhouse]`): a segment last written longer ago is
    /// deleted when the daemon starts and whenever a new segment begins.
    /// 0 (the default) keeps everything. With ClickHouse, segments are
    /// deleted once shipped and `retention_days` there applies instead.
    #[serde(default)]
    pub spool_retention_days: u32,
    /// Ship the spool to ClickHouse. Without it the spool is the store,
    /// and `interceptor audit tail | query` read it locally.
    pub clickhouse: Option<ClickHouseConfig>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpoolFailure {
    #[default]
    Refuse,
    Continue,
}

/// Where the audit trail is shipped. Spool segments are deleted once
/// ClickHouse has acknowledged every event in them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClickHouseConfig {
    /// The HTTP(S) interface, like `http://127.0.0.1:8123`.
    pub url: String,
    #[serde(default = "default_clickhouse_database")]
    pub database: String,
    #[serde(default = "default_clickhouse_user")]
    pub user: String,
    /// The password, read from this file...
    pub password_file: Option<PathBuf>,
    /// ...or from this environment variable. Neither: no password.
    pub password_env: Option<String>,
    /// Most events sent in one INSERT.
    #[serde(default = "default_clickhouse_batch")]
    pub batch_rows: usize,
    /// How often new events are shipped when fewer than a batch wait.
    #[serde(default = "default_clickhouse_interval", with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Days of audit kept in ClickHouse: older daily partitions are
    /// dropped once an hour. 0 keeps everything.
    #[serde(default)]
    pub retention_days: u32,
    /// Create the database and tables at start-up when they are missing,
    /// as `interceptor audit init` does. Off: they must exist already.
    #[serde(default = "yes")]
    pub create_tables: bool,
}

impl ClickHouseConfig {
    pub fn password(&self) -> Option<SecretRef> {
        (self.password_file.is_some() || self.password_env.is_some()).then(|| SecretRef {
            file: self.password_file.clone(),
            env: self.password_env.clone(),
        })
    }

    /// The password's value, if one is configured.
    pub fn load_password(&self) -> Result<Option<Secret>, String> {
        self.password()
            .map(|r| r.load())
            .transpose()
            .map_err(|e| format!("[audit.clickhouse] password: {e}"))
    }
}

fn default_clickhouse_database() -> String {
    "interceptor".into()
}

fn default_clickhouse_user() -> String {
    "default".into()
}

fn default_clickhouse_batch() -> usize {
    100_000
}

fn default_clickhouse_interval() -> Duration {
    Duration::from_secs(1)
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            enabled: true,
            spool_dir: None,
            fsync: Fsync::default(),
            fsync_interval: default_fsync_interval(),
            segment_bytes: default_segment_bytes(),
            queue: default_audit_queue(),
            on_spool_failure: SpoolFailure::default(),
            spool_retention_days: 0,
            clickhouse: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fsync {
    #[default]
    Batch,
    Always,
    Never,
}

fn yes() -> bool {
    true
}

/// The power-cut window the audit promises by default. Each fsync costs
/// the writer ~90 µs of CPU in this VM (disk notifications are VM exits),
/// so 10 ms rather than 100 ms is 0.9 µs more per statement at a paced
/// pgbench -S of 10k tps and ~0.3 µs at a saturated 35k; a daemon crash
/// or `kill -9` loses nothing fsync would save.
fn default_fsync_interval() -> Duration {
    Duration::from_millis(10)
}

fn default_segment_bytes() -> u64 {
    64 << 20
}

fn default_audit_queue() -> usize {
    65_536
}

impl Config {
    /// Where the audit spool is.
    pub fn audit_dir(&self) -> PathBuf {
        self.audit
            .spool_dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("audit"))
    }
}

/// Approval of held statements.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalsConfig {
    /// Where the approvals API and web console listen.
    pub listen: SocketAddr,
    /// Serve HTTPS with the client TLS certificate (`[client_tls]`'s, or the
    /// one generated under `state_dir/tls`). `false` serves plain HTTP and
    /// is allowed only on a loopback address.
    #[serde(default = "yes")]
    pub tls: bool,
    /// The console's address as approvers reach it, shown to held clients
    /// and in notifications (default: the listen address).
    pub url: Option<String>,
    /// How long a held statement waits for a decision before it is
    /// refused as timed out.
    #[serde(default = "default_approval_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// How long an approved named prepared statement may be executed again
    /// in its session (each execution with new parameters is covered only
    /// for this long).
    #[serde(default = "default_approval_reuse", with = "humantime_serde")]
    pub reuse_for: Duration,
    /// Decided requests kept under `state_dir/approvals`.
    #[serde(default = "default_approvals_kept")]
    pub keep: usize,
    /// People who may approve, each with an API token (stored hashed).
    #[serde(default, rename = "approver")]
    pub approvers: Vec<ApproverConfig>,
    /// Where new requests and decisions are posted.
    #[serde(default, rename = "webhook")]
    pub webhooks: Vec<WebhookConfig>,
    /// Console sign-in through an OpenID Connect provider, besides tokens.
    pub oidc: Option<ConsoleOidc>,
}

/// The console as an OpenID Connect client (authorization code flow with
/// PKCE). The provider's ID token names the approver through `claim`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConsoleOidc {
    /// The provider's issuer URL, exactly as its tokens' `iss` says.
    pub issuer: String,
    /// The client registered at the provider for the console.
    pub client_id: String,
    /// The client secret, read from this file...
    pub client_secret_file: Option<PathBuf>,
    /// ...or from this environment variable. Neither: a public client,
    /// which PKCE alone protects.
    pub client_secret_env: Option<String>,
    /// Where the provider's metadata is (default:
    /// `{issuer}/.well-known/openid-configuration`).
    pub discovery_url: Option<String>,
    /// PEM CA bundle for the provider's HTTPS (default: the system roots).
    pub ca_file: Option<PathBuf>,
    /// The redirect URI registered at the provider (default:
    /// `{url}/login/oidc/callback`).
    pub redirect_url: Option<String>,
    #[serde(default = "default_console_scopes")]
    pub scopes: Vec<String>,
    /// The ID-token claim matched against approvers' `oidc` lists. An
    /// `email` with `email_verified = false` is refused.
    #[serde(default = "default_console_claim")]
    pub claim: String,
    /// Shown on the sign-in button.
    #[serde(default = "default_console_provider")]
    pub name: String,
}

impl ConsoleOidc {
    pub fn client_secret(&self) -> Option<SecretRef> {
        (self.client_secret_file.is_some() || self.client_secret_env.is_some()).then(|| SecretRef {
            file: self.client_secret_file.clone(),
            env: self.client_secret_env.clone(),
        })
    }
}

fn default_console_scopes() -> Vec<String> {
    vec!["openid".into(), "email".into()]
}

fn default_console_claim() -> String {
    "email".into()
}

fn default_console_provider() -> String {
    "single sign-on".into()
}

/// One approver.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApproverConfig {
    /// Shown in decisions and the audit trail.
    pub name: String,
    /// Approver groups, which hold rules name in `approvers`.
    #[serde(default)]
    pub groups: Vec<String>,
    /// SHA-256 (hex) of the approver's API token: `interceptor approvals
    /// new-token` makes a token and prints this.
    pub token_sha256: Option<String>,
    /// Values of `[approvals.oidc] claim` (such as e-mail addresses) that
    /// sign in to the console as this approver.
    #[serde(default)]
    pub oidc: Vec<String>,
    /// Names this person has as a requester (database user, token
    /// subject, actor claim, job): they cannot approve those requests.
    #[serde(default)]
    pub identities: Vec<String>,
}

/// One notification endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub url: String,
    /// `json` posts the request as it is; `slack` posts `{"text": ...}`
    /// for Slack-compatible incoming webhooks.
    #[serde(default)]
    pub format: WebhookFormat,
    /// PEM CA bundle for an HTTPS endpoint (default: the system roots).
    pub ca_file: Option<PathBuf>,
    /// Tries per notification, with exponential backoff from 1 s.
    #[serde(default = "default_webhook_attempts")]
    pub attempts: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookFormat {
    #[default]
    Json,
    Slack,
}

fn default_approval_timeout() -> Duration {
    Duration::from_secs(300)
}

fn default_approval_reuse() -> Duration {
    Duration::from_secs(600)
}

fn default_approvals_kept() -> usize {
    10_000
}

fn default_webhook_attempts() -> u32 {
    5
}

impl ApprovalsConfig {
    /// The base URL approvers use.
    pub fn base_url(&self) -> String {
        match &self.url {
            Some(u) => u.trim_end_matches('/').to_owned(),
            None => format!(
                "{}://{}",
                if self.tls { "https" } else { "http" },
                self.listen
            ),
        }
    }
}

/// Where the statement policy comes from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// The policy file (TOML; see `interceptor policy schema`). A relative
    /// path is relative to this config file. Reloaded on SIGHUP and when
    /// the file changes; a bad file keeps the previous policy.
    pub file: PathBuf,
    /// How often the policy file is checked for changes (`"0s"`: only on
    /// SIGHUP).
    #[serde(default = "default_watch_interval", with = "humantime_serde")]
    pub watch_interval: Duration,
    /// How many distinct statement texts keep their analysis in memory.
    /// Read at start-up: the cache outlives reloads, so a new size takes a
    /// restart.
    #[serde(default = "default_analysis_cache")]
    pub analysis_cache: usize,
}

/// Token verification: which issuers are trusted, for which audiences.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Oidc {
    #[serde(rename = "issuer")]
    pub issuers: Vec<OidcIssuer>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(default = "default_leeway", with = "humantime_serde")]
    pub leeway: Duration,
    /// How long fetched signing keys are used before they are fetched
    /// again. A token signed with an unknown key id refetches sooner (at
    /// most once per `min_refresh`), so key rotation needs no restart.
    #[serde(default = "default_jwks_cache", with = "humantime_serde")]
    pub jwks_cache: Duration,
    #[serde(default = "default_min_refresh", with = "humantime_serde")]
    pub min_refresh: Duration,
    /// Limit on each discovery or JWKS request.
    #[serde(default = "default_fetch_timeout", with = "humantime_serde")]
    pub fetch_timeout: Duration,
}

/// One trusted token issuer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcIssuer {
    /// The exact `iss` claim, e.g. `https://token.actions.githubusercontent.com`.
    pub issuer: String,
    /// `aud` values accepted; a token must carry at least one.
    pub audiences: Vec<String>,
    /// Where the issuer's metadata is (default:
    /// `{issuer}/.well-known/openid-configuration`); its `jwks_uri` names
    /// the keys.
    pub discovery_url: Option<String>,
    /// The JWKS itself, skipping discovery.
    pub jwks_url: Option<String>,
    /// PEM CA bundle for the issuer's HTTPS (default: the system roots).
    pub ca_file: Option<PathBuf>,
}

fn default_leeway() -> Duration {
    Duration::from_secs(30)
}

fn default_jwks_cache() -> Duration {
    Duration::from_secs(3600)
}

fn default_min_refresh() -> Duration {
    Duration::from_secs(10)
}

fn default_fetch_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_watch_interval() -> Duration {
    Duration::from_secs(1)
}

fn default_analysis_cache() -> usize {
    10_000
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/interceptor")
}

/// Transparent interception: eBPF programs attached to a tagged cgroup
/// send its processes' connections to protected destinations to this
/// proxy. Needs root, bpffs and a cgroup v2 mount.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Intercept {
    /// The proxy listens on 127.0.0.1 and ::1 at this port for redirected
    /// connections. Connections there without a kernel origin record are
    /// closed.
    pub port: u16,
    /// The tagged parent cgroup, relative to the cgroup v2 mount. Every
    /// descendant (job cgroups made by `interceptor run`) is intercepted.
    #[serde(default = "default_cgroup")]
    pub cgroup: String,
    /// Where programs, maps and links are pinned on bpffs. Pins keep
    /// tagged traffic captured (and refused) while the daemon is down.
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    /// Where `interceptor run` leaves job records for the daemon to read.
    #[serde(default = "default_runtime_dir")]
    pub runtime_dir: PathBuf,
    /// SO_MARK on the proxy's own upstream sockets, so they are never
    /// redirected even if the daemon runs inside a tagged cgroup.
    #[serde(default = "default_mark")]
    pub mark: u32,
    /// Emit the kernel programs' aya-log debug lines into the daemon log.
    #[serde(default)]
    pub bpf_log: bool,
}

pub fn default_cgroup() -> String {
    "interceptor".into()
}

pub fn default_pin_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/interceptor")
}

pub fn default_runtime_dir() -> PathBuf {
    PathBuf::from("/run/interceptor")
}

fn default_mark() -> u32 {
    0x1f5a_0001
}

/// Resource limits. Every one has a default that suits a CI runner.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest frontend message accepted, in bytes. Larger ones are refused
    /// with SQLSTATE 08P01 before they are buffered.
    pub max_message_size: u32,
    /// Concurrent client connections; further ones get SQLSTATE 53300.
    pub max_connections: usize,
    /// How long to wait for the upstream TCP/TLS connection.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long a client may take from connecting to finishing login.
    #[serde(with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// Close a session after this long with no traffic either way
    /// (`"0s"` disables it, like PostgreSQL's idle_session_timeout).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// On SIGTERM, how long sessions may run before they are closed.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: 64 * 1024 * 1024,
            max_connections: 1024,
            connect_timeout: Duration::from_secs(5),
            startup_timeout: Duration::from_secs(30),
            idle_timeout: Duration::ZERO,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// TLS between clients and the proxy.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ClientTls {
    /// `disabled` answers SSLRequest with `N`; `enabled` accepts TLS.
    #[serde(default)]
    pub mode: ClientTlsMode,
    /// PEM certificate chain. Without `cert` and `key`, a CA and a server
    /// certificate are generated under `state_dir/tls/` on first start.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Names put in a generated certificate besides localhost, 127.0.0.1, ::1.
    #[serde(default)]
    pub hostnames: Vec<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ClientTlsMode {
    Disabled,
    #[default]
    Enabled,
}

/// One protected database server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub name: String,
    /// The addresses clients believe they connect to: `"10.0.0.5:5432"`,
    /// `"10.0.0.0/8:5432"`, `"[fd00::1]:5432"` or `"*:5432"`.
    #[serde(default)]
    pub destinations: Vec<Destination>,
    /// The real server.
    pub upstream: Upstream,
    /// Databases clients may open through this target; `"*"` allows any.
    pub databases: Vec<String>,
    #[serde(default)]
    pub client_auth: ClientAuth,
    pub upstream_auth: UpstreamAuth,
    #[serde(default)]
    pub upstream_tls: UpstreamTls,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub host: String,
    #[serde(default = "default_pg_port")]
    pub port: u16,
}

fn default_pg_port() -> u16 {
    5432
}

/// How clients prove who they are to the proxy. Identity-based login
/// arrives with the policy work; this is the interim, per-target secret.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ClientAuth {
    #[serde(default)]
    pub method: ClientAuthMethod,
    /// The shared client secret, read from this file...
    pub secret_file: Option<PathBuf>,
    /// ...or from this environment variable.
    pub secret_env: Option<String>,
}

impl ClientAuth {
    pub fn secret(&self) -> SecretRef {
        SecretRef {
            file: self.secret_file.clone(),
            env: self.secret_env.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ClientAuthMethod {
    #[default]
    Trust,
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    /// Cleartext password, accepted only over TLS.
    Password,
    /// The password is an OIDC token (a JWT) from an `[oidc]` issuer,
    /// accepted only over TLS. The token's claims become the identity.
    Oidc,
}

/// The credentials the proxy itself logs in upstream with.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamAuth {
    pub user: String,
    /// The upstream password, read from this file...
    pub password_file: Option<PathBuf>,
    /// ...or from this environment variable. Neither: log in without one
    /// (trust upstream).
    pub password_env: Option<String>,
}

impl UpstreamAuth {
    pub fn password(&self) -> Option<SecretRef> {
        (self.password_file.is_some() || self.password_env.is_some()).then(|| SecretRef {
            file: self.password_file.clone(),
            env: self.password_env.clone(),
        })
    }
}

/// Where a secret is held outside the config file: a file (trailing newline
/// stripped) or an environment variable. The reference is not secret.
#[derive(Debug, Clone)]
pub struct SecretRef {
    pub file: Option<PathBuf>,
    pub env: Option<String>,
}

/// A secret's value. Debug and Display never show it.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl SecretRef {
    /// Reads the secret now, so that rotation needs no restart.
    pub fn load(&self) -> Result<Secret, String> {
        match (&self.file, &self.env) {
            (Some(path), None) => std::fs::read_to_string(path)
                .map(|s| Secret(s.trim_end_matches(['\n', '\r']).to_owned()))
                .map_err(|e| format!("cannot read secret file {}: {e}", path.display())),
            (None, Some(var)) => std::env::var(var)
                .map(Secret)
                .map_err(|_| format!("environment variable {var} is not set")),
            (None, None) => Err("no file or environment variable given".into()),
            (Some(_), Some(_)) => Err("give a file or an environment variable, not both".into()),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    #[serde(default)]
    pub mode: UpstreamTlsMode,
    /// CA bundle for `verify-full`.
    pub ca_file: Option<PathBuf>,
    /// Name checked against the certificate (default: `upstream.host`).
    pub server_name: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamTlsMode {
    #[default]
    Disable,
    /// Encrypt, without checking the server's certificate.
    Require,
    /// Encrypt, and check the certificate chain and host name.
    VerifyFull,
}

/// An address a protected database is reached at, as a client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    Exact(SocketAddr),
    Network(IpNet, u16),
    AnyHost(u16),
}

impl Destination {
    /// Bits that must match; more is more specific.
    pub fn specificity(&self) -> u32 {
        match self {
            Destination::Exact(_) => 200,
            Destination::Network(net, _) => match net {
                IpNet::V4(n) => 96 + u32::from(n.prefix_len()),
                IpNet::V6(n) => u32::from(n.prefix_len()),
            },
            Destination::AnyHost(_) => 0,
        }
    }

    pub fn matches(&self, addr: SocketAddr) -> bool {
        let ip = match addr.ip() {
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        };
        match *self {
            Destination::Exact(d) => d.port() == addr.port() && d.ip() == ip,
            Destination::Network(net, port) => port == addr.port() && net.contains(&ip),
            Destination::AnyHost(port) => port == addr.port(),
        }
    }
}

impl FromStr for Destination {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "`{s}` is not a destination; use IP:PORT, CIDR:PORT ([v6]:PORT, [v6/len]:PORT) or *:PORT"
            )
        };
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host == "*" {
            return Ok(Destination::AnyHost(port));
        }
        if host.contains('/') {
            return IpNet::from_str(host)
                .map(|n| Destination::Network(n.trunc(), port))
                .map_err(|_| bad());
        }
        IpAddr::from_str(host)
            .map(|ip| Destination::Exact(SocketAddr::new(ip, port)))
            .map_err(|_| bad())
    }
}

impl<'de> Deserialize<'de> for Destination {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Target {
    pub fn allows_database(&self, db: &str) -> bool {
        self.databases.iter().any(|d| d == "*" || d == db)
    }
}

impl Config {
    /// Reads, parses and checks a config file. Secrets are resolved once here
    /// so that a missing one is reported at start-up, not at first login.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            ConfigError::Parse {
                path: path.to_owned(),
                line,
                column,
                message: e.message().to_owned(),
            }
        })?;
        let mut config = config;
        config.validate(path, text)?;
        if let Some(dir) = path.parent() {
            let relative_to_config = |f: &mut PathBuf| {
                if f.is_relative() {
                    *f = dir.join(&*f);
                }
            };
            if let Some(p) = &mut config.policy {
                relative_to_config(&mut p.file);
            }
            if let Some(d) = &mut config.audit.spool_dir {
                relative_to_config(d);
            }
            if let Some(f) = config
                .audit
                .clickhouse
                .as_mut()
                .and_then(|c| c.password_file.as_mut())
            {
                relative_to_config(f);
            }
            if let Some(a) = &mut config.approvals {
                for w in &mut a.get_mut().webhooks {
                    if let Some(ca) = &mut w.ca_file {
                        relative_to_config(ca);
                    }
                }
                if let Some(o) = &mut a.get_mut().oidc {
                    if let Some(ca) = &mut o.ca_file {
                        relative_to_config(ca);
                    }
                    if let Some(f) = &mut o.client_secret_file {
                        relative_to_config(f);
                    }
                }
            }
            if let Some(o) = &mut config.oidc {
                for i in &mut o.get_mut().issuers {
                    if let Some(ca) = &mut i.ca_file {
                        relative_to_config(ca);
                    }
                }
            }
        }
        Ok(config)
    }

    fn validate(&self, path: &Path, text: &str) -> Result<(), ConfigError> {
        let invalid = |offset: usize, key: String, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            line: line_col(text, offset).0,
            key,
            message,
        };
        if self.listen.is_empty() && self.intercept.is_none() {
            return Err(invalid(
                0,
                "listen".into(),
                "give at least one address, or an [intercept] section".into(),
            ));
        }
        if let Some(i) = &self.intercept {
            let at = i.span().start;
            let i = i.get_ref();
            if i.port == 0 {
                return Err(invalid(at, "intercept.port".into(), "must not be 0".into()));
            }
            let cg = Path::new(&i.cgroup);
            if i.cgroup.is_empty()
                || cg.is_absolute()
                || cg
                    .components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                return Err(invalid(
                    at,
                    "intercept.cgroup".into(),
                    "give a path relative to the cgroup v2 mount, like \"interceptor\"".into(),
                ));
            }
            if self.listen.iter().any(|l| l.get_ref().port() == i.port) {
                return Err(invalid(
                    at,
                    "intercept.port".into(),
                    "is also in `listen`; interception needs a port of its own".into(),
                ));
            }
            for t in &self.targets {
                let loopback = SocketAddr::from(([127, 0, 0, 1], i.port));
                if t.get_ref().destinations.iter().any(|d| d.matches(loopback)) {
                    return Err(invalid(
                        t.span().start,
                        format!("target.{}.destinations", t.get_ref().name),
                        format!("includes the interception port {loopback} itself"),
                    ));
                }
            }
        }
        if let Some(a) = &self.approvals {
            let at = a.span().start;
            let a = a.get_ref();
            if !a.tls && !a.listen.ip().is_loopback() {
                return Err(invalid(
                    at,
                    "approvals.tls".into(),
                    "plain HTTP is allowed only on a loopback address; approvers' tokens would cross the network in clear".into(),
                ));
            }
            if a.timeout.is_zero() {
                return Err(invalid(
                    at,
                    "approvals.timeout".into(),
                    "must be more than 0s".into(),
                ));
            }
            for (i, ap) in a.approvers.iter().enumerate() {
                let at = text.find(&format!("\"{}\"", ap.name)).unwrap_or(at);
                if let Some(hash) = &ap.token_sha256
                    && (hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()))
                {
                    return Err(invalid(
                        at,
                        format!("approvals.approver.{}.token_sha256", ap.name),
                        "must be 64 hex digits (the SHA-256 of the token; `interceptor approvals new-token` prints it)".into(),
                    ));
                }
                if ap.token_sha256.is_none() && ap.oidc.is_empty() {
                    return Err(invalid(
                        at,
                        format!("approvals.approver.{}", ap.name),
                        "has no way to sign in: give token_sha256, or oidc logins with an [approvals.oidc] provider".into(),
                    ));
                }
                if !ap.oidc.is_empty() && a.oidc.is_none() {
                    return Err(invalid(
                        at,
                        format!("approvals.approver.{}.oidc", ap.name),
                        "needs an [approvals.oidc] provider to sign in with".into(),
                    ));
                }
                if a.approvers[..i].iter().any(|o| o.name == ap.name) {
                    return Err(invalid(
                        at,
                        format!("approvals.approver.{}", ap.name),
                        "the name is used twice".into(),
                    ));
                }
            }
            if let Some(o) = &a.oidc {
                let at = text.find("[approvals.oidc]").unwrap_or(at);
                if !o.issuer.starts_with("https://") {
                    return Err(invalid(
                        at,
                        "approvals.oidc.issuer".into(),
                        format!("{:?} is not an https:// URL", o.issuer),
                    ));
                }
                if let Some(secret) = o.client_secret()
                    && let Err(e) = secret.load()
                {
                    return Err(invalid(at, "approvals.oidc.client_secret".into(), e));
                }
                if !o.scopes.iter().any(|s| s == "openid") {
                    return Err(invalid(
                        at,
                        "approvals.oidc.scopes".into(),
                        "must include \"openid\", or the provider returns no ID token".into(),
                    ));
                }
                if let Some(u) = &o.redirect_url
                    && !(u.starts_with("https://") || u.starts_with("http://"))
                {
                    return Err(invalid(
                        at,
                        "approvals.oidc.redirect_url".into(),
                        format!("{u:?} is not an http:// or https:// URL"),
                    ));
                }
            }
            for w in &a.webhooks {
                if !(w.url.starts_with("http://") || w.url.starts_with("https://")) {
                    return Err(invalid(
                        text.find(&w.url).unwrap_or(at),
                        "approvals.webhook.url".into(),
                        format!("{:?} is not an http:// or https:// URL", w.url),
                    ));
                }
            }
        }
        if self.audit.spool_retention_days > 0 && self.audit.clickhouse.is_some() {
            return Err(invalid(
                text.find("spool_retention_days").unwrap_or(0),
                "audit.spool_retention_days".into(),
                "applies only when the spool is the store: with [audit.clickhouse], shipped segments are deleted and [audit.clickhouse] retention_days drops old partitions".into(),
            ));
        }
        if let Some(ch) = &self.audit.clickhouse {
            let at = text.find("[audit.clickhouse]").unwrap_or(0);
            let plain = |s: &str| {
                !s.is_empty()
                    && !s.starts_with(|c: char| c.is_ascii_digit())
                    && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            };
            if !plain(&ch.database) {
                return Err(invalid(
                    at,
                    "audit.clickhouse.database".into(),
                    format!(
                        "{:?} is not a plain name: use letters, digits and _",
                        ch.database
                    ),
                ));
            }
            if !(ch.url.starts_with("http://") || ch.url.starts_with("https://")) {
                return Err(invalid(
                    at,
                    "audit.clickhouse.url".into(),
                    format!(
                        "{:?} is not ClickHouse's HTTP interface: give http://HOST:8123 or https://HOST:8443",
                        ch.url
                    ),
                ));
            }
            if ch.batch_rows == 0 {
                return Err(invalid(
                    at,
                    "audit.clickhouse.batch_rows".into(),
                    "must not be 0".into(),
                ));
            }
        }
        let mut seen_listen = HashSet::new();
        for l in &self.listen {
            if !seen_listen.insert(*l.get_ref()) {
                return Err(invalid(
                    l.span().start,
                    "listen".into(),
                    format!("{} is listed twice", l.get_ref()),
                ));
            }
        }
        if self.targets.is_empty() {
            return Err(invalid(
                0,
                "target".into(),
                "define at least one [[target]]".into(),
            ));
        }
        let tls = &self.client_tls;
        if tls.cert.is_some() != tls.key.is_some() {
            return Err(invalid(
                text.find("[client_tls]").unwrap_or(0),
                "client_tls".into(),
                "give both `cert` and `key`, or neither to generate them".into(),
            ));
        }
        if self.limits.max_message_size < 1024 {
            return Err(invalid(
                text.find("max_message_size").unwrap_or(0),
                "limits.max_message_size".into(),
                "must be at least 1024 bytes".into(),
            ));
        }
        if let Some(o) = &self.oidc {
            let at = o.span().start;
            if o.get_ref().issuers.is_empty() {
                return Err(invalid(
                    at,
                    "oidc.issuer".into(),
                    "list at least one [[oidc.issuer]]".into(),
                ));
            }
            for i in &o.get_ref().issuers {
                let key = |k: &str| format!("oidc.issuer.{}.{k}", i.issuer);
                if i.audiences.is_empty() {
                    return Err(invalid(
                        at,
                        key("audiences"),
                        "list the audiences (`aud`) this proxy accepts".into(),
                    ));
                }
                for url in [&i.discovery_url, &i.jwks_url].into_iter().flatten() {
                    if !url.starts_with("https://") {
                        return Err(invalid(
                            at,
                            key("url"),
                            format!("`{url}` is not https: signing keys must come over TLS"),
                        ));
                    }
                }
                if i.discovery_url.is_none()
                    && i.jwks_url.is_none()
                    && !i.issuer.starts_with("https://")
                {
                    return Err(invalid(
                        at,
                        key("issuer"),
                        "is not an https URL; give `discovery_url` or `jwks_url`".into(),
                    ));
                }
            }
        }
        let mut names = HashSet::new();
        for spanned in &self.targets {
            let t = spanned.get_ref();
            let at = spanned.span().start;
            let key = |k: &str| format!("target.{}.{k}", t.name);
            if !names.insert(t.name.as_str()) {
                return Err(invalid(
                    at,
                    "target.name".into(),
                    format!("target `{}` is defined twice", t.name),
                ));
            }
            if t.databases.is_empty() {
                return Err(invalid(
                    at,
                    key("databases"),
                    "list the databases clients may open, or \"*\"".into(),
                ));
            }
            if let Some(secret) = t.upstream_auth.password() {
                secret
                    .load()
                    .map_err(|m| invalid(at, key("upstream_auth"), m))?;
            }
            if t.client_auth.method == ClientAuthMethod::Oidc && self.oidc.is_none() {
                return Err(invalid(
                    at,
                    key("client_auth.method"),
                    "`oidc` needs an [oidc] section naming the trusted issuers".into(),
                ));
            }
            if !matches!(
                t.client_auth.method,
                ClientAuthMethod::Trust | ClientAuthMethod::Oidc
            ) {
                t.client_auth.secret().load().map_err(|m| {
                    invalid(
                        at,
                        key("client_auth"),
                        format!("this method needs `secret_file` or `secret_env`: {m}"),
                    )
                })?;
            }
            if matches!(
                t.client_auth.method,
                ClientAuthMethod::Password | ClientAuthMethod::Oidc
            ) && tls.mode == ClientTlsMode::Disabled
            {
                return Err(invalid(
                    at,
                    key("client_auth.method"),
                    "`password` sends the secret in clear, so it needs client_tls enabled".into(),
                ));
            }
            if t.upstream_tls.mode == UpstreamTlsMode::VerifyFull
                && t.upstream_tls.ca_file.is_none()
            {
                return Err(invalid(
                    at,
                    key("upstream_tls.ca_file"),
                    "verify-full needs a CA file".into(),
                ));
            }
        }
        Ok(())
    }

    /// The target a connection is for. Until the kernel reports the original
    /// destination, a connection to a listener goes to the only target, or to
    /// the one whose destinations include that listener's address.
    pub fn target_for(&self, original_destination: SocketAddr) -> Option<&Target> {
        if let [only] = self.targets.as_slice() {
            return Some(only.get_ref());
        }
        self.targets.iter().map(Spanned::get_ref).find(|t| {
            t.destinations
                .iter()
                .any(|d| d.matches(original_destination))
        })
    }

    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        self.listen.iter().map(|l| *l.get_ref()).collect()
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn approvals_section_is_checked() {
        let base = "listen = [\"127.0.0.1:15432\"]\n[[target]]\nname = \"m\"\nupstream = { host = \"127.0.0.1\" }\ndatabases = [\"*\"]\nupstream_auth = { user = \"u\" }\n\
                    [approvals]\nlisten = \"127.0.0.1:7443\"\n";
        let parse = |extra: &str| Config::parse(Path::new("x.toml"), &format!("{base}{extra}"));
        let err = |extra: &str| parse(extra).unwrap_err().to_string();
        let sso = "[approvals.oidc]\nissuer = \"https://idp.example\"\nclient_id = \"c\"\n";
        let dana = "[[approvals.approver]]\nname = \"dana\"\noidc = [\"dana@example.com\"]\n";

        let c = parse(&format!("{dana}{sso}")).unwrap();
        let a = c.approvals.unwrap().into_inner();
        let o = a.oidc.unwrap();
        assert_eq!(o.claim, "email");
        assert_eq!(o.scopes, ["openid", "email"]);
        assert!(o.client_secret().is_none(), "no secret: a public client");
        assert!(a.approvers[0].token_sha256.is_none());

        let e = err(dana);
        assert!(
            e.contains("approvals.approver.dana.oidc") && e.contains("[approvals.oidc]"),
            "{e}"
        );
        let e = err("[[approvals.approver]]\nname = \"eve\"\n");
        assert!(e.contains("has no way to sign in"), "{e}");
        let e = err(&format!("{dana}{}", sso.replace("https://", "http://")));
        assert!(e.contains("approvals.oidc.issuer"), "{e}");
        let e = err(&format!("{dana}{sso}scopes = [\"email\"]\n"));
        assert!(e.contains("must include \"openid\""), "{e}");
        let e = err(&format!(
            "{dana}{sso}client_secret_file = \"/nonexistent/secret\"\n"
        ));
        assert!(
            e.contains("cannot read secret file /nonexistent/secret"),
            "{e}"
        );
    }

    #[test]
    fn intercept_section_is_checked() {
        let base = "[[target]]\nname = \"m\"\nupstream = { host = \"127.0.0.1\" }\ndatabases = [\"*\"]\nupstream_auth = { user = \"u\" }\n";
        let ok = format!("{base}[intercept]\nport = 15432\n");
        let c = Config::parse(Path::new("x.toml"), &ok).unwrap();
        let i = c.intercept.unwrap().into_inner();
        assert_eq!(i.cgroup, "interceptor");
        assert_eq!(i.pin_dir, PathBuf::from("/sys/fs/bpf/interceptor"));
        let bad = format!("{base}[intercept]\nport = 15432\ncgroup = \"../escape\"\n");
        let e = Config::parse(Path::new("x.toml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("intercept.cgroup"), "{e}");
        let clash = format!("listen = [\"127.0.0.1:15432\"]\n{base}[intercept]\nport = 15432\n");
        let e = Config::parse(Path::new("x.toml"), &clash)
            .unwrap_err()
            .to_string();
        assert!(e.contains("intercept.port"), "{e}");
        let none = base.to_owned();
        let e = Config::parse(Path::new("x.toml"), &none)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[intercept]"), "{e}");
        let typo = format!("{base}[intercept]\nport = 15432\ncgroupp = \"x\"\n");
        let e = Config::parse(Path::new("x.toml"), &typo)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `cgroupp`"), "{e}");
    }

    #[test]
    fn spool_retention_is_for_a_spool_that_is_the_store() {
        let base = format!("{GOOD}[audit]\nspool_retention_days = 30\n");
        let c = Config::parse(Path::new("x.toml"), &base).unwrap();
        assert_eq!(c.audit.spool_retention_days, 30);
        assert_eq!(
            Config::parse(Path::new("x.toml"), GOOD)
                .unwrap()
                .audit
                .spool_retention_days,
            0
        );
        let shipped = format!("{base}[audit.clickhouse]\nurl = \"http://127.0.0.1:8123\"\n");
        let e = Config::parse(Path::new("x.toml"), &shipped)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("audit.spool_retention_days") && e.contains("applies only"),
            "{e}"
        );
    }

    const GOOD: &str = r#"
listen = ["127.0.0.1:6432", "[::1]:6432"]
state_dir = "/tmp/x"

[limits]
connect_timeout = "2s"

[client_tls]
mode = "disabled"

[[target]]
name = "main"
destinations = ["10.0.0.5:5432", "10.1.0.0/16:5432", "[fd00::/8]:5432", "*:6543"]
upstream = { host = "127.0.0.1", port = 5432 }
databases = ["app"]
upstream_auth = { user = "admin", password_env = "HOME" }
"#;

    #[test]
    fn parses_a_full_file() {
        let c = Config::parse(Path::new("x.toml"), GOOD).expect("valid");
        assert_eq!(c.listen.len(), 2);
        assert_eq!(c.limits.connect_timeout, Duration::from_secs(2));
        let t = c.targets[0].get_ref();
        assert!(t.allows_database("app"));
        assert!(!t.allows_database("postgres"));
        assert!(t.destinations[1].matches("10.1.2.3:5432".parse().unwrap()));
        assert!(!t.destinations[1].matches("10.2.2.3:5432".parse().unwrap()));
        assert!(t.destinations[0].matches("[::ffff:10.0.0.5]:5432".parse().unwrap()));
        assert!(t.destinations[3].matches("1.2.3.4:6543".parse().unwrap()));
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let text = GOOD.replace(
            "connect_timeout = \"2s\"",
            "connect_timeout = \"2s\"\nconect_timeout = 3",
        );
        let err = Config::parse(Path::new("c.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("c.toml:7:"), "{err}");
        assert!(err.contains("conect_timeout"), "{err}");
    }

    #[test]
    fn missing_secret_is_reported_without_value() {
        let text = GOOD.replace(
            "password_env = \"HOME\"",
            "password_env = \"INTERCEPTOR_SURELY_UNSET\"",
        );
        let err = Config::parse(Path::new("c.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(err.contains("target.main.upstream_auth"), "{err}");
        assert!(err.contains("INTERCEPTOR_SURELY_UNSET is not set"), "{err}");
        assert!(err.starts_with("c.toml:11:"), "{err}");
    }

    #[test]
    fn cleartext_client_auth_requires_tls() {
        let text = GOOD.replace(
            "databases = [\"app\"]",
            "databases = [\"app\"]\nclient_auth = { method = \"password\", secret_env = \"HOME\" }",
        );
        let err = Config::parse(Path::new("c.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs client_tls"), "{err}");
    }

    #[test]
    fn secret_debug_hides_value() {
        let s = Secret("hunter2".into());
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn bad_destination_is_rejected() {
        assert!("db.internal:5432".parse::<Destination>().is_err());
        assert_eq!(
            "*:5432".parse::<Destination>(),
            Ok(Destination::AnyHost(5432))
        );
    }
}
