//! Maps the cancel keys the proxy hands to clients onto upstream backends.
//!
//! Each client gets the upstream's real process id (so NOTIFY self-detection
//! and pg_backend_pid() agree) but a secret chosen by the proxy, so a client
//! never learns a key that would work against the server directly.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::protocol::startup::CANCEL_REQUEST_CODE;

#[derive(Debug, Clone)]
pub struct UpstreamKey {
    pub host: String,
    pub port: u16,
    pub pid: i32,
    pub secret: Vec<u8>,
}

#[derive(Default)]
pub struct CancelRegistry {
    keys: Mutex<HashMap<(i32, i32), UpstreamKey>>,
}

/// Removes its key when the session ends.
pub struct CancelGuard<'a> {
    registry: &'a CancelRegistry,
    key: (i32, i32),
}

impl Drop for CancelGuard<'_> {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.key);
    }
}

impl CancelRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(i32, i32), UpstreamKey>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a session; returns the client-facing (pid, secret).
    pub fn register(&self, upstream: UpstreamKey) -> (CancelGuard<'_>, i32, i32) {
        let mut keys = self.lock();
        let pid = upstream.pid;
        let secret = loop {
            let s: i32 = rand::rng().random();
            if !keys.contains_key(&(pid, s)) {
                break s;
            }
        };
        keys.insert((pid, secret), upstream);
        (
            CancelGuard {
                registry: self,
                key: (pid, secret),
            },
            pid,
            secret,
        )
    }

    pub fn lookup(&self, pid: i32, secret: &[u8]) -> Option<UpstreamKey> {
        let secret = i32::from_be_bytes(secret.try_into().ok()?);
        self.lock().get(&(pid, secret)).cloned()
    }
}

/// Sends a CancelRequest to the upstream. Like PostgreSQL, the outcome is
/// not reported to the requester.
pub async fn send_cancel(key: &UpstreamKey, connect_timeout: Duration) -> std::io::Result<()> {
    let mut stream = tokio::time::timeout(
        connect_timeout,
        TcpStream::connect((key.host.as_str(), key.port)),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    let mut packet = Vec::with_capacity(12 + key.secret.len());
    packet.extend_from_slice(&((12 + key.secret.len()) as i32).to_be_bytes());
    packet.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
    packet.extend_from_slice(&key.pid.to_be_bytes());
    packet.extend_from_slice(&key.secret);
    stream.write_all(&packet).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_and_unmap() {
        let reg = CancelRegistry::default();
        let up = UpstreamKey {
            host: "h".into(),
            port: 1,
            pid: 42,
            secret: vec![1, 2, 3, 4],
        };
        let (guard, pid, secret) = reg.register(up);
        assert_eq!(pid, 42);
        let found = reg.lookup(pid, &secret.to_be_bytes()).expect("registered");
        assert_eq!(found.secret, vec![1, 2, 3, 4]);
        assert!(
            reg.lookup(pid, &secret.wrapping_add(1).to_be_bytes())
                .is_none()
        );
        drop(guard);
        assert!(reg.lookup(pid, &secret.to_be_bytes()).is_none());
    }
}
