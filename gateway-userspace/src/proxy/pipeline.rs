//! The request path as code: [`Pipeline::handle`] runs the phases in their fixed order (see the
//! diagram in [`super`]) and is the only caller of [`error_response`].
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, atomic::AtomicU64},
    time::Instant,
};

use http::{
    HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version, header,
};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::{Body as _, Incoming};

use super::{
    BoxError, ResponseBody, Services,
    access_log::{AccessRecord, redact_target},
    body::{BodyOutcome, Finish, LimitedBody, LoggedBody, RequestBody, StallGuard},
    cache::{Lookup, ResponseCache},
    error::{ErrorSource, ProxyError, error_response},
    headers::{
        Forwarding, RequestId, X_REQUEST_ID, forwarded_client, remove_hop_by_hop, set_forwarding,
    },
    server::Activity,
    tunnel::{self, TunnelSlot},
    upstream::{InFlight, Upstreams},
};
use crate::{
    abuse::{Outcome, OutcomeClass},
    auth::{AuthMethod, Identity, Method},
    authz::{Authorizer, RequestFacts, TlsFacts},
    cors::{self, CorsPolicies, PreflightOutcome},
    ratelimit::{KeyMaterial, RateLimits},
    validate::{BodyContext, Validations, Violation},
};
use crate::{
    cidr::Cidr,
    config::{Config, ConfigError, HttpConfig, UpstreamProtocol},
    routing::{RequestView, Route, RouteTable, path::normalize_path, request_host},
    tls::ClientCertIdentity,
};

/// What the pipeline knows of a listener.
pub(crate) struct ListenerInfo {
    pub(crate) name: Arc<str>,
    pub(crate) tls: bool,
    /// `Some(port)` when every request is redirected to HTTPS on that port.
    pub(crate) redirect_port: Option<u16>,
    pub(crate) trusted_proxies: Vec<Cidr>,
}

/// What the pipeline knows of the client connection a request came on.
pub(crate) struct ConnInfo {
    pub(crate) listener: usize,
    pub(crate) peer: SocketAddr,
    pub(crate) tls_version: Option<&'static str>,
    pub(crate) alpn: Option<&'static str>,
    /// The client certificate the TLS handshake verified (mTLS listeners only), for the
    /// authenticate phase to map to a principal.
    pub(crate) client_cert: Option<ClientCertIdentity>,
    pub(crate) activity: Arc<Activity>,
    /// A WebSocket tunnel to run once the connection has switched protocols.
    pub(crate) tunnel: TunnelSlot,
}

/// Shared by every connection of every listener; immutable once built.
pub(crate) struct Pipeline {
    listeners: Vec<ListenerInfo>,
    routes: RouteTable,
    upstreams: Upstreams,
    limits: HttpConfig,
    strip_response_headers: Vec<HeaderName>,
    services: Services,
    authorizer: Authorizer,
    validations: Validations,
    rate_limits: RateLimits,
    cors: CorsPolicies,
    /// Credentials each route accepts (by route name); empty: anonymous.
    route_auth: HashMap<String, Vec<Method>>,
    /// Answers of the routes that cache; `None` when none does.
    cache: Option<ResponseCache>,
    identity_headers: IdentityHeaders,
}

/// Where the authenticated identity goes in the upstream request.
struct IdentityHeaders {
    principal: HeaderName,
    scopes: HeaderName,
    method: HeaderName,
    forward_jwt: bool,
}

