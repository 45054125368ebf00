//! Optional API keys: `Authorization: Bearer KEY` checked against SHA-256 hashes from a file (a mounted
//! Kubernetes Secret works the same), compared in constant time, with per-key request and token rate limits.
//!
//! The file (YAML; unknown keys are refused; the keys themselves never appear in it):
//! ```yaml
//! keys:
//!   - name: team-a                   # in metrics and logs instead of the key
//!     sha256: 9f86d081884c7d65...    # `echo -n KEY | baleen-gateway hash-key`
//!     requestsPerMinute: 600         # optional
//!     tokensPerMinute: 100000        # optional: the requests' max_tokens / max_completion_tokens, summed
//! ```
//! A key with `tokensPerMinute` must state `max_tokens` (or `max_completion_tokens`) in every request: the gateway
//! charges what a request may generate when it arrives, so an unbounded request is refused (400), not guessed.

use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use baleen_api::http::{ApiError, bearer};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::{Error, Result};

/// The keys file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysFile {
    pub keys: Vec<KeyConfig>,
}

/// One key of the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeyConfig {
    pub name: String,
    /// Lower-case hex SHA-256 of the key.
    pub sha256: String,
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    #[serde(default)]
    pub tokens_per_minute: Option<u32>,
}

/// The SHA-256 of `key`, as stored in the file (lower-case hex).
pub fn hash_key(key: &str) -> String {
    Sha256::digest(key.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// A token bucket: `capacity` per minute, refilled continuously.
#[derive(Debug)]
struct Bucket {
    capacity: f64,
    level: f64,
    at: Instant,
}

impl Bucket {
    fn new(per_minute: u32, now: Instant) -> Self {
        Self { capacity: f64::from(per_minute), level: f64::from(per_minute), at: now }
    }

    fn refill(&mut self, now: Instant) {
        let seconds = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + seconds * self.capacity / 60.0).min(self.capacity);
        self.at = now;
    }

    /// Whole seconds until `cost` is available (0: it is now).
    fn wait_for(&self, cost: f64) -> u32 {
        if self.level >= cost { 0 } else { ((cost - self.level) * 60.0 / self.capacity).ceil().max(1.0) as u32 }
    }
}

fn lock(m: &Mutex<Bucket>) -> std::sync::MutexGuard<'_, Bucket> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One key, parsed.
#[derive(Debug)]
pub struct Key {
    pub name: String,
    hash: [u8; 32],
    requests: Option<Mutex<Bucket>>,
    tokens: Option<Mutex<Bucket>>,
}

/// Which limit refused a request (the `limit` label of the rate-limit counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Requests,
    Tokens,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::Tokens => "tokens",
        }
    }
}

impl Key {
    /// Charges one request that may generate `max_tokens`: both buckets or neither. The error is a 429 with
    /// `Retry-After` (and which limit), or a 400 when the request can never fit.
    pub fn admit(&self, max_tokens: Option<u64>, now: Instant) -> std::result::Result<(), (ApiError, Option<Limit>)> {
        let mut requests = self.requests.as_ref().map(lock);
        let mut tokens = self.tokens.as_ref().map(lock);
        let cost = match (&tokens, max_tokens) {
            (None, _) => 0.0,
            (Some(_), Some(n)) => n as f64,
            (Some(bucket), None) => {
                return Err((
                    ApiError::invalid_param(
                        "max_tokens",
                        format!(
                            "the API key `{}` is limited to {} tokens per minute: set `max_tokens` (or \
                             `max_completion_tokens`)",
                            self.name, bucket.capacity
                        ),
                    ),
                    None,
                ));
            }
        };
        if let Some(bucket) = &tokens
            && cost > bucket.capacity
        {
            return Err((
                ApiError::invalid_param(
                    "max_tokens",
                    format!(
                        "max_tokens {cost} is more than the API key `{}` may use in a minute ({})",
                        self.name, bucket.capacity
                    ),
                ),
                None,
            ));
        }
        let mut wait = (0, None);
        if let Some(bucket) = requests.as_mut() {
            bucket.refill(now);
            wait = (bucket.wait_for(1.0), Some(Limit::Requests));
        }
        if let Some(bucket) = tokens.as_mut() {
            bucket.refill(now);
            let w = bucket.wait_for(cost);
            if w > wait.0 {
                wait = (w, Some(Limit::Tokens));
            }
        }
        if let (seconds, Some(limit)) = wait
            && seconds > 0
        {
            let mut e = ApiError::queue_full(format!(
                "the API key `{}` is over its {} per minute limit; retry in {seconds} s",
                self.name,
                limit.as_str()
            ));
            e.retry_after = Some(seconds);
            return Err((e, Some(limit)));
        }
        if let Some(bucket) = requests.as_mut() {
            bucket.level -= 1.0;
        }
        if let Some(bucket) = tokens.as_mut() {
            bucket.level -= cost;
        }
        Ok(())
    }
}

/// Every key of the file.
#[derive(Debug)]
pub struct Keys {
    keys: Vec<Key>,
}

