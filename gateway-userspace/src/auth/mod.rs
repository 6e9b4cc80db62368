//! The authenticate phase: turns a request's credentials into a typed [`Identity`], or into an
//! [`AuthError`] that says exactly why not.
//!
//! - [`jwt`]: bearer tokens from trusted issuers, keys from local files or a JWKS URL (cached,
//!   refreshed in the background, refetched once on an unknown `kid`).
//! - [`apikeys`]: API keys, stored as hashes with owner, scopes and expiry; created and revoked
//!   at runtime through the admin API.
//! - [`basic`]: HTTP Basic against Argon2 hashes, for legacy clients, on TLS listeners only.
//!
//! A route names the [`Method`]s it accepts, in order. The first method whose credential is
//! present decides: a bad bearer token is not retried as an API key, so one failed credential
//! never turns into another method's success.
pub mod apikeys;
pub mod basic;
pub mod jwt;

use std::{
    collections::BTreeSet,
    fmt,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http::{HeaderMap, StatusCode, header};
use serde::{Deserialize, Serialize};

use self::{apikeys::KeyStore, basic::BasicUsers, jwt::JwtVerifier};
use crate::config::auth::AuthConfig;

/// Who a request acts for, once authenticated.
#[derive(Clone, Debug, PartialEq)]
pub struct Identity {
    /// The subject: the JWT's principal claim, the API key's owner, the certificate's name.
    pub principal: String,
    pub method: AuthMethod,
    /// What the credential grants (the token's `scope`/`scp`, the API key's scopes).
    pub scopes: BTreeSet<String>,
    /// Roles (the token's roles claim; API keys have none).
    pub roles: BTreeSet<String>,
    /// Every verified claim of a token (empty for other methods), for authorization rules.
    pub claims: serde_json::Map<String, serde_json::Value>,
}

/// How an [`Identity`] was established.
#[derive(Clone, Debug, PartialEq)]
pub enum AuthMethod {
    Jwt {
        issuer: String,
        /// The `kid` of the key that verified the token, if it had one.
        key_id: Option<String>,
        /// The verified token itself, for routes that forward it upstream.
        token: VerifiedToken,
    },
    ApiKey {
        key_id: apikeys::KeyId,
    },
    /// A client certificate verified by the TLS layer.
    Mtls,
    /// A user and password (HTTP Basic) from the users file.
    Basic,
}

impl AuthMethod {
    /// A short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            AuthMethod::Jwt { .. } => "jwt",
            AuthMethod::ApiKey { .. } => "api_key",
            AuthMethod::Mtls => "mtls",
            AuthMethod::Basic => "basic",
        }
    }
}

/// A bearer token that passed verification. Its `Debug` output hides it: it is a credential
/// until it expires, and identities end up in logs.
#[derive(Clone, PartialEq, Eq)]
pub struct VerifiedToken(Arc<str>);

impl VerifiedToken {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for VerifiedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VerifiedToken(..)")
    }
}

/// A credential type a route may accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// `Authorization: Bearer <JWT>`.
    Jwt,
    /// The configured API key header (or query parameter).
    ApiKey,
    /// The client certificate an mTLS listener verified: its subject CN (or first SAN) is the
    /// principal. Checked by the pipeline, which holds the connection's TLS facts.
    Mtls,
    /// `Authorization: Basic` against `auth.basic.users_file`. Legacy: only on routes that
    /// every listener serves over TLS.
    Basic,
}

/// Why a request was not authenticated. Each variant is a distinct outcome with a stable
/// [`AuthError::reason`] for logs and metrics; the messages are for operators, never for clients.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no credentials: no bearer token or API key that this route accepts")]
    MissingCredentials,
    #[error("malformed credentials: {0}")]
    MalformedCredentials(&'static str),
    #[error("malformed token: {0}")]
    MalformedToken(String),
    #[error("token algorithm `{alg}` is not allowed for this issuer")]
    AlgorithmNotAllowed { alg: String },
    #[error("token names an untrusted issuer `{issuer}`")]
    WrongIssuer { issuer: String },
    #[error("token key id {kid:?} is not among issuer `{issuer}`'s keys (refetched if allowed)")]
    UnknownKeyId { issuer: String, kid: Option<String> },
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token is not valid yet (`nbf` or `iat` in the future)")]
    NotYetValid,
    #[error("token audience is not one of this issuer's audiences")]
    WrongAudience,
    #[error("token lacks the required claim `{0}`")]
    MissingClaim(String),
    #[error("token claim `{claim}` is invalid: {message}")]
    InvalidClaim {
        claim: String,
        message: &'static str,
    },
    #[error(
        "no usable keys for issuer `{issuer}`: fetching them failed for longer than `max_key_age`; check that the JWKS URL is reachable"
    )]
    KeysUnavailable { issuer: String },
    #[error("API key is not known")]
    UnknownApiKey,
    #[error("API key `{0}` was revoked")]
    RevokedApiKey(apikeys::KeyId),
    #[error("API key `{0}` expired")]
    ExpiredApiKey(apikeys::KeyId),
    #[error("Basic credentials: unknown user or wrong password")]
    BadPassword,
}

