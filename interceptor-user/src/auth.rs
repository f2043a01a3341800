//! Server side of SCRAM-SHA-256 (RFC 5802/7677), for clients logging in to
//! the proxy. The client side, for logging in upstream, is postgres-protocol's.
//!
//! Channel binding (SCRAM-SHA-256-PLUS) is never offered: the proxy
//! terminates TLS, so a binding to its certificate would prove nothing about
//! the upstream.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
const ITERATIONS: u32 = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("channel binding is not supported by this server")]
    ChannelBinding,
    #[error("password authentication failed")]
    Failed,
}

/// What the proxy keeps of a client secret: enough to verify a proof, not
/// enough to log in as the client.
#[derive(Clone)]
pub struct ScramVerifier {
    salt: [u8; 16],
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(data);
    m.finalize().into_bytes().into()
}

impl ScramVerifier {
    pub fn from_password(password: &str) -> Self {
        let mut salt = [0u8; 16];
        rand::rng().fill_bytes(&mut salt);
        // PostgreSQL SASLpreps the password, and falls back to the raw bytes
        // when that fails; do the same so the same secrets work.
        let prepared = stringprep::saslprep(password)
            .map(|c| c.into_owned())
            .unwrap_or_else(|_| password.to_owned());
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(prepared.as_bytes(), &salt, ITERATIONS, &mut salted);
        let client_key = hmac(&salted, b"Client Key");
        ScramVerifier {
            salt,
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&salted, b"Server Key"),
        }
    }

    /// Handles the client-first message; returns the exchange state and the
    /// server-first message to send.
    pub fn start(&self, client_first: &[u8]) -> Result<(ScramExchange, String), ScramError> {
        let text =
            std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (gs2, bare) = match text.as_bytes().first() {
            Some(b'n') | Some(b'y') => {
                let mut parts = text.splitn(3, ',');
                let flag = parts.next().unwrap_or_default();
                let authzid = parts.next().ok_or(ScramError::Malformed("no GS2 header"))?;
                let bare = parts
                    .next()
                    .ok_or(ScramError::Malformed("no client-first-bare"))?;
                (format!("{flag},{authzid},"), bare)
            }
            Some(b'p') => return Err(ScramError::ChannelBinding),
            _ => {
                return Err(ScramError::Malformed(
                    "GS2 header must start with n, y or p",
                ));
            }
        };
        let client_nonce = bare
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .filter(|n| !n.is_empty())
            .ok_or(ScramError::Malformed("no client nonce"))?;
        let mut server_nonce = [0u8; 18];
        rand::rng().fill_bytes(&mut server_nonce);
        let nonce = format!("{client_nonce}{}", B64.encode(server_nonce));
        let server_first = format!("r={nonce},s={},i={ITERATIONS}", B64.encode(self.salt));
        let exchange = ScramExchange {
            verifier: self.clone(),
            gs2_header: gs2,
            client_first_bare: bare.to_owned(),
            server_first: server_first.clone(),
            nonce,
        };
        Ok((exchange, server_first))
    }
}

/// The state between server-first and server-final.
pub struct ScramExchange {
    verifier: ScramVerifier,
    gs2_header: String,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

impl ScramExchange {
    /// Checks the client's proof; returns the server-final message.
    pub fn finish(self, client_final: &[u8]) -> Result<String, ScramError> {
        let text =
            std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = text
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("no proof"))?;
        let mut channel = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            if let Some(v) = attr.strip_prefix("c=") {
                channel = Some(v);
            } else if let Some(v) = attr.strip_prefix("r=") {
                nonce = Some(v);
            }
        }
        let channel = B64
            .decode(channel.ok_or(ScramError::Malformed("no channel binding attribute"))?)
            .map_err(|_| ScramError::Malformed("channel binding is not base64"))?;
        if channel != self.gs2_header.as_bytes() {
            return Err(ScramError::Malformed(
                "channel binding does not match the GS2 header",
            ));
        }
        if nonce != Some(self.nonce.as_str()) {
            return Err(ScramError::Malformed("nonce does not match"));
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| ScramError::Malformed("proof is not base64"))?;
        if proof.len() != 32 {
            return Err(ScramError::Malformed("proof has the wrong length"));
        }
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let client_key: Vec<u8> = proof.iter().zip(signature).map(|(p, s)| p ^ s).collect();
        let computed: [u8; 32] = Sha256::digest(&client_key).into();
        // Constant-time comparison: a timing difference would leak the key.
        let diff = computed
            .iter()
            .zip(self.verifier.stored_key)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 {
            return Err(ScramError::Failed);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    fn run(client_pw: &str, server_pw: &str) -> Result<(), ScramError> {
        let verifier = ScramVerifier::from_password(server_pw);
        let mut client = ScramSha256::new(client_pw.as_bytes(), ChannelBinding::unsupported());
        let (exchange, server_first) = verifier.start(client.message())?;
        client
            .update(server_first.as_bytes())
            .expect("client accepts server-first");
        let server_final = exchange.finish(client.message())?;
        client
            .finish(server_final.as_bytes())
            .expect("client verifies the server");
        Ok(())
    }

    #[test]
    fn right_password_passes_both_ways() {
        assert_eq!(run("s3cret", "s3cret"), Ok(()));
    }

    #[test]
    fn wrong_password_fails() {
        assert_eq!(run("guess", "s3cret"), Err(ScramError::Failed));
    }

    #[test]
    fn channel_binding_request_refused() {
        let v = ScramVerifier::from_password("x");
        assert_eq!(
            v.start(b"p=tls-server-end-point,,n=,r=abc").err(),
            Some(ScramError::ChannelBinding)
        );
    }

    #[test]
    fn garbage_is_malformed() {
        let v = ScramVerifier::from_password("x");
        assert!(matches!(
            v.start(b"\xff\xfe"),
            Err(ScramError::Malformed(_))
        ));
        assert!(matches!(v.start(b"n,,n=,"), Err(ScramError::Malformed(_))));
    }
}
