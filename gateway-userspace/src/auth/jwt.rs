//! Bearer tokens (JWS-signed JWTs) from trusted issuers.
//!
//! `jsonwebtoken` checks signatures; everything around them is done here, on purpose:
//!
//! - **Algorithms are pinned per issuer.** The token's `alg` only chooses among the issuer's
//!   configured algorithms; `none` is always refused, and a key is used only with algorithms of
//!   its own family, so an HS256 token "signed" with an RSA public key (algorithm confusion)
//!   never reaches a verifier.
//! - **Keys come only from configuration**: a local JWKS or PEM file, or the issuer's JWKS URL.
//!   The token's `jku`, `x5u` and embedded `jwk` headers are never read, let alone fetched.
//! - **Claims are checked on an injected [`Clock`]** with typed outcomes: `exp` is required, a
//!   time claim of the wrong JSON type is an error (never treated as absent), `iss` and `aud`
//!   must match.
//! - **JWKS caching.** Keys are re-read every `refresh_interval` in the background. A token
//!   with an unknown `kid` triggers one refetch, at most once per `min_refetch_interval`, so key
//!   rotation does not cause an outage and random `kid`s cannot hammer the issuer. A failed
//!   refresh keeps the last good keys until they are older than `max_key_age`; failures are
//!   logged and counted.
//! - **Verified tokens are remembered.** A client sends the same token with every request, and
//!   an RSA or ECDSA check costs hundreds of microseconds, so a verified token's identity is kept
//!   (by the token's SHA-256) as long as the key set that verified it is current. Each reuse
//!   checks the claims again (`exp`, `nbf` ...), so an expired token fails on time.
use std::{
    collections::{BTreeSet, HashMap},
    path::{Path, PathBuf},
    str::FromStr as _,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use http_body_util::BodyExt as _;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{
    Algorithm, AlgorithmFamily, DecodingKey,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse},
};
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{AuthError, AuthMethod, Clock, Identity, VerifiedToken, elapsed};
use crate::config::auth::{JwtIssuerConfig, KeySourceConfig};

/// Longer tokens are refused before any parsing (headers are bounded anyway; this bounds work).
const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// A JWKS larger than this is not a key set.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// A JWKS fetch (connect, TLS, request, body) that takes longer has failed.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The system CA bundle on Debian and derivatives, for `https` JWKS URLs without `ca_file`.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Setting up the issuers failed: the config points at keys that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("JWT issuer `{issuer}`: cannot load its keys")]
    Load {
        issuer: String,
        #[source]
        source: KeyLoadError,
    },
    #[error("JWT issuer `{issuer}`: cannot read the CA bundle `{path}` for its JWKS URL")]
    CaFile {
        issuer: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "JWT issuer `{issuer}`: the CA bundle `{path}` holds no usable certificate; point `ca_file` at a PEM bundle"
    )]
    NoCaCertificates { issuer: String, path: PathBuf },
    #[error("JWT issuer `{issuer}` has no key source; set `jwks_file`, `pem_file` or `jwks_url`")]
    NoKeySource { issuer: String },
    #[error("JWT issuer `{issuer}`: cannot set up TLS for its JWKS URL")]
    Tls {
        issuer: String,
        #[source]
        source: rustls::Error,
    },
}

/// Loading an issuer's keys failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyLoadError {
    #[error("cannot read `{path}`")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{path}` is not a PEM public key (RSA, EC or Ed25519)")]
    Pem { path: PathBuf },
    #[error("the key set is not a JWKS (`{{\"keys\": [...]}}`): {0}")]
    Jwks(String),
    #[error("the key set holds no key usable with the algorithms {algorithms:?}")]
    NoUsableKeys { algorithms: Vec<Algorithm> },
    #[error("fetching `{url}` failed: {message}")]
    Fetch { url: String, message: String },
}

/// One verification key.
#[derive(Clone)]
struct VerifyKey {
    kid: Option<String>,
    family: AlgorithmFamily,
    /// The JWK's `alg`, when it pins one.
    alg: Option<Algorithm>,
    /// The JWK's curve, to refuse ES256 on a P-384 key.
    curve: Option<EllipticCurve>,
    key: DecodingKey,
}

impl VerifyKey {
    /// Whether this key may verify a token signed with `alg`. The family check is what stops
    /// algorithm confusion even if a configuration slipped through.
    fn accepts(&self, alg: Algorithm) -> bool {
        let curve_ok = match (alg, &self.curve) {
            (Algorithm::ES256, Some(curve)) => *curve == EllipticCurve::P256,
            (Algorithm::ES384, Some(curve)) => *curve == EllipticCurve::P384,
            _ => true,
        };
        self.family == alg.family() && self.alg.is_none_or(|pinned| pinned == alg) && curve_ok
    }
}

/// The keys of one issuer as last loaded.
struct KeySet {
    keys: Vec<VerifyKey>,
    /// When they were loaded; `None` if no load ever succeeded.
    loaded_at: Option<SystemTime>,
    /// Bumped on every successful load, so concurrent unknown-`kid` requests share one refetch.
    generation: u64,
}

enum Source {
    JwksFile(PathBuf),
    PemFile(PathBuf),
    Url {
        url: String,
        uri: http::Uri,
        tls: Option<tokio_rustls::TlsConnector>,
    },
}

struct Issuer {
    config: JwtIssuerConfig,
    algorithms: Vec<Algorithm>,
    source: Source,
    clock: Arc<dyn Clock>,
    keys: RwLock<Arc<KeySet>>,
    /// When keys were last fetched (background or on demand); held across a fetch, so at most
    /// one runs per issuer.
    last_fetch: tokio::sync::Mutex<Option<SystemTime>>,
    refresh_failures: AtomicU64,
}

/// Counters of one issuer, for metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuerStats {
    pub issuer: String,
    pub keys: usize,
    /// Failed key loads since start (background and on-demand).
    pub refresh_failures: u64,
    pub loaded_unix_ms: Option<u64>,
}

/// Verified tokens remembered at most, unless configured otherwise.
const DEFAULT_VERIFIED_CAPACITY: u64 = 10_000;

/// Verifies bearer tokens of every configured issuer.
pub struct JwtVerifier {
    issuers: HashMap<String, Arc<Issuer>>,
    /// By the token's SHA-256: its identity and the key set that verified it. `None`: every
    /// token is verified in full.
    verified: Option<moka::sync::Cache<[u8; 32], Arc<Remembered>>>,
}

/// A verified token's identity, and the key set that verified it.
struct Remembered {
    identity: Identity,
    keys: Arc<KeySet>,
}

/// The token header fields this module reads. Everything else (`jku`, `x5u`, `jwk`, `x5c` ...)
/// is ignored by construction: keys come from configuration only.
#[derive(Deserialize)]
struct RawHeader {
    alg: Option<String>,
    kid: Option<String>,
    crit: Option<Value>,
}

