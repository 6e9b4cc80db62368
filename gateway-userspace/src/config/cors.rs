//! A route's CORS policy (`cors = { ... }` on a `[[routes]]` entry) as written in the file, and
//! its validation. [`crate::cors`] answers preflights and decorates responses from it.
//!
//! ```toml
//! [[routes]]
//! name = "api"
//! cors = { allow_origins = ["https://app.example.com"], allow_methods = ["GET", "POST"], allow_headers = ["content-type", "authorization"], allow_credentials = true, max_age = "10m" }
//! ```
use std::time::Duration;

use http::{HeaderName, Method};
use serde::Deserialize;

use super::{ConfigError, invalid};

/// Which browser origins may call a route from scripts, and how.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// Origins as browsers send them (`https://app.example.com`, `http://localhost:3000`:
    /// scheme, host and a non-default port, nothing else), or `["*"]` for any origin (only
    /// without credentials).
    pub allow_origins: Vec<String>,
    /// Methods a preflight may ask for. Default `GET`, `HEAD`, `POST`.
    #[serde(default = "default_allow_methods")]
    pub allow_methods: Vec<String>,
    /// Request headers a preflight may ask for, e.g. `content-type`, `authorization`.
    /// Default: none.
    #[serde(default)]
    pub allow_headers: Vec<String>,
    /// Response headers scripts may read beyond the CORS-safelisted ones. Default: none.
    #[serde(default)]
    pub expose_headers: Vec<String>,
    /// Let browsers send cookies and `Authorization` and let scripts read the answer.
    /// Default `false`.
    #[serde(default)]
    pub allow_credentials: bool,
    /// How long browsers may cache a preflight's answer. Default: unset (browsers then ask
    /// again after 5 s). At most 24 h; browsers cap it lower (Chromium at 2 h).
    #[serde(default, with = "humantime_serde")]
    pub max_age: Option<Duration>,
}

fn default_allow_methods() -> Vec<String> {
    vec!["GET".to_owned(), "HEAD".to_owned(), "POST".to_owned()]
}

/// `allow_origins` once checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllowedOrigins {
    /// `["*"]`.
    Any,
    /// Exact serialized origins, compared byte for byte with the `Origin` header.
    List(Vec<String>),
}

const MAX_AGE_LIMIT: Duration = Duration::from_secs(24 * 3600);

impl CorsConfig {
    /// The checked origins; `key` is the `cors` table's key path, e.g. `routes[0].cors`.
    pub fn origins(&self, key: &str) -> Result<AllowedOrigins, ConfigError> {
        let key = format!("{key}.allow_origins");
        if self.allow_origins.is_empty() {
            return Err(invalid(
                &key,
                "list the origins allowed to call this route, e.g. `[\"https://app.example.com\"]`, or remove `cors`",
            ));
        }
        if self.allow_origins.iter().any(|origin| origin == "*") {
            if self.allow_origins.len() > 1 {
                return Err(invalid(
                    &key,
                    "`*` already allows every origin; use `[\"*\"]` alone or list origins",
                ));
            }
            return Ok(AllowedOrigins::Any);
        }
        for (i, origin) in self.allow_origins.iter().enumerate() {
            check_origin(&format!("{key}[{i}]"), origin)?;
        }
        Ok(AllowedOrigins::List(self.allow_origins.clone()))
    }

    /// The checked `allow_methods`.
    pub fn methods(&self, key: &str) -> Result<Vec<Method>, ConfigError> {
        if self.allow_methods.is_empty() {
            return Err(invalid(
                &format!("{key}.allow_methods"),
                "list at least one method, e.g. `[\"GET\", \"POST\"]` (or leave it out for GET, HEAD and POST)",
            ));
        }
        self.allow_methods
            .iter()
            .enumerate()
            .map(|(i, method)| {
                let key = format!("{key}.allow_methods[{i}]");
                if method == "*" {
                    return Err(invalid(&key, "list the methods; `*` is not supported"));
                }
                let token = !method.is_empty()
                    && method.bytes().all(|b| b.is_ascii_uppercase() || b == b'-');
                if !token {
                    return Err(invalid(
                        &key,
                        format!("`{method}` is not a method; write it in capitals, like `GET`"),
                    ));
                }
                Method::from_bytes(method.as_bytes())
                    .map_err(|_| invalid(&key, format!("`{method}` is not a method")))
            })
            .collect()
    }

