//! TLS termination for the L7 listeners: the rustls server config (TLS 1.2 and 1.3, AEAD suites
//! only, ALPN `h2` and `http/1.1`, the `ring` provider), the SNI certificate resolver, the
//! self-signed demo certificate, reloading certificates from disk without dropping
//! connections, client certificates (mTLS, [`client_auth`]) and the client side towards TLS
//! upstreams.
mod client_auth;
mod reload;
mod resolver;
mod upstream;
mod x509;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{RootCertStore, ServerConfig, crypto::CryptoProvider, sign::CertifiedKey};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};

pub use self::{
    client_auth::ClientCertIdentity,
    reload::Reloader,
    resolver::{CertStore, SniResolver},
    upstream::{UpstreamTls, upstream_tls},
};
use crate::config::TlsConfig;

/// ALPN protocols offered to clients, preferred first.
pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read `{path}`")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{path}` holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("`{path}` holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("the key in `{key}` cannot be used with the certificate in `{cert}`")]
    Unusable {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("generating the self-signed certificate failed")]
    SelfSigned(#[source] rcgen::Error),
    #[error("building the TLS server configuration failed")]
    Config(#[source] rustls::Error),
    #[error("`{path}` holds no usable PEM CA certificate")]
    NoCaCertificate { path: PathBuf },
    #[error("building the client-certificate verifier failed")]
    ClientVerifier(#[source] rustls::server::VerifierBuilderError),
    #[error("`{0}` is not a DNS name or IP address; fix the upstream's `server_name`")]
    ServerName(String),
}

/// The `ring` provider restricted to AEAD suites with forward secrecy (which is every suite
/// rustls implements; listing them keeps that true if rustls ever adds others).
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::{cipher_suite as suite, default_provider};
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            suite::TLS13_AES_256_GCM_SHA384,
            suite::TLS13_AES_128_GCM_SHA256,
            suite::TLS13_CHACHA20_POLY1305_SHA256,
            suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            suite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        ],
        ..default_provider()
    })
}

/// Loads a PEM certificate chain and its PEM private key, and checks that they belong together.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let cert_pem = read(cert)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.to_owned(),
        });
    }
    let key_der = PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|source| TlsError::NoKey {
        path: key.to_owned(),
        source,
    })?;
    let unusable = |source| TlsError::Unusable {
        cert: cert.to_owned(),
        key: key.to_owned(),
        source,
    };
    let signing_key = provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(unusable)?;
    let certified = CertifiedKey::new(chain, signing_key);
    // Unlike `CertifiedKey::from_der`, an undecidable comparison counts as a mismatch: a key we
    // cannot check is a key we do not serve.
    certified.keys_match().map_err(unusable)?;
    Ok(certified)
}

/// The trust anchors in a PEM bundle. Certificates rustls cannot use as anchors are skipped
/// (system bundles hold a few); a bundle with none usable is an error.
pub fn load_ca_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut roots = RootCertStore::empty();
    let (added, _skipped) = roots
        .add_parsable_certificates(CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok));
    if added == 0 {
        return Err(TlsError::NoCaCertificate {
            path: path.to_owned(),
        });
    }
    Ok(roots)
}

/// A fresh self-signed certificate for `names` (DNS names or IP addresses).
pub fn self_signed(names: &[String]) -> Result<CertifiedKey, TlsError> {
    let generated =
        rcgen::generate_simple_self_signed(names.to_vec()).map_err(TlsError::SelfSigned)?;
    let key = PrivateKeyDer::Pkcs8(generated.signing_key.serialize_der().into());
    let signing_key = provider()
        .key_provider
        .load_private_key(key)
        .map_err(TlsError::Config)?;
    Ok(CertifiedKey::new(
        vec![generated.cert.der().clone()],
        signing_key,
    ))
}

/// A listener's TLS setup: the config handed to the acceptor, and the task that keeps its
/// certificates fresh.
pub struct ListenerTls {
    pub server_config: Arc<ServerConfig>,
    pub reloader: Reloader,
}

/// Loads a listener's certificates and builds its server config.
pub fn listener_tls(config: &TlsConfig) -> Result<ListenerTls, TlsError> {
    let reloader = Reloader::load(config)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Config)?;
    let builder = match reloader.client_verifier() {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    };
    let mut server_config = builder.with_cert_resolver(reloader.resolver());
    server_config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
    Ok(ListenerTls {
        server_config: Arc::new(server_config),
        reloader,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_offers_aead_suites_only() {
        for suite in &provider().cipher_suites {
            let name = format!("{:?}", suite.suite());
            assert!(
                name.contains("GCM") || name.contains("CHACHA20_POLY1305"),
                "{name} is not an AEAD suite"
            );
        }
    }

    #[test]
    fn self_signed_certificate_has_matching_key() {
        let key = self_signed(&["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("generating a self-signed certificate");
        key.keys_match()
            .expect("the generated key fits its certificate");
    }

    #[test]
    fn loading_checks_that_key_and_certificate_belong_together() {
        let dir = std::env::temp_dir().join(format!("gateway-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating a temp dir");
        let a = rcgen::generate_simple_self_signed(vec!["a.test".to_owned()]).expect("cert a");
        let b = rcgen::generate_simple_self_signed(vec!["b.test".to_owned()]).expect("cert b");
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("writing a PEM file");
            path
        };
        let cert_a = write("a.crt", a.cert.pem());
        let key_a = write("a.key", a.signing_key.serialize_pem());
        let key_b = write("b.key", b.signing_key.serialize_pem());
        load_certified_key(&cert_a, &key_a).expect("a matching pair loads");
        let err = load_certified_key(&cert_a, &key_b).expect_err("a mismatched pair is refused");
        assert!(matches!(err, TlsError::Unusable { .. }), "{err}");
        let err = load_certified_key(&key_a, &key_a).expect_err("a key is not a certificate");
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
        let err = load_certified_key(&cert_a, &cert_a).expect_err("a certificate is not a key");
        assert!(matches!(err, TlsError::NoKey { .. }), "{err}");
        std::fs::remove_dir_all(&dir).expect("removing the temp dir");
    }
}
