//! Keeps a listener's certificates in step with their files: polls modification times and, when
//! a file changed, loads the pair again and swaps it into the resolver. Polling (rather than
//! inotify) also catches files replaced through a symlink swap, as Kubernetes secrets and
//! certbot do. A broken new file is logged and the old certificate kept.
use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::sign::CertifiedKey;

use super::{CertStore, SniResolver, TlsError, load_certified_key, self_signed};
use crate::config::{CertificateConfig, TlsConfig};

/// One certificate as loaded, with what it serves.
struct Slot {
    /// `None` for the generated self-signed certificate, which has no files.
    files: Option<CertificateConfig>,
    names: Vec<String>,
    is_default: bool,
    modified: (Option<SystemTime>, Option<SystemTime>),
    key: Arc<CertifiedKey>,
}

/// Owns a listener's certificates; [`Reloader::run`] watches their files.
pub struct Reloader {
    slots: Vec<Slot>,
    resolver: Arc<SniResolver>,
    interval: Duration,
}

fn modified(files: &CertificateConfig) -> (Option<SystemTime>, Option<SystemTime>) {
    let time = |path: &std::path::Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    (time(&files.cert), time(&files.key))
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
        Ok(Reloader {
            slots,
            resolver,
            interval: config.reload_interval,
        })
    }

    pub fn resolver(&self) -> Arc<SniResolver> {
        Arc::clone(&self.resolver)
    }

    /// Checks the files once; returns how many certificates were replaced.
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
        replaced
    }

    /// Polls until the task is dropped.
    pub async fn run(mut self) {
        if self.slots.iter().all(|slot| slot.files.is_none()) {
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
}
