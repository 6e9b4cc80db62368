//! Keeps a listener's certificates and client CA bundle in step with their files: polls
//! modification times and, when a file changed, loads it again and swaps it in (the pair into the
//! resolver, the bundle into the client verifier). Polling (rather than inotify) also catches
//! files replaced through a symlink swap, as Kubernetes secrets and certbot do. A broken new file
//! is logged and the old certificate or bundle kept.
use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::sign::CertifiedKey;

use super::{
    CertStore, SniResolver, TlsError, client_auth::ReloadingVerifier, load_certified_key,
    self_signed,
};
use crate::config::{CertificateConfig, ClientAuthConfig, TlsConfig};

/// One certificate as loaded, with what it serves.
struct Slot {
    /// `None` for the generated self-signed certificate, which has no files.
    files: Option<CertificateConfig>,
    names: Vec<String>,
    is_default: bool,
    modified: (Option<SystemTime>, Option<SystemTime>),
    key: Arc<CertifiedKey>,
}

/// The client CA bundle of an mTLS listener, as loaded.
struct ClientCa {
    config: ClientAuthConfig,
    modified: Option<SystemTime>,
    verifier: Arc<ReloadingVerifier>,
}

/// Owns a listener's certificates and client CA bundle; [`Reloader::run`] watches their files.
pub struct Reloader {
    slots: Vec<Slot>,
    resolver: Arc<SniResolver>,
    client_ca: Option<ClientCa>,
    interval: Duration,
}

fn modified_at(path: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn modified(files: &CertificateConfig) -> (Option<SystemTime>, Option<SystemTime>) {
    (modified_at(&files.cert), modified_at(&files.key))
}

impl Reloader {
    /// Loads every certificate of a listener (or generates the self-signed one).
    pub fn load(config: &TlsConfig) -> Result<Reloader, TlsError> {
        let mut slots = Vec::new();
        let from_files = |files: &CertificateConfig, is_default: bool| -> Result<Slot, TlsError> {
            let modified = modified(files);
            Ok(Slot {
                key: Arc::new(load_certified_key(&files.cert, &files.key)?),
                files: Some(files.clone()),
                names: files.names.clone(),
                is_default,
                modified,
            })
        };
        for files in &config.certificates {
            slots.push(from_files(files, false)?);
        }
        if let Some(files) = &config.default_certificate {
            slots.push(from_files(files, true)?);
        }
        if config.self_signed {
            slots.push(Slot {
                files: None,
                names: config.self_signed_names.clone(),
                is_default: true,
                modified: (None, None),
                key: Arc::new(self_signed(&config.self_signed_names)?),
            });
        }
        let resolver = Arc::new(SniResolver::new(store(&slots)));
        let client_ca = match &config.client_auth {
            Some(client_auth) => Some(ClientCa {
                modified: modified_at(&client_auth.ca),
                verifier: Arc::new(ReloadingVerifier::load(client_auth)?),
                config: client_auth.clone(),
            }),
            None => None,
        };
        Ok(Reloader {
            slots,
            resolver,
            client_ca,
            interval: config.reload_interval,
        })
    }

    pub fn resolver(&self) -> Arc<SniResolver> {
        Arc::clone(&self.resolver)
    }

    /// The client certificate verifier of an mTLS listener.
    pub fn client_verifier(&self) -> Option<Arc<ReloadingVerifier>> {
        self.client_ca.as_ref().map(|ca| Arc::clone(&ca.verifier))
    }

    /// Checks the client CA bundle once; whether a new one was swapped in.
    fn poll_client_ca(&mut self) -> bool {
        let Some(ca) = &mut self.client_ca else {
            return false;
        };
        let now = modified_at(&ca.config.ca);
        if now == ca.modified {
            return false;
        }
        ca.modified = now;
        match ca.verifier.reload(&ca.config) {
            Ok(()) => {
                tracing::info!(ca = %ca.config.ca.display(), "client CA bundle reloaded");
                true
            }
            Err(error) => {
                tracing::error!(
                    ca = %ca.config.ca.display(),
                    error = %crate::lists::error_chain(&error),
                    "the changed client CA bundle cannot be used; still verifying with the previous one"
                );
                false
            }
        }
    }

    /// Checks the files once; returns how many certificates (and CA bundles) were replaced.
    pub fn poll(&mut self) -> usize {
        let mut replaced = 0;
        for slot in &mut self.slots {
            let Some(files) = &slot.files else { continue };
            let now = modified(files);
            if now == slot.modified {
                continue;
            }
            // Remember the new times even when loading fails: a half-written pair is retried
            // when its other file changes, and a broken file is reported once, not every poll.
            slot.modified = now;
            match load_certified_key(&files.cert, &files.key) {
                Ok(key) => {
                    slot.key = Arc::new(key);
                    replaced += 1;
                    tracing::info!(cert = %files.cert.display(), "certificate reloaded");
                }
                Err(error) => tracing::error!(
                    cert = %files.cert.display(),
                    error = %crate::lists::error_chain(&error),
                    "the changed certificate cannot be used; still serving the previous one"
                ),
            }
        }
        if replaced > 0 {
            self.resolver.replace(store(&self.slots));
        }
        if self.poll_client_ca() {
            replaced += 1;
        }
        replaced
    }

    /// Polls until the task is dropped.
    pub async fn run(mut self) {
        if self.slots.iter().all(|slot| slot.files.is_none()) && self.client_ca.is_none() {
            return;
        }
        let mut ticker = tokio::time::interval(self.interval);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            self.poll();
        }
    }
}

