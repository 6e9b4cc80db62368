//! API keys: created and revoked at runtime through the admin API, persisted across restarts,
//! verified on every request.
//!
//! A key is `gw_<key id>_<secret>`: the key id (8 random bytes, hex) is public and names the key
//! in lists and logs; the secret (32 random bytes, base64url) is shown once, at creation. Only
//! the SHA-256 of the secret is stored: a slow password hash buys nothing against 256 random
//! bits, and a fast one keeps verification off the request's critical path. Hashes are compared
//! in constant time.
//!
//! The store is a JSON file (`version`, then one object per key) replaced atomically on every
//! change, before the change is answered: a revocation the daemon acknowledged survives a crash.
use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use super::{AuthError, AuthMethod, Clock, Identity, unix_ms};
use crate::lists::state::{StateError, write_atomic};

/// What every key starts with, so leaked keys are recognisable (secret scanners, log filters).
const PREFIX: &str = "gw_";
/// Hex characters of a key id.
const KEY_ID_LEN: usize = 16;
/// Base64url characters of 32 random bytes, unpadded.
const SECRET_LEN: usize = 43;
const FILE_VERSION: u32 = 1;
const MAX_OWNER_LEN: usize = 128;
const MAX_SCOPES: usize = 64;
const MAX_SCOPE_LEN: usize = 128;

/// The public name of a key: 16 lowercase hex characters.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KeyId(String);

impl KeyId {
    fn generate() -> Result<KeyId, KeyStoreError> {
        let mut bytes = [0u8; KEY_ID_LEN / 2];
        getrandom::fill(&mut bytes).map_err(KeyStoreError::Random)?;
        Ok(KeyId(bytes.iter().map(|b| format!("{b:02x}")).collect()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    #[cfg(test)]
    pub(crate) fn for_tests(id: &str) -> KeyId {
        KeyId::try_from(id.to_owned()).expect("a valid test key id")
    }
}

impl TryFrom<String> for KeyId {
    type Error = String;

    fn try_from(id: String) -> Result<Self, Self::Error> {
        if id.len() == KEY_ID_LEN && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(KeyId(id))
        } else {
            Err(format!(
                "`{id}` is not a key id (16 lowercase hex characters, as `gateway keys list` shows)"
            ))
        }
    }
}

impl From<KeyId> for String {
    fn from(id: KeyId) -> String {
        id.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A whole key as handed to its owner, once. `Debug` hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// One key as the file stores it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct Record {
    key_id: KeyId,
    /// SHA-256 of the secret, hex.
    secret_sha256: String,
    owner: String,
    scopes: Vec<String>,
    created_unix_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_unix_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    revoked_unix_ms: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: u32,
    keys: Vec<Record>,
}

/// Whether a key is usable now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyStatus {
    Active,
    Expired,
    Revoked,
}

impl KeyStatus {
    pub fn name(self) -> &'static str {
        match self {
            KeyStatus::Active => "active",
            KeyStatus::Expired => "expired",
            KeyStatus::Revoked => "revoked",
        }
    }
}

/// A key as listed to operators: everything but the secret and its hash.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyView {
    pub key_id: KeyId,
    pub owner: String,
    pub scopes: Vec<String>,
    pub created_unix_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_unix_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_unix_ms: Option<u64>,
    pub status: KeyStatus,
}

/// A new key: the only moment its secret exists outside its owner's hands.
#[derive(Clone, Debug)]
pub struct CreatedKey {
    pub view: KeyView,
    pub secret: Secret,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyStoreError {
    #[error("cannot read the API key file `{path}`")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the API key file `{path}` is damaged; restore it from a backup (or move it away to start with no keys)"
    )]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "the API key file `{path}` has version {found}, this build reads version {FILE_VERSION}; run the matching gateway version"
    )]
    Version { path: PathBuf, found: u32 },
    #[error(
        "the API key file `{path}` lists key `{key_id}` twice; remove one entry by hand (keep the revoked one if either is)"
    )]
    Duplicate { path: PathBuf, key_id: KeyId },
    #[error(
        "the API key file `{path}` holds a bad hash for key `{key_id}`; revoke and recreate it"
    )]
    BadHash { path: PathBuf, key_id: KeyId },
    #[error("persisting the API keys failed; the change was not applied")]
    Write(#[source] StateError),
    // getrandom's error implements `std::error::Error` only with its `std` feature.
    #[error("the system's random number generator failed: {0}")]
    Random(getrandom::Error),
    #[error("{0}")]
    Invalid(String),
    #[error("no API key `{0}`; `gateway keys list` shows the key ids")]
    NotFound(String),
}