impl Keys {
    /// Reads and validates the keys file; the error names the field.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|source| Error::ReadConfig { path: path.to_path_buf(), source })?;
        let file: KeysFile =
            serde_yaml::from_str(&text).map_err(|source| Error::ParseConfig { path: path.to_path_buf(), source })?;
        Self::new(file, Instant::now())
    }

    pub fn new(file: KeysFile, now: Instant) -> Result<Self> {
        if file.keys.is_empty() {
            return Err(Error::Invalid { field: "keys".into(), reason: "lists no key".into() });
        }
        let mut keys: Vec<Key> = Vec::with_capacity(file.keys.len());
        for (i, key) in file.keys.into_iter().enumerate() {
            let field = |f: &str| format!("keys[{i}].{f}");
            if key.name.trim().is_empty() {
                return Err(Error::Invalid { field: field("name"), reason: "is empty".into() });
            }
            let Some(hash) = parse_hex(&key.sha256.to_ascii_lowercase()) else {
                return Err(Error::Invalid {
                    field: field("sha256"),
                    reason: "is not 64 hex digits (`echo -n KEY | baleen-gateway hash-key` prints it)".into(),
                });
            };
            if keys.iter().any(|k| k.name == key.name || k.hash == hash) {
                return Err(Error::Invalid { field: field("name"), reason: "repeats a name or a key".into() });
            }
            for (f, value) in
                [("requestsPerMinute", key.requests_per_minute), ("tokensPerMinute", key.tokens_per_minute)]
            {
                if value == Some(0) {
                    return Err(Error::Invalid { field: field(f), reason: "must be at least 1".into() });
                }
            }
            keys.push(Key {
                name: key.name,
                hash,
                requests: key.requests_per_minute.map(|n| Mutex::new(Bucket::new(n, now))),
                tokens: key.tokens_per_minute.map(|n| Mutex::new(Bucket::new(n, now))),
            });
        }
        Ok(Self { keys })
    }

    /// The key of the request's `Authorization: Bearer` value: its hash is compared with every stored hash in
    /// constant time. A 401 (OpenAI's shape) when it is missing or unknown.
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> std::result::Result<&Key, ApiError> {
        let presented = bearer(authorization)?;
        let hash: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for key in &self.keys {
            if bool::from(key.hash.ct_eq(&hash)) {
                found = Some(key);
            }
        }
        found.ok_or_else(|| ApiError::unauthorized("the API key is not valid".to_string()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::time::Duration;

    use super::*;

    fn keys(yaml: &str, now: Instant) -> Result<Keys> {
        let file: KeysFile =
            serde_yaml::from_str(yaml).map_err(|source| Error::ParseConfig { path: "keys.yaml".into(), source })?;
        Keys::new(file, now)
    }

    fn authorization(key: &str) -> Vec<u8> {
        format!("Bearer {key}").into_bytes()
    }

    #[test]
    fn keys_are_found_by_their_hash_and_others_refused() {
        assert_eq!(hash_key("test"), "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08");
        let now = Instant::now();
        let k = keys(
            &format!(
                "keys:\n  - name: a\n    sha256: {}\n  - name: b\n    sha256: {}\n",
                hash_key("ka"),
                hash_key("kb")
            ),
            now,
        )
        .unwrap();
        assert_eq!(k.authenticate(Some(&authorization("kb"))).unwrap().name, "b");
        assert_eq!(k.authenticate(Some(&authorization("kc"))).unwrap_err().status, http::StatusCode::UNAUTHORIZED);
        assert_eq!(k.authenticate(None).unwrap_err().status, http::StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn bad_files_name_the_field() {
        let now = Instant::now();
        for (yaml, field) in [
            ("keys: []\n", "keys"),
            ("keys:\n  - name: a\n    sha256: abc\n", "keys[0].sha256"),
            (
                &format!("keys:\n  - name: a\n    sha256: {}\n    requestsPerMinute: 0\n", hash_key("x")),
                "keys[0].requestsPerMinute",
            ),
            (
                &format!("keys:\n  - name: a\n    sha256: {h}\n  - name: b\n    sha256: {h}\n", h = hash_key("x")),
                "keys[1].name",
            ),
            ("keys:\n  - name: a\n    key: plain\n", "unknown field `key`"),
        ] {
            let e = keys(yaml, now).unwrap_err().to_string();
            assert!(e.contains(field), "{yaml}: {e}");
        }
    }

    #[test]
    fn request_and_token_limits_refill_over_the_minute() {
        let t0 = Instant::now();
        let k = keys(
            &format!(
                "keys:\n  - name: a\n    sha256: {}\n    requestsPerMinute: 2\n    tokensPerMinute: 60\n",
                hash_key("x")
            ),
            t0,
        )
        .unwrap();
        let key = &k.keys[0];
        assert!(key.admit(Some(10), t0).is_ok());
        assert!(key.admit(Some(10), t0).is_ok());
        let (e, limit) = key.admit(Some(10), t0).unwrap_err();
        assert_eq!((e.status.as_u16(), limit), (429, Some(Limit::Requests)));
        assert_eq!(e.retry_after, Some(30), "one request refills in 30 s");
        // 30 s later: one request back, and 30 more tokens (40 + 30 > 60: capped at 60).
        let t1 = t0 + Duration::from_secs(30);
        let (e, limit) = key.admit(Some(61), t1).unwrap_err();
        assert_eq!((e.status.as_u16(), limit), (400, None), "more than a minute's tokens can never pass");
        assert!(key.admit(Some(60), t1).is_ok());
        let t2 = t1 + Duration::from_secs(30);
        let (e, limit) = key.admit(Some(40), t2).unwrap_err();
        assert_eq!((e.status.as_u16(), limit), (429, Some(Limit::Tokens)));
        assert_eq!(e.retry_after, Some(10), "30 tokens there, 40 wanted: 10 s more");
        let (e, _) = key.admit(None, t2).unwrap_err();
        assert_eq!(e.status.as_u16(), 400, "a token-limited key must state max_tokens");
    }
}