impl JwtVerifier {
    /// Loads every issuer's keys. Local files must load (a typo should stop the start); a JWKS
    /// URL that cannot be fetched now is logged, counted and retried.
    pub async fn new(
        configs: &[JwtIssuerConfig],
        clock: Arc<dyn Clock>,
    ) -> Result<JwtVerifier, JwtError> {
        let mut issuers = HashMap::new();
        for config in configs {
            let issuer = Arc::new(Issuer::new(config.clone(), Arc::clone(&clock))?);
            let loaded = issuer.reload().await;
            match (&issuer.source, loaded) {
                (_, Ok(())) => {}
                (Source::Url { .. }, Err(error)) => issuer.record_failure(&error),
                (_, Err(source)) => {
                    return Err(JwtError::Load {
                        issuer: config.issuer.clone(),
                        source,
                    });
                }
            }
            issuers.insert(config.issuer.clone(), issuer);
        }
        Ok(JwtVerifier {
            issuers,
            verified: Some(moka::sync::Cache::new(DEFAULT_VERIFIED_CAPACITY)),
        })
    }

    /// Remembers up to `capacity` verified tokens (0: none, every token is verified in full).
    pub fn remembering(mut self, capacity: u64) -> JwtVerifier {
        self.verified = (capacity > 0).then(|| moka::sync::Cache::new(capacity));
        self
    }

    /// Re-reads every issuer's keys at its `refresh_interval` (sooner after a failure). Runs
    /// until the future is dropped.
    pub async fn refresh_forever(self: Arc<Self>) {
        let mut tasks = tokio::task::JoinSet::new();
        for issuer in self.issuers.values() {
            tasks.spawn(Arc::clone(issuer).refresh_loop());
        }
        while tasks.join_next().await.is_some() {}
    }

    /// Failed key loads of all issuers since start.
    pub fn refresh_failures(&self) -> u64 {
        self.issuers
            .values()
            .map(|i| i.refresh_failures.load(Ordering::Relaxed))
            .sum()
    }

    pub fn stats(&self) -> Vec<IssuerStats> {
        let mut stats: Vec<_> = self
            .issuers
            .values()
            .map(|issuer| {
                let keys = issuer.current();
                IssuerStats {
                    issuer: issuer.config.issuer.clone(),
                    keys: keys.keys.len(),
                    refresh_failures: issuer.refresh_failures.load(Ordering::Relaxed),
                    loaded_unix_ms: keys.loaded_at.map(super::unix_ms),
                }
            })
            .collect();
        stats.sort_by(|a, b| a.issuer.cmp(&b.issuer));
        stats
    }

    /// Verifies a bearer token: header, issuer, algorithm, key, signature, then claims. A token
    /// verified before, with its issuer's keys unchanged since, needs its claims checked only.
    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(malformed("longer than 16 KiB"));
        }
        let Some(verified) = &self.verified else {
            return self.verify_uncached(token).await;
        };
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(cached) = verified.get(&digest) {
            let Remembered { identity, keys } = &*cached;
            if let AuthMethod::Jwt { issuer, .. } = &identity.method
                && let Some(issuer) = self.issuers.get(issuer)
                && Arc::ptr_eq(keys, &issuer.current())
                && issuer.usable(keys)
            {
                issuer.check_claims(&identity.claims)?;
                return Ok(identity.clone());
            }
            verified.invalidate(&digest);
        }
        let identity = self.verify_uncached(token).await?;
        if let AuthMethod::Jwt { issuer, .. } = &identity.method
            && let Some(issuer) = self.issuers.get(issuer)
        {
            let keys = issuer.current();
            let remembered = Remembered {
                identity: identity.clone(),
                keys,
            };
            verified.insert(digest, Arc::new(remembered));
        }
        Ok(identity)
    }

    async fn verify_uncached(&self, token: &str) -> Result<Identity, AuthError> {
        let mut parts = token.split('.');
        let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed("not three dot-separated parts"));
        };
        let header: RawHeader = decode_json(header_b64, "header")?;
        let alg_name = header
            .alg
            .ok_or_else(|| malformed("the header has no `alg`"))?;
        if alg_name.eq_ignore_ascii_case("none") {
            return Err(AuthError::AlgorithmNotAllowed { alg: alg_name });
        }
        if header.crit.is_some() {
            // RFC 7515 4.1.11: a token whose critical extensions are not understood is invalid.
            return Err(malformed(
                "critical header extensions (`crit`) are not supported",
            ));
        }
        let claims: Map<String, Value> = decode_json(payload_b64, "payload")?;
        let issuer = match claims.get("iss") {
            None => return Err(AuthError::MissingClaim("iss".to_owned())),
            Some(Value::String(iss)) => {
                self.issuers
                    .get(iss)
                    .ok_or_else(|| AuthError::WrongIssuer {
                        issuer: truncate(iss),
                    })?
            }
            Some(_) => return Err(invalid_claim("iss", "not a string")),
        };
        let alg = Algorithm::from_str(&alg_name)
            .ok()
            .filter(|alg| issuer.algorithms.contains(alg))
            .ok_or_else(|| AuthError::AlgorithmNotAllowed {
                alg: truncate(&alg_name),
            })?;

        let message = &token[..header_b64.len() + 1 + payload_b64.len()];
        let key_id = issuer
            .verify_signature(header.kid.as_deref(), alg, message, signature_b64)
            .await?;
        issuer.check_claims(&claims)?;
        let identity = issuer.identity(claims, key_id, token)?;
        Ok(identity)
    }
}

impl Issuer {
    fn new(config: JwtIssuerConfig, clock: Arc<dyn Clock>) -> Result<Issuer, JwtError> {
        let no_source = || JwtError::NoKeySource {
            issuer: config.issuer.clone(),
        };
        let source = match config.key_source().ok_or_else(no_source)? {
            KeySourceConfig::JwksFile(path) => Source::JwksFile(path.to_owned()),
            KeySourceConfig::PemFile(path) => Source::PemFile(path.to_owned()),
            KeySourceConfig::JwksUrl(url) => {
                let uri: http::Uri =
                    url.parse()
                        .map_err(|e: http::uri::InvalidUri| JwtError::Load {
                            issuer: config.issuer.clone(),
                            source: KeyLoadError::Fetch {
                                url: url.to_owned(),
                                message: e.to_string(),
                            },
                        })?;
                let tls = if uri.scheme_str() == Some("https") {
                    Some(tls_connector(&config)?)
                } else {
                    None
                };
                Source::Url {
                    url: url.to_owned(),
                    uri,
                    tls,
                }
            }
        };
        Ok(Issuer {
            algorithms: config.parsed_algorithms(),
            config,
            source,
            clock,
            keys: RwLock::new(Arc::new(KeySet {
                keys: Vec::new(),
                loaded_at: None,
                generation: 0,
            })),
            last_fetch: tokio::sync::Mutex::new(None),
            refresh_failures: AtomicU64::new(0),
        })
    }