struct Stored {
    record: Record,
    hash: [u8; 32],
}

impl Stored {
    fn view(&self, now_ms: u64) -> KeyView {
        let record = &self.record;
        let status = if record.revoked_unix_ms.is_some() {
            KeyStatus::Revoked
        } else if record.expires_unix_ms.is_some_and(|at| now_ms >= at) {
            KeyStatus::Expired
        } else {
            KeyStatus::Active
        };
        KeyView {
            key_id: record.key_id.clone(),
            owner: record.owner.clone(),
            scopes: record.scopes.clone(),
            created_unix_ms: record.created_unix_ms,
            expires_unix_ms: record.expires_unix_ms,
            revoked_unix_ms: record.revoked_unix_ms,
            status,
        }
    }
}

/// The API keys, shared by the admin API (changes) and the request path (verification).
pub struct KeyStore {
    path: PathBuf,
    clock: Arc<dyn Clock>,
    keys: RwLock<BTreeMap<KeyId, Stored>>,
    /// Serialises changes, so verification never waits for a write to reach the disk: a change
    /// is written first and only then swapped in.
    writer: Mutex<()>,
}

impl fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl KeyStore {
    /// Loads the store; a missing file is an empty store (first start). A damaged file is an
    /// error: guessing could resurrect a revoked key or lock out valid ones.
    pub fn open(path: &Path, clock: Arc<dyn Clock>) -> Result<KeyStore, KeyStoreError> {
        let text = match std::fs::read(path) {
            Ok(text) => Some(text),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(KeyStoreError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let mut keys = BTreeMap::new();
        if let Some(text) = text {
            let file: File =
                serde_json::from_slice(&text).map_err(|source| KeyStoreError::Parse {
                    path: path.to_owned(),
                    source,
                })?;
            if file.version != FILE_VERSION {
                return Err(KeyStoreError::Version {
                    path: path.to_owned(),
                    found: file.version,
                });
            }
            for record in file.keys {
                let hash =
                    parse_hash(&record.secret_sha256).ok_or_else(|| KeyStoreError::BadHash {
                        path: path.to_owned(),
                        key_id: record.key_id.clone(),
                    })?;
                let key_id = record.key_id.clone();
                if keys
                    .insert(key_id.clone(), Stored { record, hash })
                    .is_some()
                {
                    return Err(KeyStoreError::Duplicate {
                        path: path.to_owned(),
                        key_id,
                    });
                }
            }
        }
        Ok(KeyStore {
            path: path.to_owned(),
            clock,
            keys: RwLock::new(keys),
            writer: Mutex::new(()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates a key, persists it, and returns it with its secret (never stored, never shown
    /// again).
    pub fn create(
        &self,
        owner: &str,
        scopes: &[String],
        ttl: Option<Duration>,
    ) -> Result<CreatedKey, KeyStoreError> {
        validate(owner, scopes)?;
        if ttl.is_some_and(|ttl| ttl.is_zero()) {
            return Err(KeyStoreError::Invalid(
                "a key's time to live must be longer than zero".to_owned(),
            ));
        }
        let mut random = [0u8; 32];
        getrandom::fill(&mut random).map_err(KeyStoreError::Random)?;
        let secret_text = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random);
        let hash: [u8; 32] = Sha256::digest(secret_text.as_bytes()).into();
        let now_ms = unix_ms(self.clock.now());
        let _writing = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let key_id = loop {
            let id = KeyId::generate()?;
            if !self.read().contains_key(&id) {
                break id;
            }
        };
        let record = Record {
            key_id: key_id.clone(),
            secret_sha256: hex(&hash),
            owner: owner.to_owned(),
            scopes: scopes.to_vec(),
            created_unix_ms: now_ms,
            expires_unix_ms: ttl.map(|ttl| {
                now_ms.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
            }),
            revoked_unix_ms: None,
        };
        self.persist(Some(&record))?;
        let stored = Stored { record, hash };
        let view = stored.view(now_ms);
        self.write().insert(key_id.clone(), stored);
        tracing::info!(key_id = %key_id, owner, ?scopes, expires_unix_ms = ?view.expires_unix_ms, "API key created");
        Ok(CreatedKey {
            view,
            secret: Secret(format!("{PREFIX}{key_id}_{secret_text}")),
        })
    }

    /// Every key, revoked and expired ones included (they stay for the record).
    pub fn list(&self) -> Vec<KeyView> {
        let now_ms = unix_ms(self.clock.now());
        self.read().values().map(|s| s.view(now_ms)).collect()
    }

    /// Revokes a key at once and for good; revoking it again changes nothing.
    pub fn revoke(&self, key_id: &str) -> Result<KeyView, KeyStoreError> {
        let key_id = KeyId::try_from(key_id.to_owned()).map_err(KeyStoreError::Invalid)?;
        let now_ms = unix_ms(self.clock.now());
        let _writing = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let record = {
            let keys = self.read();
            let stored = keys
                .get(&key_id)
                .ok_or_else(|| KeyStoreError::NotFound(key_id.to_string()))?;
            if stored.record.revoked_unix_ms.is_some() {
                return Ok(stored.view(now_ms));
            }
            Record {
                revoked_unix_ms: Some(now_ms),
                ..stored.record.clone()
            }
        };
        self.persist(Some(&record))?;
        let mut keys = self.write();
        let stored = keys
            .get_mut(&key_id)
            .ok_or_else(|| KeyStoreError::NotFound(key_id.to_string()))?;
        stored.record = record;
        tracing::info!(key_id = %key_id, owner = %stored.record.owner, "API key revoked");
        Ok(stored.view(now_ms))
    }

    /// Verifies a presented key. Revocation and expiry are reported only to holders of the
    /// right secret; anything else is an unknown key.
    pub fn verify(&self, presented: &str) -> Result<Identity, AuthError> {
        let (key_id, secret) = parse_presented(presented)?;
        let presented_hash: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        let now_ms = unix_ms(self.clock.now());
        // The id is public, so its lookup may take variable time; the secret's hash is what is
        // compared in constant time.
        let keys = self.read();
        let Some(stored) = keys.get(&key_id) else {
            return Err(AuthError::UnknownApiKey);
        };
        if !bool::from(stored.hash.ct_eq(&presented_hash)) {
            return Err(AuthError::UnknownApiKey);
        }
        let record = &stored.record;
        if record.revoked_unix_ms.is_some() {
            return Err(AuthError::RevokedApiKey(record.key_id.clone()));
        }
        if record.expires_unix_ms.is_some_and(|at| now_ms >= at) {
            return Err(AuthError::ExpiredApiKey(record.key_id.clone()));
        }
        Ok(Identity {
            principal: record.owner.clone(),
            method: AuthMethod::ApiKey {
                key_id: record.key_id.clone(),
            },
            scopes: record.scopes.iter().cloned().collect(),
            roles: Default::default(),
            claims: Default::default(),
        })
    }

    /// Writes the file as it will be with `change` applied (a new or updated record).
    fn persist(&self, change: Option<&Record>) -> Result<(), KeyStoreError> {
        let mut records: Vec<Record> = self.read().values().map(|s| s.record.clone()).collect();
        if let Some(change) = change {
            match records.iter_mut().find(|r| r.key_id == change.key_id) {
                Some(existing) => *existing = change.clone(),
                None => records.push(change.clone()),
            }
        }
        let file = File {
            version: FILE_VERSION,
            keys: records,
        };
        let mut bytes = serde_json::to_vec_pretty(&file).map_err(|source| {
            KeyStoreError::Write(StateError::Write {
                path: self.path.clone(),
                source: source.into(),
            })
        })?;
        bytes.push(b'\n');
        write_atomic(&self.path, &bytes).map_err(KeyStoreError::Write)?;
        // The file holds no secret, but owners and scopes are nobody else's business.
        restrict_permissions(&self.path).map_err(|source| {
            KeyStoreError::Write(StateError::Write {
                path: self.path.clone(),
                source,
            })
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<KeyId, Stored>> {
        // Every change is a single insert or assignment, so a panic elsewhere cannot leave the
        // map half-updated.
        self.keys.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<KeyId, Stored>> {
        self.keys.write().unwrap_or_else(|p| p.into_inner())
    }
}

fn restrict_permissions(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

/// Splits `gw_<key id>_<secret>`; the shape is checked before any lookup.
fn parse_presented(presented: &str) -> Result<(KeyId, &str), AuthError> {
    let malformed =
        || AuthError::MalformedCredentials("API key is not of the form gw_<id>_<secret>");
    let rest = presented.strip_prefix(PREFIX).ok_or_else(malformed)?;
    let (id, secret) = rest.split_at_checked(KEY_ID_LEN).ok_or_else(malformed)?;
    let secret = secret.strip_prefix('_').ok_or_else(malformed)?;
    let secret_ok = secret.len() == SECRET_LEN
        && secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !secret_ok {
        return Err(malformed());
    }
    let id = KeyId::try_from(id.to_owned()).map_err(|_| malformed())?;
    Ok((id, secret))
}

/// Checks an owner and scopes as `create` will, so the CLI can refuse them before connecting.
pub fn validate(owner: &str, scopes: &[String]) -> Result<(), KeyStoreError> {
    validate_owner(owner)?;
    validate_scopes(scopes)
}

fn validate_owner(owner: &str) -> Result<(), KeyStoreError> {
    if owner.is_empty() || owner.len() > MAX_OWNER_LEN || owner.chars().any(char::is_control) {
        return Err(KeyStoreError::Invalid(format!(
            "the owner must be 1 to {MAX_OWNER_LEN} bytes without control characters (e.g. `svc-billing`)"
        )));
    }
    Ok(())
}

fn validate_scopes(scopes: &[String]) -> Result<(), KeyStoreError> {
    if scopes.len() > MAX_SCOPES {
        return Err(KeyStoreError::Invalid(format!(
            "at most {MAX_SCOPES} scopes per key"
        )));
    }
    for scope in scopes {
        if scope.is_empty()
            || scope.len() > MAX_SCOPE_LEN
            || !scope.bytes().all(|b| b.is_ascii_graphic() && b != b',')
        {
            return Err(KeyStoreError::Invalid(format!(
                "scope `{scope}` must be 1 to {MAX_SCOPE_LEN} visible ASCII characters without commas (e.g. `orders:read`)"
            )));
        }
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hash(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut hash = [0u8; 32];
    for (i, byte) in hash.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(hash)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::testing::{ManualClock, temp_dir};

    fn store(dir: &Path, clock: &Arc<ManualClock>) -> KeyStore {
        KeyStore::open(
            &dir.join("api-keys.json"),
            Arc::clone(clock) as Arc<dyn Clock>,
        )
        .unwrap_or_else(|e| panic!("opening the key store: {e}"))
    }

    fn scopes(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn created_keys_verify_and_carry_owner_and_scopes() {
        let dir = temp_dir("apikeys-create");
        let clock = Arc::new(ManualClock::at_unix_secs(1_800_000_000));
        let keys = store(&dir, &clock);
        let created = keys
            .create(
                "svc-billing",
                &scopes(&["orders:read", "orders:write"]),
                None,
            )
            .expect("create");
        let secret = created.secret.expose();
        assert!(secret.starts_with("gw_"), "{secret}");
        assert_eq!(secret.len(), 3 + KEY_ID_LEN + 1 + SECRET_LEN, "{secret}");
        let identity = keys.verify(secret).expect("a fresh key verifies");
        assert_eq!(identity.principal, "svc-billing");
        assert_eq!(
            identity.method,
            AuthMethod::ApiKey {
                key_id: created.view.key_id.clone()
            }
        );
        assert_eq!(identity.scopes.len(), 2);
        // The secret is nowhere in the file, only its hash.
        let file = std::fs::read_to_string(keys.path()).expect("the key file exists");
        let secret_part = &secret[secret.len() - SECRET_LEN..];
        assert!(!file.contains(secret_part), "{file}");
        assert!(file.contains(&hex(&Sha256::digest(secret_part.as_bytes()))));
        let mode = std::fs::metadata(keys.path()).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }

    #[test]
    fn a_wrong_secret_for_a_known_id_is_an_unknown_key() {
        let dir = temp_dir("apikeys-wrong");
        let clock = Arc::new(ManualClock::at_unix_secs(1_800_000_000));
        let keys = store(&dir, &clock);
        let created = keys.create("svc", &[], None).expect("create");
        let mut forged = created.secret.expose().to_owned();
        let last = forged.pop().unwrap();
        forged.push(if last == 'A' { 'B' } else { 'A' });
        assert!(matches!(
            keys.verify(&forged),
            Err(AuthError::UnknownApiKey)
        ));
        for garbage in [
            "",
            "gw_",
            "gw_xyz_abc",
            "Bearer x",
            &forged[..forged.len() - 1],
        ] {
            assert_eq!(
                keys.verify(garbage).expect_err(garbage).reason(),
                "malformed_credentials",
                "{garbage:?}"
            );
        }
    }

    #[test]
    fn revoked_keys_are_rejected_and_stay_revoked_after_a_restart() {
        let dir = temp_dir("apikeys-revoke");
        let clock = Arc::new(ManualClock::at_unix_secs(1_800_000_000));
        let keys = store(&dir, &clock);
        let kept = keys.create("svc-a", &scopes(&["a"]), None).expect("create");
        let revoked = keys.create("svc-b", &[], None).expect("create");
        let view = keys
            .revoke(revoked.view.key_id.as_str())
            .expect("revoke a key");
        assert_eq!(view.status, KeyStatus::Revoked);
        assert!(matches!(
            keys.verify(revoked.secret.expose()),
            Err(AuthError::RevokedApiKey(id)) if id == revoked.view.key_id
        ));
        // Revoking twice is harmless; unknown and malformed ids are errors.
        keys.revoke(revoked.view.key_id.as_str())
            .expect("revoke again");
        assert!(matches!(
            keys.revoke("0000000000000000"),
            Err(KeyStoreError::NotFound(_))
        ));
        assert!(matches!(
            keys.revoke("not-an-id"),
            Err(KeyStoreError::Invalid(_))
        ));

        drop(keys);
        let reloaded = store(&dir, &clock);
        assert_eq!(reloaded.list().len(), 2);
        let identity = reloaded
            .verify(kept.secret.expose())
            .expect("a kept key verifies after a reload");
        assert_eq!(identity.principal, "svc-a");
        assert!(matches!(
            reloaded.verify(revoked.secret.expose()),
            Err(AuthError::RevokedApiKey(_))
        ));
    }

    #[test]
    fn time_limited_keys_expire_on_the_injected_clock() {
        let dir = temp_dir("apikeys-expiry");
        let clock = Arc::new(ManualClock::at_unix_secs(1_800_000_000));
        let keys = store(&dir, &clock);
        let created = keys
            .create("svc", &[], Some(Duration::from_secs(30 * 86_400)))
            .expect("create");
        assert_eq!(
            created.view.expires_unix_ms,
            Some((1_800_000_000 + 30 * 86_400) * 1000)
        );
        clock.advance(Duration::from_secs(30 * 86_400 - 1));
        keys.verify(created.secret.expose())
            .expect("valid one second before expiry");
        clock.advance(Duration::from_secs(1));
        assert!(matches!(
            keys.verify(created.secret.expose()),
            Err(AuthError::ExpiredApiKey(_))
        ));
        assert_eq!(keys.list()[0].status, KeyStatus::Expired);
    }

    #[test]
    fn bad_owners_and_scopes_are_refused() {
        let dir = temp_dir("apikeys-invalid");
        let clock = Arc::new(ManualClock::at_unix_secs(1_800_000_000));
        let keys = store(&dir, &clock);
        assert!(keys.create("", &[], None).is_err());
        assert!(keys.create("a\nb", &[], None).is_err());
        assert!(keys.create("svc", &scopes(&["has space"]), None).is_err());
        assert!(keys.create("svc", &scopes(&[""]), None).is_err());
        assert!(keys.list().is_empty(), "nothing was created");
        assert!(!keys.path().exists(), "nothing was written");
    }

    #[test]
    fn a_damaged_file_is_refused_not_guessed() {
        let dir = temp_dir("apikeys-damaged");
        let clock = Arc::new(ManualClock::at_unix_secs(1_800_000_000));
        let path = dir.join("api-keys.json");
        for (text, expected) in [
            ("{not json", "damaged"),
            (r#"{"version": 9, "keys": []}"#, "version 9"),
            (
                r#"{"version": 1, "keys": [{"key_id": "0123456789abcdef", "secret_sha256": "zz", "owner": "a", "scopes": [], "created_unix_ms": 1}]}"#,
                "bad hash",
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let error = KeyStore::open(&path, Arc::clone(&clock) as Arc<dyn Clock>)
                .expect_err(text)
                .to_string();
            assert!(error.contains(expected), "{text}: {error}");
        }
    }
}
