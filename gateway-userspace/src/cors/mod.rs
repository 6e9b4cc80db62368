//! Cross-origin resource sharing, per route: the gateway answers browsers' preflights itself
//! and adds the `Access-Control-*` headers to actual responses, so upstreams need not know
//! which sites call them.
//!
//! # How the pipeline calls it
//!
//! ```text
//! 4 route ── match the route with `cors::preflight_method(method, headers)` in place of the
//!            method when it returns one (a preflight asks about the method it names; a route
//!            that allows `POST` but not `OPTIONS` must still find it), then:
//!            match policies.route(&route.name).map(|cors| cors.preflight(headers, method)) {
//!                Some(PreflightOutcome::Allowed(h)) => answer 204 with `h`, no upstream,
//!                Some(PreflightOutcome::Refused(why)) => 403 problem, log `why.reason()`,
//!                _ => go on to authenticate (preflights carry no credentials, so they are
//!                     answered before it)
//!            }
//! 10 response filters ─ cors.decorate(request_headers, response.headers_mut()) on every
//!            response of a CORS route, the gateway's own 401/403/429 included: without
//!            `Access-Control-Allow-Origin` a script cannot even see that it was limited.
//! ```
//!
//! CORS is the browser's check, not the gateway's: a request from an origin not on the list is
//! still served (only its response lacks the headers that would let a script read it).
//! Authentication and authorization are what keep other callers out.
use std::collections::HashMap;

use http::{HeaderMap, HeaderName, HeaderValue, Method, header};

use crate::config::{
    ConfigError, RouteConfig,
    cors::{AllowedOrigins, CorsConfig},
};

/// A route's CORS policy, its headers rendered once.
#[derive(Clone, Debug)]
pub struct Cors {
    origins: AllowedOrigins,
    methods: Vec<Method>,
    headers: Vec<HeaderName>,
    credentials: bool,
    allow_methods: HeaderValue,
    allow_headers: Option<HeaderValue>,
    expose_headers: Option<HeaderValue>,
    max_age: Option<HeaderValue>,
}

/// What to do with a request that might be a preflight.
#[derive(Clone, Debug)]
pub enum PreflightOutcome {
    /// Not a preflight (an `OPTIONS` request without `Origin` and
    /// `Access-Control-Request-Method` is an ordinary one): handle the request as usual.
    NotPreflight,
    /// Answer `204 No Content` with these headers; the request goes no further.
    Allowed(HeaderMap),
    /// Answer 403; the reason is for the log, not the client.
    Refused(PreflightRefusal),
}

/// Why a preflight was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PreflightRefusal {
    #[error("origin `{0}` is not in the route's `cors.allow_origins`")]
    Origin(String),
    #[error("method `{0}` is not in the route's `cors.allow_methods`")]
    Method(String),
    #[error("request header `{0}` is not in the route's `cors.allow_headers`")]
    Header(String),
}

impl PreflightRefusal {
    /// A stable slug for logs and metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            PreflightRefusal::Origin(_) => "origin_not_allowed",
            PreflightRefusal::Method(_) => "method_not_allowed",
            PreflightRefusal::Header(_) => "header_not_allowed",
        }
    }
}

/// The method a preflight asks about, if `method` and `headers` make one: what route matching
/// should use in place of `OPTIONS`.
pub fn preflight_method(method: &Method, headers: &HeaderMap) -> Option<Method> {
    if method != Method::OPTIONS || !headers.contains_key(header::ORIGIN) {
        return None;
    }
    let requested = headers.get(header::ACCESS_CONTROL_REQUEST_METHOD)?;
    Method::from_bytes(requested.as_bytes()).ok()
}

/// The headers a preflight answer may vary with: none of them is worth a cache serving one
/// origin's answer to another.
const PREFLIGHT_VARY: &str =
    "origin, access-control-request-method, access-control-request-headers";

