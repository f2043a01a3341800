//! Statement decisions. Free of sockets and wire types: it takes a
//! statement, an identity and a target, and returns a decision.

pub mod analysis;
pub mod masking;

use serde::{Deserialize, Serialize};

/// What the proxy does with one statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum StatementDecision {
    Allow,
    Deny {
        reason: String,
        hint: Option<String>,
    },
    Hold {
        reason: String,
    },
}

impl StatementDecision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, StatementDecision::Allow)
    }
}
pub mod policy;
pub mod principal;
pub mod session;

pub use analysis::{
    Analysis, AnalysisError, Analyzer, Kind, LastAnalysis, Statement, analyze,
    pin::{PinError, pin_temp},
    redact_literals,
};
pub use policy::{ApprovalNeeds, Decision, Limits, Policy, PolicyError, Subject, Verdict};
pub use principal::{Principal, TokenIdentity};
pub use session::{Check, Refusal, SessionPolicy};
