//! The `[auth]` section: where API keys are presented and stored, and which JWT issuers are
//! trusted with which keys and algorithms. Validation here refuses the settings that would open
//! an attack (a `none` or HMAC algorithm next to public keys, JWKS over plain HTTP to another
//! host) before anything starts.
use std::{
    path::{Path, PathBuf},
    str::FromStr as _,
    time::Duration,
};

use jsonwebtoken::{Algorithm, AlgorithmFamily};
use serde::Deserialize;

use super::{ConfigError, invalid};

/// How requests prove who they are.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub api_keys: ApiKeysConfig,
    /// Trusted JWT issuers. None (the default) means bearer tokens are never accepted.
    pub jwt: Vec<JwtIssuerConfig>,
    /// What a route that says nothing about `auth` requires: e.g. `["jwt", "api_key"]` to make
    /// authentication the default, so a forgotten route is closed rather than open. Default
    /// `[]`: such routes are anonymous.
    pub default_route_auth: Vec<crate::auth::Method>,
    /// Headers that tell the upstream who the client is. Client-supplied copies are always
    /// removed first, on every route, so they cannot be forged.
    pub identity_headers: IdentityHeadersConfig,
    /// HTTP Basic for legacy clients (routes list `basic` in `auth`).
    pub basic: BasicConfig,
    /// Verified JWTs remembered, so a client's next request with the same token skips the
    /// signature check (claims such as `exp` are still checked each time; a change of the
    /// issuer's keys forgets them). 0 verifies every token in full. Default 10000.
    pub verified_token_cache: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            api_keys: ApiKeysConfig::default(),
            jwt: Vec::new(),
            default_route_auth: Vec::new(),
            identity_headers: IdentityHeadersConfig::default(),
            basic: BasicConfig::default(),
            verified_token_cache: 10_000,
        }
    }
}

/// HTTP Basic authentication. Legacy: a password in every request, so only routes served
/// exclusively over TLS may accept it; prefer API keys or JWTs for anything new.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BasicConfig {
    /// One `user:$argon2id$...[:scope,scope]` per line (`gateway hash-password` prints the
    /// hash). Loaded at start. Required when any route accepts `basic`.
    pub users_file: Option<PathBuf>,
    /// The realm named in the `WWW-Authenticate` challenge. Default `gateway`.
    pub realm: String,
}

impl Default for BasicConfig {
    fn default() -> Self {
        BasicConfig {
            users_file: None,
            realm: "gateway".to_owned(),
        }
    }
}

/// How the authenticated identity reaches the upstream.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityHeadersConfig {
    /// Default `x-authenticated-principal`.
    pub principal: String,
    /// Space-separated scopes. Default `x-authenticated-scopes`.
    pub scopes: String,
    /// `jwt`, `api_key` or `mtls`. Default `x-authenticated-method`.
    pub method: String,
    /// Pass a verified JWT on in `Authorization`; otherwise credentials stop at the gateway.
    /// Default `false`.
    pub forward_jwt: bool,
}

impl Default for IdentityHeadersConfig {
    fn default() -> Self {
        IdentityHeadersConfig {
            principal: "x-authenticated-principal".to_owned(),
            scopes: "x-authenticated-scopes".to_owned(),
            method: "x-authenticated-method".to_owned(),
            forward_jwt: false,
        }
    }
}

/// API keys, created and revoked with `gateway keys`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiKeysConfig {
    /// Request header that carries the key (matched case-insensitively). Default `x-api-key`.
    pub header: String,
    /// Query parameter that may carry the key instead. Off by default: URLs end up in logs,
    /// browser histories and `Referer` headers.
    pub query_param: Option<String>,
    /// The key store (hashes only, never a secret). Default `<state_dir>/api-keys.json`.
    pub file: Option<PathBuf>,
}

impl Default for ApiKeysConfig {
    fn default() -> Self {
        ApiKeysConfig {
            header: "x-api-key".to_owned(),
            query_param: None,
            file: None,
        }
    }
}

impl ApiKeysConfig {
    /// The key store's path for a daemon whose state lives in `state_dir`.
    pub fn file(&self, state_dir: &Path) -> PathBuf {
        self.file
            .clone()
            .unwrap_or_else(|| state_dir.join("api-keys.json"))
    }
}