impl AuthError {
    /// A stable slug for logs and metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::MissingCredentials => "missing_credentials",
            AuthError::MalformedCredentials(_) => "malformed_credentials",
            AuthError::MalformedToken(_) => "malformed_token",
            AuthError::AlgorithmNotAllowed { .. } => "algorithm_not_allowed",
            AuthError::WrongIssuer { .. } => "wrong_issuer",
            AuthError::UnknownKeyId { .. } => "unknown_key_id",
            AuthError::BadSignature => "bad_signature",
            AuthError::Expired => "token_expired",
            AuthError::NotYetValid => "token_not_yet_valid",
            AuthError::WrongAudience => "wrong_audience",
            AuthError::MissingClaim(_) => "missing_claim",
            AuthError::InvalidClaim { .. } => "invalid_claim",
            AuthError::KeysUnavailable { .. } => "keys_unavailable",
            AuthError::UnknownApiKey => "unknown_api_key",
            AuthError::RevokedApiKey(_) => "revoked_api_key",
            AuthError::ExpiredApiKey(_) => "expired_api_key",
            AuthError::BadPassword => "bad_password",
        }
    }

    /// The status the client gets: 401 for every credential problem; 503 when the gateway
    /// itself cannot verify (the client's token may well be good).
    pub fn status(&self) -> StatusCode {
        match self {
            AuthError::KeysUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::UNAUTHORIZED,
        }
    }
}

/// The time source of expiry checks, injected so tests move time instead of sleeping.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;
}