/// `Access-Control-*` response headers that only the gateway sets on a CORS route.
const CORS_RESPONSE_HEADERS: [HeaderName; 6] = [
    header::ACCESS_CONTROL_ALLOW_ORIGIN,
    header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
    header::ACCESS_CONTROL_ALLOW_METHODS,
    header::ACCESS_CONTROL_ALLOW_HEADERS,
    header::ACCESS_CONTROL_EXPOSE_HEADERS,
    header::ACCESS_CONTROL_MAX_AGE,
];

/// Longest origin text kept in a refusal: the value comes from the client and goes to logs.
const MAX_LOGGED: usize = 128;

impl Cors {
    /// The policy of a validated `cors` table at key path `key` (e.g. `routes[0].cors`).
    pub fn new(key: &str, config: &CorsConfig) -> Result<Cors, ConfigError> {
        let methods = config.methods(key)?;
        let headers = config.headers(key)?;
        let exposed = config.exposed(key)?;
        let join = |names: Vec<&str>| -> Option<HeaderValue> {
            if names.is_empty() {
                return None;
            }
            HeaderValue::try_from(names.join(", ")).ok()
        };
        Ok(Cors {
            origins: config.origins(key)?,
            allow_methods: join(methods.iter().map(Method::as_str).collect())
                .unwrap_or(HeaderValue::from_static("")),
            allow_headers: join(headers.iter().map(HeaderName::as_str).collect()),
            expose_headers: join(exposed.iter().map(HeaderName::as_str).collect()),
            max_age: config.max_age.map(|age| HeaderValue::from(age.as_secs())),
            credentials: config.allow_credentials,
            methods,
            headers,
        })
    }

    /// The value of `Access-Control-Allow-Origin` for a request's `Origin`, if it may have
    /// one. Exactly one `Origin` header counts; two are a broken or forged request.
    fn allow_origin(&self, request: &HeaderMap) -> Result<HeaderValue, PreflightRefusal> {
        let mut origins = request.get_all(header::ORIGIN).iter();
        let (Some(origin), None) = (origins.next(), origins.next()) else {
            let shown = request
                .get_all(header::ORIGIN)
                .iter()
                .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(PreflightRefusal::Origin(truncate(shown)));
        };
        match &self.origins {
            AllowedOrigins::Any => Ok(HeaderValue::from_static("*")),
            AllowedOrigins::List(list)
                if list.iter().any(|o| o.as_bytes() == origin.as_bytes()) =>
            {
                Ok(origin.clone())
            }
            AllowedOrigins::List(_) => Err(PreflightRefusal::Origin(truncate(
                String::from_utf8_lossy(origin.as_bytes()).into_owned(),
            ))),
        }
    }

    /// Answers a request if it is a preflight (see [`PreflightOutcome`]). `method` is the
    /// request's own method.
    pub fn preflight(&self, request: &HeaderMap, method: &Method) -> PreflightOutcome {
        if method != Method::OPTIONS
            || !request.contains_key(header::ORIGIN)
            || !request.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
        {
            return PreflightOutcome::NotPreflight;
        }
        match self.check_preflight(request) {
            Ok(headers) => PreflightOutcome::Allowed(headers),
            Err(refusal) => PreflightOutcome::Refused(refusal),
        }
    }