    fn current(&self) -> Arc<KeySet> {
        Arc::clone(&self.keys.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The keys if they may be used now: fetched keys age out after `max_key_age`; local files
    /// are the operator's own and never do.
    fn usable(&self, keys: &KeySet) -> bool {
        match (&self.source, keys.loaded_at) {
            (_, None) => false,
            (Source::Url { .. }, Some(at)) => {
                elapsed(at, self.clock.now()) <= self.config.max_key_age
            }
            (_, Some(_)) => true,
        }
    }

    /// Finds the key that verifies the signature, refetching once if the `kid` is unknown.
    /// Returns the `kid` of the key used.
    async fn verify_signature(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
        message: &str,
        signature_b64: &str,
    ) -> Result<Option<String>, AuthError> {
        let mut keys = self.current();
        let mut refetched = false;
        loop {
            let usable = self.usable(&keys);
            let candidates: Vec<&VerifyKey> = if usable {
                keys.keys
                    .iter()
                    .filter(|key| key.accepts(alg))
                    // A key without a `kid` (a PEM file) may verify any token; a token without
                    // a `kid` may be verified by any key of the right family.
                    .filter(|key| kid.is_none() || key.kid.is_none() || key.kid.as_deref() == kid)
                    .collect()
            } else {
                Vec::new()
            };
            if candidates.is_empty() {
                if !refetched && self.refetch(keys.generation).await {
                    refetched = true;
                    keys = self.current();
                    continue;
                }
                if !self.usable(&keys) {
                    return Err(AuthError::KeysUnavailable {
                        issuer: self.config.issuer.clone(),
                    });
                }
                return Err(AuthError::UnknownKeyId {
                    issuer: self.config.issuer.clone(),
                    kid: kid.map(truncate),
                });
            }
            for key in candidates {
                // An undecodable signature or a key the backend rejects is a failed
                // verification like any other.
                if jsonwebtoken::crypto::verify(signature_b64, message.as_bytes(), &key.key, alg)
                    .unwrap_or(false)
                {
                    return Ok(key.kid.clone());
                }
            }
            return Err(AuthError::BadSignature);
        }
    }

    /// A refetch for a token whose key is not known. Returns whether new keys are there to
    /// retry with: loaded now, or by a concurrent request while this one waited.
    async fn refetch(&self, seen_generation: u64) -> bool {
        let mut last_fetch = self.last_fetch.lock().await;
        if self.current().generation != seen_generation {
            return true;
        }
        let now = self.clock.now();
        if last_fetch.is_some_and(|at| elapsed(at, now) < self.config.min_refetch_interval) {
            return false;
        }
        *last_fetch = Some(now);
        match self.reload().await {
            Ok(()) => {
                tracing::info!(issuer = %self.config.issuer, "refetched keys for an unknown key id");
                true
            }
            Err(error) => {
                self.record_failure(&error);
                false
            }
        }
    }

    /// The background refresh of this issuer.
    async fn refresh_loop(self: Arc<Self>) {
        let mut failed = false;
        loop {
            // After a failure, retry at the refetch pace rather than wait a whole interval
            // while the keys age.
            let wait = if failed {
                self.config.min_refetch_interval
            } else {
                self.config.refresh_interval
            };
            tokio::time::sleep(wait).await;
            failed = !self.refresh().await;
        }
    }

    /// Reloads the keys now; on failure the last good keys stay. Returns whether it worked.
    async fn refresh(&self) -> bool {
        let mut last_fetch = self.last_fetch.lock().await;
        *last_fetch = Some(self.clock.now());
        match self.reload().await {
            Ok(()) => true,
            Err(error) => {
                self.record_failure(&error);
                false
            }
        }
    }

    fn record_failure(&self, error: &KeyLoadError) {
        let failures = self.refresh_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let keys = self.current();
        tracing::warn!(
            issuer = %self.config.issuer,
            error = %crate::lists::error_chain(error),
            failures,
            kept_keys = keys.keys.len(),
            "loading JWT keys failed; the last good keys stay in use until they exceed max_key_age"
        );
    }

    /// Loads the keys from the source and swaps them in. An empty result is a failure: a
    /// broken key endpoint must not take every token down with it.
    async fn reload(&self) -> Result<(), KeyLoadError> {
        let keys = match &self.source {
            Source::JwksFile(path) => parse_jwks(&read_file(path).await?, &self.algorithms)?,
            Source::PemFile(path) => vec![parse_pem(&read_file(path).await?, path)?],
            Source::Url { url, uri, tls } => {
                let body =
                    fetch(uri, tls.as_ref())
                        .await
                        .map_err(|message| KeyLoadError::Fetch {
                            url: url.clone(),
                            message,
                        })?;
                parse_jwks(&body, &self.algorithms)?
            }
        };
        let keys: Vec<VerifyKey> = keys
            .into_iter()
            .filter(|key| self.algorithms.iter().any(|alg| key.accepts(*alg)))
            .collect();
        if keys.is_empty() {
            return Err(KeyLoadError::NoUsableKeys {
                algorithms: self.algorithms.clone(),
            });
        }
        let mut current = self.keys.write().unwrap_or_else(|p| p.into_inner());
        let generation = current.generation + 1;
        tracing::debug!(issuer = %self.config.issuer, keys = keys.len(), generation, "JWT keys loaded");
        *current = Arc::new(KeySet {
            keys,
            loaded_at: Some(self.clock.now()),
            generation,
        });
        Ok(())
    }

    /// `exp`, `nbf`, `iat`, `aud` and the required claims, on the injected clock.
    fn check_claims(&self, claims: &Map<String, Value>) -> Result<(), AuthError> {
        let now = self
            .clock
            .now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let leeway = self.config.leeway.as_secs_f64();
        let exp =
            time_claim(claims, "exp")?.ok_or_else(|| AuthError::MissingClaim("exp".to_owned()))?;
        if now >= exp + leeway {
            return Err(AuthError::Expired);
        }
        if time_claim(claims, "nbf")?.is_some_and(|nbf| nbf > now + leeway) {
            return Err(AuthError::NotYetValid);
        }
        if time_claim(claims, "iat")?.is_some_and(|iat| iat > now + leeway) {
            return Err(AuthError::NotYetValid);
        }
        let audiences = match claims.get("aud") {
            None => return Err(AuthError::MissingClaim("aud".to_owned())),
            Some(Value::String(aud)) => vec![aud.as_str()],
            Some(Value::Array(list)) => list
                .iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(|| invalid_claim("aud", "not a string or list of strings"))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(invalid_claim("aud", "not a string or list of strings")),
        };
        if !audiences
            .iter()
            .any(|aud| self.config.audiences.iter().any(|ours| ours == aud))
        {
            return Err(AuthError::WrongAudience);
        }
        for required in &self.config.required_claims {
            if claims.get(required).is_none_or(Value::is_null) {
                return Err(AuthError::MissingClaim(required.clone()));
            }
        }
        Ok(())
    }

    fn identity(
        &self,
        claims: Map<String, Value>,
        key_id: Option<String>,
        token: &str,
    ) -> Result<Identity, AuthError> {
        let principal_claim = &self.config.principal_claim;
        let principal = match claims.get(principal_claim) {
            None | Some(Value::Null) => {
                return Err(AuthError::MissingClaim(principal_claim.clone()));
            }
            Some(Value::String(p)) if !p.is_empty() => p.clone(),
            Some(_) => {
                return Err(AuthError::InvalidClaim {
                    claim: principal_claim.clone(),
                    message: "not a non-empty string",
                });
            }
        };
        let mut scopes = BTreeSet::new();
        // OAuth 2 `scope` is one space-separated string; some issuers send `scp` as a list.
        for name in ["scope", "scp"] {
            scopes.extend(string_or_list(&claims, name, true)?);
        }
        let roles = string_or_list(&claims, &self.config.roles_claim, false)?
            .into_iter()
            .collect();
        Ok(Identity {
            principal,
            method: AuthMethod::Jwt {
                issuer: self.config.issuer.clone(),
                key_id,
                token: VerifiedToken(Arc::from(token)),
            },
            scopes,
            roles,
            claims,
        })
    }
}

/// A claim holding a string (split on spaces if `split`) or a list of strings.
fn string_or_list(
    claims: &Map<String, Value>,
    name: &str,
    split: bool,
) -> Result<Vec<String>, AuthError> {
    let bad = || AuthError::InvalidClaim {
        claim: name.to_owned(),
        message: "not a string or list of strings",
    };
    match claims.get(name) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(text)) if split => {
            Ok(text.split_ascii_whitespace().map(str::to_owned).collect())
        }
        Some(Value::String(text)) => Ok(vec![text.clone()]),
        Some(Value::Array(list)) => list
            .iter()
            .map(|v| v.as_str().map(str::to_owned).ok_or_else(bad))
            .collect(),
        Some(_) => Err(bad()),
    }
}