    /// The checked `allow_headers`, lowercase.
    pub fn headers(&self, key: &str) -> Result<Vec<HeaderName>, ConfigError> {
        header_names(&format!("{key}.allow_headers"), &self.allow_headers)
    }

    /// The checked `expose_headers`, lowercase.
    pub fn exposed(&self, key: &str) -> Result<Vec<HeaderName>, ConfigError> {
        header_names(&format!("{key}.expose_headers"), &self.expose_headers)
    }
}

fn header_names(key: &str, names: &[String]) -> Result<Vec<HeaderName>, ConfigError> {
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let key = format!("{key}[{i}]");
            if name == "*" {
                // With credentials `*` is a literal header name to browsers, without them a
                // wildcard: one spelling, two meanings. Listing the names says what is meant.
                return Err(invalid(&key, "list the header names; `*` is not supported"));
            }
            HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| invalid(&key, format!("`{name}` is not a header name")))
        })
        .collect()
}

/// An origin as browsers serialize it: `scheme://host` plus `:port` when not the scheme's
/// default, lowercase, without path, query or trailing slash. Anything else would never equal
/// an `Origin` header, and the operator would wonder why.
fn check_origin(key: &str, origin: &str) -> Result<(), ConfigError> {
    if origin == "null" {
        return Err(invalid(
            key,
            "`null` is the origin of sandboxed frames and local files, which any page can create; list real origins",
        ));
    }
    let shape = || {
        invalid(
            key,
            format!(
                "`{origin}` is not an origin; write scheme, host and port only, in lowercase, e.g. `https://app.example.com` or `http://localhost:3000`"
            ),
        )
    };
    let (scheme, rest) = origin.split_once("://").ok_or_else(shape)?;
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_lowercase())
        && scheme
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b));
    if !scheme_ok || rest.is_empty() || rest.contains(['/', '?', '#', '@']) {
        return Err(shape());
    }
    let (host, port) = match rest.rsplit_once(':') {
        // A bracketed IPv6 address has colons of its own.
        Some((host, port)) if !port.contains(']') => (host, Some(port)),
        _ => (rest, None),
    };
    let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().is_ok() && v6 == v6.to_ascii_lowercase()
    } else {
        !host.is_empty()
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            })
    };
    if !host_ok {
        return Err(shape());
    }
    if let Some(port) = port {
        let number = port
            .parse::<u16>()
            .ok()
            .filter(|_| !port.starts_with('0'))
            .ok_or_else(shape)?;
        let default = match scheme {
            "https" => Some(443),
            "http" => Some(80),
            _ => None,
        };
        if default == Some(number) {
            return Err(invalid(
                key,
                format!(
                    "browsers leave the default port out of `Origin`; write `{scheme}://{host}`"
                ),
            ));
        }
    }
    Ok(())
}