fn store(slots: &[Slot]) -> CertStore {
    let mut store = CertStore::default();
    for slot in slots {
        store.insert(&slot.names, &slot.key);
        if slot.is_default {
            store.set_default(&slot.key);
        }
    }
    store
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_files_are_reloaded_and_broken_ones_ignored() {
        let dir = std::env::temp_dir().join(format!("gateway-reload-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating a temp dir");
        let (cert, key) = (dir.join("site.crt"), dir.join("site.key"));
        let write_pair = |name: &str| {
            let generated =
                rcgen::generate_simple_self_signed(vec![name.to_owned()]).expect("generating");
            std::fs::write(&cert, generated.cert.pem()).expect("writing the certificate");
            std::fs::write(&key, generated.signing_key.serialize_pem()).expect("writing the key");
            generated.cert.der().clone()
        };
        let first = write_pair("site.test");
        let config = TlsConfig {
            certificates: Vec::new(),
            default_certificate: Some(CertificateConfig {
                cert: cert.clone(),
                key: key.clone(),
                names: vec!["site.test".to_owned()],
            }),
            self_signed: false,
            self_signed_names: Vec::new(),
            reload_interval: Duration::from_secs(1),
            client_auth: None,
        };
        let mut reloader = Reloader::load(&config).expect("loading the first pair");
        let served = |reloader: &Reloader| {
            reloader.resolver.lookup_for_test(Some("site.test")).cert[0].clone()
        };
        assert_eq!(served(&reloader), first);
        assert_eq!(reloader.poll(), 0, "nothing changed yet");

        // Modification times have a coarse granularity on some file systems: make the change
        // visible by moving the times forward explicitly.
        let bump = |path: &std::path::Path, secs| {
            let file = std::fs::File::options()
                .write(true)
                .open(path)
                .expect("opening");
            file.set_modified(SystemTime::now() + Duration::from_secs(secs))
                .expect("setting the modification time");
        };
        let second = write_pair("site.test");
        bump(&cert, 10);
        bump(&key, 10);
        assert_eq!(reloader.poll(), 1);
        assert_eq!(served(&reloader), second, "the new certificate is served");

        std::fs::write(&key, "not a key").expect("breaking the key");
        bump(&key, 20);
        assert_eq!(reloader.poll(), 0, "a broken file is not loaded");
        assert_eq!(
            served(&reloader),
            second,
            "the previous certificate is kept"
        );
        std::fs::remove_dir_all(&dir).expect("removing the temp dir");
    }

    #[test]
    fn a_changed_client_ca_bundle_is_swapped_in_and_a_broken_one_ignored() {
        use rustls::server::danger::ClientCertVerifier as _;
        let dir = std::env::temp_dir().join(format!("gateway-ca-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating a temp dir");
        let bundle = dir.join("clients-ca.crt");
        // A CA and a client certificate it issued.
        let ca_and_client = |name: &str| {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            let ca =
                rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
                    .expect("a CA");
            let mut leaf = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
            leaf.distinguished_name
                .push(rcgen::DnType::CommonName, "client");
            leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
            let client = leaf
                .signed_by(&rcgen::KeyPair::generate().unwrap(), &ca)
                .expect("a client certificate");
            (ca.pem(), client.der().clone())
        };
        let (old_ca, old_client) = ca_and_client("Old CA");
        let (new_ca, new_client) = ca_and_client("New CA");
        std::fs::write(&bundle, &old_ca).expect("writing the bundle");
        let config = TlsConfig {
            certificates: Vec::new(),
            default_certificate: None,
            self_signed: true,
            self_signed_names: vec!["localhost".to_owned()],
            reload_interval: Duration::from_secs(1),
            client_auth: Some(ClientAuthConfig {
                ca: bundle.clone(),
                mode: crate::config::ClientAuthMode::Required,
            }),
        };
        let mut reloader = Reloader::load(&config).expect("loading");
        let verifier = reloader.client_verifier().expect("an mTLS listener");
        let accepts = |client: &rustls::pki_types::CertificateDer<'static>| {
            verifier
                .verify_client_cert(client, &[], rustls::pki_types::UnixTime::now())
                .is_ok()
        };
        assert!(accepts(&old_client) && !accepts(&new_client));

        let bump = |secs| {
            let file = std::fs::File::options()
                .write(true)
                .open(&bundle)
                .expect("opening");
            file.set_modified(SystemTime::now() + Duration::from_secs(secs))
                .expect("setting the modification time");
        };
        std::fs::write(&bundle, &new_ca).expect("rotating the bundle");
        bump(10);
        assert_eq!(reloader.poll(), 1);
        assert!(accepts(&new_client), "the new CA's clients are accepted");
        assert!(!accepts(&old_client), "the old CA's are not");

        std::fs::write(&bundle, "not a certificate").expect("breaking the bundle");
        bump(20);
        assert_eq!(reloader.poll(), 0, "a broken bundle is not loaded");
        assert!(accepts(&new_client), "the previous bundle is kept");
        std::fs::remove_dir_all(&dir).expect("removing the temp dir");
    }
}