impl Pipeline {
    /// Builds the pipeline of a validated config. `previous`, the pipeline it replaces on a
    /// reload, lends its rate-limit budgets to limits that did not change.
    pub(crate) fn new(
        config: &Config,
        services: Services,
        previous: Option<&Pipeline>,
    ) -> Result<Pipeline, ConfigError> {
        let names = &config.auth.identity_headers;
        // Validation checked the names.
        let header = |name: &str| {
            HeaderName::from_bytes(name.as_bytes()).unwrap_or(HeaderName::from_static("x-invalid"))
        };
        let listeners = config
            .listeners
            .iter()
            .map(|listener| ListenerInfo {
                name: Arc::from(listener.name.as_str()),
                tls: listener.tls.is_some(),
                redirect_port: listener
                    .redirect_to_https
                    .then_some(listener.redirect_port.unwrap_or(443)),
                trusted_proxies: listener.trusted_proxies.clone(),
            })
            .collect();
        Ok(Pipeline {
            listeners,
            routes: RouteTable::compile(config),
            cache: ResponseCache::new(config),
            upstreams: Upstreams::new(config)?,
            limits: config.http.clone(),
            // Validation checked the names.
            strip_response_headers: config
                .http
                .strip_response_headers
                .iter()
                .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
                .collect(),
            route_auth: config
                .routes
                .iter()
                .map(|route| {
                    let methods = route
                        .auth
                        .clone()
                        .unwrap_or_else(|| config.auth.default_route_auth.clone());
                    (route.name.clone(), methods)
                })
                .collect(),
            identity_headers: IdentityHeaders {
                principal: header(&names.principal),
                scopes: header(&names.scopes),
                method: header(&names.method),
                forward_jwt: names.forward_jwt,
            },
            rate_limits: RateLimits::new(&config.routes, previous.map(|p| &p.rate_limits))?,
            cors: CorsPolicies::new(&config.routes)?,
            authorizer: Authorizer::from_config(config)?,
            validations: Validations::from_config(config)?,
            services,
        })
    }

    /// The upstream pools, for the health-check task and readiness.
    pub(crate) fn upstreams(&self) -> &Upstreams {
        &self.upstreams
    }

    /// The rate limits, for the idle-key eviction task.
    pub(crate) fn rate_limits(&self) -> &RateLimits {
        &self.rate_limits
    }

    /// Serves one request: runs the phases, turns any failure into its response, applies the
    /// response filters and arranges for the access-log line. Never fails.
    pub(crate) async fn handle(
        &self,
        conn: &ConnInfo,
        request: Request<Incoming>,
    ) -> Response<LoggedBody> {
        let busy = conn.activity.busy();
        let request_id = RequestId::from_headers(request.headers());
        let listener = &self.listeners[conn.listener];
        let mut record = AccessRecord {
            started: Instant::now(),
            request_id: request_id.as_str().to_owned(),
            peer: conn.peer,
            client: conn.peer.ip(),
            listener: Arc::clone(&listener.name),
            tls_version: conn.tls_version,
            alpn: conn.alpn,
            client_cert: conn
                .client_cert
                .as_ref()
                .and_then(|cert| cert.name().map(str::to_owned)),
            http_version: version_name(request.version()),
            method: request.method().to_string(),
            target: redact_target(request.uri().path(), request.uri().query()),
            host: request_host(request.uri(), request.headers()),
            user_agent: request
                .headers()
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            route: None,
            upstream: None,
            identity: None,
            cache: None,
            status: 0,
            error: None,
            bytes_in: Arc::new(AtomicU64::new(0)),
            bytes_out: 0,
        };
        let mut in_flight = None;
        // Who the client is for abuse purposes: the peer, or behind a trusted proxy the address
        // it forwards (such a client cannot be dropped in the kernel, so it is denied here).
        let (client, behind_proxy) =
            forwarded_client(conn.peer.ip(), &listener.trusted_proxies, request.headers());
        record.client = client;
        // CORS decorates whatever response this request gets, so its `Origin` is kept aside.
        let mut cors_request = HeaderMap::new();
        if let Some(origin) = request.headers().get(header::ORIGIN) {
            cors_request.insert(header::ORIGIN, origin.clone());
        }
        let denied = behind_proxy
            && self
                .services
                .abuse
                .as_ref()
                .is_some_and(|abuse| abuse.denied_at_l7(client));
        let outcome = if denied {
            Err(ProxyError::Denied)
        } else {
            self.phases(
                conn,
                listener,
                request,
                &request_id,
                &mut record,
                &mut in_flight,
            )
            .await
        };
        let mut response = match outcome {
            Ok(response) => response,
            Err(error) => {
                if matches!(
                    error.source_kind(),
                    ErrorSource::Upstream | ErrorSource::Internal
                ) {
                    tracing::warn!(
                        request_id = request_id.as_str(),
                        route = record.route.as_deref(),
                        upstream = record.upstream.map(tracing::field::display),
                        error = %crate::lists::error_chain(&error),
                        "request failed"
                    );
                }
                record.error = Some(error.slug());
                if let Some((phase, reason)) = error.rejection() {
                    self.services
                        .metrics
                        .record_rejection(record.route.as_deref(), phase, reason);
                }
                let mut response = error_response(&error, &request_id);
                if let ProxyError::RateLimited(headers) = error {
                    response.headers_mut().extend(headers);
                } else if response.status() == StatusCode::UNAUTHORIZED {
                    // RFC 9110: a 401 says how to authenticate.
                    for challenge in self.challenges(record.route.as_deref()) {
                        response
                            .headers_mut()
                            .append(header::WWW_AUTHENTICATE, challenge);
                    }
                }
                response
            }
        };

        // Phase 10, response filters: on every response, the gateway's own included.
        if let Some(cors) = record.route.as_deref().and_then(|r| self.cors.route(r)) {
            cors.decorate(&cors_request, response.headers_mut());
        }
        for name in &self.strip_response_headers {
            response.headers_mut().remove(name);
        }
        response
            .headers_mut()
            .insert(X_REQUEST_ID, request_id.header_value());

        // Phase 11, log: written by the body wrapper once the body is sent or abandoned. The
        // metrics count the request now, when its response head is ready.
        record.status = response.status().as_u16();
        self.services.metrics.record_request(
            &listener.name,
            record.route.as_deref(),
            record.status,
            record.started.elapsed(),
        );
        // The abuse detector counts what this client got: the gateway's refusals and the
        // upstream's alike (a 401 from the API's own login is credential stuffing too).
        if let Some(abuse) = &self.services.abuse
            && let Some(class) = OutcomeClass::of_status(record.status)
            && abuse.watches(class)
        {
            abuse.observe(&Outcome {
                source: client,
                behind_proxy,
                class,
                count: 1,
            });
        }
        response.map(|body| {
            LoggedBody::new(
                body,
                Finish {
                    record,
                    in_flight,
                    connection_busy: busy,
                },
            )
        })
    }

