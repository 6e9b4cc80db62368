//! Which route serves a request: the route table compiled from the config, matched by listener,
//! host, normalised path, method and headers. Deny by default: a request that matches no route
//! of its listener gets no route, and the proxy answers 404 without contacting any upstream.
pub mod path;

use std::{sync::Arc, time::Duration};

use http::{HeaderMap, HeaderName, HeaderValue, Method};

use crate::config::{Config, RouteConfig};

/// A route as the proxy uses it.
#[derive(Debug)]
pub struct Route {
    pub name: String,
    /// The upstream pool's name.
    pub upstream: String,
    pub timeout: Duration,
    pub max_body_bytes: u64,
    host: Option<HostPattern>,
    path: PathMatch,
    methods: Vec<Method>,
    headers: Vec<(HeaderName, HeaderValue)>,
    strip_prefix: bool,
}

#[derive(Debug)]
enum HostPattern {
    Exact(String),
    /// `*.example.com` stored as `example.com`; matches one label in front of it.
    Wildcard(String),
}

#[derive(Debug)]
enum PathMatch {
    Any,
    Exact(String),
    Prefix(String),
    /// Anchored at both ends by [`compile_path_regex`].
    Regex(regex::Regex),
}

/// Compiles a route's `path_regex`, anchored so that it must match the whole path, with a
/// size limit so a config cannot make the daemon build a huge automaton.
pub fn compile_path_regex(pattern: &str) -> Result<regex::Regex, String> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(1 << 20)
        .build()
        .map_err(|e| format!("not a valid regular expression: {e}"))
}

/// What routing looks at in a request. `path` is already normalised.
pub struct RequestView<'a> {
    pub host: Option<&'a str>,
    pub path: &'a str,
    pub method: &'a Method,
    pub headers: &'a HeaderMap,
}

impl Route {
    fn compile(config: &RouteConfig) -> Route {
        let host = config
            .host
            .as_deref()
            .map(|host| match host.strip_prefix("*.") {
                Some(suffix) => HostPattern::Wildcard(suffix.to_owned()),
                None => HostPattern::Exact(host.to_owned()),
            });
        let path = match (&config.path_exact, &config.path_prefix, &config.path_regex) {
            (Some(exact), _, _) => PathMatch::Exact(exact.clone()),
            (None, Some(prefix), _) => PathMatch::Prefix(prefix.clone()),
            // Validation compiled it; one that still failed must match nothing, not everything.
            (None, None, Some(pattern)) => PathMatch::Regex(
                compile_path_regex(pattern)
                    .unwrap_or_else(|_| regex::Regex::new("[^\\s\\S]").expect("a valid regex")),
            ),
            (None, None, None) => PathMatch::Any,
        };
        Route {
            name: config.name.clone(),
            upstream: config.upstream.clone(),
            timeout: config.timeout,
            max_body_bytes: config.max_body_bytes,
            host,
            path,
            // Validation checked the spellings; an entry that still fails to convert could not
            // match any request, so leaving it out would widen the route: keep it unmatchable.
            methods: config
                .methods
                .iter()
                .map(|m| Method::from_bytes(m.as_bytes()).unwrap_or(Method::CONNECT))
                .collect(),
            headers: config
                .headers
                .iter()
                .filter_map(|(name, value)| {
                    Some((
                        HeaderName::from_bytes(name.as_bytes()).ok()?,
                        HeaderValue::from_str(value).ok()?,
                    ))
                })
                .collect(),
            strip_prefix: config.strip_prefix,
        }
    }

    fn matches(&self, request: &RequestView<'_>) -> bool {
        let host_ok = match &self.host {
            None => true,
            Some(HostPattern::Exact(host)) => request.host == Some(host.as_str()),
            Some(HostPattern::Wildcard(suffix)) => request
                .host
                .and_then(|host| host.split_once('.'))
                .is_some_and(|(label, parent)| !label.is_empty() && parent == suffix),
        };
        host_ok
            && self.path_matches(request.path)
            && (self.methods.is_empty() || self.methods.contains(request.method))
            && self
                .headers
                .iter()
                .all(|(name, value)| request.headers.get_all(name).iter().any(|v| v == value))
    }