/// A NumericDate claim. The wrong JSON type is an error, never "absent": treating a string
/// `exp` as missing is exactly CVE-2026-25537.
fn time_claim(claims: &Map<String, Value>, name: &str) -> Result<Option<f64>, AuthError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .map(Some)
            .ok_or_else(|| invalid_claim(name, "not a number")),
        Some(_) => Err(invalid_claim(name, "not a number of seconds since 1970")),
    }
}

fn invalid_claim(claim: &str, message: &'static str) -> AuthError {
    AuthError::InvalidClaim {
        claim: claim.to_owned(),
        message,
    }
}

fn malformed(message: &str) -> AuthError {
    AuthError::MalformedToken(message.to_owned())
}

/// Attacker-chosen text made fit for a log line: bounded, without control characters.
fn truncate(text: &str) -> String {
    text.chars()
        .take(64)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn decode_json<T: serde::de::DeserializeOwned>(
    part: &str,
    what: &'static str,
) -> Result<T, AuthError> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| AuthError::MalformedToken(format!("the {what} is not base64url")))?;
    serde_json::from_slice(&bytes)
        .map_err(|_| AuthError::MalformedToken(format!("the {what} is not the expected JSON")))
}

async fn read_file(path: &Path) -> Result<Vec<u8>, KeyLoadError> {
    tokio::fs::read(path)
        .await
        .map_err(|source| KeyLoadError::Read {
            path: path.to_owned(),
            source,
        })
}

fn parse_pem(bytes: &[u8], path: &Path) -> Result<VerifyKey, KeyLoadError> {
    let (family, key) = DecodingKey::from_rsa_pem(bytes)
        .map(|k| (AlgorithmFamily::Rsa, k))
        .or_else(|_| DecodingKey::from_ec_pem(bytes).map(|k| (AlgorithmFamily::Ec, k)))
        .or_else(|_| DecodingKey::from_ed_pem(bytes).map(|k| (AlgorithmFamily::Ed, k)))
        .map_err(|_| KeyLoadError::Pem {
            path: path.to_owned(),
        })?;
    Ok(VerifyKey {
        kid: None,
        family,
        alg: None,
        curve: None,
        key,
    })
}

/// The usable keys of a JWKS. A key this gateway cannot use (encryption keys, unknown types)
/// is skipped, not fatal: issuers publish such keys next to signing keys.
fn parse_jwks(bytes: &[u8], algorithms: &[Algorithm]) -> Result<Vec<VerifyKey>, KeyLoadError> {
    #[derive(Deserialize)]
    struct RawSet {
        keys: Vec<Value>,
    }
    let set: RawSet =
        serde_json::from_slice(bytes).map_err(|e| KeyLoadError::Jwks(e.to_string()))?;
    let hmac_issuer = algorithms
        .iter()
        .any(|a| a.family() == AlgorithmFamily::Hmac);
    let mut keys = Vec::new();
    for (index, value) in set.keys.into_iter().enumerate() {
        let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
            tracing::debug!(index, "skipped a JWKS entry this gateway cannot parse");
            continue;
        };
        let family = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => AlgorithmFamily::Rsa,
            AlgorithmParameters::EllipticCurve(_) => AlgorithmFamily::Ec,
            AlgorithmParameters::OctetKeyPair(_) => AlgorithmFamily::Ed,
            AlgorithmParameters::OctetKey(_) => AlgorithmFamily::Hmac,
            _ => continue,
        };
        // A shared secret next to public keys is never used by an asymmetric issuer (config
        // validation refuses to mix the two), and vice versa.
        if (family == AlgorithmFamily::Hmac) != hmac_issuer {
            continue;
        }
        if jwk
            .common
            .public_key_use
            .as_ref()
            .is_some_and(|u| *u != PublicKeyUse::Signature)
        {
            continue;
        }
        let alg = match jwk.common.key_algorithm {
            None => None,
            Some(key_alg) => match Algorithm::try_from(key_alg) {
                Ok(alg) => Some(alg),
                // An encryption algorithm (RSA-OAEP ...): not a signing key.
                Err(_) => continue,
            },
        };
        let curve = match &jwk.algorithm {
            AlgorithmParameters::EllipticCurve(params) => Some(params.curve.clone()),
            _ => None,
        };
        let Ok(key) = DecodingKey::from_jwk(&jwk) else {
            tracing::debug!(index, "skipped a JWKS entry with unusable key material");
            continue;
        };
        keys.push(VerifyKey {
            kid: jwk.common.key_id.clone(),
            family,
            alg,
            curve,
            key,
        });
    }
    Ok(keys)
}

fn tls_connector(config: &JwtIssuerConfig) -> Result<tokio_rustls::TlsConnector, JwtError> {
    use rustls_pki_types::{CertificateDer, pem::PemObject as _};
    let path = config
        .ca_file
        .clone()
        .unwrap_or_else(|| PathBuf::from(SYSTEM_CA_BUNDLE));
    let pem = std::fs::read(&path).map_err(|source| JwtError::CaFile {
        issuer: config.issuer.clone(),
        path: path.clone(),
        source,
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem).flatten() {
        // A bundle may hold certificates this verifier cannot parse; the rest still count.
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(JwtError::NoCaCertificates {
            issuer: config.issuer.clone(),
            path,
        });
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|source| JwtError::Tls {
        issuer: config.issuer.clone(),
        source,
    })?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(tls)))
}