    fn check_preflight(&self, request: &HeaderMap) -> Result<HeaderMap, PreflightRefusal> {
        let allow_origin = self.allow_origin(request)?;
        let requested = request
            .get(header::ACCESS_CONTROL_REQUEST_METHOD)
            .map(HeaderValue::as_bytes)
            .unwrap_or_default();
        // Methods are case-sensitive: `patch` is not `PATCH`, and browsers send what scripts
        // wrote for anything but the six methods they normalise.
        if !self
            .methods
            .iter()
            .any(|m| m.as_str().as_bytes() == requested)
        {
            return Err(PreflightRefusal::Method(truncate(
                String::from_utf8_lossy(requested).into_owned(),
            )));
        }
        for value in request.get_all(header::ACCESS_CONTROL_REQUEST_HEADERS) {
            for name in value.as_bytes().split(|b| *b == b',') {
                let name = name.trim_ascii();
                if name.is_empty() {
                    continue;
                }
                let allowed = self
                    .headers
                    .iter()
                    .any(|h| h.as_str().as_bytes().eq_ignore_ascii_case(name));
                if !allowed {
                    return Err(PreflightRefusal::Header(truncate(
                        String::from_utf8_lossy(name).into_owned(),
                    )));
                }
            }
        }

        let mut headers = HeaderMap::with_capacity(7);
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow_origin);
        if self.credentials {
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            self.allow_methods.clone(),
        );
        if let Some(allow_headers) = &self.allow_headers {
            headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, allow_headers.clone());
        }
        if let Some(max_age) = &self.max_age {
            headers.insert(header::ACCESS_CONTROL_MAX_AGE, max_age.clone());
        }
        headers.insert(header::VARY, HeaderValue::from_static(PREFLIGHT_VARY));
        Ok(headers)
    }

    /// Sets the CORS headers of an actual (non-preflight) response. Whatever `Access-Control-*`
    /// headers the upstream sent go first: two `Access-Control-Allow-Origin` values make
    /// browsers refuse the response, and the route's policy is the one in force.
    pub fn decorate(&self, request: &HeaderMap, response: &mut HeaderMap) {
        for name in &CORS_RESPONSE_HEADERS {
            response.remove(name);
        }
        if matches!(self.origins, AllowedOrigins::List(_)) {
            // The answer depends on `Origin` (echoed, or left out), so a shared cache must not
            // hand one origin's response to another, nor a response without the header to an
            // allowed origin. Added even when this request had no `Origin`, for that reason.
            add_vary_origin(response);
        }
        let Ok(allow_origin) = self.allow_origin(request) else {
            return;
        };
        response.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow_origin);
        if self.credentials {
            response.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(expose) = &self.expose_headers {
            response.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, expose.clone());
        }
    }
}

/// Adds `Origin` to `Vary` unless it is there already (or `Vary: *` covers everything), keeping
/// what the upstream listed.
fn add_vary_origin(response: &mut HeaderMap) {
    let covered = response.get_all(header::VARY).iter().any(|value| {
        value
            .as_bytes()
            .split(|b| *b == b',')
            .map(<[u8]>::trim_ascii)
            .any(|name| name == b"*" || name.eq_ignore_ascii_case(b"origin"))
    });
    if !covered {
        response.append(header::VARY, HeaderValue::from_static("origin"));
    }
}