/// The system's wall clock: token and key expiries are wall-clock times.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// Milliseconds since the Unix epoch of `time` (0 before 1970).
pub(crate) fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `later - earlier`, zero if the clock went backwards.
pub(crate) fn elapsed(earlier: SystemTime, later: SystemTime) -> Duration {
    later.duration_since(earlier).unwrap_or_default()
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Jwt(#[from] jwt::JwtError),
    #[error(transparent)]
    Keys(#[from] apikeys::KeyStoreError),
    #[error("`auth.api_keys.header` is not a valid HTTP header name")]
    ApiKeyHeader,
    #[error(transparent)]
    Basic(#[from] basic::BasicError),
}

/// Where API keys are presented.
#[derive(Clone, Debug)]
struct ApiKeyLocation {
    header: header::HeaderName,
    query_param: Option<String>,
}

/// The authenticate phase for every route: the configured methods, ready to verify.
pub struct Authenticator {
    jwt: Option<Arc<JwtVerifier>>,
    keys: Arc<KeyStore>,
    key_location: ApiKeyLocation,
    basic: Option<BasicUsers>,
}

impl Authenticator {
    /// Loads the JWT issuers' keys (local files must load; a JWKS URL that is down is retried in
    /// the background) and takes the daemon's key store, which the admin API shares.
    pub async fn new(
        config: &AuthConfig,
        keys: Arc<KeyStore>,
        clock: Arc<dyn Clock>,
    ) -> Result<Authenticator, SetupError> {
        let jwt = if config.jwt.is_empty() {
            None
        } else {
            Some(Arc::new(
                JwtVerifier::new(&config.jwt, clock)
                    .await?
                    .remembering(config.verified_token_cache),
            ))
        };
        Ok(Authenticator {
            jwt,
            keys,
            key_location: ApiKeyLocation {
                header: header::HeaderName::from_bytes(config.api_keys.header.as_bytes())
                    .map_err(|_| SetupError::ApiKeyHeader)?,
                query_param: config.api_keys.query_param.clone(),
            },
            basic: match &config.basic.users_file {
                Some(path) => Some(BasicUsers::load(path, &config.basic.realm)?),
                None => None,
            },
        })
    }

    /// Removes the API key header, so the credential does not travel on to the upstream.
    pub fn strip_api_key(&self, headers: &mut HeaderMap) {
        headers.remove(&self.key_location.header);
    }

    /// The `WWW-Authenticate` challenges of a 401 on a route accepting `methods`, in order.
    pub fn challenges(&self, methods: &[Method]) -> Vec<http::HeaderValue> {
        methods
            .iter()
            .filter_map(|method| match method {
                Method::Jwt => Some(http::HeaderValue::from_static("Bearer")),
                Method::Basic => self.basic.as_ref().and_then(BasicUsers::challenge),
                Method::ApiKey | Method::Mtls => None,
            })
            .collect()
    }

    /// The JWT verifier, to run its background refresh ([`JwtVerifier::refresh_forever`]) and
    /// read its counters.
    pub fn jwt(&self) -> Option<&Arc<JwtVerifier>> {
        self.jwt.as_ref()
    }

    /// Authenticates a request with the first of `methods` whose credential it presents. Every
    /// rejection is logged with its reason.
    pub async fn authenticate(
        &self,
        methods: &[Method],
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<Identity, AuthError> {
        let result = self.try_methods(methods, headers, query).await;
        match &result {
            Ok(identity) => tracing::debug!(
                principal = %identity.principal,
                method = identity.method.name(),
                "request authenticated"
            ),
            Err(error) => tracing::info!(
                reason = error.reason(),
                error = %error,
                "request not authenticated"
            ),
        }
        result
    }

    async fn try_methods(
        &self,
        methods: &[Method],
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<Identity, AuthError> {
        for method in methods {
            match method {
                Method::Jwt => {
                    let Some(verifier) = &self.jwt else { continue };
                    if let Some(token) = authorization(headers, "bearer")? {
                        return verifier.verify(token).await;
                    }
                }
                Method::Basic => {
                    let Some(users) = &self.basic else { continue };
                    if let Some(credentials) = authorization(headers, "basic")? {
                        return users.verify(credentials).await;
                    }
                }
                Method::ApiKey => {
                    if let Some(presented) = self.api_key(headers, query)? {
                        return self.keys.verify(presented);
                    }
                }
                // The pipeline tried the certificate before calling here.
                Method::Mtls => {}
            }
        }
        Err(AuthError::MissingCredentials)
    }

    /// The API key from the configured header or, if enabled, query parameter. Two copies are
    /// refused rather than one picked: which one a backend would see is anyone's guess.
    fn api_key<'a>(
        &self,
        headers: &'a HeaderMap,
        query: Option<&'a str>,
    ) -> Result<Option<&'a str>, AuthError> {
        let mut found = None;
        for value in headers.get_all(&self.key_location.header) {
            let value = value
                .to_str()
                .map_err(|_| AuthError::MalformedCredentials("API key header is not ASCII"))?;
            if found.replace(value.trim()).is_some() {
                return Err(AuthError::MalformedCredentials("more than one API key"));
            }
        }
        if let (Some(param), Some(query)) = (&self.key_location.query_param, query) {
            for pair in query.split('&') {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                if name == param && found.replace(value).is_some() {
                    return Err(AuthError::MalformedCredentials("more than one API key"));
                }
            }
        }
        Ok(found)
    }
}

/// The credentials of the `Authorization` header if it uses `scheme` (lowercase).
fn authorization<'a>(headers: &'a HeaderMap, scheme: &str) -> Result<Option<&'a str>, AuthError> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(AuthError::MalformedCredentials(
            "more than one Authorization header",
        ));
    }
    let value = value
        .to_str()
        .map_err(|_| AuthError::MalformedCredentials("Authorization header is not ASCII"))?;
    let Some((presented, credentials)) = value.split_once(' ') else {
        return Ok(None);
    };
    // The scheme is case-insensitive (RFC 9110); another method's scheme is not ours.
    if !presented.eq_ignore_ascii_case(scheme) {
        return Ok(None);
    }
    let credentials = credentials.trim();
    if credentials.is_empty() {
        return Err(AuthError::MalformedCredentials(
            "empty credentials after the Authorization scheme",
        ));
    }
    Ok(Some(credentials))
}

#[cfg(test)]
pub(crate) mod testing {
    use std::{
        sync::Mutex,
        time::{Duration, SystemTime},
    };

    use super::Clock;

    /// A clock that moves only when told to.
    #[derive(Debug)]
    pub(crate) struct ManualClock(Mutex<SystemTime>);

    impl ManualClock {
        pub(crate) fn at_unix_secs(secs: u64) -> ManualClock {
            ManualClock(Mutex::new(
                SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
            ))
        }

        pub(crate) fn advance(&self, by: Duration) {
            *self.0.lock().expect("clock lock") += by;
        }
    }