    fn path_matches(&self, path: &str) -> bool {
        match &self.path {
            PathMatch::Any => true,
            PathMatch::Exact(exact) => path == exact,
            PathMatch::Regex(regex) => regex.is_match(path),
            PathMatch::Prefix(prefix) if prefix.ends_with('/') => path.starts_with(prefix.as_str()),
            // Segment-wise: `/api` covers `/api` and `/api/...`, never `/apix`.
            PathMatch::Prefix(prefix) => path
                .strip_prefix(prefix.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
        }
    }

    /// The path sent upstream: the normalised path, without the route's prefix when the route
    /// strips it (keeping a leading `/`).
    pub fn upstream_path(&self, path: &str) -> String {
        if let (true, PathMatch::Prefix(prefix)) = (self.strip_prefix, &self.path) {
            let rest = path
                .strip_prefix(prefix.trim_end_matches('/'))
                .unwrap_or(path);
            if rest.starts_with('/') {
                return rest.to_owned();
            }
            return format!("/{rest}");
        }
        path.to_owned()
    }
}

/// Every listener's routes, in the order its `routes` list gives them.
#[derive(Debug)]
pub struct RouteTable {
    by_listener: Vec<Vec<Arc<Route>>>,
}

impl RouteTable {
    /// Compiles a validated config; listener `i` here is `config.listeners[i]`.
    pub fn compile(config: &Config) -> RouteTable {
        let by_listener = config
            .listeners
            .iter()
            .map(|listener| {
                listener
                    .routes
                    .iter()
                    .filter_map(|name| config.routes.iter().find(|r| &r.name == name))
                    .map(|route| Arc::new(Route::compile(route)))
                    .collect()
            })
            .collect();
        RouteTable { by_listener }
    }