    /// Phases 3 to 9, in order. Each returns early with the error that ends the request.
    async fn phases(
        &self,
        conn: &ConnInfo,
        listener: &ListenerInfo,
        request: Request<Incoming>,
        request_id: &RequestId,
        record: &mut AccessRecord,
        in_flight: &mut Option<InFlight>,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        // Phase 3, parse/limits. hyper parsed the head under looser limits; these produce the
        // documented statuses with a problem body.
        self.check_limits(&request)?;

        // Phase 4, route.
        if let Some(port) = listener.redirect_port {
            return redirect_to_https(&request, port);
        }
        let path = normalize_path(request.uri().path()).map_err(ProxyError::BadPath)?;
        // A CORS preflight is matched as the request it announces, so a route limited to GET
        // and POST still answers its preflights.
        let preflight = cors::preflight_method(request.method(), request.headers());
        let route = self
            .routes
            .find(
                conn.listener,
                &RequestView {
                    host: record.host.as_deref(),
                    path: &path,
                    method: preflight.as_ref().unwrap_or(request.method()),
                    headers: request.headers(),
                },
            )
            .ok_or(ProxyError::NoRoute)?;
        record.route = Some(route.name.clone());
        // Preflights carry no credentials: answered here, before authentication.
        if let Some(cors) = self.cors.route(&route.name) {
            match cors.preflight(request.headers(), request.method()) {
                PreflightOutcome::Allowed(headers) => {
                    let mut response =
                        Response::new(Empty::new().map_err(|never| match never {}).boxed_unsync());
                    *response.status_mut() = StatusCode::NO_CONTENT;
                    *response.headers_mut() = headers;
                    return Ok(response);
                }
                PreflightOutcome::Refused(refusal) => {
                    return Err(ProxyError::CorsRefused(refusal.reason()));
                }
                PreflightOutcome::NotPreflight => {}
            }
        }

        // Phase 5, authenticate. Identity headers are the gateway's to set: whatever the
        // client sent under their names goes, on every route.
        let mut request = request;
        let names = &self.identity_headers;
        for name in [&names.principal, &names.scopes, &names.method] {
            request.headers_mut().remove(name);
        }
        let identity = self
            .authenticate(route, &mut request, conn.client_cert.as_ref())
            .await?;
        if let Some(identity) = &identity {
            record.identity = Some(identity.principal.clone());
        }

        // Phase 6, authorize; phase 7, validate. The request head is checked against the
        // route's validation first because Cedar wants the OpenAPI operation and its path
        // parameters, but a head violation is reported only once authorization allowed the
        // request: a client without the right does not learn what would have been valid.
        let validation = self.validations.route(&route.name);
        let head =
            validation.map(|v| v.check_head(request.method(), request.uri(), request.headers()));
        let operation = match &head {
            Some(Ok(operation)) => operation.clone(),
            _ => None,
        };
        if let Some(authz) = self.authorizer.route(&route.name) {
            let tls = conn.tls_version.map(|version| TlsFacts {
                version,
                sni: record.host.as_deref(),
                client_certificate: conn.client_cert.is_some(),
            });
            let path_params = operation
                .as_ref()
                .map_or(&[][..], |op| op.path_params.as_slice());
            authz
                .authorize(
                    identity.as_ref(),
                    &RequestFacts {
                        route: &route.name,
                        method: request.method(),
                        path: &path,
                        path_params,
                        operation: operation.as_ref().and_then(|op| op.operation_id.as_deref()),
                        source: record.client,
                        time: std::time::SystemTime::now(),
                        tls,
                    },
                )
                .map_err(ProxyError::Forbidden)?;
        }
        if let Some(Err(violation)) = head {
            return Err(ProxyError::Invalid(violation));
        }
        let mut request = request.map(RequestBody::Streamed);
        if let Some(validation) = validation
            && let Some(limit) = validation.body_limit(request.headers(), operation.as_ref())
        {
            let (parts, body) = request.into_parts();
            let bytes = read_capped(body, limit).await?;
            validation
                .check_body(
                    &bytes,
                    &BodyContext::new(&parts.headers, operation.as_ref()),
                )
                .map_err(ProxyError::Invalid)?;
            request = Request::from_parts(parts, RequestBody::Buffered(Some(bytes)));
        }

        // Phase 8, rate-limit: keyed by the verified identity or API key, else the client.
        let limited = self
            .rate_limits
            .route(&route.name)
            .map(|limits| limits.check(&KeyMaterial::new(record.client, identity.as_ref())));
        if let Some(outcome) = &limited
            && !outcome.allowed()
        {
            return Err(ProxyError::RateLimited(outcome.headers().clone()));
        }

        // Phase 9, upstream: from the route's response cache when it holds a fresh answer.
        let authenticated = self
            .route_auth
            .get(&route.name)
            .is_some_and(|methods| !methods.is_empty());
        let lookup = self.cache.as_ref().map_or(Lookup::Bypass, |cache| {
            cache.lookup(&route.name, &request, authenticated, identity.as_ref())
        });
        let mut response = match lookup {
            Lookup::Hit(response) => {
                record.cache = Some("hit");
                self.services.metrics.record_cache(&route.name, "hit");
                response
            }
            lookup => {
                // A miss keeps what `store` needs of the request, which `forward` consumes.
                let miss = match lookup {
                    Lookup::Miss(key) => {
                        record.cache = Some("miss");
                        self.services.metrics.record_cache(&route.name, "miss");
                        Some((key, request.method().clone(), request.headers().clone()))
                    }
                    _ => None,
                };
                let response = self
                    .forward(
                        conn, listener, request, route, &path, request_id, record, in_flight,
                    )
                    .await?;
                match (miss, &self.cache) {
                    (Some((key, method, headers)), Some(cache)) => {
                        cache.store(key, &method, &headers, response).await?
                    }
                    _ => response,
                }
            }
        };
        if let Some(outcome) = limited {
            outcome.apply_headers(response.headers_mut());
        }
        Ok(response)
    }