/// GETs a JWKS: one HTTP/1.1 request, no redirects (a redirect is a failure to look at, not to
/// follow), a bounded body, and a deadline on the whole exchange.
async fn fetch(
    uri: &http::Uri,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> Result<Vec<u8>, String> {
    let exchange = async {
        let host = uri.host().ok_or("the URL has no host")?;
        let bare_host = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri
            .port_u16()
            .unwrap_or(if tls.is_some() { 443 } else { 80 });
        let stream = tokio::net::TcpStream::connect((bare_host, port))
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        match tls {
            Some(connector) => {
                let name = rustls_pki_types::ServerName::try_from(bare_host.to_owned())
                    .map_err(|e| format!("`{host}` is not a TLS server name: {e}"))?;
                let stream = connector
                    .connect(name, stream)
                    .await
                    .map_err(|e| format!("TLS handshake failed: {e}"))?;
                get(stream, uri).await
            }
            None => get(stream, uri).await,
        }
    };
    tokio::time::timeout(FETCH_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer within {FETCH_TIMEOUT:?}"))?
}

async fn get<S>(stream: S, uri: &http::Uri) -> Result<Vec<u8>, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake failed: {e}"))?;
    // The connection ends when `sender` is dropped at the end of this exchange.
    tokio::spawn(connection);
    let authority = uri.authority().map_or("", |a| a.as_str());
    let request = http::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(http::header::HOST, authority)
        .header(
            http::header::ACCEPT,
            "application/jwk-set+json, application/json",
        )
        .header(http::header::USER_AGENT, "gateway-jwks")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| format!("cannot build the request: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    if response.status() != http::StatusCode::OK {
        return Err(format!("the server answered {}", response.status()));
    }
    let body = http_body_util::Limited::new(response.into_body(), MAX_JWKS_BYTES)
        .collect()
        .await
        .map_err(|e| format!("reading the body failed (larger than 1 MiB?): {e}"))?;
    Ok(body.to_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, sync::Mutex};

    use http_body_util::Full;
    use jsonwebtoken::{EncodingKey, jwk::JwkSet};
    use serde_json::json;

    use super::*;
    use crate::auth::testing::{ManualClock, TempDir, temp_dir};

    const NOW: u64 = 1_800_000_000;
    const ISSUER: &str = "https://idp.test";
    const RSA_A: &[u8] = include_bytes!("testdata/rsa-a.key.pem");
    const RSA_A_PUB: &[u8] = include_bytes!("testdata/rsa-a.pub.pem");
    const RSA_B: &[u8] = include_bytes!("testdata/rsa-b.key.pem");
    const EC_A: &[u8] = include_bytes!("testdata/ec-a.key.pem");
    const EC_A_PUB: &[u8] = include_bytes!("testdata/ec-a.pub.pem");

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Signs a token with any header, so tests can say `alg`, `kid`, `jku` as they please.
    fn sign(header: &Value, claims: &Value, key: &EncodingKey, alg: Algorithm) -> String {
        let message = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let signature = jsonwebtoken::crypto::sign(message.as_bytes(), key, alg)
            .unwrap_or_else(|e| panic!("signing a test token: {e}"));
        format!("{message}.{signature}")
    }

    fn rsa(pem: &[u8]) -> EncodingKey {
        EncodingKey::from_rsa_pem(pem).expect("test RSA key")
    }

    fn claims() -> Value {
        json!({
            "iss": ISSUER,
            "aud": ["orders", "other"],
            "sub": "alice",
            "exp": NOW + 600,
            "iat": NOW - 10,
            "scope": "orders:read orders:write",
            "roles": ["admin"],
            "tenant": "acme",
        })
    }

    fn rs256(kid: &str, claims: &Value, key: &[u8]) -> String {
        sign(
            &json!({"alg": "RS256", "typ": "JWT", "kid": kid}),
            claims,
            &rsa(key),
            Algorithm::RS256,
        )
    }

    fn jwks(keys: &[(&str, &[u8])]) -> String {
        let keys = keys
            .iter()
            .map(|(kid, pem)| {
                let mut jwk = Jwk::from_encoding_key(&rsa(pem), Algorithm::RS256)
                    .expect("a JWK from a test key");
                jwk.common.key_id = Some((*kid).to_owned());
                jwk
            })
            .collect();
        serde_json::to_string(&JwkSet { keys }).expect("a JWKS")
    }

    fn issuer_config(source: KeySource) -> JwtIssuerConfig {
        let (jwks_file, pem_file, jwks_url) = match source {
            KeySource::JwksFile(path) => (Some(path), None, None),
            KeySource::PemFile(path) => (None, Some(path), None),
            KeySource::Url(url) => (None, None, Some(url)),
        };
        JwtIssuerConfig {
            issuer: ISSUER.to_owned(),
            audiences: vec!["orders".to_owned()],
            algorithms: vec!["RS256".to_owned()],
            jwks_file,
            pem_file,
            jwks_url,
            ca_file: None,
            refresh_interval: Duration::from_secs(300),
            min_refetch_interval: Duration::from_secs(10),
            max_key_age: Duration::from_secs(3600),
            leeway: Duration::from_secs(30),
            required_claims: vec!["tenant".to_owned()],
            principal_claim: "sub".to_owned(),
            roles_claim: "roles".to_owned(),
        }
    }

    enum KeySource {
        JwksFile(PathBuf),
        PemFile(PathBuf),
        Url(String),
    }

    /// A verifier on a JWKS file holding RSA key A as `a`.
    async fn file_verifier(name: &str) -> (JwtVerifier, Arc<ManualClock>, TempDir) {
        let dir = temp_dir(name);
        let path = dir.join("jwks.json");
        std::fs::write(&path, jwks(&[("a", RSA_A)])).unwrap();
        let clock = Arc::new(ManualClock::at_unix_secs(NOW));
        let verifier = JwtVerifier::new(
            &[issuer_config(KeySource::JwksFile(path))],
            Arc::clone(&clock) as Arc<dyn Clock>,
        )
        .await
        .unwrap_or_else(|e| panic!("verifier: {e}"));
        (verifier, clock, dir)
    }

    async fn reason(verifier: &JwtVerifier, token: &str) -> &'static str {
        match verifier.verify(token).await {
            Ok(identity) => panic!("token was accepted as {identity:?}"),
            Err(error) => error.reason(),
        }
    }

    #[tokio::test]
    async fn a_good_token_becomes_an_identity() {
        let (verifier, _clock, _dir) = file_verifier("jwt-good").await;
        let token = rs256("a", &claims(), RSA_A);
        let identity = verifier
            .verify(&token)
            .await
            .unwrap_or_else(|e| panic!("a good token: {e}"));
        assert_eq!(identity.principal, "alice");
        assert_eq!(
            identity.scopes,
            BTreeSet::from(["orders:read".to_owned(), "orders:write".to_owned()])
        );
        assert_eq!(identity.roles, BTreeSet::from(["admin".to_owned()]));
        assert_eq!(identity.claims["tenant"], "acme");
        let AuthMethod::Jwt {
            issuer,
            key_id,
            token: verified,
        } = &identity.method
        else {
            panic!("not a JWT identity: {identity:?}");
        };
        assert_eq!(issuer, ISSUER);
        assert_eq!(key_id.as_deref(), Some("a"));
        assert_eq!(verified.as_str(), token);
    }

    #[tokio::test]
    async fn alg_none_is_always_rejected() {
        let (verifier, _clock, _dir) = file_verifier("jwt-none").await;
        for alg in ["none", "None", "NONE"] {
            let message = format!(
                "{}.{}",
                b64(json!({"alg": alg, "kid": "a"}).to_string().as_bytes()),
                b64(claims().to_string().as_bytes())
            );
            for token in [format!("{message}."), format!("{message}.c2ln")] {
                assert_eq!(
                    reason(&verifier, &token).await,
                    "algorithm_not_allowed",
                    "{alg}"
                );
            }
        }
    }

    #[tokio::test]
    async fn hs256_signed_with_the_rsa_public_key_is_rejected() {
        let (verifier, _clock, _dir) = file_verifier("jwt-confusion").await;
        // The classic attack: the public key (which anyone can get) used as an HMAC secret.
        for secret in [RSA_A_PUB, RSA_A_PUB.trim_ascii_end()] {
            let token = sign(
                &json!({"alg": "HS256", "kid": "a"}),
                &claims(),
                &EncodingKey::from_secret(secret),
                Algorithm::HS256,
            );
            assert_eq!(reason(&verifier, &token).await, "algorithm_not_allowed");
        }
        // And at the key level: even an issuer pinned to HS256 never uses an RSA key for it.
        let rsa_key = parse_pem(RSA_A_PUB, Path::new("rsa-a.pub.pem")).expect("RSA public key");
        assert!(!rsa_key.accepts(Algorithm::HS256));
        assert!(rsa_key.accepts(Algorithm::RS256));
    }

    #[tokio::test]
    async fn tampered_and_foreign_signatures_are_rejected() {
        let (verifier, _clock, _dir) = file_verifier("jwt-tamper").await;
        let token = rs256("a", &claims(), RSA_A);
        let parts: Vec<&str> = token.split('.').collect();
        let mut forged = claims();
        forged["sub"] = json!("mallory");
        let tampered = format!(
            "{}.{}.{}",
            parts[0],
            b64(forged.to_string().as_bytes()),
            parts[2]
        );
        assert_eq!(reason(&verifier, &tampered).await, "bad_signature");
        // Signed by another key that claims to be `a`.
        assert_eq!(
            reason(&verifier, &rs256("a", &claims(), RSA_B)).await,
            "bad_signature"
        );
        let truncated = &token[..token.len() - 4];
        assert_eq!(reason(&verifier, truncated).await, "bad_signature");
        for garbage in [
            "",
            "a.b",
            "a.b.c.d.e",
            "!!.??.**",
            &format!("{}.e30.", parts[0]),
        ] {
            let got = reason(&verifier, garbage).await;
            assert!(
                got == "malformed_token" || got == "missing_claim",
                "{garbage:?}: {got}"
            );
        }
    }

    #[tokio::test]
    async fn time_claims_follow_the_clock_with_leeway() {
        let (verifier, clock, _dir) = file_verifier("jwt-time").await;
        let mut expiring = claims();
        expiring["exp"] = json!(NOW + 60);
        let token = rs256("a", &expiring, RSA_A);
        verifier.verify(&token).await.expect("valid now");
        clock.advance(Duration::from_secs(60 + 29));
        verifier
            .verify(&token)
            .await
            .expect("valid within the 30 s leeway");
        // The second check was answered from the verified tokens; it must still expire on time.
        let verified = verifier.verified.as_ref().expect("on by default");
        verified.run_pending_tasks();
        assert_eq!(verified.entry_count(), 1);
        clock.advance(Duration::from_secs(1));
        assert_eq!(reason(&verifier, &token).await, "token_expired");

        let mut future = claims();
        future["nbf"] = json!(NOW + 3600 + 100);
        future["exp"] = json!(NOW + 100_000);
        let token = rs256("a", &future, RSA_A);
        assert_eq!(reason(&verifier, &token).await, "token_not_yet_valid");
        clock.advance(Duration::from_secs(3600 + 100 - 90 - 30));
        verifier
            .verify(&token)
            .await
            .expect("valid once nbf is within the leeway");

        let mut issued_later = claims();
        issued_later["exp"] = json!(NOW + 100_000);
        issued_later["iat"] = json!(NOW + 50_000);
        let token = rs256("a", &issued_later, RSA_A);
        assert_eq!(reason(&verifier, &token).await, "token_not_yet_valid");
    }

    #[tokio::test]
    async fn claims_of_the_wrong_type_are_errors_not_absent() {
        let (verifier, _clock, _dir) = file_verifier("jwt-types").await;
        for (claim, value) in [
            ("exp", json!("never")),
            ("nbf", json!("99999999999")),
            ("iat", json!({"at": 1})),
            ("aud", json!(7)),
            ("sub", json!(["alice"])),
            ("roles", json!({"admin": true})),
        ] {
            let mut bad = claims();
            bad[claim] = value;
            assert_eq!(
                reason(&verifier, &rs256("a", &bad, RSA_A)).await,
                "invalid_claim",
                "{claim}"
            );
        }
    }

    #[tokio::test]
    async fn issuer_audience_and_required_claims_are_enforced() {
        let (verifier, _clock, _dir) = file_verifier("jwt-claims").await;
        let cases = [
            ("iss", json!("https://evil.test"), "wrong_issuer"),
            ("aud", json!("billing"), "wrong_audience"),
            ("aud", json!(["billing", "payments"]), "wrong_audience"),
        ];
        for (claim, value, expected) in cases {
            let mut bad = claims();
            bad[claim] = value;
            assert_eq!(
                reason(&verifier, &rs256("a", &bad, RSA_A)).await,
                expected,
                "{claim}"
            );
        }
        for claim in ["iss", "aud", "exp", "sub", "tenant"] {
            let mut bad = claims();
            bad.as_object_mut().unwrap().remove(claim);
            match verifier.verify(&rs256("a", &bad, RSA_A)).await {
                Err(AuthError::MissingClaim(name)) => assert_eq!(name, claim),
                other => panic!("without `{claim}`: {other:?}"),
            }
        }
        let mut single = claims();
        single["aud"] = json!("orders");
        verifier
            .verify(&rs256("a", &single, RSA_A))
            .await
            .expect("`aud` as a single string");
    }

    #[tokio::test]
    async fn a_pem_file_pins_the_key_and_its_algorithm() {
        let dir = temp_dir("jwt-pem");
        let path = dir.join("ec.pub.pem");
        std::fs::write(&path, EC_A_PUB).unwrap();
        let mut config = issuer_config(KeySource::PemFile(path));
        config.algorithms = vec!["ES256".to_owned()];
        let clock = Arc::new(ManualClock::at_unix_secs(NOW));
        let verifier = JwtVerifier::new(&[config], clock as Arc<dyn Clock>)
            .await
            .unwrap_or_else(|e| panic!("verifier: {e}"));
        let ec = EncodingKey::from_ec_pem(EC_A).expect("test EC key");
        let token = sign(
            &json!({"alg": "ES256", "kid": "whatever"}),
            &claims(),
            &ec,
            Algorithm::ES256,
        );
        verifier
            .verify(&token)
            .await
            .expect("ES256 with the PEM key");
        assert_eq!(
            reason(&verifier, &rs256("a", &claims(), RSA_A)).await,
            "algorithm_not_allowed"
        );
    }

    #[test]
    fn jwks_entries_that_cannot_sign_are_skipped() {
        let set: Value = serde_json::from_str(&jwks(&[("a", RSA_A)])).unwrap();
        let rsa = set["keys"][0].clone();
        let variant = |kid: &str, field: &str, value: &str| {
            let mut key = rsa.clone();
            key["kid"] = json!(kid);
            key[field] = json!(value);
            key
        };
        let set = json!({"keys": [
            rsa,
            variant("enc", "use", "enc"),
            variant("oaep", "alg", "RSA-OAEP"),
            variant("rs512", "alg", "RS512"),
            {"kty": "unknown", "kid": "weird"},
            {"kty": "oct", "kid": "secret", "k": "c2VjcmV0"},
            "not even an object",
        ]});
        let keys = parse_jwks(set.to_string().as_bytes(), &[Algorithm::RS256])
            .unwrap_or_else(|e| panic!("a JWKS with odd entries: {e}"));
        let kids: Vec<_> = keys.iter().filter_map(|k| k.kid.as_deref()).collect();
        assert_eq!(kids, ["a", "rs512"]);
        assert!(keys[0].accepts(Algorithm::RS256));
        assert!(
            !keys[1].accepts(Algorithm::RS256),
            "a key pinned to RS512 must not verify RS256"
        );
    }

    #[tokio::test]
    async fn an_hmac_issuer_uses_only_its_shared_secrets() {
        let dir = temp_dir("jwt-hmac");
        let path = dir.join("jwks.json");
        let secret = b"a shared secret of 32 bytes or more";
        let rsa: Value = serde_json::from_str(&jwks(&[("a", RSA_A)])).unwrap();
        let set = json!({"keys": [
            {"kty": "oct", "kid": "s1", "alg": "HS256", "k": b64(secret)},
            rsa["keys"][0],
        ]});
        std::fs::write(&path, set.to_string()).unwrap();
        let mut config = issuer_config(KeySource::JwksFile(path));
        config.algorithms = vec!["HS256".to_owned()];
        let clock = Arc::new(ManualClock::at_unix_secs(NOW));
        let verifier = JwtVerifier::new(&[config], clock as Arc<dyn Clock>)
            .await
            .unwrap_or_else(|e| panic!("verifier: {e}"));
        let hs256 = |kid: &str, key: &[u8]| {
            sign(
                &json!({"alg": "HS256", "kid": kid}),
                &claims(),
                &EncodingKey::from_secret(key),
                Algorithm::HS256,
            )
        };
        verifier
            .verify(&hs256("s1", secret))
            .await
            .expect("HS256 with the shared secret");
        assert_eq!(
            reason(&verifier, &hs256("s1", b"guessed")).await,
            "bad_signature"
        );
        // The RSA key next to the secret is not loaded for an HMAC issuer.
        assert_eq!(
            reason(&verifier, &hs256("a", RSA_A_PUB)).await,
            "unknown_key_id"
        );
        assert_eq!(
            reason(&verifier, &rs256("a", &claims(), RSA_A)).await,
            "algorithm_not_allowed"
        );
    }

    #[tokio::test]
    async fn a_bad_local_key_file_stops_the_start() {
        let dir = temp_dir("jwt-badfile");
        let path = dir.join("jwks.json");
        for text in ["{}", "{\"keys\": []}", "not json"] {
            std::fs::write(&path, text).unwrap();
            let clock = Arc::new(ManualClock::at_unix_secs(NOW));
            let result = JwtVerifier::new(
                &[issuer_config(KeySource::JwksFile(path.clone()))],
                clock as Arc<dyn Clock>,
            )
            .await;
            assert!(matches!(result, Err(JwtError::Load { .. })), "{text}");
        }
        let missing = issuer_config(KeySource::PemFile(dir.join("missing.pem")));
        let clock = Arc::new(ManualClock::at_unix_secs(NOW));
        assert!(
            JwtVerifier::new(&[missing], clock as Arc<dyn Clock>)
                .await
                .is_err()
        );
    }

    /// A JWKS server on 127.0.0.1 whose answer tests swap, recording every path it is asked.
    struct JwksServer {
        addr: SocketAddr,
        body: Arc<Mutex<(u16, String)>>,
        hits: Arc<Mutex<Vec<String>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl JwksServer {
        async fn start(initial: String) -> JwksServer {
            Self::start_with(initial, None).await
        }

        async fn start_with(initial: String, tls: Option<tokio_rustls::TlsAcceptor>) -> JwksServer {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind a test server");
            let addr = listener.local_addr().unwrap();
            let body = Arc::new(Mutex::new((200, initial)));
            let hits = Arc::new(Mutex::new(Vec::new()));
            let (served, recorded) = (Arc::clone(&body), Arc::clone(&hits));
            let task = tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let (served, recorded) = (Arc::clone(&served), Arc::clone(&recorded));
                    let tls = tls.clone();
                    let service = hyper::service::service_fn(move |request: http::Request<_>| {
                        recorded
                            .lock()
                            .unwrap()
                            .push(request.uri().path().to_owned());
                        let (status, text) = served.lock().unwrap().clone();
                        let mut response = http::Response::new(Full::new(bytes::Bytes::from(text)));
                        *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
                        async move { Ok::<_, std::convert::Infallible>(response) }
                    });
                    tokio::spawn(async move {
                        let http = hyper::server::conn::http1::Builder::new();
                        match tls {
                            Some(acceptor) => {
                                if let Ok(stream) = acceptor.accept(stream).await {
                                    let _ =
                                        http.serve_connection(TokioIo::new(stream), service).await;
                                }
                            }
                            None => {
                                let _ = http.serve_connection(TokioIo::new(stream), service).await;
                            }
                        }
                    });
                }
            });
            JwksServer {
                addr,
                body,
                hits,
                task,
            }
        }

        fn url(&self, path: &str) -> String {
            format!("http://{}{path}", self.addr)
        }

        fn serve(&self, status: u16, text: String) {
            *self.body.lock().unwrap() = (status, text);
        }

        fn hits(&self) -> Vec<String> {
            self.hits.lock().unwrap().clone()
        }
    }

    impl Drop for JwksServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn url_verifier(server: &JwksServer) -> (JwtVerifier, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::at_unix_secs(NOW));
        let verifier = JwtVerifier::new(
            &[issuer_config(KeySource::Url(server.url("/jwks")))],
            Arc::clone(&clock) as Arc<dyn Clock>,
        )
        .await
        .unwrap_or_else(|e| panic!("verifier: {e}"));
        (verifier, clock)
    }

    #[tokio::test]
    async fn an_unknown_kid_triggers_one_rate_limited_refetch() {
        let server = JwksServer::start(jwks(&[("a", RSA_A)])).await;
        let (verifier, clock) = url_verifier(&server).await;
        assert_eq!(server.hits(), ["/jwks"], "one fetch at start");
        verifier
            .verify(&rs256("a", &claims(), RSA_A))
            .await
            .expect("key a");

        // The issuer rotates to key b; the first token with `kid: b` refetches and passes.
        server.serve(200, jwks(&[("a", RSA_A), ("b", RSA_B)]));
        let rotated = rs256("b", &claims(), RSA_B);
        verifier
            .verify(&rotated)
            .await
            .unwrap_or_else(|e| panic!("a rotated key must work after one refetch: {e}"));
        assert_eq!(server.hits().len(), 2);

        // Random kids within the interval cost nothing upstream.
        for kid in ["x", "y", "z"] {
            assert_eq!(
                reason(&verifier, &rs256(kid, &claims(), RSA_B)).await,
                "unknown_key_id"
            );
        }
        assert_eq!(server.hits().len(), 2, "refetches are rate-limited");
        clock.advance(Duration::from_secs(10));
        assert_eq!(
            reason(&verifier, &rs256("x", &claims(), RSA_B)).await,
            "unknown_key_id"
        );
        assert_eq!(server.hits().len(), 3, "one refetch per interval");
    }

    #[tokio::test]
    async fn jku_x5u_and_embedded_jwk_headers_are_never_fetched_or_trusted() {
        let server = JwksServer::start(jwks(&[("a", RSA_A)])).await;
        let (verifier, _clock) = url_verifier(&server).await;
        let attacker = rsa(RSA_B);
        let mut embedded =
            Jwk::from_encoding_key(&attacker, Algorithm::RS256).expect("attacker JWK");
        embedded.common.key_id = Some("evil".to_owned());
        for kid in ["evil", "a"] {
            let header = json!({
                "alg": "RS256",
                "kid": kid,
                "jku": server.url("/evil-jwks"),
                "x5u": server.url("/evil-x5u"),
                "jwk": embedded,
            });
            let token = sign(&header, &claims(), &attacker, Algorithm::RS256);
            let got = reason(&verifier, &token).await;
            assert!(
                got == "unknown_key_id" || got == "bad_signature",
                "{kid}: {got}"
            );
        }
        let hits = server.hits();
        assert!(
            hits.iter().all(|path| path == "/jwks"),
            "only the configured URL may be fetched: {hits:?}"
        );
    }

    #[tokio::test]
    async fn failed_refreshes_keep_the_last_keys_until_they_age_out() {
        let server = JwksServer::start(jwks(&[("a", RSA_A)])).await;
        let (verifier, clock) = url_verifier(&server).await;
        let issuer = Arc::clone(&verifier.issuers[ISSUER]);
        let token = rs256("a", &claims(), RSA_A);

        server.serve(500, "down".to_owned());
        assert!(!issuer.refresh().await, "a 500 is a failed refresh");
        server.serve(200, "{\"keys\": []}".to_owned());
        assert!(
            !issuer.refresh().await,
            "an empty key set is a failed refresh"
        );
        assert_eq!(verifier.refresh_failures(), 2);
        assert_eq!(verifier.stats()[0].refresh_failures, 2);
        verifier.verify(&token).await.expect("last good keys stay");

        // Past max_key_age (1 h here) the stale keys are no longer trusted: 503, not 401.
        clock.advance(Duration::from_secs(3601));
        let mut later = claims();
        later["exp"] = json!(NOW + 7200);
        let token = rs256("a", &later, RSA_A);
        match verifier.verify(&token).await {
            Err(error @ AuthError::KeysUnavailable { .. }) => {
                assert_eq!(error.status(), http::StatusCode::SERVICE_UNAVAILABLE);
            }
            other => panic!("aged-out keys: {other:?}"),
        }
        // The verify above tried one refetch (which failed); once the issuer is back, the next
        // refresh restores service.
        assert_eq!(verifier.refresh_failures(), 3);
        server.serve(200, jwks(&[("a", RSA_A)]));
        assert!(issuer.refresh().await);
        verifier.verify(&token).await.expect("fresh keys again");
    }

    #[tokio::test]
    async fn an_https_jwks_url_is_verified_against_its_ca_file() {
        use rustls_pki_types::PrivateKeyDer;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server_cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
            .expect("a test certificate");
        let tls = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![server_cert.cert.der().clone()],
                PrivateKeyDer::Pkcs8(server_cert.signing_key.serialize_der().into()),
            )
            .expect("a server TLS config");
        let server = JwksServer::start_with(
            jwks(&[("a", RSA_A)]),
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(tls))),
        )
        .await;
        let dir = temp_dir("jwt-https");
        let trusted = dir.join("ca.pem");
        std::fs::write(&trusted, server_cert.cert.pem()).unwrap();
        let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
            .expect("another test certificate");
        let untrusted = dir.join("other-ca.pem");
        std::fs::write(&untrusted, other.cert.pem()).unwrap();
        let url = format!("https://localhost:{}/jwks", server.addr.port());

        let mut config = issuer_config(KeySource::Url(url));
        config.ca_file = Some(trusted);
        let clock = Arc::new(ManualClock::at_unix_secs(NOW));
        let verifier = JwtVerifier::new(&[config.clone()], Arc::clone(&clock) as Arc<dyn Clock>)
            .await
            .unwrap_or_else(|e| panic!("verifier: {e}"));
        assert_eq!(verifier.refresh_failures(), 0, "fetched over TLS");
        verifier
            .verify(&rs256("a", &claims(), RSA_A))
            .await
            .expect("a key fetched over https");

        // A server whose certificate the CA file does not vouch for is not trusted.
        config.ca_file = Some(untrusted);
        let verifier = JwtVerifier::new(&[config], clock as Arc<dyn Clock>)
            .await
            .unwrap_or_else(|e| panic!("verifier: {e}"));
        assert_eq!(verifier.refresh_failures(), 1);
        assert_eq!(
            reason(&verifier, &rs256("a", &claims(), RSA_A)).await,
            "keys_unavailable"
        );
    }

    #[tokio::test]
    async fn an_unreachable_jwks_url_at_start_is_retried_not_fatal() {
        // Bind and drop, so nothing listens on the port.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let clock = Arc::new(ManualClock::at_unix_secs(NOW));
        let verifier = JwtVerifier::new(
            &[issuer_config(KeySource::Url(format!("http://{addr}/jwks")))],
            clock as Arc<dyn Clock>,
        )
        .await
        .expect("a JWKS URL that is down does not stop the start");
        assert_eq!(verifier.refresh_failures(), 1);
        assert_eq!(
            reason(&verifier, &rs256("a", &claims(), RSA_A)).await,
            "keys_unavailable"
        );
    }

    #[tokio::test]
    async fn the_background_refresh_picks_up_a_rotated_file() {
        let dir = temp_dir("jwt-refresh");
        let path = dir.join("jwks.json");
        std::fs::write(&path, jwks(&[("a", RSA_A)])).unwrap();
        let mut config = issuer_config(KeySource::JwksFile(path.clone()));
        config.refresh_interval = Duration::from_millis(50);
        // Unknown kids must not be what picks the new key up in this test.
        config.min_refetch_interval = Duration::from_secs(3600);
        let clock = Arc::new(ManualClock::at_unix_secs(NOW));
        let verifier = Arc::new(
            JwtVerifier::new(&[config], clock as Arc<dyn Clock>)
                .await
                .unwrap_or_else(|e| panic!("verifier: {e}")),
        );
        let issuer = Arc::clone(&verifier.issuers[ISSUER]);
        *issuer.last_fetch.lock().await = Some(issuer.clock.now());
        let refresh = tokio::spawn(Arc::clone(&verifier).refresh_forever());
        // Replaced by a rename, as operators should: the refresh must not read half a file.
        let staged = dir.join("jwks.json.new");
        std::fs::write(&staged, jwks(&[("b", RSA_B)])).unwrap();
        std::fs::rename(&staged, &path).unwrap();
        let token = rs256("b", &claims(), RSA_B);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while verifier.verify(&token).await.is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the background refresh did not load the rotated key within 5 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        refresh.abort();
    }
}