/// One trusted token issuer.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtIssuerConfig {
    /// The exact `iss` claim of its tokens.
    pub issuer: String,
    /// Tokens must name at least one of these in `aud`.
    pub audiences: Vec<String>,
    /// Algorithms accepted from this issuer (pinned: the token's `alg` header only chooses among
    /// these). `none` is never accepted, and HMAC cannot be mixed with RSA/EC/EdDSA.
    pub algorithms: Vec<String>,
    /// A local JWKS file (`{"keys": [...]}`); re-read at `refresh_interval`.
    pub jwks_file: Option<PathBuf>,
    /// A local PEM public key (RSA, EC or Ed25519).
    pub pem_file: Option<PathBuf>,
    /// A JWKS URL: `https://`, or `http://` to a loopback address only.
    pub jwks_url: Option<String>,
    /// CA bundle (PEM) for an `https` `jwks_url`. Default: the system bundle
    /// `/etc/ssl/certs/ca-certificates.crt`.
    pub ca_file: Option<PathBuf>,
    /// How often keys are re-read in the background. Default 5 min.
    #[serde(default = "default_refresh_interval", with = "humantime_serde")]
    pub refresh_interval: Duration,
    /// A token with an unknown `kid` triggers at most one refetch per this interval, so key
    /// rotation is picked up at once but random `kid`s cannot hammer the issuer. Default 10 s.
    #[serde(default = "default_min_refetch_interval", with = "humantime_serde")]
    pub min_refetch_interval: Duration,
    /// Fetched keys stay in use while refreshes fail, up to this age; then tokens of this
    /// issuer are refused until a refresh succeeds. Default 24 h.
    #[serde(default = "default_max_key_age", with = "humantime_serde")]
    pub max_key_age: Duration,
    /// Clock skew allowed on `exp`, `nbf` and `iat`. Default 30 s.
    #[serde(default = "default_leeway", with = "humantime_serde")]
    pub leeway: Duration,
    /// Claims every token must carry, beyond `iss`, `aud`, `exp` and the principal claim.
    #[serde(default)]
    pub required_claims: Vec<String>,
    /// The claim that names the principal. Default `sub`.
    #[serde(default = "default_principal_claim")]
    pub principal_claim: String,
    /// The claim that lists roles (an array of strings). Default `roles`.
    #[serde(default = "default_roles_claim")]
    pub roles_claim: String,
}

fn default_refresh_interval() -> Duration {
    Duration::from_secs(300)
}

fn default_min_refetch_interval() -> Duration {
    Duration::from_secs(10)
}

fn default_max_key_age() -> Duration {
    Duration::from_secs(24 * 3600)
}

fn default_leeway() -> Duration {
    Duration::from_secs(30)
}

fn default_principal_claim() -> String {
    "sub".to_owned()
}

fn default_roles_claim() -> String {
    "roles".to_owned()
}

