//! Command-line interface.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "interceptor",
    version,
    about = "A transparent PostgreSQL proxy for AI agents in CI",
    long_about = "interceptor sits between CI jobs and PostgreSQL. It holds the real database \
credentials, relays the full PostgreSQL protocol (simple and extended queries, COPY, \
cancel, fast-path calls), and is the place where identity, per-statement policy, masking \
and audit are enforced.\n\nStart with `interceptor check-config FILE`, then \
`interceptor daemon --config FILE`. See README.md for a complete example configuration."
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
        /// one thread; on a runner that also runs the database, fewer
        /// threads leave more CPU to it.
        #[arg(long, value_name = "N", env = "INTERCEPTOR_WORKER_THREADS")]
        worker_threads: Option<usize>,
    },
    /// Check a configuration file and exit: 0 if it is valid, 1 with
    /// `file:line: key: problem` if not. Secrets it references are read
    /// to check that they exist, and never printed.
    CheckConfig {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}