/// Checks the `cors` table at key path `key` (e.g. `routes[0].cors`).
pub(super) fn validate(key: &str, cors: &CorsConfig) -> Result<(), ConfigError> {
    let origins = cors.origins(key)?;
    if cors.allow_credentials && origins == AllowedOrigins::Any {
        return Err(invalid(
            &format!("{key}.allow_credentials"),
            "browsers refuse credentials with `Access-Control-Allow-Origin: *`, and echoing any origin instead would let every site act with the user's cookies; list the origins",
        ));
    }
    cors.methods(key)?;
    cors.headers(key)?;
    cors.exposed(key)?;
    if let Some(max_age) = cors.max_age
        && max_age > MAX_AGE_LIMIT
    {
        return Err(invalid(
            &format!("{key}.max_age"),
            "must be at most 24h (browsers cap it lower anyway)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::*;

    fn route_with(cors: &str) -> String {
        format!(
            r#"
            [[upstreams]]
            name = "app"
            endpoints = ["127.0.0.1:8081"]
            [[routes]]
            name = "api"
            path_prefix = "/api/"
            upstream = "app"
            cors = {cors}
            "#
        )
    }

    #[test]
    fn a_full_cors_table_parses_with_defaults() {
        let text = route_with(
            r#"{ allow_origins = ["https://app.example.com", "http://localhost:3000", "http://[::1]:8080"] }"#,
        );
        let config = Config::parse(&text).unwrap_or_else(|error| panic!("{error}\n{text}"));
        let cors = config.routes[0].cors.as_ref().expect("a cors table");
        assert_eq!(cors.allow_methods, ["GET", "HEAD", "POST"], "the default");
        assert!(cors.allow_headers.is_empty() && cors.expose_headers.is_empty());
        assert!(!cors.allow_credentials);
        assert_eq!(cors.max_age, None);

        let text = route_with(
            r#"{ allow_origins = ["*"], allow_methods = ["PUT"], allow_headers = ["Content-Type"], expose_headers = ["x-request-id"], max_age = "10m" }"#,
        );
        let config = Config::parse(&text).unwrap_or_else(|error| panic!("{error}\n{text}"));
        let cors = config.routes[0].cors.as_ref().expect("a cors table");
        assert_eq!(cors.origins("k").expect("valid"), AllowedOrigins::Any);
        assert_eq!(cors.max_age, Some(Duration::from_secs(600)));
        let headers = cors.headers("k").expect("valid");
        assert_eq!(headers[0].as_str(), "content-type", "names are lowercased");
    }

    #[test]
    fn wildcard_origin_with_credentials_is_refused() {
        let text = route_with(r#"{ allow_origins = ["*"], allow_credentials = true }"#);
        match Config::parse(&text) {
            Err(ConfigError::Invalid { key, message }) => {
                assert_eq!(key, "routes[0].cors.allow_credentials", "{message}");
                assert!(message.contains("list the origins"), "{message}");
            }
            other => panic!("`*` with credentials was accepted: {other:?}"),
        }
    }

    #[test]
    fn errors_name_the_key_path() {
        let cases = [
            (r#"{ allow_origins = [] }"#, "routes[0].cors.allow_origins"),
            (
                r#"{ allow_origins = ["https://a.example"], allow_methods = [] }"#,
                "routes[0].cors.allow_methods",
            ),
            (
                r#"{ allow_origins = ["*", "https://a.example"] }"#,
                "routes[0].cors.allow_origins",
            ),
            (
                r#"{ allow_origins = ["https://a.example/"] }"#,
                "routes[0].cors.allow_origins[0]",
            ),
            (
                r#"{ allow_origins = ["https://a.example", "https://A.example"] }"#,
                "routes[0].cors.allow_origins[1]",
            ),
            (
                r#"{ allow_origins = ["a.example"] }"#,
                "routes[0].cors.allow_origins[0]",
            ),
            (
                r#"{ allow_origins = ["https://a.example:443"] }"#,
                "routes[0].cors.allow_origins[0]",
            ),
            (
                r#"{ allow_origins = ["https://a.example:99999"] }"#,
                "routes[0].cors.allow_origins[0]",
            ),
            (
                r#"{ allow_origins = ["https://user@a.example"] }"#,
                "routes[0].cors.allow_origins[0]",
            ),
            (
                r#"{ allow_origins = ["null"] }"#,
                "routes[0].cors.allow_origins[0]",
            ),
            (
                r#"{ allow_origins = ["https://a.example"], allow_methods = ["get"] }"#,
                "routes[0].cors.allow_methods[0]",
            ),
            (
                r#"{ allow_origins = ["https://a.example"], allow_methods = ["GET", "*"] }"#,
                "routes[0].cors.allow_methods[1]",
            ),
            (
                r#"{ allow_origins = ["https://a.example"], allow_headers = ["bad header"] }"#,
                "routes[0].cors.allow_headers[0]",
            ),
            (
                r#"{ allow_origins = ["https://a.example"], allow_headers = ["*"] }"#,
                "routes[0].cors.allow_headers[0]",
            ),
            (
                r#"{ allow_origins = ["https://a.example"], expose_headers = ["x:y"] }"#,
                "routes[0].cors.expose_headers[0]",
            ),
            (
                r#"{ allow_origins = ["https://a.example"], max_age = "2days" }"#,
                "routes[0].cors.max_age",
            ),
        ];
        for (cors, key) in cases {
            let text = route_with(cors);
            match Config::parse(&text) {
                Err(ConfigError::Invalid { key: got, message }) => {
                    assert_eq!(got, key, "{message}\n{cors}");
                }
                other => panic!("expected an error for `{key}`, got {other:?}\n{cors}"),
            }
        }
    }
}
