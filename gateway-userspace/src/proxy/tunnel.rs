//! WebSocket tunnels. An HTTP/1.1 `Upgrade: websocket` request on a route to an HTTP/1.1
//! upstream is forwarded with its upgrade headers; when the upstream answers `101 Switching
//! Protocols`, both connections are handed over by hyper and their bytes copied both ways
//! until either side closes. Every other `Upgrade` (notably `h2c`, a known way to smuggle
//! requests past a proxy) is dropped as the hop-by-hop header it is.
//!
//! The tunnel runs on the client connection's own task (see `server::drive`), so it stays
//! under that connection's limits: it holds its place in `http.max_connections`, is closed
//! after `http.idle_timeout` without traffic, and ends with the shutdown grace.
use std::{future::Future, pin::Pin, sync::Mutex};

use http::{HeaderMap, HeaderValue, header};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::upstream::InFlight;

/// A tunnel waiting to run once the client connection has switched protocols.
pub(crate) type Tunnel = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Where the pipeline leaves a connection's tunnel for the connection task to pick up.
#[derive(Default)]
pub(crate) struct TunnelSlot(Mutex<Option<Tunnel>>);

impl TunnelSlot {
    pub(crate) fn put(&self, tunnel: Tunnel) {
        *self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(tunnel);
    }

    pub(crate) fn take(&self) -> Option<Tunnel> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }
}

/// Whether a request asks to switch to WebSocket: `Connection: upgrade` and
/// `Upgrade: websocket`, in any case.
pub(crate) fn wants_websocket(headers: &HeaderMap) -> bool {
    let connection_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    let websocket = headers
        .get(header::UPGRADE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.trim().eq_ignore_ascii_case("websocket"));
    connection_upgrade && websocket
}

/// Puts the upgrade headers back after the hop-by-hop ones were removed.
pub(crate) fn set_upgrade_headers(headers: &mut HeaderMap) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
}

/// Copies bytes both ways between the two upgraded connections until either ends. Holds
/// `endpoint` so the upstream counts the tunnel as outstanding for as long as it lasts.
pub(crate) fn splice(
    client: OnUpgrade,
    upstream: OnUpgrade,
    endpoint: InFlight,
    request_id: String,
) -> Tunnel {
    Box::pin(async move {
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(both) => both,
            Err(error) => {
                tracing::debug!(request_id, %error, "the WebSocket upgrade did not complete");
                return;
            }
        };
        let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
        match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            Ok((sent, received)) => tracing::debug!(
                request_id,
                upstream = %endpoint.addr(),
                sent,
                received,
                "WebSocket tunnel closed"
            ),
            Err(error) => tracing::debug!(
                request_id,
                upstream = %endpoint.addr(),
                %error,
                "WebSocket tunnel ended with an error"
            ),
        }
    })
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::testing::headers;

    #[test]
    fn only_websocket_upgrades_are_recognised() {
        assert!(wants_websocket(&headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "WebSocket"),
        ])));
        for refused in [
            headers(&[("connection", "upgrade"), ("upgrade", "h2c")]),
            headers(&[("upgrade", "websocket")]),
            headers(&[("connection", "upgrade")]),
            headers(&[("connection", "close"), ("upgrade", "websocket")]),
        ] {
            assert!(!wants_websocket(&refused), "{refused:?}");
        }
    }
}
