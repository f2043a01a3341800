//! interceptor: a PostgreSQL proxy that binds every session to a verified
//! identity, decides per statement, masks results and audits everything.
//!
//! The data path reads top to bottom: [`daemon`] accepts, [`session`] logs
//! the client in and the proxy in upstream, [`relay`] moves messages whose
//! shape [`protocol`] knows.

pub mod approvals;
pub mod audit;
pub mod auth;
pub mod cancel;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod enforce;
pub mod intercept;
pub mod limits;
pub mod masking;
pub mod oidc;
pub mod policy_cli;
pub mod protocol;
pub mod relay;
pub mod runtime;
pub mod session;
pub mod stream;
pub mod tls;
pub mod upstream;
pub mod workers;
