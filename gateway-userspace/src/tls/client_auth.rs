//! Client certificates (mTLS) on a listener: the rustls verifier built from the listener's CA
//! bundle (swapped when the bundle changes on disk, see [`ReloadingVerifier`]), and the
//! [`ClientCertIdentity`] that a verified certificate gives the request pipeline, for the
//! authenticate phase to map to a principal.
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::{
    DistinguishedName, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    pki_types::{CertificateDer, UnixTime},
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};

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

/// The verifier of the current CA bundle, replaceable while the listener serves: the listener's
/// [`super::Reloader`] swaps in a verifier built from a changed bundle, and handshakes from then
/// on use it (a bundle that does not load is logged and the old one kept).
///
/// It sends no CA names in its certificate request (`root_hint_subjects` would have to borrow
/// from a verifier that may be replaced): clients then offer the certificate they have, and it
/// is verified against the current bundle all the same.
#[derive(Debug)]
pub struct ReloadingVerifier {
    current: ArcSwap<Current>,
    mandatory: bool,
}

#[derive(Debug)]
struct Current(Arc<dyn ClientCertVerifier>);

impl ReloadingVerifier {
    pub(super) fn load(config: &ClientAuthConfig) -> Result<ReloadingVerifier, TlsError> {
        Ok(ReloadingVerifier {
            current: ArcSwap::from_pointee(Current(verifier(config)?)),
            mandatory: config.mode == ClientAuthMode::Required,
        })
    }

    /// Builds a verifier from the bundle again and swaps it in; on error the old one stays.
    pub(super) fn reload(&self, config: &ClientAuthConfig) -> Result<(), TlsError> {
        self.current.store(Arc::new(Current(verifier(config)?)));
        Ok(())
    }
}

impl ClientCertVerifier for ReloadingVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current
            .load()
            .0
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current
            .load()
            .0
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current
            .load()
            .0
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current.load().0.supported_verify_schemes()
    }
}