    /// The first of the listener's routes that matches, or none (deny).
    pub fn find(&self, listener: usize, request: &RequestView<'_>) -> Option<&Arc<Route>> {
        self.by_listener
            .get(listener)?
            .iter()
            .find(|route| route.matches(request))
    }
}

/// The host a request is for, lowercase, without port or trailing dot: the URI's authority
/// (HTTP/2 `:authority`, absolute-form HTTP/1.1) or else the `Host` header.
pub fn request_host(uri: &http::Uri, headers: &HeaderMap) -> Option<String> {
    let authority = match uri.authority() {
        Some(authority) => authority.host().to_owned(),
        None => {
            let host = headers.get(http::header::HOST)?.to_str().ok()?;
            let authority: http::uri::Authority = host.parse().ok()?;
            authority.host().to_owned()
        }
    };
    Some(authority.trim_end_matches('.').to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(routes: &str) -> RouteTable {
        let text = format!(
            r#"
            [[upstreams]]
            name = "app"
            endpoints = ["127.0.0.1:9"]
            [[listeners]]
            name = "public"
            address = "127.0.0.1:8080"
            routes = ["admin", "api", "exact", "wild", "users", "any-get"]
            {routes}
            "#
        );
        let config = Config::parse(&text).unwrap_or_else(|e| panic!("test config: {e}"));
        RouteTable::compile(&config)
    }

    const ROUTES: &str = r#"
        [[routes]]
        name = "admin"
        path_prefix = "/admin"
        headers = { x-internal = "yes" }
        upstream = "app"
        [[routes]]
        name = "api"
        host = "api.example.com"
        path_prefix = "/api/"
        methods = ["GET", "POST"]
        upstream = "app"
        strip_prefix = true
        [[routes]]
        name = "exact"
        path_exact = "/health"
        upstream = "app"
        [[routes]]
        name = "wild"
        host = "*.example.com"
        path_prefix = "/static"
        upstream = "app"
        [[routes]]
        name = "users"
        path_regex = "/users/[0-9]+(/keys)?"
        upstream = "app"
        [[routes]]
        name = "any-get"
        host = "get.example.com"
        methods = ["GET"]
        upstream = "app"
    "#;

    fn route(table: &RouteTable, host: &str, path: &str, method: Method) -> Option<String> {
        let mut headers = HeaderMap::new();
        if path.starts_with("/admin") {
            headers.insert("x-internal", HeaderValue::from_static("yes"));
        }
        let raw = path;
        let path = path::normalize_path(raw).ok()?;
        let view = RequestView {
            host: Some(host),
            path: &path,
            method: &method,
            headers: &headers,
        };
        table.find(0, &view).map(|route| route.name.clone())
    }

    #[test]
    fn routes_match_by_host_path_method_and_headers() {
        let table = table(ROUTES);
        let get = || Method::GET;
        assert_eq!(
            route(&table, "api.example.com", "/api/users", get()).as_deref(),
            Some("api")
        );
        assert_eq!(
            route(&table, "api.example.com", "/api/users", Method::DELETE),
            None
        );
        assert_eq!(
            route(&table, "other.example.com", "/api/users", get()),
            None
        );
        assert_eq!(
            route(&table, "x.example.com", "/health", get()).as_deref(),
            Some("exact")
        );
        assert_eq!(route(&table, "x.example.com", "/health/", get()), None);
        assert_eq!(
            route(&table, "cdn.example.com", "/static/a.css", get()).as_deref(),
            Some("wild")
        );
        assert_eq!(
            route(&table, "a.cdn.example.com", "/static/a.css", get()),
            None
        );
        assert_eq!(route(&table, "cdn.example.com", "/staticx", get()), None);
        assert_eq!(
            route(&table, "get.example.com", "/anything", get()).as_deref(),
            Some("any-get")
        );
        assert_eq!(
            route(&table, "get.example.com", "/anything", Method::POST),
            None
        );
    }

    #[test]
    fn regex_paths_match_the_whole_normalised_path() {
        let table = table(ROUTES);
        for (path, expected) in [
            ("/users/42", Some("users")),
            ("/users/42/keys", Some("users")),
            ("/users//42/./keys", Some("users")),
            ("/users/%34%32", Some("users")),
            ("/users/42/keys/1", None),
            ("/v2/users/42", None),
            ("/users/abc", None),
        ] {
            assert_eq!(
                route(&table, "x.org", path, Method::GET).as_deref(),
                expected,
                "{path}"
            );
        }
        let error = Config::parse(
            "[[routes]]\nname = \"r\"\nupstream = \"app\"\npath_regex = \"(\"\n[[upstreams]]\nname = \"app\"\nendpoints = [\"127.0.0.1:9\"]\n",
        )
        .expect_err("an unbalanced group");
        assert!(
            error.to_string().contains("routes[0].path_regex"),
            "{error}"
        );
    }

    #[test]
    fn header_matches_are_required() {
        let table = table(ROUTES);
        let path = "/admin/users";
        let view = RequestView {
            host: Some("x"),
            path,
            method: &Method::GET,
            headers: &HeaderMap::new(),
        };
        assert!(table.find(0, &view).is_none(), "without the header");
        assert_eq!(
            route(&table, "x", path, Method::GET).as_deref(),
            Some("admin")
        );
    }

    #[test]
    fn unknown_listeners_and_unmatched_requests_get_no_route() {
        let table = table(ROUTES);
        assert_eq!(route(&table, "x.org", "/", Method::GET), None);
        let view = RequestView {
            host: None,
            path: "/health",
            method: &Method::GET,
            headers: &HeaderMap::new(),
        };
        assert!(table.find(1, &view).is_none());
    }

    #[test]
    fn normalisation_blocks_bypasses_of_a_prefix_rule() {
        // Only `/api/` is routed on this host; every spelling that resolves elsewhere must
        // miss it, and every spelling that resolves into it must hit it.
        let table = table(ROUTES);
        let host = "api.example.com";
        for raw in [
            "/api/../admin",
            "/api/%2e%2e/admin",
            "/api/./../admin",
            "//admin",
            "/apix",
        ] {
            assert_eq!(
                route(&table, host, raw, Method::GET),
                None,
                "`{raw}` must not reach `api`"
            );
        }
        for raw in [
            "/%61pi/users",
            "//api//users",
            "/./api/users",
            "/admin/../api/users",
        ] {
            assert_eq!(
                route(&table, host, raw, Method::GET).as_deref(),
                Some("api"),
                "`{raw}`"
            );
        }
    }

    #[test]
    fn strip_prefix_keeps_a_leading_slash() {
        let table = table(ROUTES);
        let view = RequestView {
            host: Some("api.example.com"),
            path: "/api/users",
            method: &Method::GET,
            headers: &HeaderMap::new(),
        };
        let api = table.find(0, &view).expect("the api route");
        assert_eq!(api.upstream_path("/api/users"), "/users");
        assert_eq!(api.upstream_path("/api/"), "/");
    }

    #[test]
    fn request_host_prefers_the_authority_and_drops_the_port() {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::HOST,
            HeaderValue::from_static("Example.COM.:8443"),
        );
        let origin: http::Uri = "/x".parse().expect("uri");
        assert_eq!(
            request_host(&origin, &headers).as_deref(),
            Some("example.com")
        );
        let absolute: http::Uri = "https://api.example.com:443/x".parse().expect("uri");
        assert_eq!(
            request_host(&absolute, &headers).as_deref(),
            Some("api.example.com")
        );
        assert_eq!(request_host(&origin, &HeaderMap::new()), None);
    }
}
