//! The response cache: GET and HEAD answers of routes that opt in (`[routes.cache]`), kept in
//! memory while the upstream says they are fresh, following RFC 9111 as a shared cache does.
//!
//! Stored only when the upstream allows it explicitly: status 200, 203, 204, 301, 404 or 410,
//! `Cache-Control` with `s-maxage` or `max-age` and without `no-store`, `no-cache` or
//! `private`, no `Set-Cookie`, no `Vary: *`, and a `Content-Length` within the route's
//! `max_body_bytes` (the body is buffered to store it; anything else streams through). A
//! request that asks for a fresh answer (`no-cache`, `no-store`) or sends a range skips the
//! cache; so does one with credentials on a route that does not authenticate, since such an
//! answer may be personal. On authenticated routes the key holds the identity, so one user's
//! answer is never served to another.
//!
//! One variant per URL: `Vary` is honoured by remembering the request values the stored answer
//! varied on and treating a request with other values as a miss. The cache belongs to one
//! pipeline, so a config reload starts it empty.
use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full};

use super::{ProxyError, ResponseBody};
use crate::{
    auth::Identity,
    config::{Config, RouteCacheConfig},
};

/// Who may see an entry and which URL it answers.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub(crate) struct CacheKey {
    route: Arc<str>,
    host: String,
    /// Path and query as the client sent them.
    target: String,
    /// `method:principal` on authenticated routes.
    identity: Option<String>,
}

struct Stored {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    stored_at: Instant,
    fresh_for: Duration,
    /// The request headers the answer varies on, with the values it was stored for.
    vary: Vec<(HeaderName, Option<HeaderValue>)>,
}

/// What a lookup found.
pub(crate) enum Lookup {
    /// The route does not cache, or this request must not use the cache.
    Bypass,
    /// Not stored (or stale, or another variant): forward, then offer the answer to `store`.
    Miss(CacheKey),
    Hit(Response<ResponseBody>),
}

pub(crate) struct ResponseCache {
    routes: HashMap<String, RouteCacheConfig>,
    entries: moka::sync::Cache<CacheKey, Arc<Stored>>,
}

/// Evicts an entry when it goes stale rather than when memory runs short.
struct UntilStale;

impl moka::Expiry<CacheKey, Arc<Stored>> for UntilStale {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        stored: &Arc<Stored>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(stored.fresh_for)
    }
}

impl ResponseCache {
    /// The caches of every route that has one; `None` when none does.
    pub(crate) fn new(config: &Config) -> Option<ResponseCache> {
        let routes: HashMap<_, _> = config
            .routes
            .iter()
            .filter_map(|route| Some((route.name.clone(), route.cache.clone()?)))
            .collect();
        if routes.is_empty() {
            return None;
        }
        let entries = moka::sync::Cache::builder()
            .max_capacity(config.http.cache_capacity_bytes)
            .weigher(|key: &CacheKey, stored: &Arc<Stored>| {
                let headers: usize = stored
                    .headers
                    .iter()
                    .map(|(name, value)| name.as_str().len() + value.len() + 32)
                    .sum();
                let size = stored.body.len() + headers + key.target.len() + key.host.len() + 128;
                u32::try_from(size).unwrap_or(u32::MAX)
            })
            .expire_after(UntilStale)
            .build();
        Some(ResponseCache { routes, entries })
    }

