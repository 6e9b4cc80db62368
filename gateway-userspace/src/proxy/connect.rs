//! How an upstream pool opens connections: TCP through hyper-util's connector (connect
//! timeout, `TCP_NODELAY`), then, for TLS pools, a rustls handshake bounded by the same
//! timeout. ALPN tells the pooled client which protocol the connection speaks.
use std::{
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::{
    client::legacy::connect::{Connected, Connection, HttpConnector},
    rt::TokioIo,
};
use rustls_pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::{TlsConnector, client::TlsStream};

use super::BoxError;
use crate::tls::{ALPN_H2, UpstreamTls};

/// The connector of one pool.
#[derive(Clone)]
pub(crate) struct UpstreamConnector {
    http: HttpConnector,
    tls: Option<Arc<TlsSide>>,
}

struct TlsSide {
    connector: TlsConnector,
    server_name: Option<ServerName<'static>>,
    handshake_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("the endpoint address `{0}` is not an IP address")]
    Address(String),
    #[error("the TLS handshake with the upstream did not finish within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("the TLS handshake with the upstream failed")]
    Handshake(#[source] io::Error),
}

impl UpstreamConnector {
    pub(crate) fn new(connect_timeout: Duration, tls: Option<UpstreamTls>) -> UpstreamConnector {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        // TLS pools address their endpoints as `https://`; the TLS is ours, not hyper's.
        http.enforce_http(false);
        UpstreamConnector {
            http,
            tls: tls.map(|tls| {
                Arc::new(TlsSide {
                    connector: TlsConnector::from(tls.config),
                    server_name: tls.server_name,
                    handshake_timeout: connect_timeout,
                })
            }),
        }
    }
}

impl tower_service::Service<Uri> for UpstreamConnector {
    type Response = UpstreamIo;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamIo, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(BoxError::from)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        let host = uri.host().unwrap_or_default().to_owned();
        let connecting = self.http.call(uri);
        Box::pin(async move {
            let tcp = connecting.await?.into_inner();
            let Some(tls) = tls else {
                return Ok(UpstreamIo {
                    stream: TokioIo::new(Stream::Plain(tcp)),
                    h2: false,
                });
            };
            let name = match &tls.server_name {
                Some(name) => name.clone(),
                // Endpoints are `IP:PORT`; an IPv6 host comes bracketed in the URI.
                None => host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .map(ServerName::from)
                    .map_err(|_| ConnectError::Address(host.clone()))?,
            };
            let stream =
                tokio::time::timeout(tls.handshake_timeout, tls.connector.connect(name, tcp))
                    .await
                    .map_err(|_| ConnectError::HandshakeTimeout(tls.handshake_timeout))?
                    .map_err(ConnectError::Handshake)?;
            let h2 = stream.get_ref().1.alpn_protocol() == Some(ALPN_H2);
            Ok(UpstreamIo {
                stream: TokioIo::new(Stream::Tls(Box::new(stream))),
                h2,
            })
        })
    }
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// A connection to an endpoint, plain or TLS.
pub(crate) struct UpstreamIo {
    stream: TokioIo<Stream>,
    /// ALPN settled on HTTP/2.
    h2: bool,
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        let connected = Connected::new();
        if self.h2 {
            connected.negotiated_h2()
        } else {
            connected
        }
    }
}

impl Read for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl Write for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}