    /// The `WWW-Authenticate` challenges for a 401 on `route`.
    fn challenges(&self, route: Option<&str>) -> Vec<HeaderValue> {
        let methods = route
            .and_then(|route| self.route_auth.get(route))
            .map_or(&[][..], Vec::as_slice);
        self.services
            .auth
            .as_ref()
            .map(|auth| auth.challenges(methods))
            .unwrap_or_default()
    }

    /// Phase 5: verifies the route's credentials and tells the upstream who the client is.
    /// The credential itself stops here unless the route forwards verified JWTs.
    async fn authenticate(
        &self,
        route: &Route,
        request: &mut Request<Incoming>,
        client_cert: Option<&ClientCertIdentity>,
    ) -> Result<Option<Identity>, ProxyError> {
        let methods = self
            .route_auth
            .get(&route.name)
            .map_or(&[][..], Vec::as_slice);
        if methods.is_empty() {
            return Ok(None);
        }
        let Some(authenticator) = &self.services.auth else {
            return Err(ProxyError::Internal(
                "authentication is required but no authenticator is running".into(),
            ));
        };
        // A certificate the listener verified is a credential already presented: it decides
        // when the route accepts it, as the first credential present does for the others.
        let certificate = methods
            .contains(&Method::Mtls)
            .then_some(client_cert)
            .flatten()
            .and_then(|cert| cert.name().map(str::to_owned));
        let identity = match certificate {
            Some(principal) => Identity {
                principal,
                method: AuthMethod::Mtls,
                scopes: Default::default(),
                roles: Default::default(),
                claims: Default::default(),
            },
            None => authenticator
                .authenticate(methods, request.headers(), request.uri().query())
                .await
                .map_err(ProxyError::Unauthenticated)?,
        };
        let names = &self.identity_headers;
        let headers = request.headers_mut();
        if !(names.forward_jwt && matches!(identity.method, AuthMethod::Jwt { .. })) {
            headers.remove(header::AUTHORIZATION);
        }
        authenticator.strip_api_key(headers);
        let scopes: Vec<&str> = identity.scopes.iter().map(String::as_str).collect();
        for (name, value) in [
            (&names.principal, identity.principal.as_str()),
            (&names.scopes, &scopes.join(" ")),
            (&names.method, identity.method.name()),
        ] {
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.insert(name.clone(), value);
            }
        }
        Ok(Some(identity))
    }

    fn check_limits(&self, request: &Request<Incoming>) -> Result<(), ProxyError> {
        let target = request
            .uri()
            .path_and_query()
            .map_or(0, |target| target.as_str().len());
        if target > self.limits.max_uri_bytes {
            return Err(ProxyError::UriTooLong);
        }
        let headers = request.headers();
        if headers.len() > self.limits.max_headers {
            return Err(ProxyError::HeadersTooLarge);
        }
        // Name, value, ": " and CRLF: the size on the wire in HTTP/1.1.
        let bytes: usize = headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum();
        if bytes > self.limits.max_header_bytes {
            return Err(ProxyError::HeadersTooLarge);
        }
        Ok(())
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "the phase's whole context; bundling it would only rename the parameters"
    )]
    async fn forward(
        &self,
        conn: &ConnInfo,
        listener: &ListenerInfo,
        mut request: Request<RequestBody>,
        route: &Route,
        path: &str,
        request_id: &RequestId,
        record: &mut AccessRecord,
        in_flight: &mut Option<InFlight>,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let pool = self.upstreams.get(&route.upstream).ok_or_else(|| {
            ProxyError::Internal(format!("route `{}` names a missing pool", route.name).into())
        })?;
        // A declared length over the limit is refused before anything is sent upstream.
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|length| length > route.max_body_bytes) {
            return Err(ProxyError::BodyTooLarge);
        }
        let mut endpoint = pool.pick().ok_or_else(|| ProxyError::NoEndpoint {
            upstream: pool.name.clone(),
        })?;
        record.upstream = Some(endpoint.addr());
        pool.retry_budget.deposit();

        // WebSocket over HTTP/1.1 only, on both sides: HTTP/2's extended CONNECT is not
        // offered to clients, and an HTTP/2 upstream has no `Upgrade`.
        let client_upgrade = (request.version() == Version::HTTP_11
            && pool.protocol == UpstreamProtocol::Http1
            && tunnel::wants_websocket(request.headers()))
        .then(|| hyper::upgrade::on(&mut request));
        // `TE` is hop-by-hop, but `TE: trailers` to an HTTP/2 upstream says "I understand
        // trailers", which gRPC servers expect to hear; it is the one `TE` value HTTP/2
        // allows, so it is passed on there. HTTP/1.1 upstreams get no `TE` at all.
        let te_trailers = pool.protocol != UpstreamProtocol::Http1
            && request
                .headers()
                .get_all(header::TE)
                .iter()
                .filter_map(|value| value.to_str().ok())
                .flat_map(|value| value.split(','))
                .any(|token| token.trim().eq_ignore_ascii_case("trailers"));

        let (mut parts, body) = request.into_parts();
        // The host the client addressed, port included: the URI's authority (HTTP/2, or an
        // absolute-form target) wins over a `Host` header, as it did for routing.
        let authority = parts
            .uri
            .authority()
            .map(|authority| match authority.port_u16() {
                Some(port) => format!("{}:{port}", authority.host()),
                None => authority.host().to_owned(),
            });
        let upstream_path = route.upstream_path(path);
        let target = match parts.uri.query() {
            Some(query) => format!("{upstream_path}?{query}"),
            None => upstream_path,
        };
        parts.uri = Uri::builder()
            .scheme(pool.scheme)
            .authority(endpoint.addr().to_string())
            .path_and_query(target.clone())
            .build()
            .map_err(|error| ProxyError::Internal(error.into()))?;
        parts.version = match pool.protocol {
            UpstreamProtocol::Http1 => Version::HTTP_11,
            UpstreamProtocol::H2c | UpstreamProtocol::H2 => Version::HTTP_2,
        };
        remove_hop_by_hop(&mut parts.headers);
        if client_upgrade.is_some() {
            tunnel::set_upgrade_headers(&mut parts.headers);
        }
        if te_trailers {
            parts
                .headers
                .insert(header::TE, HeaderValue::from_static("trailers"));
        }
        if let Some(value) = authority.and_then(|a| HeaderValue::from_str(&a).ok()) {
            // So the upstream sees the host the route matched, never a conflicting `Host`.
            parts.headers.insert(header::HOST, value);
        }
        set_forwarding(
            &mut parts.headers,
            &Forwarding {
                peer: conn.peer.ip(),
                trusted: listener
                    .trusted_proxies
                    .iter()
                    .any(|cidr| cidr.contains(conn.peer.ip())),
                proto: if listener.tls { "https" } else { "http" },
                host: record.host.as_deref(),
            },
        );
        parts
            .headers
            .insert(X_REQUEST_ID, request_id.header_value());

        // A retry is safe only when the endpoint never saw the request (the connection was
        // refused), the method is idempotent, and there is no body to replay; the pool's
        // budget keeps retries from multiplying the load on a failing pool.
        let replayable =
            is_idempotent(&parts.method) && body.is_end_stream() && client_upgrade.is_none();
        let retry_head =
            replayable.then(|| (parts.method.clone(), parts.version, parts.headers.clone()));
        let mut request = Request::from_parts(parts, body);
        let mut retries = 0;
        let mut response = loop {
            let outcome = Arc::new(BodyOutcome::default());
            let (parts, body) = request.into_parts();
            let body = LimitedBody::new(
                body,
                route.max_body_bytes,
                Arc::clone(&outcome),
                Arc::clone(&record.bytes_in),
            );
            let sent = tokio::time::timeout(
                route.timeout,
                pool.client.request(Request::from_parts(parts, body)),
            )
            .await;
            // Passive ejection counts every answer: 5xx and broken exchanges against the
            // endpoint, anything else for it.
            let failed = !matches!(&sent, Ok(Ok(response)) if !response.status().is_server_error());
            if !outcome.too_large() && !outcome.client_failed() {
                pool.record_outcome(&endpoint, failed);
            }
            match sent {
                Ok(Ok(response)) => break response,
                _ if outcome.too_large() => return Err(ProxyError::BodyTooLarge),
                Ok(Err(error)) if outcome.client_failed() => {
                    return Err(ProxyError::ClientBody(error.into()));
                }
                Err(_elapsed) => return Err(ProxyError::UpstreamTimeout(route.timeout)),
                Ok(Err(error)) if error.is_connect() => {
                    pool.eject(&endpoint);
                    let next = match &retry_head {
                        Some(_) if retries < MAX_RETRIES && pool.retry_budget.withdraw() => {
                            pool.pick()
                        }
                        _ => None,
                    };
                    let (Some(next), Some((method, version, headers))) = (next, &retry_head) else {
                        return Err(ProxyError::UpstreamConnect(error.into()));
                    };
                    tracing::info!(
                        request_id = request_id.as_str(),
                        failed = %endpoint.addr(),
                        next = %next.addr(),
                        "endpoint refused the connection; retrying the idempotent request on another"
                    );
                    retries += 1;
                    endpoint = next;
                    record.upstream = Some(endpoint.addr());
                    let uri = Uri::builder()
                        .scheme(pool.scheme)
                        .authority(endpoint.addr().to_string())
                        .path_and_query(target.clone())
                        .build()
                        .map_err(|error| ProxyError::Internal(error.into()))?;
                    let mut retry = Request::new(RequestBody::Buffered(None));
                    *retry.method_mut() = method.clone();
                    *retry.uri_mut() = uri;
                    *retry.version_mut() = *version;
                    *retry.headers_mut() = headers.clone();
                    request = retry;
                }
                Ok(Err(error)) => return Err(ProxyError::UpstreamFailed(error.into())),
            }
        };
        let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        let upgrade = match client_upgrade {
            Some(client) if switching => {
                let upstream = hyper::upgrade::on(&mut response);
                // The tunnel holds the endpoint for as long as it lasts.
                conn.tunnel.put(tunnel::splice(
                    client,
                    upstream,
                    endpoint,
                    request_id.as_str().to_owned(),
                ));
                true
            }
            _ => {
                *in_flight = Some(endpoint);
                false
            }
        };

        let (mut parts, body) = response.into_parts();
        remove_hop_by_hop(&mut parts.headers);
        if upgrade {
            tunnel::set_upgrade_headers(&mut parts.headers);
        }
        // hyper picks the framing for the client's protocol; the upstream's version says
        // nothing about the client's.
        parts.version = Version::HTTP_11;
        let body = StallGuard::new(body.map_err(BoxError::from).boxed_unsync(), route.timeout);
        Ok(Response::from_parts(parts, body.boxed_unsync()))
    }
}