fn truncate(mut text: String) -> String {
    if text.len() > MAX_LOGGED {
        let mut end = MAX_LOGGED;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// Every route's CORS policy. Routes without `cors` have no entry.
#[derive(Clone, Debug, Default)]
pub struct CorsPolicies {
    routes: HashMap<String, Cors>,
}

impl CorsPolicies {
    /// The policies of validated `routes`.
    pub fn new(routes: &[RouteConfig]) -> Result<Self, ConfigError> {
        let mut policies = HashMap::new();
        for (i, route) in routes.iter().enumerate() {
            if let Some(config) = &route.cors {
                policies.insert(
                    route.name.clone(),
                    Cors::new(&format!("routes[{i}].cors"), config)?,
                );
            }
        }
        Ok(CorsPolicies { routes: policies })
    }

    /// The policy of the route named `route`, or `None` when it has none.
    pub fn route(&self, route: &str) -> Option<&Cors> {
        self.routes.get(route)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn policy(cors: &str) -> Cors {
        let text = format!(
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
        );
        let config = Config::parse(&text).unwrap_or_else(|error| panic!("{error}\n{text}"));
        let policies = CorsPolicies::new(&config.routes).expect("a valid policy");
        policies.route("api").expect("the route's policy").clone()
    }

    const APP: &str = r#"{ allow_origins = ["https://app.example.com", "http://localhost:3000"], allow_methods = ["GET", "POST", "PATCH"], allow_headers = ["content-type", "authorization"], expose_headers = ["x-request-id", "ratelimit"], allow_credentials = true, max_age = "10m" }"#;

    fn request(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).expect("a header name"),
                HeaderValue::from_str(value).expect("a header value"),
            );
        }
        headers
    }

    fn get<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
        headers
            .get(name)
            .map(|value| value.to_str().expect("ASCII header"))
    }

    fn preflight(cors: &Cors, pairs: &[(&str, &str)]) -> PreflightOutcome {
        cors.preflight(&request(pairs), &Method::OPTIONS)
    }

    #[test]
    fn an_allowed_preflight_gets_every_header() {
        let cors = policy(APP);
        let outcome = preflight(
            &cors,
            &[
                ("origin", "https://app.example.com"),
                ("access-control-request-method", "PATCH"),
                (
                    "access-control-request-headers",
                    "Content-Type, authorization",
                ),
            ],
        );
        let PreflightOutcome::Allowed(headers) = outcome else {
            panic!("refused: {outcome:?}");
        };
        assert_eq!(
            get(&headers, "access-control-allow-origin"),
            Some("https://app.example.com"),
            "the origin is echoed, never `*` with credentials"
        );
        assert_eq!(
            get(&headers, "access-control-allow-credentials"),
            Some("true")
        );
        assert_eq!(
            get(&headers, "access-control-allow-methods"),
            Some("GET, POST, PATCH")
        );
        assert_eq!(
            get(&headers, "access-control-allow-headers"),
            Some("content-type, authorization")
        );
        assert_eq!(get(&headers, "access-control-max-age"), Some("600"));
        assert_eq!(
            get(&headers, "vary"),
            Some("origin, access-control-request-method, access-control-request-headers")
        );
    }

    #[test]
    fn preflights_are_refused_for_a_wrong_origin_method_or_header() {
        let cors = policy(APP);
        let cases: [(&[(&str, &str)], PreflightRefusal); 6] = [
            (
                &[
                    ("origin", "https://evil.example"),
                    ("access-control-request-method", "GET"),
                ],
                PreflightRefusal::Origin("https://evil.example".to_owned()),
            ),
            (
                // A look-alike: scheme and port are part of the origin.
                &[
                    ("origin", "http://app.example.com"),
                    ("access-control-request-method", "GET"),
                ],
                PreflightRefusal::Origin("http://app.example.com".to_owned()),
            ),
            (
                &[
                    ("origin", "https://app.example.com"),
                    ("origin", "https://evil.example"),
                    ("access-control-request-method", "GET"),
                ],
                PreflightRefusal::Origin(
                    "https://app.example.com, https://evil.example".to_owned(),
                ),
            ),
            (
                &[
                    ("origin", "https://app.example.com"),
                    ("access-control-request-method", "DELETE"),
                ],
                PreflightRefusal::Method("DELETE".to_owned()),
            ),
            (
                &[
                    ("origin", "https://app.example.com"),
                    ("access-control-request-method", "patch"),
                ],
                PreflightRefusal::Method("patch".to_owned()),
            ),
            (
                &[
                    ("origin", "https://app.example.com"),
                    ("access-control-request-method", "POST"),
                    ("access-control-request-headers", "content-type,x-admin"),
                ],
                PreflightRefusal::Header("x-admin".to_owned()),
            ),
        ];
        for (pairs, expected) in cases {
            match preflight(&cors, pairs) {
                PreflightOutcome::Refused(refusal) => assert_eq!(refusal, expected, "{pairs:?}"),
                other => panic!("expected {expected:?} for {pairs:?}, got {other:?}"),
            }
        }
        assert_eq!(
            PreflightRefusal::Header("x".to_owned()).reason(),
            "header_not_allowed"
        );
    }

    #[test]
    fn only_options_with_origin_and_a_requested_method_is_a_preflight() {
        let cors = policy(APP);
        let plain_options = request(&[("origin", "https://app.example.com")]);
        assert!(matches!(
            cors.preflight(&plain_options, &Method::OPTIONS),
            PreflightOutcome::NotPreflight
        ));
        let asking = request(&[
            ("origin", "https://app.example.com"),
            ("access-control-request-method", "POST"),
        ]);
        assert!(matches!(
            cors.preflight(&asking, &Method::POST),
            PreflightOutcome::NotPreflight
        ));
        assert_eq!(
            preflight_method(&Method::OPTIONS, &asking),
            Some(Method::POST)
        );
        assert_eq!(preflight_method(&Method::OPTIONS, &plain_options), None);
        assert_eq!(preflight_method(&Method::GET, &asking), None);
    }

    #[test]
    fn any_origin_without_credentials_answers_with_a_star() {
        let cors = policy(r#"{ allow_origins = ["*"] }"#);
        let outcome = preflight(
            &cors,
            &[
                ("origin", "https://anyone.example"),
                ("access-control-request-method", "POST"),
            ],
        );
        let PreflightOutcome::Allowed(headers) = outcome else {
            panic!("refused: {outcome:?}");
        };
        assert_eq!(get(&headers, "access-control-allow-origin"), Some("*"));
        assert_eq!(get(&headers, "access-control-allow-credentials"), None);
        assert_eq!(get(&headers, "access-control-allow-headers"), None);
        assert_eq!(get(&headers, "access-control-max-age"), None);

        let mut response = HeaderMap::new();
        cors.decorate(
            &request(&[("origin", "https://anyone.example")]),
            &mut response,
        );
        assert_eq!(get(&response, "access-control-allow-origin"), Some("*"));
        assert_eq!(
            get(&response, "vary"),
            None,
            "`*` is the same for every origin"
        );
    }

    #[test]
    fn actual_responses_get_the_origin_credentials_and_exposed_headers() {
        let cors = policy(APP);
        let mut response = request(&[
            ("vary", "accept-encoding"),
            ("access-control-allow-origin", "*"),
            ("access-control-allow-credentials", "false"),
            ("content-type", "application/json"),
        ]);
        cors.decorate(
            &request(&[("origin", "http://localhost:3000")]),
            &mut response,
        );
        assert_eq!(
            get(&response, "access-control-allow-origin"),
            Some("http://localhost:3000"),
            "the upstream's `*` is replaced"
        );
        assert_eq!(
            response
                .get_all("access-control-allow-origin")
                .iter()
                .count(),
            1
        );
        assert_eq!(
            get(&response, "access-control-allow-credentials"),
            Some("true")
        );
        assert_eq!(
            get(&response, "access-control-expose-headers"),
            Some("x-request-id, ratelimit")
        );
        let vary: Vec<&str> = response
            .get_all("vary")
            .iter()
            .map(|v| v.to_str().expect("ASCII"))
            .collect();
        assert_eq!(
            vary,
            ["accept-encoding", "origin"],
            "the upstream's Vary is kept"
        );
        assert_eq!(get(&response, "content-type"), Some("application/json"));
    }

    #[test]
    fn other_origins_get_no_cors_headers_but_still_vary() {
        let cors = policy(APP);
        for origin in [Some("https://evil.example"), None] {
            let mut response = request(&[("access-control-allow-origin", "https://evil.example")]);
            let headers = match origin {
                Some(origin) => request(&[("origin", origin)]),
                None => HeaderMap::new(),
            };
            cors.decorate(&headers, &mut response);
            assert_eq!(
                get(&response, "access-control-allow-origin"),
                None,
                "{origin:?}: an upstream's header must not let it through"
            );
            assert_eq!(get(&response, "access-control-allow-credentials"), None);
            assert_eq!(get(&response, "vary"), Some("origin"), "{origin:?}");
        }
        let mut response = request(&[("vary", "Accept, Origin")]);
        cors.decorate(&HeaderMap::new(), &mut response);
        assert_eq!(
            response.get_all("vary").iter().count(),
            1,
            "Origin is not listed twice"
        );
    }
}
