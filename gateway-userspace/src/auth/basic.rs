//! HTTP Basic authentication (RFC 7617): legacy, for clients that can do nothing better.
//!
//! Passwords are stored only as Argon2id hashes (PHC strings, as `gateway hash-password`
//! prints them) in a users file, one `user:hash[:scope,scope...]` per line. Config validation
//! refuses a route that accepts Basic on a plain-HTTP listener: the password travels in clear
//! in every request.
//!
//! Argon2 is slow on purpose (tens of milliseconds), so verification runs on the blocking pool,
//! at most one per core at a time, and a successful check is remembered for a few minutes:
//! a client that sends the same password with every request pays the hash once, and a flood
//! of wrong passwords queues behind the permits instead of taking every core.
use std::{
    collections::{BTreeSet, HashMap},
    path::Path,
    sync::Arc,
    time::Duration,
};

use argon2::{Argon2, PasswordHash, PasswordVerifier as _};
use base64::Engine as _;
use http::HeaderValue;
use sha2::{Digest as _, Sha256};
use tokio::sync::Semaphore;

use super::{AuthError, AuthMethod, Identity};

/// How long a verified user/password pair is accepted without hashing again.
const VERIFIED_TTL: Duration = Duration::from_secs(300);
/// Verified pairs remembered at most (each entry is a 32-byte digest).
const VERIFIED_CAPACITY: u64 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum BasicError {
    #[error("reading the Basic users file `{path}`: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "`{path}` line {line}: {message} (expected `user:$argon2id$...[:scope,scope]`; `gateway hash-password` prints the hash)"
    )]
    Line {
        path: String,
        line: usize,
        message: String,
    },
}

struct User {
    /// An Argon2 PHC string, checked parseable at load.
    hash: String,
    scopes: BTreeSet<String>,
}

/// The users allowed to authenticate with Basic, and the state that keeps checking them cheap.
pub struct BasicUsers {
    realm: String,
    users: HashMap<String, User>,
    /// Verified `(user, password, hash)` digests; a changed hash no longer matches.
    verified: moka::sync::Cache<[u8; 32], ()>,
    hashing: Arc<Semaphore>,
    /// Hashed for unknown users too, so a wrong user name costs as long as a wrong password and
    /// response times do not tell which user names exist.
    decoy_hash: String,
}

impl BasicUsers {
    /// Loads the users file. Any bad line fails the load, naming the line: a half-loaded users
    /// file would lock out whoever was on the lines after it.
    pub fn load(path: &Path, realm: &str) -> Result<BasicUsers, BasicError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| BasicError::Read {
            path: shown.clone(),
            source,
        })?;
        let mut users = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |message: &str| BasicError::Line {
                path: shown.clone(),
                line: index + 1,
                message: message.to_owned(),
            };
            let mut fields = line.splitn(3, ':');
            let (Some(name), Some(hash)) = (fields.next(), fields.next()) else {
                return Err(bad("no `:` between user and hash"));
            };
            if name.is_empty() {
                return Err(bad("empty user name"));
            }
            let parsed = PasswordHash::new(hash).map_err(|e| bad(&format!("bad hash: {e}")))?;
            if !parsed.algorithm.as_str().starts_with("argon2") {
                return Err(bad("only Argon2 hashes are accepted"));
            }
            let scopes = fields
                .next()
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
            let user = User {
                hash: hash.to_owned(),
                scopes,
            };
            if users.insert(name.to_owned(), user).is_some() {
                return Err(bad(&format!("user `{name}` appears twice")));
            }
        }
        let permits = std::thread::available_parallelism().map_or(1, usize::from);
        Ok(BasicUsers {
            realm: realm.to_owned(),
            users,
            verified: moka::sync::Cache::builder()
                .max_capacity(VERIFIED_CAPACITY)
                .time_to_live(VERIFIED_TTL)
                .build(),
            hashing: Arc::new(Semaphore::new(permits)),
            decoy_hash: hash_password(b"decoy password for unknown users")
                .expect("hashing with a fresh salt cannot fail"),
        })
    }

    /// The `WWW-Authenticate` challenge of a 401 on a route that accepts Basic.
    pub fn challenge(&self) -> Option<HeaderValue> {
        HeaderValue::from_str(&format!(
            "Basic realm=\"{}\", charset=\"UTF-8\"",
            self.realm
        ))
        .ok()
    }

    /// Verifies the `Basic` credentials of an `Authorization` header value (the part after the
    /// scheme).
    pub async fn verify(&self, credentials: &str) -> Result<Identity, AuthError> {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(credentials.trim())
            .map_err(|_| AuthError::MalformedCredentials("Basic credentials are not base64"))?;
        let decoded = String::from_utf8(decoded)
            .map_err(|_| AuthError::MalformedCredentials("Basic credentials are not UTF-8"))?;
        let Some((name, password)) = decoded.split_once(':') else {
            return Err(AuthError::MalformedCredentials(
                "Basic credentials lack the `:` between user and password",
            ));
        };
        let user = self.users.get(name);
        let hash = user.map_or(&self.decoy_hash, |u| &u.hash).clone();
        let digest: [u8; 32] = Sha256::new()
            .chain_update(name)
            .chain_update([0])
            .chain_update(password)
            .chain_update([0])
            .chain_update(&hash)
            .finalize()
            .into();
        let remembered = user.is_some() && self.verified.contains_key(&digest);
        let verified = remembered || (self.hash_matches(password, hash).await && user.is_some());
        let Some(user) = user.filter(|_| verified) else {
            return Err(AuthError::BadPassword);
        };
        if !remembered {
            self.verified.insert(digest, ());
        }
        Ok(Identity {
            principal: name.to_owned(),
            method: AuthMethod::Basic,
            scopes: user.scopes.clone(),
            roles: BTreeSet::new(),
            claims: serde_json::Map::new(),
        })
    }

    /// Checks `password` against an Argon2 `hash` on the blocking pool, one check per core at
    /// a time.
    async fn hash_matches(&self, password: &str, hash: String) -> bool {
        let Ok(_permit) = self.hashing.acquire().await else {
            return false;
        };
        let password = password.to_owned();
        tokio::task::spawn_blocking(move || verify_password(&password, &hash))
            .await
            .unwrap_or(false)
    }
}

fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| {
        Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
}

/// An Argon2id PHC string for `password` with a fresh random salt and the crate's default
/// (OWASP-recommended) cost, as the users file stores it.
pub fn hash_password(password: &[u8]) -> Result<String, argon2::password_hash::Error> {
    use argon2::password_hash::{PasswordHasher as _, SaltString, rand_core::OsRng};
    let salt = SaltString::generate(&mut OsRng);
    Ok(Argon2::default()
        .hash_password(password, &salt)?
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::testing::temp_dir;

    fn users(lines: &str) -> Result<BasicUsers, BasicError> {
        let dir = temp_dir("basic");
        let path = dir.join("users");
        std::fs::write(&path, lines).expect("users file is written");
        BasicUsers::load(&path, "api")
    }

    fn credentials(user: &str, password: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    }

    #[tokio::test]
    async fn the_right_password_authenticates_with_the_users_scopes() {
        let hash = hash_password(b"correct horse").expect("hash");
        let users = users(&format!(
            "# legacy clients\nalice:{hash}:orders:read, orders:write\n"
        ))
        .expect("loads");
        let identity = users
            .verify(&credentials("alice", "correct horse"))
            .await
            .expect("authenticates");
        assert_eq!(identity.principal, "alice");
        assert_eq!(identity.method, AuthMethod::Basic);
        assert_eq!(
            identity
                .scopes
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            ["orders:read", "orders:write"]
        );
        // Remembered: the second check needs no hashing (and still gives the same identity).
        users.verified.run_pending_tasks();
        assert_eq!(users.verified.entry_count(), 1);
        let again = users
            .verify(&credentials("alice", "correct horse"))
            .await
            .expect("authenticates again");
        assert_eq!(again, identity);
    }

    #[tokio::test]
    async fn wrong_password_unknown_user_and_garbage_are_refused() {
        let hash = hash_password(b"correct horse").expect("hash");
        let users = users(&format!("alice:{hash}\n")).expect("loads");
        for (presented, reason) in [
            (credentials("alice", "wrong"), "bad_password"),
            (credentials("mallory", "correct horse"), "bad_password"),
            ("%%%".to_owned(), "malformed_credentials"),
            (
                base64::engine::general_purpose::STANDARD.encode("no colon"),
                "malformed_credentials",
            ),
        ] {
            let error = users.verify(&presented).await.expect_err("refused");
            assert_eq!(error.reason(), reason, "{presented}: {error}");
        }
        // Failures are never remembered.
        users.verified.run_pending_tasks();
        assert_eq!(users.verified.entry_count(), 0);
    }

    #[test]
    fn bad_users_files_name_the_line() {
        let hash = hash_password(b"pw").expect("hash");
        for (text, expected) in [
            ("alice\n".to_owned(), "line 1: no `:`"),
            (format!("ok:{hash}\nbob:plaintext\n"), "line 2: bad hash"),
            (
                format!("a:{hash}\na:{hash}\n"),
                "line 2: user `a` appears twice",
            ),
            (format!(":{hash}\n"), "line 1: empty user name"),
        ] {
            let error = users(&text).err().expect("refused").to_string();
            assert!(error.contains(expected), "{error}");
        }
    }
}