    impl Clock for ManualClock {
        fn now(&self) -> SystemTime {
            *self.0.lock().expect("clock lock")
        }
    }

    /// A fresh temporary folder for one test, removed on drop (also when the test fails).
    pub(crate) struct TempDir(std::path::PathBuf);

    impl std::ops::Deref for TempDir {
        type Target = std::path::Path;

        fn deref(&self) -> &std::path::Path {
            &self.0
        }
    }

    impl AsRef<std::path::Path> for TempDir {
        fn as_ref(&self) -> &std::path::Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    pub(crate) fn temp_dir(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "gateway-auth-{name}-{}-{}",
            std::process::id(),
            super::unix_ms(SystemTime::now())
        ));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create `{}`: {e}", dir.display()));
        TempDir(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::testing::headers;

    async fn authenticator(
        auth_toml: &str,
        name: &str,
    ) -> (Authenticator, Arc<KeyStore>, testing::TempDir) {
        let config = Config::parse(auth_toml).unwrap_or_else(|e| panic!("test config: {e}"));
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let dir = testing::temp_dir(name);
        let keys = Arc::new(
            KeyStore::open(&dir.join("api-keys.json"), Arc::clone(&clock))
                .unwrap_or_else(|e| panic!("key store: {e}")),
        );
        let auth = Authenticator::new(&config.auth, Arc::clone(&keys), clock)
            .await
            .unwrap_or_else(|e| panic!("authenticator: {e}"));
        (auth, keys, dir)
    }

    #[tokio::test]
    async fn api_key_header_name_is_case_insensitive() {
        let (auth, keys, _dir) = authenticator("", "casing").await;
        let created = keys
            .create("svc-billing", &["orders:read".to_owned()], None)
            .expect("create a key");
        for name in ["x-api-key", "X-Api-Key", "X-API-KEY"] {
            let identity = auth
                .authenticate(
                    &[Method::ApiKey],
                    &headers(&[(name, created.secret.expose())]),
                    None,
                )
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(identity.principal, "svc-billing");
            assert!(identity.scopes.contains("orders:read"));
            assert_eq!(identity.method.name(), "api_key");
        }
    }

    #[tokio::test]
    async fn query_parameter_is_off_unless_configured() {
        let (auth, keys, _dir) = authenticator("", "query-off").await;
        let created = keys.create("svc", &[], None).expect("create a key");
        let query = format!("a=1&api_key={}", created.secret.expose());
        let err = auth
            .authenticate(&[Method::ApiKey], &HeaderMap::new(), Some(&query))
            .await
            .expect_err("query keys are off by default");
        assert_eq!(err.reason(), "missing_credentials");

        let (auth, keys, _dir) =
            authenticator("[auth.api_keys]\nquery_param = \"api_key\"", "query-on").await;
        let created = keys.create("svc", &[], None).expect("create a key");
        let query = format!("a=1&api_key={}", created.secret.expose());
        let identity = auth
            .authenticate(&[Method::ApiKey], &HeaderMap::new(), Some(&query))
            .await
            .unwrap_or_else(|e| panic!("query key: {e}"));
        assert_eq!(identity.principal, "svc");
        // The same key twice (header and query) is ambiguous, not a success.
        let err = auth
            .authenticate(
                &[Method::ApiKey],
                &headers(&[("x-api-key", created.secret.expose())]),
                Some(&query),
            )
            .await
            .expect_err("two copies of a key");
        assert_eq!(err.reason(), "malformed_credentials");
    }

    #[tokio::test]
    async fn missing_and_unknown_credentials_are_distinct() {
        let (auth, _keys, _dir) = authenticator("", "missing").await;
        let err = auth
            .authenticate(&[Method::ApiKey, Method::Jwt], &HeaderMap::new(), None)
            .await
            .expect_err("no credentials");
        assert_eq!(err.reason(), "missing_credentials");
        assert_eq!(err.status(), StatusCode::UNAUTHORIZED);
        let well_formed = format!("gw_0123456789abcdef_{}", "A".repeat(43));
        let err = auth
            .authenticate(
                &[Method::ApiKey],
                &headers(&[("x-api-key", &well_formed)]),
                None,
            )
            .await
            .expect_err("unknown key");
        assert_eq!(err.reason(), "unknown_api_key");
        let err = auth
            .authenticate(
                &[Method::ApiKey],
                &headers(&[("x-api-key", "a"), ("X-Api-Key", "b")]),
                None,
            )
            .await
            .expect_err("two keys");
        assert_eq!(err.reason(), "malformed_credentials");
    }

    #[tokio::test]
    async fn the_first_presented_credential_decides() {
        let dir = testing::temp_dir("first-credential");
        let pem = dir.join("ec.pub.pem");
        std::fs::write(&pem, include_bytes!("testdata/ec-a.pub.pem")).unwrap();
        let toml = format!(
            "[[auth.jwt]]\nissuer = \"https://idp.test\"\naudiences = [\"orders\"]\nalgorithms = [\"ES256\"]\npem_file = \"{}\"",
            pem.display()
        );
        let (auth, keys, _dir) = authenticator(&toml, "first-credential-store").await;
        let api_key = keys.create("svc", &[], None).expect("create a key");
        let now = unix_ms(SystemTime::now()) / 1000;
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
            &serde_json::json!({
                "iss": "https://idp.test", "aud": "orders", "sub": "alice", "exp": now + 300,
            }),
            &jsonwebtoken::EncodingKey::from_ec_pem(include_bytes!("testdata/ec-a.key.pem"))
                .expect("test EC key"),
        )
        .expect("signing a test token");
        let both = headers(&[
            ("authorization", &format!("Bearer {token}")),
            ("x-api-key", api_key.secret.expose()),
        ]);
        let identity = auth
            .authenticate(&[Method::Jwt, Method::ApiKey], &both, None)
            .await
            .unwrap_or_else(|e| panic!("a good bearer token: {e}"));
        assert_eq!(identity.principal, "alice");
        let identity = auth
            .authenticate(&[Method::ApiKey, Method::Jwt], &both, None)
            .await
            .unwrap_or_else(|e| panic!("a good API key: {e}"));
        assert_eq!(identity.principal, "svc");

        // A bad token is final: the valid API key beside it is not tried instead.
        let bad = headers(&[
            ("authorization", &format!("Bearer {token}x")),
            ("x-api-key", api_key.secret.expose()),
        ]);
        let err = auth
            .authenticate(&[Method::Jwt, Method::ApiKey], &bad, None)
            .await
            .expect_err("a tampered token");
        assert_eq!(err.reason(), "bad_signature");
    }

