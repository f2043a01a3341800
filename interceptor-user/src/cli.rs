//! Command-line interface.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::workers::Sched;

#[derive(Debug, Parser)]
#[command(
    name = "interceptor",
    version,
    about = "A transparent PostgreSQL proxy for AI agents in CI",
    long_about = "interceptor sits between CI jobs and PostgreSQL. It holds the real database \
credentials, relays the full PostgreSQL protocol (simple and extended queries, COPY, \
cancel, fast-path calls), and is the place where identity, per-statement policy, masking \
and audit are enforced.\n\nWith an [intercept] section in the config, the daemon also loads \
eBPF programs that send the connections of processes in a tagged cgroup to the proxy \
without their knowledge: wrap a CI step with `interceptor run -- CMD`.\n\n\
Start with `interceptor check-config FILE`, then `interceptor daemon --config FILE`. \
See README.md for a complete example configuration."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy in the foreground.
    ///
    /// Signals: SIGHUP reloads the config file atomically (a bad file keeps
    /// the running config and logs why); SIGTERM or SIGINT stops accepting,
    /// lets sessions finish for `limits.shutdown_grace`, then ends the rest
    /// with SQLSTATE 57P01. Logging follows RUST_LOG (default: info).
    Daemon {
        /// The TOML configuration file.
        #[arg(long, short, value_name = "FILE", env = "INTERCEPTOR_CONFIG")]
        config: PathBuf,
        /// Session threads (default: one per CPU). Each session lives on
        /// one thread. With one per CPU, each thread is bound to its CPU
        /// and takes the sessions whose client runs there; any other
        /// number leaves threads unbound (on a runner that also runs the
        /// database, fewer threads leave more CPU to it).
        #[arg(long, value_name = "N", env = "INTERCEPTOR_WORKER_THREADS")]
        worker_threads: Option<usize>,
        /// How session threads are scheduled. `batch`: a thread woken by a
        /// reply does not preempt the client or server that sent it, which
        /// is about to block anyway; more throughput when the proxy shares
        /// its CPUs with them, at the cost of waiting up to a scheduler
        /// slice (a few ms) on CPUs saturated by other work. `normal`: the
        /// kernel's default, with wakeup preemption.
        #[arg(
            long,
            value_enum,
            value_name = "POLICY",
            default_value_t = Sched::Batch,
            env = "INTERCEPTOR_SESSION_SCHED"
        )]
        session_sched: Sched,
    },
    /// Check a configuration file and exit: 0 if it is valid, 1 with
    /// `file:line: key: problem` if not. Secrets it references are read
    /// to check that they exist, and never printed.
    CheckConfig {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Check, explain and describe statement policy files.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Approve or deny statements that policy held: list the requests,
    /// show one, decide it. Talks to the daemon's approvals API, as the
    /// approver whose token is given. `new-token` makes an approver token.
    Approvals {
        #[command(subcommand)]
        command: ApprovalsCommand,
    },
    /// The audit trail: read it (from the local spool, or ClickHouse when
    /// configured), verify its hash chains, and create its tables.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Print a session's transcript: who, from where, then every
    /// statement with its decision, rule, rows, masked values, SQLSTATE
    /// and duration. Reads ClickHouse (when configured) and the spool's
    /// events not yet shipped.
    Replay {
        #[command(flatten)]
        spool: SpoolLocation,
        /// The session's audit id, as `audit tail` shows it.
        #[arg(value_name = "SESSION")]
        session: uuid::Uuid,
    },
    /// Run a CI step with its database connections intercepted.
    ///
    /// Creates a job cgroup under the tagged parent, moves itself in,
    /// records the job's identity (user, GitHub Actions / GitLab CI
    /// variables, the OIDC token if given) for the daemon, runs CMD, and
    /// removes the cgroup when CMD is done (killing anything CMD left
    /// running). Exits with CMD's status. Needs root (cgroup moves); under
    /// sudo, CMD runs as the calling user (SUDO_UID/SUDO_GID). Refuses to
    /// run CMD if the tagged cgroup does not exist, so CMD never runs
    /// unintercepted.
    Run {
        /// Job name for the audit trail (default: GITHUB_JOB, CI_JOB_NAME, or "job").
        #[arg(long, value_name = "NAME")]
        job: Option<String>,
        /// Read the job's OIDC token from this environment variable.
        #[arg(long, value_name = "VAR", conflicts_with_all = ["token_file", "token_github"])]
        token_env: Option<String>,
        /// Read the job's OIDC token from this file.
        #[arg(long, value_name = "FILE", conflicts_with = "token_github")]
        token_file: Option<PathBuf>,
        /// Request a GitHub Actions ID token for this audience from the
        /// runner (ACTIONS_ID_TOKEN_REQUEST_URL and _TOKEN; the workflow
        /// needs `permissions: id-token: write`). The audience must be one
        /// the daemon's `[oidc]` issuer accepts.
        #[arg(long, value_name = "AUDIENCE")]
        token_github: Option<String>,
        #[command(flatten)]
        location: InterceptLocation,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Intercept an existing cgroup (a systemd scope, a container) and its
    /// descendants, for runners that already give each job a cgroup. The
    /// daemon must have installed the programs. Needs root.
    Tag {
        /// The cgroup: a path under the cgroup v2 mount, absolute or relative to it.
        #[arg(value_name = "CGROUP")]
        target: String,
        #[command(flatten)]
        location: InterceptLocation,
    },
    /// Stop intercepting a cgroup tagged with `interceptor tag`.
    Untag {
        /// The cgroup, as given to `interceptor tag`.
        #[arg(value_name = "CGROUP")]
        target: String,
        #[command(flatten)]
        location: InterceptLocation,
    },
    /// Detach every program, remove the pins and the (empty) tagged parent
    /// cgroup. Afterwards tagged processes connect directly again: this is
    /// how interception is switched off, so stop the CI jobs first.
    Uninstall {
        #[command(flatten)]
        location: InterceptLocation,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Check a policy file and exit: 0 if valid, 1 with `file:line:column:
    /// problem` if not.
    Check {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Show how a policy decides SQL for an identity: each statement's
    /// kind, tables, functions and settings, the groups the identity is
    /// in, and the rule that decides (or the default deny).
    Explain {
        /// The policy file.
        #[arg(long, value_name = "FILE")]
        policy: PathBuf,
        /// The SQL, as the client would send it (several statements allowed).
        #[arg(long, value_name = "SQL")]
        sql: String,
        /// The identity, as `key=value` pairs: user, uid, comm, exe,
        /// cgroup, job, intercepted (true/false), ci.NAME for a CI
        /// variable, or claim.NAME for a verified token's claim (repeat a
        /// claim for an array claim such as groups). Repeat or separate
        /// with commas.
        #[arg(long, value_name = "KEY=VALUE", value_delimiter = ',')]
        identity: Vec<String>,
        /// The target name the session goes to.
        #[arg(long, default_value = "default")]
        target: String,
        /// The database the session uses.
        #[arg(long, default_value = "postgres")]
        database: String,
    },
    /// Print the policy file's JSON schema.
    Schema,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Print the newest events: daemon start and stop, policy reloads,
    /// session starts and ends, one row per statement (decision, rule,
    /// rows, bytes, SQLSTATE, duration, text), and what masking hid in each
    /// (rule, column or detector, count; never a value).
    Tail {
        #[command(flatten)]
        spool: SpoolLocation,
        /// How many events.
        #[arg(short = 'n', long, default_value_t = 50)]
        lines: usize,
        /// Only this session (its audit id, as `audit tail` shows it).
        #[arg(long, value_name = "ID")]
        session: Option<uuid::Uuid>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Check a session's tamper-evident hash chain: every statement row
    /// present (1, 2, 3...), unchanged, and in order. Exits 1 if not.
    /// Reads ClickHouse (when configured) and the spool.
    Verify {
        #[command(flatten)]
        spool: SpoolLocation,
        /// The session's audit id.
        #[arg(value_name = "SESSION")]
        session: uuid::Uuid,
    },
    /// Find statement rows. Without ClickHouse the spool is the store and
    /// is searched locally; with `[audit.clickhouse]` the query runs there
    /// (events reach it within `flush_interval`).
    Query {
        #[command(flatten)]
        spool: SpoolLocation,
        /// Only this session.
        #[arg(long, value_name = "ID")]
        session: Option<uuid::Uuid>,
        /// Only this principal (as `audit tail` shows it).
        #[arg(long, value_name = "NAME")]
        principal: Option<String>,
        /// Only this decision: allow, deny, hold or unchecked.
        #[arg(long, value_name = "DECISION")]
        decision: Option<String>,
        /// Only statements that touched this table.
        #[arg(long, value_name = "TABLE")]
        table: Option<String>,
        /// Only the last DURATION ("1h", "30m", "7d").
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        since: Option<std::time::Duration>,
        /// At most this many rows, the newest.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Run this SQL on ClickHouse instead and print its result (see
        /// docs/analysts.md for the views and example queries).
        #[arg(long, value_name = "SQL", conflicts_with_all = ["session", "principal", "decision", "table", "since"])]
        sql: Option<String>,
        /// The output format for --sql: any ClickHouse format.
        #[arg(long, default_value = "PrettyCompactMonoBlock", requires = "sql")]
        format: String,
        /// One JSON object per line.
        #[arg(long, conflicts_with = "sql")]
        json: bool,
    },
    /// Create the ClickHouse database, tables and views the audit trail
    /// needs (what is missing; nothing is dropped). The DDL works on
    /// ClickHouse 18.16; a server from 20.5 on also gets LowCardinality,
    /// a DateTime64 column, ZSTD on statement text and a TTL.
    Init {
        /// The daemon's configuration file, with `[audit.clickhouse]`.
        #[arg(
            long,
            short,
            value_name = "FILE",
            env = "INTERCEPTOR_CONFIG",
            required_unless_present = "print"
        )]
        config: Option<PathBuf>,
        /// Print the DDL instead of running it.
        #[arg(long)]
        print: bool,
        /// With --print: the server version to write it for.
        #[arg(long, value_name = "X.Y", default_value = "18.16", requires = "print")]
        server_version: String,
        /// With --print: the database name.
        #[arg(long, default_value = "interceptor", requires = "print")]
        database: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ApprovalsCommand {
    /// Pending requests (every kept one with --all), newest first.
    List {
        #[command(flatten)]
        api: ApprovalsApi,
        #[arg(long)]
        all: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// One request: the statement, who asked, the target, the planner's
    /// estimate, and its state.
    Show {
        #[command(flatten)]
        api: ApprovalsApi,
        #[arg(value_name = "ID")]
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Approve a request. It runs once it has every approval it needs.
    Approve {
        #[command(flatten)]
        api: ApprovalsApi,
        #[arg(value_name = "ID")]
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
        /// Also approve this statement's fingerprint for this principal on
        /// this target for N minutes.
        #[arg(long, value_name = "N")]
        grant_minutes: Option<u32>,
    },
    /// Deny a request; the client gets SQLSTATE 42501 with the reason.
    Deny {
        #[command(flatten)]
        api: ApprovalsApi,
        #[arg(value_name = "ID")]
        id: String,
        #[arg(long)]
        reason: String,
    },
    /// Make an approver token: prints the token (give it to the approver)
    /// and the `[[approvals.approver]]` entry with its hash for the config.
    NewToken {
        /// The approver's name.
        #[arg(long)]
        name: String,
        /// Approver groups.
        #[arg(long = "group", value_name = "GROUP")]
        groups: Vec<String>,
    },
}

/// How to reach the approvals API, and as whom.
#[derive(Debug, Args)]
pub struct ApprovalsApi {
    /// The daemon's configuration file: the API's address comes from
    /// `[approvals]`, and its CA from `state_dir/tls/ca.pem`.
    #[arg(long, short, value_name = "FILE", env = "INTERCEPTOR_CONFIG")]
    pub config: Option<PathBuf>,
    /// The API's base URL, instead of the config's.
    #[arg(long, value_name = "URL", env = "INTERCEPTOR_APPROVALS_URL")]
    pub url: Option<String>,
    /// The CA that signed the API's certificate.
    #[arg(long, value_name = "FILE", env = "INTERCEPTOR_APPROVALS_CA")]
    pub ca: Option<PathBuf>,
    /// The approver's API token...
    #[arg(
        long,
        value_name = "TOKEN",
        env = "INTERCEPTOR_APPROVER_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// ...or a file holding it.
    #[arg(long, value_name = "FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
}

/// Which spool to read: the daemon's (from its config) or a directory.
#[derive(Debug, Args)]
pub struct SpoolLocation {
    /// The daemon's configuration file; its `[audit] spool_dir` (default
    /// `state_dir/audit`) is read.
    #[arg(
        long,
        short,
        value_name = "FILE",
        env = "INTERCEPTOR_CONFIG",
        conflicts_with = "spool"
    )]
    pub config: Option<PathBuf>,
    /// The spool directory itself.
    #[arg(long, value_name = "DIR")]
    pub spool: Option<PathBuf>,
}

/// Where the interception state lives; must match the daemon's [intercept].
#[derive(Debug, Args)]
pub struct InterceptLocation {
    /// The tagged parent cgroup, relative to the cgroup v2 mount.
    #[arg(
        long,
        value_name = "PATH",
        env = "INTERCEPTOR_CGROUP",
        default_value = "interceptor"
    )]
    pub cgroup: String,
    /// Where the daemon pinned its programs, maps and links.
    #[arg(
        long,
        value_name = "DIR",
        env = "INTERCEPTOR_PIN_DIR",
        default_value = "/sys/fs/bpf/interceptor"
    )]
    pub pin_dir: PathBuf,
    /// Where job records are kept for the daemon.
    #[arg(
        long,
        value_name = "DIR",
        env = "INTERCEPTOR_RUNTIME_DIR",
        default_value = "/run/interceptor"
    )]
    pub runtime_dir: PathBuf,
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
