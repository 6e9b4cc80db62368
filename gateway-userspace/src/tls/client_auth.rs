//! Client certificates (mTLS) on a listener: the rustls verifier built from the listener's CA
//! bundle, and the [`ClientCertIdentity`] that a verified certificate gives the request
//! pipeline, for the authenticate phase to map to a principal.
use std::sync::Arc;

use rustls::server::{WebPkiClientVerifier, danger::ClientCertVerifier};

use super::{TlsError, load_ca_roots, provider, x509};
use crate::config::{ClientAuthConfig, ClientAuthMode};

/// Who a verified client certificate says the client is. Only ever built from a certificate
/// that chained to the listener's CA during the handshake.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientCertIdentity {
    /// The subject's common name (the last `CN`, the most specific one).
    pub common_name: Option<String>,
    /// Subject alternative names of each kind, in certificate order.
    pub dns_names: Vec<String>,
    pub uris: Vec<String>,
    pub emails: Vec<String>,
}

impl ClientCertIdentity {
    /// The names in a (verified) DER certificate.
    pub fn from_der(der: &[u8]) -> ClientCertIdentity {
        let names = x509::cert_names(der);
        ClientCertIdentity {
            common_name: names.common_name,
            dns_names: names.dns,
            uris: names.uris,
            emails: names.emails,
        }
    }

    /// One name for logs: the common name, else the first URI (where SPIFFE ids live), DNS
    /// name or email address.
    pub fn name(&self) -> Option<&str> {
        self.common_name
            .as_deref()
            .or(self.uris.first().map(String::as_str))
            .or(self.dns_names.first().map(String::as_str))
            .or(self.emails.first().map(String::as_str))
    }
}

/// The verifier a listener with `client_auth` hands rustls. `required` fails handshakes
/// without a certificate; `optional` lets them through without an identity. Either way a
/// presented certificate must chain to the CA bundle, or the handshake fails.
pub(super) fn verifier(config: &ClientAuthConfig) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let roots = load_ca_roots(&config.ca)?;
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
    let builder = match config.mode {
        ClientAuthMode::Required => builder,
        ClientAuthMode::Optional => builder.allow_unauthenticated(),
    };
    builder.build().map_err(TlsError::ClientVerifier)
}
