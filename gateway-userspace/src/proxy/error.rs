//! The one place where a failed request becomes a response. Every phase returns a
//! [`ProxyError`]; [`error_response`] turns it into an RFC 9457 `application/problem+json` body
//! with a type, a title, the status and the request id, and nothing else: no internal detail,
//! upstream error text or backtrace reaches a client. The detail goes to the log instead.
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full};

use super::{BoxError, ResponseBody, headers::RequestId};
use crate::routing::path::PathError;

/// Which side caused a failure: decides the status family and, for later slices, whether a
/// retry is allowed (only `Upstream` failures before a response may be retried).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorSource {
    /// The request itself is unacceptable (4xx).
    Client,
    /// No route serves the request (404).
    Route,
    /// The upstream failed, was unreachable or too slow (5xx).
    Upstream,
    /// The gateway itself failed (500).
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("the request path is not acceptable")]
    BadPath(#[source] PathError),
    #[error("the request headers exceed the configured size or count")]
    HeadersTooLarge,
    #[error("the request target exceeds the configured length")]
    UriTooLong,
    #[error("the request body exceeds the route's `max_body_bytes`")]
    BodyTooLarge,
    #[error("reading the request body from the client failed")]
    ClientBody(#[source] BoxError),
    #[error("no route of this listener matches the request")]
    NoRoute,
    #[error("the client is denied for abuse (it reaches us through a trusted proxy)")]
    Denied,
    #[error("the request is not authenticated")]
    Unauthenticated(#[source] crate::auth::AuthError),
    #[error("authorization denied the request: {0}")]
    Forbidden(#[source] crate::authz::AuthzDenied),
    #[error("the request does not validate: {}", .0.detail())]
    Invalid(crate::validate::Violation),
    /// Carries the `Retry-After` and `RateLimit*` headers for the 429.
    #[error("the route's rate limit is exceeded")]
    RateLimited(http::HeaderMap),
    #[error("the CORS preflight is refused: {0}")]
    CorsRefused(&'static str),
    #[error("upstream `{upstream}` has no available endpoint")]
    NoEndpoint { upstream: String },
    #[error("connecting to the upstream failed")]
    UpstreamConnect(#[source] BoxError),
    #[error("the upstream exchange failed")]
    UpstreamFailed(#[source] BoxError),
    #[error("the upstream did not answer within {0:?}")]
    UpstreamTimeout(Duration),
    #[error("the gateway failed")]
    Internal(#[source] BoxError),
}

impl ProxyError {
    pub fn source_kind(&self) -> ErrorSource {
        match self {
            ProxyError::BadPath(_)
            | ProxyError::HeadersTooLarge
            | ProxyError::UriTooLong
            | ProxyError::BodyTooLarge
            | ProxyError::ClientBody(_) => ErrorSource::Client,
            ProxyError::NoRoute => ErrorSource::Route,
            ProxyError::Denied => ErrorSource::Client,
            // Keys that cannot be fetched are the gateway's trouble, not the client's.
            ProxyError::Unauthenticated(error) if error.status().is_server_error() => {
                ErrorSource::Internal
            }
            ProxyError::Unauthenticated(_) => ErrorSource::Client,
            ProxyError::RateLimited(_) | ProxyError::CorsRefused(_) => ErrorSource::Client,
            ProxyError::Forbidden(_) | ProxyError::Invalid(_) => ErrorSource::Client,
            ProxyError::NoEndpoint { .. }
            | ProxyError::UpstreamConnect(_)
            | ProxyError::UpstreamFailed(_)
            | ProxyError::UpstreamTimeout(_) => ErrorSource::Upstream,
            ProxyError::Internal(_) => ErrorSource::Internal,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadPath(_) | ProxyError::ClientBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::UriTooLong => StatusCode::URI_TOO_LONG,
            ProxyError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::Denied => StatusCode::FORBIDDEN,
            ProxyError::Unauthenticated(error) => error.status(),
            ProxyError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Forbidden(denied) => denied.status(),
            ProxyError::Invalid(violation) => violation.status(),
            ProxyError::CorsRefused(_) => StatusCode::FORBIDDEN,
            ProxyError::NoEndpoint { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamConnect(_) | ProxyError::UpstreamFailed(_) => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// For a request a policy refused: the phase that refused it and that phase's reason, for
    /// the rejection metrics. `None` for routing and upstream failures.
    pub fn rejection(&self) -> Option<(&'static str, &'static str)> {
        Some(match self {
            ProxyError::BadPath(_)
            | ProxyError::HeadersTooLarge
            | ProxyError::UriTooLong
            | ProxyError::BodyTooLarge
            | ProxyError::ClientBody(_) => ("limits", self.slug()),
            ProxyError::Denied => ("abuse", "denied"),
            ProxyError::Unauthenticated(error) => ("authenticate", error.reason()),
            ProxyError::Forbidden(denied) => ("authorize", denied.reason()),
            ProxyError::Invalid(violation) => ("validate", violation.slug()),
            ProxyError::RateLimited(_) => ("rate_limit", "limit_exceeded"),
            ProxyError::CorsRefused(_) => ("cors", "preflight_refused"),
            ProxyError::NoRoute
            | ProxyError::NoEndpoint { .. }
            | ProxyError::UpstreamConnect(_)
            | ProxyError::UpstreamFailed(_)
            | ProxyError::UpstreamTimeout(_)
            | ProxyError::Internal(_) => return None,
        })
    }

    /// A stable, short name: the problem type's last part and the access log's `error` field.
    pub fn slug(&self) -> &'static str {
        match self {
            ProxyError::BadPath(_) => "bad-path",
            ProxyError::HeadersTooLarge => "headers-too-large",
            ProxyError::UriTooLong => "uri-too-long",
            ProxyError::BodyTooLarge => "body-too-large",
            ProxyError::ClientBody(_) => "bad-body",
            ProxyError::NoRoute => "no-route",
            ProxyError::Denied => "denied",
            ProxyError::Unauthenticated(error) if error.status().is_server_error() => {
                "auth-unavailable"
            }
            ProxyError::Unauthenticated(_) => "unauthenticated",
            ProxyError::RateLimited(_) => "rate-limited",
            ProxyError::Forbidden(_) => "forbidden",
            ProxyError::Invalid(violation) => violation.slug(),
            ProxyError::CorsRefused(_) => "cors-refused",
            ProxyError::NoEndpoint { .. } => "no-endpoint",
            ProxyError::UpstreamConnect(_) => "upstream-unreachable",
            ProxyError::UpstreamFailed(_) => "upstream-failed",
            ProxyError::UpstreamTimeout(_) => "upstream-timeout",
            ProxyError::Internal(_) => "internal",
        }
    }

    /// What the client is told: generic on purpose.
    fn title(&self) -> &'static str {
        match self {
            ProxyError::BadPath(_) => "The request path is not valid",
            ProxyError::HeadersTooLarge => "Request headers too large",
            ProxyError::UriTooLong => "Request target too long",
            ProxyError::BodyTooLarge => "Request body too large",
            ProxyError::ClientBody(_) => "The request body could not be read",
            ProxyError::NoRoute => "Not found",
            ProxyError::Denied => "Forbidden",
            ProxyError::Unauthenticated(error) if error.status().is_server_error() => {
                "Service unavailable"
            }
            ProxyError::Unauthenticated(_) => "Unauthorized",
            ProxyError::RateLimited(_) => "Too many requests",
            ProxyError::Forbidden(_) => "Forbidden",
            ProxyError::Invalid(_) => "The request is not valid",
            ProxyError::CorsRefused(_) => "Forbidden",
            ProxyError::NoEndpoint { .. } => "Service unavailable",
            ProxyError::UpstreamConnect(_) | ProxyError::UpstreamFailed(_) => "Bad gateway",
            ProxyError::UpstreamTimeout(_) => "Gateway timeout",
            ProxyError::Internal(_) => "Internal error",
        }
    }
}

/// The response for a failed request. Logging the cause is the caller's job (the access log
/// records the slug; the pipeline logs the chain of upstream and internal failures).
pub fn error_response(error: &ProxyError, request_id: &RequestId) -> Response<ResponseBody> {
    let status = error.status();
    let mut body = serde_json::json!({
        "type": format!("urn:gateway:problem:{}", error.slug()),
        "title": error.title(),
        "status": status.as_u16(),
        "request_id": request_id.as_str(),
    });
    // Validation failures say what was wrong (never echoing a value), so a client can fix it;
    // an authorization denial names its reason slug only.
    match error {
        ProxyError::Invalid(violation) => {
            body["detail"] = violation.detail().into();
            if let Some(pointer) = violation.pointer() {
                body["pointer"] = pointer.into();
            }
        }
        ProxyError::Forbidden(denied) => body["detail"] = denied.reason().into(),
        _ => {}
    }
    let mut response = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let ProxyError::Invalid(violation) = error
        && !violation.allow().is_empty()
    {
        let allow: Vec<&str> = violation.allow().iter().map(http::Method::as_str).collect();
        if let Ok(value) = HeaderValue::from_str(&allow.join(", ")) {
            response.headers_mut().insert(header::ALLOW, value);
        }
    }
    if matches!(
        error,
        ProxyError::BodyTooLarge | ProxyError::BadPath(_) | ProxyError::ClientBody(_)
    ) {
        // The rest of the request body was not read: the connection cannot be reused.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn problem_bodies_carry_no_internal_detail() {
        let secret = "connection refused by 10.1.2.3:8080 (internal-db)";
        let error = ProxyError::UpstreamConnect(secret.into());
        let id = RequestId::generate();
        let response = error_response(&error, &id);
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("a full body")
            .to_bytes();
        let text = std::str::from_utf8(&bytes).expect("utf-8");
        assert!(!text.contains("10.1.2.3"), "leaked detail: {text}");
        let json: serde_json::Value = serde_json::from_str(text).expect("json");
        assert_eq!(json["status"], 502);
        assert_eq!(json["type"], "urn:gateway:problem:upstream-unreachable");
        assert_eq!(json["request_id"], id.as_str());
        assert_eq!(json.as_object().map(|o| o.len()), Some(4), "{json}");
    }

    #[test]
    fn every_error_has_its_status_and_source() {
        let cases = [
            (ProxyError::NoRoute, 404, ErrorSource::Route),
            (ProxyError::Denied, 403, ErrorSource::Client),
            (ProxyError::HeadersTooLarge, 431, ErrorSource::Client),
            (ProxyError::UriTooLong, 414, ErrorSource::Client),
            (ProxyError::BodyTooLarge, 413, ErrorSource::Client),
            (
                ProxyError::NoEndpoint {
                    upstream: "app".to_owned(),
                },
                503,
                ErrorSource::Upstream,
            ),
            (
                ProxyError::UpstreamTimeout(Duration::from_secs(1)),
                504,
                ErrorSource::Upstream,
            ),
        ];
        for (error, status, source) in cases {
            assert_eq!(error.status().as_u16(), status, "{error}");
            assert_eq!(error.source_kind(), source, "{error}");
        }
    }
}