    #[test]
    fn schemes_are_case_insensitive_and_other_schemes_are_ignored() {
        let bearer = |value: &str| {
            authorization(&headers(&[("authorization", value)]), "bearer")
                .unwrap()
                .map(str::to_owned)
        };
        assert_eq!(bearer("Bearer abc").as_deref(), Some("abc"));
        assert_eq!(bearer("bEARER abc").as_deref(), Some("abc"));
        assert_eq!(bearer("Basic dXNlcjpwdw=="), None);
        assert_eq!(
            authorization(
                &headers(&[("authorization", "basic dXNlcjpwdw==")]),
                "basic"
            )
            .unwrap(),
            Some("dXNlcjpwdw==")
        );
        assert!(
            authorization(
                &headers(&[("authorization", "Bearer a"), ("authorization", "Bearer b")]),
                "bearer"
            )
            .is_err(),
            "two Authorization headers must be refused"
        );
    }

    #[test]
    fn verified_tokens_stay_out_of_debug_output() {
        let method = AuthMethod::Jwt {
            issuer: "i".to_owned(),
            key_id: None,
            token: VerifiedToken(Arc::from("eyJ.secret.token")),
        };
        let debug = format!("{method:?}");
        assert!(!debug.contains("secret"), "{debug}");
    }

    #[test]
    fn reasons_are_distinct() {
        let id = apikeys::KeyId::for_tests("0123456789abcdef");
        let errors = [
            AuthError::MissingCredentials,
            AuthError::MalformedCredentials("x"),
            AuthError::MalformedToken("x".into()),
            AuthError::AlgorithmNotAllowed { alg: "x".into() },
            AuthError::WrongIssuer { issuer: "x".into() },
            AuthError::UnknownKeyId {
                issuer: "x".into(),
                kid: None,
            },
            AuthError::BadSignature,
            AuthError::Expired,
            AuthError::NotYetValid,
            AuthError::WrongAudience,
            AuthError::MissingClaim("x".into()),
            AuthError::InvalidClaim {
                claim: "x".into(),
                message: "x",
            },
            AuthError::KeysUnavailable { issuer: "x".into() },
            AuthError::UnknownApiKey,
            AuthError::RevokedApiKey(id.clone()),
            AuthError::ExpiredApiKey(id),
            AuthError::BadPassword,
        ];
        let reasons: BTreeSet<_> = errors.iter().map(AuthError::reason).collect();
        assert_eq!(reasons.len(), errors.len(), "{reasons:?}");
    }
}