    /// Looks `request` up for `route`. `authenticated` says whether the route requires
    /// credentials (then `identity` is the verified one).
    pub(crate) fn lookup<B>(
        &self,
        route: &str,
        request: &Request<B>,
        authenticated: bool,
        identity: Option<&Identity>,
    ) -> Lookup {
        if !self.routes.contains_key(route) {
            return Lookup::Bypass;
        }
        let headers = request.headers();
        let method = request.method();
        let personal = !authenticated
            && (headers.contains_key(header::AUTHORIZATION)
                || headers.contains_key(header::COOKIE));
        let wants_fresh = directives(headers.get_all(header::CACHE_CONTROL))
            .any(|(name, _)| name == "no-cache" || name == "no-store")
            || headers
                .get(header::PRAGMA)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"no-cache"));
        if !(method == Method::GET || method == Method::HEAD)
            || personal
            || wants_fresh
            || headers.contains_key(header::RANGE)
        {
            return Lookup::Bypass;
        }
        let key = CacheKey {
            route: Arc::from(route),
            host: request
                .uri()
                .host()
                .or_else(|| headers.get(header::HOST).and_then(|h| h.to_str().ok()))
                .unwrap_or_default()
                .to_ascii_lowercase(),
            target: request
                .uri()
                .path_and_query()
                .map_or("/", |pq| pq.as_str())
                .to_owned(),
            identity: identity.map(|id| format!("{}:{}", id.method.name(), id.principal)),
        };
        let Some(stored) = self.entries.get(&key) else {
            return Lookup::Miss(key);
        };
        let age = stored.stored_at.elapsed();
        let same_variant = stored
            .vary
            .iter()
            .all(|(name, value)| headers.get(name) == value.as_ref());
        if age >= stored.fresh_for || !same_variant {
            return Lookup::Miss(key);
        }
        let mut response = Response::new(if method == Method::HEAD {
            empty_body()
        } else {
            Full::new(stored.body.clone())
                .map_err(|never| match never {})
                .boxed_unsync()
        });
        *response.status_mut() = stored.status;
        *response.headers_mut() = stored.headers.clone();
        response
            .headers_mut()
            .insert(header::AGE, HeaderValue::from(age.as_secs()));
        Lookup::Hit(response)
    }

    /// Stores the upstream's answer to a missed GET if it may be stored, and returns the
    /// answer to send (buffered if it was stored, untouched otherwise).
    pub(crate) async fn store(
        &self,
        key: CacheKey,
        request_method: &Method,
        request_headers: &HeaderMap,
        response: Response<ResponseBody>,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let Some(config) = self.routes.get(&*key.route) else {
            return Ok(response);
        };
        let Some(fresh_for) = storable(request_method, &response, config) else {
            return Ok(response);
        };
        let vary = match varies_on(response.headers()) {
            Some(names) => names
                .into_iter()
                .map(|name| {
                    let value = request_headers.get(&name).cloned();
                    (name, value)
                })
                .collect(),
            None => return Ok(response),
        };
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(ProxyError::UpstreamFailed)?
            .to_bytes();
        let stored = Stored {
            status: parts.status,
            headers: parts.headers.clone(),
            body: body.clone(),
            stored_at: Instant::now(),
            fresh_for,
            vary,
        };
        self.entries.insert(key, Arc::new(stored));
        Ok(Response::from_parts(
            parts,
            Full::new(body)
                .map_err(|never| match never {})
                .boxed_unsync(),
        ))
    }
}

