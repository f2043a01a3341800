//! Per-identity limits from the policy's `[[limit]]`s: a statement rate
//! shared by all of an identity's sessions, and a cap on the rows and bytes
//! one statement may return.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;

use crate::protocol::build::ProxyError;

/// Token buckets by identity ([`policies::Principal::limit_key`]).
#[derive(Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<String, Arc<Bucket>>>,
}

impl RateLimiter {
    /// The identity's bucket, shared with its other sessions.
    pub fn bucket(&self, key: &str, burst: u32) -> Arc<Bucket> {
        let mut map = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() > 4096 {
            // Identities with no live session hold no debt worth keeping.
            map.retain(|_, b| Arc::strong_count(b) > 1);
        }
        map.entry(key.to_owned())
            .or_insert_with(|| {
                Arc::new(Bucket {
                    state: Mutex::new((f64::from(burst), Instant::now())),
                })
            })
            .clone()
    }
}

/// Tokens and when they were last topped up.
pub struct Bucket {
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    /// Takes `n` statements' worth and says how long to wait before sending
    /// them. Tokens may go negative: later statements queue behind earlier
    /// ones, across sessions, so the identity's rate holds however many
    /// connections it opens.
    pub fn take(&self, n: u32, rate: f64, burst: u32) -> Duration {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let refill = now.duration_since(s.1).as_secs_f64() * rate;
        s.0 = (s.0 + refill).min(f64::from(burst)) - f64::from(n);
        s.1 = now;
        if s.0 >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-s.0 / rate)
        }
    }
}

/// What to do with one backend message under a result cap.
#[derive(Debug, PartialEq, Eq)]
pub enum CapAction {
    Forward,
    /// Withhold it: the result is over the cap.
    Drop,
    /// End the capped result with this error instead.
    Replace(BytesMut),
}

/// Counts one result's rows and bytes and withholds what is over the cap.
/// The server still runs the statement to its end (cancelling could hit
/// the next statement in a pipeline); the client gets the rows up to the
/// cap, then SQLSTATE 54000 where the result would have ended.
#[derive(Debug)]
pub struct ResultCap {
    max_rows: u64,
    max_bytes: u64,
    rows: u64,
    bytes: u64,
    over: Option<&'static str>,
}

impl ResultCap {
    pub fn new(max_rows: Option<u64>, max_bytes: Option<u64>) -> Option<ResultCap> {
        (max_rows.is_some() || max_bytes.is_some()).then(|| ResultCap {
            max_rows: max_rows.unwrap_or(u64::MAX),
            max_bytes: max_bytes.unwrap_or(u64::MAX),
            rows: 0,
            bytes: 0,
            over: None,
        })
    }

    fn reset(&mut self) {
        self.rows = 0;
        self.bytes = 0;
        self.over = None;
    }

    /// `tag` and `len` (the whole frame) of the next backend message.
    pub fn on(&mut self, tag: u8, len: usize) -> CapAction {
        match tag {
            // DataRow, and COPY TO STDOUT's rows.
            b'D' | b'd' => {
                if self.over.is_some() {
                    return CapAction::Drop;
                }
                self.rows += 1;
                self.bytes += len as u64;
                if self.rows > self.max_rows {
                    self.over = Some("rows");
                } else if self.bytes > self.max_bytes {
                    self.over = Some("bytes");
                }
                if self.over.is_some() {
                    CapAction::Drop
                } else {
                    CapAction::Forward
                }
            }
            b'c' if self.over.is_some() => CapAction::Drop,
            // The result's end: CommandComplete, ErrorResponse,
            // PortalSuspended, EmptyQueryResponse.
            b'C' | b'E' | b's' | b'I' => {
                let over = self.over;
                self.reset();
                match over {
                    None => CapAction::Forward,
                    Some(what) => {
                        let limit = if what == "rows" {
                            self.max_rows
                        } else {
                            self.max_bytes
                        };
                        let mut out = BytesMut::new();
                        ProxyError::error(
                            "54000",
                            format!(
                                "interceptor: the result exceeds this identity's limit of {limit} {what} per statement; the rest was withheld"
                            ),
                        )
                        .with_hint("Add a LIMIT or an aggregate, or page through the rows with a cursor.")
                        .encode(&mut out);
                        CapAction::Replace(out)
                    }
                }
            }
            // A new result starts, or the cycle ends.
            b'T' | b'H' | b'Z' => {
                self.reset();
                CapAction::Forward
            }
            _ => CapAction::Forward,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_over_the_cap_are_withheld_and_the_result_ends_in_54000() {
        let mut cap = ResultCap::new(Some(2), None).unwrap();
        assert_eq!(cap.on(b'T', 30), CapAction::Forward);
        assert_eq!(cap.on(b'D', 10), CapAction::Forward);
        assert_eq!(cap.on(b'D', 10), CapAction::Forward);
        assert_eq!(cap.on(b'D', 10), CapAction::Drop);
        assert_eq!(cap.on(b'D', 10), CapAction::Drop);
        let CapAction::Replace(err) = cap.on(b'C', 12) else {
            panic!("no error")
        };
        assert_eq!(err[0], b'E');
        assert!(String::from_utf8_lossy(&err).contains("54000"));
        // The next result starts from zero.
        assert_eq!(cap.on(b'Z', 6), CapAction::Forward);
        assert_eq!(cap.on(b'D', 10), CapAction::Forward);
        assert_eq!(cap.on(b'C', 12), CapAction::Forward);
    }

    #[test]
    fn bytes_cap_counts_copy_out_too() {
        let mut cap = ResultCap::new(None, Some(25)).unwrap();
        assert_eq!(cap.on(b'H', 10), CapAction::Forward);
        assert_eq!(cap.on(b'd', 20), CapAction::Forward);
        assert_eq!(cap.on(b'd', 20), CapAction::Drop);
        assert_eq!(cap.on(b'c', 5), CapAction::Drop);
        assert!(matches!(cap.on(b'C', 12), CapAction::Replace(_)));
    }

    #[test]
    fn a_bucket_paces_past_its_burst() {
        let b = RateLimiter::default().bucket("job x", 2);
        assert_eq!(b.take(2, 10.0, 2), Duration::ZERO);
        let wait = b.take(1, 10.0, 2);
        assert!(
            wait > Duration::from_millis(50) && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        // Debt accumulates: the next one waits behind it.
        assert!(b.take(1, 10.0, 2) > wait);
    }
}
