//! The admin HTTP listener: `/metrics` (Prometheus text, optionally behind a bearer token),
//! `/healthz` (the process answers) and `/readyz` (config loaded, XDP attached, upstreams
//! usable). Loopback by default and separate from every data-plane listener; it serves GET only.
use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::Metrics;

/// Answers `/readyz`: `Ok(())` when ready, else what is missing.
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// What the admin listener serves.
#[derive(Clone)]
pub struct AdminHttp {
    pub metrics: Metrics,
    pub readiness: Readiness,
    /// When set, `/metrics` wants `Authorization: Bearer <token>`.
    pub bearer_token: Option<Arc<str>>,
}

/// Serves connections until the task is dropped.
pub async fn serve(listener: TcpListener, admin: AdminHttp) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "admin HTTP accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(answer(&admin, &request, peer).await) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(error) = served {
                tracing::debug!(%error, %peer, "admin HTTP connection ended with an error");
            }
        });
    }
}

async fn answer(
    admin: &AdminHttp,
    request: &Request<Incoming>,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here\n");
    }
    match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match (admin.readiness)() {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(missing) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("not ready: {missing}\n"),
            ),
        },
        "/metrics" => {
            if !authorized(admin, request) {
                tracing::warn!(%peer, "refused a /metrics scrape without the bearer token");
                return text(StatusCode::UNAUTHORIZED, "a bearer token is required\n");
            }
            let metrics = admin.metrics.clone();
            // Collectors read kernel maps with syscalls: keep them off the async workers.
            let body = tokio::task::spawn_blocking(move || metrics.render())
                .await
                .unwrap_or_default();
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz or /readyz\n",
        ),
    }
}

fn authorized(admin: &AdminHttp, request: &Request<Incoming>) -> bool {
    let Some(token) = &admin.bearer_token else {
        return true;
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    presented.is_some_and(|p| constant_time_eq(p.as_bytes(), token.as_bytes()))
}

/// Compares without an early exit, so response time does not reveal a matching prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison_needs_the_whole_token() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secre", b"secret"));
        assert!(!constant_time_eq(b"secreT", b"secret"));
    }

    async fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> (StatusCode, String) {
        use http_body_util::BodyExt as _;
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);
        let mut request = Request::get(path).header(header::HOST, "localhost");
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let response = sender
            .send_request(request.body(http_body_util::Empty::<Bytes>::new()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Metrics::new(Arc::new(|| None));
        metrics.record_request(
            "public",
            Some("api"),
            200,
            std::time::Duration::from_millis(2),
        );
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&ready);
        let server = tokio::spawn(serve(
            listener,
            AdminHttp {
                metrics,
                readiness: Arc::new(move || {
                    if flag.load(std::sync::atomic::Ordering::Relaxed) {
                        Ok(())
                    } else {
                        Err("XDP is not attached".to_owned())
                    }
                }),
                bearer_token: Some(Arc::from("s3cret")),
            },
        ));

        assert_eq!(get(addr, "/healthz", None).await.0, StatusCode::OK);
        let (status, body) = get(addr, "/readyz", None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("XDP is not attached"), "{body}");
        ready.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(get(addr, "/readyz", None).await.0, StatusCode::OK);

        assert_eq!(
            get(addr, "/metrics", None).await.0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            get(addr, "/metrics", Some("wrong")).await.0,
            StatusCode::UNAUTHORIZED
        );
        let (status, body) = get(addr, "/metrics", Some("s3cret")).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("gateway_http_requests_total"), "{body}");
        assert_eq!(get(addr, "/nope", None).await.0, StatusCode::NOT_FOUND);
        server.abort();
    }
}