fn empty_body() -> ResponseBody {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// How long the answer to a GET may be served from the cache, if it may be stored at all.
fn storable(
    method: &Method,
    response: &Response<ResponseBody>,
    config: &RouteCacheConfig,
) -> Option<Duration> {
    let headers = response.headers();
    let cacheable_status = matches!(
        response.status().as_u16(),
        200 | 203 | 204 | 301 | 404 | 410
    );
    if method != Method::GET || !cacheable_status || headers.contains_key(header::SET_COOKIE) {
        return None;
    }
    let length: u64 = headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    if length > config.max_body_bytes {
        return None;
    }
    let mut max_age = None;
    let mut shared_max_age = None;
    for (name, value) in directives(headers.get_all(header::CACHE_CONTROL)) {
        match name.as_str() {
            "no-store" | "no-cache" | "private" => return None,
            "max-age" => max_age = value.and_then(|v| v.parse::<u64>().ok()),
            "s-maxage" => shared_max_age = value.and_then(|v| v.parse::<u64>().ok()),
            _ => {}
        }
    }
    // A shared cache prefers `s-maxage` (RFC 9111 5.2.2.10).
    let seconds = shared_max_age.or(max_age).filter(|&s| s > 0)?;
    Some(Duration::from_secs(seconds).min(config.max_ttl))
}

/// The request headers an answer varies on; `None` for `Vary: *` (never the same request).
fn varies_on(headers: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut names = Vec::new();
    for value in headers.get_all(header::VARY) {
        for name in value.to_str().ok()?.split(',').map(str::trim) {
            if name == "*" {
                return None;
            }
            if !name.is_empty() {
                names.push(HeaderName::from_bytes(name.as_bytes()).ok()?);
            }
        }
    }
    Some(names)
}

/// `Cache-Control` directives as lowercase names with their unquoted values.
fn directives<'a>(
    values: http::header::GetAll<'a, HeaderValue>,
) -> impl Iterator<Item = (String, Option<String>)> + 'a {
    values
        .into_iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|directive| {
            let directive = directive.trim();
            if directive.is_empty() {
                return None;
            }
            let (name, value) = match directive.split_once('=') {
                Some((name, value)) => (name, Some(value.trim().trim_matches('"').to_owned())),
                None => (directive, None),
            };
            Some((name.trim().to_ascii_lowercase(), value))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> ResponseCache {
        let config = Config::parse(
            r#"
            [[routes]]
            name = "catalog"
            upstream = "app"
            cache = { max_ttl = "60s" }
            [[routes]]
            name = "live"
            upstream = "app"
            [[upstreams]]
            name = "app"
            endpoints = ["127.0.0.1:8081"]
            "#,
        )
        .expect("config");
        ResponseCache::new(&config).expect("a route caches")
    }

    fn get(target: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut request = Request::get(target).header("host", "api.test");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(()).expect("request")
    }

    fn answer(status: u16, headers: &[(&str, &str)], body: &'static str) -> Response<ResponseBody> {
        let mut response = Response::new(
            Full::new(Bytes::from_static(body.as_bytes()))
                .map_err(|never| match never {})
                .boxed_unsync(),
        );
        *response.status_mut() = StatusCode::from_u16(status).expect("status");
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        for (name, value) in headers {
            response.headers_mut().append(
                HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_str(value).expect("value"),
            );
        }
        response
    }

    /// Runs a miss through `store` and returns whether the answer was stored.
    async fn offer(
        cache: &ResponseCache,
        request: &Request<()>,
        response: Response<ResponseBody>,
    ) -> bool {
        let Lookup::Miss(key) = cache.lookup("catalog", request, false, None) else {
            panic!("expected a miss");
        };
        let sent = cache
            .store(key, request.method(), request.headers(), response)
            .await
            .expect("stored or passed");
        let body = sent.into_body().collect().await.expect("body").to_bytes();
        assert!(!body.is_empty(), "the client still gets the body");
        cache.entries.run_pending_tasks();
        matches!(
            cache.lookup("catalog", request, false, None),
            Lookup::Hit(_)
        )
    }

    #[tokio::test]
    async fn fresh_answers_are_served_with_their_age_and_stale_ones_are_not() {
        let cache = cache();
        let request = get("/items?page=2", &[]);
        assert!(
            offer(
                &cache,
                &request,
                answer(200, &[("cache-control", "public, max-age=30")], "[1,2]")
            )
            .await
        );
        let Lookup::Hit(hit) = cache.lookup("catalog", &request, false, None) else {
            panic!("a hit");
        };
        assert_eq!(hit.headers()[header::AGE], "0");
        assert_eq!(
            hit.into_body().collect().await.expect("body").to_bytes(),
            "[1,2]"
        );
        // HEAD is answered from the GET entry, without a body.
        let head = Request::head("/items?page=2")
            .header("host", "api.test")
            .body(())
            .expect("head");
        let Lookup::Hit(hit) = cache.lookup("catalog", &head, false, None) else {
            panic!("HEAD hits the GET entry");
        };
        assert!(
            hit.into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes()
                .is_empty()
        );
        // Another query string is another URL.
        assert!(matches!(
            cache.lookup("catalog", &get("/items?page=3", &[]), false, None),
            Lookup::Miss(_)
        ));
        // A route without a cache, and requests that want a fresh answer, bypass it.
        assert!(matches!(
            cache.lookup("live", &request, false, None),
            Lookup::Bypass
        ));
        for header in [
            ("cache-control", "no-cache"),
            ("pragma", "no-cache"),
            ("range", "bytes=0-1"),
        ] {
            assert!(
                matches!(
                    cache.lookup("catalog", &get("/items?page=2", &[header]), false, None),
                    Lookup::Bypass
                ),
                "{header:?}"
            );
        }
        // Once older than its freshness, an entry is a miss (moka also evicts it then).
        let Lookup::Miss(key) = cache.lookup("catalog", &get("/old", &[]), false, None) else {
            panic!("a miss");
        };
        let stale = Stored {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from_static(b"old"),
            stored_at: Instant::now() - Duration::from_secs(61),
            fresh_for: Duration::from_secs(60),
            vary: Vec::new(),
        };
        cache.entries.insert(key, Arc::new(stale));
        assert!(matches!(
            cache.lookup("catalog", &get("/old", &[]), false, None),
            Lookup::Miss(_)
        ));
        // Credentials on an anonymous route: possibly personal, never from the cache.
        assert!(matches!(
            cache.lookup(
                "catalog",
                &get("/items?page=2", &[("cookie", "s=1")]),
                false,
                None
            ),
            Lookup::Bypass
        ));
    }

    #[tokio::test]
    async fn only_answers_the_upstream_lets_a_shared_cache_keep_are_stored() {
        let cache = cache();
        for (i, (status, headers)) in [
            (200, vec![]),
            (200, vec![("cache-control", "max-age=0")]),
            (200, vec![("cache-control", "private, max-age=60")]),
            (200, vec![("cache-control", "no-store")]),
            (
                200,
                vec![("cache-control", "max-age=60"), ("set-cookie", "s=1")],
            ),
            (200, vec![("cache-control", "max-age=60"), ("vary", "*")]),
            (500, vec![("cache-control", "max-age=60")]),
        ]
        .into_iter()
        .enumerate()
        {
            let request = get(&format!("/refused/{i}"), &[]);
            assert!(
                !offer(&cache, &request, answer(status, &headers, "x")).await,
                "{status} {headers:?}"
            );
        }
        // `s-maxage` wins over `max-age`; the route's `max_ttl` caps both.
        let response = answer(200, &[("cache-control", "max-age=0, s-maxage=600")], "x");
        let config = &cache.routes["catalog"];
        assert_eq!(
            storable(&Method::GET, &response, config),
            Some(Duration::from_secs(60))
        );
    }

    #[tokio::test]
    async fn vary_and_identity_keep_variants_apart() {
        let cache = cache();
        let gzip = get("/v", &[("accept-encoding", "gzip")]);
        assert!(
            offer(
                &cache,
                &gzip,
                answer(
                    200,
                    &[("cache-control", "max-age=60"), ("vary", "Accept-Encoding")],
                    "z"
                )
            )
            .await
        );
        assert!(matches!(
            cache.lookup(
                "catalog",
                &get("/v", &[("accept-encoding", "br")]),
                false,
                None
            ),
            Lookup::Miss(_)
        ));
        assert!(matches!(
            cache.lookup("catalog", &get("/v", &[]), false, None),
            Lookup::Miss(_)
        ));

        let identity = |principal: &str| Identity {
            principal: principal.to_owned(),
            method: crate::auth::AuthMethod::Mtls,
            scopes: Default::default(),
            roles: Default::default(),
            claims: Default::default(),
        };
        let (alice, bob) = (identity("alice"), identity("bob"));
        let request = get("/me", &[]);
        let Lookup::Miss(key) = cache.lookup("catalog", &request, true, Some(&alice)) else {
            panic!("a miss");
        };
        cache
            .store(
                key,
                &Method::GET,
                request.headers(),
                answer(200, &[("cache-control", "max-age=60")], "alice's"),
            )
            .await
            .expect("stored");
        cache.entries.run_pending_tasks();
        assert!(matches!(
            cache.lookup("catalog", &request, true, Some(&alice)),
            Lookup::Hit(_)
        ));
        assert!(
            matches!(
                cache.lookup("catalog", &request, true, Some(&bob)),
                Lookup::Miss(_)
            ),
            "never another identity's answer"
        );
    }
}
