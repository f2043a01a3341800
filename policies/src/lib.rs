//! Statement decisions. Free of sockets and wire types: it takes a
//! statement, an identity and a target, and returns a decision.
//!
//! The engine itself arrives with the identity-bound policy issue; this
//! crate already fixes the decision vocabulary the proxy is built around.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_allow_is_allowed() {
        assert!(StatementDecision::Allow.is_allowed());
        assert!(
            !StatementDecision::Deny {
                reason: "r".into(),
                hint: None
            }
            .is_allowed()
        );
        assert!(!StatementDecision::Hold { reason: "r".into() }.is_allowed());
    }
}
