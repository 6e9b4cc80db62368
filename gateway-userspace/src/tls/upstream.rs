//! The client side of re-encryption: the rustls client config for an upstream pool (its CA
//! bundle, its optional client certificate, ALPN for the pool's protocol) and the name its
//! endpoints are asked for.
use std::sync::Arc;

use rustls::{ClientConfig, sign::SingleCertAndKey};
use rustls_pki_types::ServerName;

use super::{ALPN_H2, ALPN_HTTP11, TlsError, load_ca_roots, load_certified_key, provider};
use crate::config::{UpstreamProtocol, UpstreamTlsConfig};

/// What an upstream pool needs to open TLS connections.
pub struct UpstreamTls {
    pub config: Arc<ClientConfig>,
    /// SNI and the name checked against the endpoint's certificate; `None`: the endpoint's
    /// IP address.
    pub server_name: Option<ServerName<'static>>,
}

/// Builds the client side of a pool's TLS from its (validated) config.
pub fn upstream_tls(
    config: &UpstreamTlsConfig,
    protocol: UpstreamProtocol,
) -> Result<UpstreamTls, TlsError> {
    let roots = load_ca_roots(config.ca_path())?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Config)?
        .with_root_certificates(roots);
    let mut client_config = match (&config.client_cert, &config.client_key) {
        (Some(cert), Some(key)) => builder.with_client_cert_resolver(Arc::new(
            SingleCertAndKey::from(load_certified_key(cert, key)?),
        )),
        _ => builder.with_no_client_auth(),
    };
    // One protocol per pool: the endpoint must agree to it or the handshake fails, rather
    // than a pool silently speaking something else than configured.
    client_config.alpn_protocols = vec![match protocol {
        UpstreamProtocol::H2 | UpstreamProtocol::H2c => ALPN_H2.to_vec(),
        UpstreamProtocol::Http1 => ALPN_HTTP11.to_vec(),
    }];
    let server_name = config
        .server_name
        .as_ref()
        .map(|name| {
            ServerName::try_from(name.clone()).map_err(|_| TlsError::ServerName(name.clone()))
        })
        .transpose()?;
    Ok(UpstreamTls {
        config: Arc::new(client_config),
        server_name,
    })
}
