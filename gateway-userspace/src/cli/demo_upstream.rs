//! `gateway demo-upstream`: the upstream `cargo xtask run` proxies to, so the demo needs
//! nothing else. Answers every request, over HTTP/1.1 or prior-knowledge HTTP/2, with JSON
//! describing what it received, which shows what the gateway forwarded.
use std::{collections::BTreeMap, convert::Infallible};

use anyhow::Context as _;
use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::{BodyExt as _, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};

use super::DemoUpstreamArgs;

pub(super) fn run(args: &DemoUpstreamArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(serve(args))
}

async fn serve(args: &DemoUpstreamArgs) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(address = %args.listen, "demo upstream listening (HTTP/1.1 and h2c)");
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = terminate.recv() => return Ok(()),
        };
        tokio::spawn(async move {
            let served = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service_fn(echo))
                .await;
            if let Err(error) = served {
                tracing::debug!(%error, "demo upstream connection failed");
            }
        });
    }
}

async fn echo(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = request.into_parts();
    let body_bytes = body
        .collect()
        .await
        .map_or(0, |collected| collected.to_bytes().len());
    let headers: BTreeMap<&str, &str> = parts
        .headers
        .iter()
        .map(|(name, value)| (name.as_str(), value.to_str().unwrap_or("<binary>")))
        .collect();
    let answer = serde_json::json!({
        "upstream": "gateway demo-upstream",
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body_bytes": body_bytes,
    });
    let mut response = Response::new(Full::new(Bytes::from(format!("{answer:#}\n"))));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    // Shown so that the gateway's stripping of `Server` can be seen in the demo.
    response.headers_mut().insert(
        header::SERVER,
        header::HeaderValue::from_static("gateway-demo-upstream"),
    );
    Ok(response)
}