/// Where an issuer's keys come from, once validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySourceConfig<'a> {
    JwksFile(&'a Path),
    PemFile(&'a Path),
    JwksUrl(&'a str),
}

impl JwtIssuerConfig {
    /// The key source (validation guarantees there is exactly one).
    pub fn key_source(&self) -> Option<KeySourceConfig<'_>> {
        match (&self.jwks_file, &self.pem_file, &self.jwks_url) {
            (Some(path), _, _) => Some(KeySourceConfig::JwksFile(path)),
            (None, Some(path), _) => Some(KeySourceConfig::PemFile(path)),
            (None, None, Some(url)) => Some(KeySourceConfig::JwksUrl(url)),
            (None, None, None) => None,
        }
    }

    /// The pinned algorithms (validation guarantees they parse).
    pub fn parsed_algorithms(&self) -> Vec<Algorithm> {
        self.algorithms
            .iter()
            .filter_map(|name| Algorithm::from_str(name).ok())
            .collect()
    }
}

pub(super) fn validate(auth: &AuthConfig) -> Result<(), ConfigError> {
    if !auth
        .basic
        .realm
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\' || b == b' ')
    {
        return Err(invalid(
            "auth.basic.realm",
            "use printable ASCII without quotes or backslashes",
        ));
    }
    let names = &auth.identity_headers;
    for (key, name) in [
        ("principal", &names.principal),
        ("scopes", &names.scopes),
        ("method", &names.method),
    ] {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(invalid(
                &format!("auth.identity_headers.{key}"),
                format!("`{name}` is not a valid HTTP header name"),
            ));
        }
    }
    let keys = &auth.api_keys;
    if http::HeaderName::from_bytes(keys.header.as_bytes()).is_err() {
        return Err(invalid(
            "auth.api_keys.header",
            format!("`{}` is not a valid HTTP header name", keys.header),
        ));
    }
    if keys.header.eq_ignore_ascii_case("authorization") {
        return Err(invalid(
            "auth.api_keys.header",
            "`authorization` carries bearer tokens; choose another header such as `x-api-key`",
        ));
    }
    if let Some(param) = &keys.query_param
        && (param.is_empty()
            || !param
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
    {
        return Err(invalid(
            "auth.api_keys.query_param",
            "use letters, digits, `-` or `_` (or remove it: keys in URLs leak into logs)",
        ));
    }
    for (i, issuer) in auth.jwt.iter().enumerate() {
        let key = |field: &str| format!("auth.jwt[{i}].{field}");
        if issuer.issuer.is_empty() {
            return Err(invalid(&key("issuer"), "must not be empty"));
        }
        if auth.jwt[..i].iter().any(|o| o.issuer == issuer.issuer) {
            return Err(invalid(
                &key("issuer"),
                format!("`{}` is configured twice", issuer.issuer),
            ));
        }
        if issuer.audiences.is_empty() || issuer.audiences.iter().any(String::is_empty) {
            return Err(invalid(
                &key("audiences"),
                "list at least one audience: tokens minted for another service must not pass",
            ));
        }
        validate_algorithms(issuer, &key)?;
        let sources = [
            issuer.jwks_file.is_some(),
            issuer.pem_file.is_some(),
            issuer.jwks_url.is_some(),
        ];
        if sources.iter().filter(|set| **set).count() != 1 {
            return Err(invalid(
                &key("jwks_file"),
                "set exactly one of `jwks_file`, `pem_file` or `jwks_url`",
            ));
        }
        let hmac = issuer
            .parsed_algorithms()
            .iter()
            .any(|alg| alg.family() == AlgorithmFamily::Hmac);
        if let Some(url) = &issuer.jwks_url {
            validate_url(url).map_err(|message| invalid(&key("jwks_url"), message))?;
            if hmac {
                return Err(invalid(
                    &key("jwks_url"),
                    "HMAC secrets are never fetched over the network; put them in a `jwks_file`",
                ));
            }
        } else if issuer.ca_file.is_some() {
            return Err(invalid(&key("ca_file"), "only applies to `jwks_url`"));
        }
        if issuer.pem_file.is_some() && hmac {
            return Err(invalid(
                &key("pem_file"),
                "a PEM file holds a public key; HMAC secrets go in a `jwks_file` (`kty: oct`)",
            ));
        }
        if issuer.refresh_interval < Duration::from_secs(1) {
            return Err(invalid(&key("refresh_interval"), "must be at least 1s"));
        }
        if issuer.min_refetch_interval < Duration::from_secs(1) {
            return Err(invalid(
                &key("min_refetch_interval"),
                "must be at least 1s (it protects the issuer from random `kid`s)",
            ));
        }
        if issuer.max_key_age <= issuer.refresh_interval {
            return Err(invalid(
                &key("max_key_age"),
                "must be longer than `refresh_interval`, or keys would expire between refreshes",
            ));
        }
        if issuer.leeway > Duration::from_secs(300) {
            return Err(invalid(
                &key("leeway"),
                "must be at most 5m; fix the clocks instead",
            ));
        }
        if issuer.principal_claim.is_empty() {
            return Err(invalid(&key("principal_claim"), "must not be empty"));
        }
        if let Some(j) = issuer.required_claims.iter().position(String::is_empty) {
            return Err(invalid(
                &format!("auth.jwt[{i}].required_claims[{j}]"),
                "must not be empty",
            ));
        }
    }
    Ok(())
}

fn validate_algorithms(
    issuer: &JwtIssuerConfig,
    key: &impl Fn(&str) -> String,
) -> Result<(), ConfigError> {
    if issuer.algorithms.is_empty() {
        return Err(invalid(
            &key("algorithms"),
            "pin the algorithms this issuer signs with, e.g. [\"RS256\"]",
        ));
    }
    let mut families = Vec::new();
    for (j, name) in issuer.algorithms.iter().enumerate() {
        let alg_key = format!("{}[{j}]", key("algorithms"));
        if name.eq_ignore_ascii_case("none") {
            return Err(invalid(
                &alg_key,
                "`none` means unsigned tokens and is never accepted",
            ));
        }
        let Ok(alg) = Algorithm::from_str(name) else {
            return Err(invalid(
                &alg_key,
                format!(
                    "`{name}` is not a JWS algorithm; use one of HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA"
                ),
            ));
        };
        families.push(alg.family());
    }
    let hmac = families.contains(&AlgorithmFamily::Hmac);
    if hmac && families.iter().any(|f| *f != AlgorithmFamily::Hmac) {
        // The classic algorithm-confusion attack signs an HMAC token with a public key as the
        // secret; an issuer is either all-HMAC or all-asymmetric.
        return Err(invalid(
            &key("algorithms"),
            "HMAC (HS*) cannot be mixed with RSA, EC or EdDSA algorithms; configure two issuers",
        ));
    }
    Ok(())
}

/// Checks a JWKS URL: keys fetched in clear text from another host could be replaced by anyone
/// on the path, so `http` is allowed to loopback addresses only.
fn validate_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("`{url}` is not a valid URL ({e})"))?;
    let host = uri.host().unwrap_or_default();
    match uri.scheme_str() {
        Some("https") if !host.is_empty() => Ok(()),
        Some("http") if is_loopback(host) => Ok(()),
        Some("http") => Err(format!(
            "`{url}` uses plain http to a non-loopback host; use https (keys in clear text can be swapped in transit)"
        )),
        _ => Err(format!(
            "`{url}` must be an absolute https:// URL (http:// only to a loopback address)"
        )),
    }
}

fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A route that accepts Basic needs the users file, and every listener that serves it must
/// be HTTPS: the password crosses the wire with every request.
pub(super) fn validate_basic_routes(
    auth: &AuthConfig,
    listeners: &[super::l7::ListenerConfig],
    routes: &[super::l7::RouteConfig],
) -> Result<(), ConfigError> {
    for (i, route) in routes.iter().enumerate() {
        let methods = route.auth.as_ref().unwrap_or(&auth.default_route_auth);
        if !methods.contains(&crate::auth::Method::Basic) {
            continue;
        }
        if auth.basic.users_file.is_none() {
            return Err(invalid(
                &format!("routes[{i}].auth"),
                "accepts `basic` but `auth.basic.users_file` is not set",
            ));
        }
        if let Some(j) = listeners
            .iter()
            .position(|l| l.tls.is_none() && l.routes.contains(&route.name))
        {
            return Err(invalid(
                &format!("listeners[{j}].routes"),
                format!(
                    "serves route `{}`, which accepts `basic`, over plain HTTP: Basic sends the password in clear; serve the route on HTTPS listeners only",
                    route.name
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ConfigError};

    const ISSUER: &str = r#"
        [[auth.jwt]]
        issuer = "https://idp.example"
        audiences = ["orders"]
        algorithms = ["RS256", "ES256"]
        jwks_url = "https://idp.example/.well-known/jwks.json"
    "#;

    #[test]
    fn defaults_need_no_auth_section() {
        let config = Config::parse("").unwrap();
        assert!(config.auth.jwt.is_empty());
        assert_eq!(config.auth.api_keys.header, "x-api-key");
        assert_eq!(config.auth.api_keys.query_param, None);
        assert_eq!(
            config
                .auth
                .api_keys
                .file(std::path::Path::new("/var/lib/gateway/x")),
            std::path::Path::new("/var/lib/gateway/x/api-keys.json")
        );
    }

    #[test]
    fn an_issuer_parses_with_defaults() {
        let config = Config::parse(ISSUER).unwrap();
        let issuer = &config.auth.jwt[0];
        assert_eq!(issuer.refresh_interval, std::time::Duration::from_secs(300));
        assert_eq!(issuer.leeway, std::time::Duration::from_secs(30));
        assert_eq!(issuer.principal_claim, "sub");
        assert_eq!(
            issuer.parsed_algorithms(),
            [
                jsonwebtoken::Algorithm::RS256,
                jsonwebtoken::Algorithm::ES256
            ]
        );
    }

    #[test]
    fn dangerous_settings_are_refused_with_their_key() {
        let base = "[[auth.jwt]]\nissuer = \"i\"\naudiences = [\"a\"]\n";
        let cases = [
            (
                format!("{base}algorithms = [\"none\"]\npem_file = \"/k.pem\""),
                "auth.jwt[0].algorithms[0]",
            ),
            (
                format!("{base}algorithms = [\"RS256\", \"HS256\"]\njwks_file = \"/k.json\""),
                "auth.jwt[0].algorithms",
            ),
            (
                format!("{base}algorithms = [\"HS256\"]\npem_file = \"/k.pem\""),
                "auth.jwt[0].pem_file",
            ),
            (
                format!("{base}algorithms = [\"HS256\"]\njwks_url = \"https://i/jwks\""),
                "auth.jwt[0].jwks_url",
            ),
            (
                format!("{base}algorithms = [\"RS256\"]\njwks_url = \"http://idp.example/jwks\""),
                "auth.jwt[0].jwks_url",
            ),
            (
                format!("{base}algorithms = [\"RS256\"]"),
                "auth.jwt[0].jwks_file",
            ),
            (
                format!(
                    "{base}algorithms = [\"RS256\"]\npem_file = \"/k.pem\"\njwks_file = \"/k.json\""
                ),
                "auth.jwt[0].jwks_file",
            ),
            (
                "[[auth.jwt]]\nissuer = \"i\"\naudiences = []\nalgorithms = [\"RS256\"]\npem_file = \"/k\""
                    .to_owned(),
                "auth.jwt[0].audiences",
            ),
            (
                format!("{base}algorithms = [\"RS256\"]\npem_file = \"/k\"\nmax_key_age = \"1m\""),
                "auth.jwt[0].max_key_age",
            ),
            (
                format!("{ISSUER}{}", ISSUER.replace("ES256", "PS256")),
                "auth.jwt[1].issuer",
            ),
            (
                "[auth.api_keys]\nheader = \"bad header\"".to_owned(),
                "auth.api_keys.header",
            ),
            (
                "[auth.api_keys]\nheader = \"Authorization\"".to_owned(),
                "auth.api_keys.header",
            ),
            (
                "[auth.api_keys]\nquery_param = \"a b\"".to_owned(),
                "auth.api_keys.query_param",
            ),
        ];
        for (text, key) in cases {
            match Config::parse(&text) {
                Err(ConfigError::Invalid { key: got, .. }) => assert_eq!(got, key, "{text}"),
                other => panic!("{text}: expected an error for `{key}`, got {other:?}"),
            }
        }
    }

    #[test]
    fn plain_http_is_allowed_to_loopback_only() {
        for url in [
            "http://127.0.0.1:8080/jwks",
            "http://[::1]:8080/jwks",
            "http://localhost/jwks",
        ] {
            let text = ISSUER.replace("https://idp.example/.well-known/jwks.json", url);
            let config = Config::parse(&text).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(
                config.auth.jwt[0].key_source(),
                Some(super::KeySourceConfig::JwksUrl(url))
            );
        }
    }

    #[test]
    fn basic_needs_a_users_file_and_tls_listeners_only() {
        let config = |users_file: &str, tls: &str| {
            Config::parse(&format!(
                r#"
                [[listeners]]
                name = "edge"
                address = "127.0.0.1:8443"
                routes = ["legacy"]
                {tls}
                [[routes]]
                name = "legacy"
                upstream = "app"
                auth = ["basic"]
                [[upstreams]]
                name = "app"
                endpoints = ["127.0.0.1:8081"]
                [auth.basic]
                {users_file}
                "#
            ))
        };
        let tls = "[listeners.tls]\nself_signed = true";
        let users = r#"users_file = "/etc/gateway/basic-users""#;
        assert!(config(users, tls).is_ok());
        for (users_file, tls, key, says) in [
            ("", tls, "routes[0].auth", "users_file"),
            (users, "", "listeners[0].routes", "in clear"),
        ] {
            match config(users_file, tls) {
                Err(ConfigError::Invalid { key: got, message }) => {
                    assert_eq!(got, key, "{message}");
                    assert!(message.contains(says), "{message}");
                }
                other => panic!("expected `{key}` to be refused, got {other:?}"),
            }
        }
    }
}