/// A plain listener's answer to everything when it redirects: 308 to the same target over
/// HTTPS, so methods and bodies are kept by clients that follow it.
fn redirect_to_https(
    request: &Request<Incoming>,
    port: u16,
) -> Result<Response<ResponseBody>, ProxyError> {
    let host = request_host(request.uri(), request.headers()).ok_or(ProxyError::NoRoute)?;
    let target = request
        .uri()
        .path_and_query()
        .map_or("/", |target| target.as_str());
    let location = if port == 443 {
        format!("https://{host}{target}")
    } else {
        format!("https://{host}:{port}{target}")
    };
    let location =
        HeaderValue::from_str(&location).map_err(|error| ProxyError::Internal(error.into()))?;
    let mut response = Response::new(Empty::new().map_err(|never| match never {}).boxed_unsync());
    *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
    response.headers_mut().insert(header::LOCATION, location);
    Ok(response)
}

fn version_name(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "unknown",
    }
}

/// Reads a whole request body for validation, refusing it past `limit` bytes.
async fn read_capped(mut body: RequestBody, limit: u64) -> Result<bytes::Bytes, ProxyError> {
    let mut bytes = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|error| ProxyError::ClientBody(Box::new(error)))?;
        if let Ok(data) = frame.into_data() {
            if bytes.len() as u64 + data.len() as u64 > limit {
                return Err(ProxyError::Invalid(Violation::body_too_large()));
            }
            bytes.extend_from_slice(&data);
        }
    }
    Ok(bytes.freeze())
}

/// Retries of one request on other endpoints, at most.
const MAX_RETRIES: u32 = 2;

/// Methods whose repetition has the same effect as one request (RFC 9110 §9.2.2).
fn is_idempotent(method: &http::Method) -> bool {
    matches!(
        *method,
        http::Method::GET
            | http::Method::HEAD
            | http::Method::OPTIONS
            | http::Method::PUT
            | http::Method::DELETE
            | http::Method::TRACE
    )
}
