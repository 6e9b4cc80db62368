//! Picks a listener's certificate by SNI: an exact name, then a one-label wildcard, then the
//! default. The whole table is swapped atomically on reload, so a handshake sees either the
//! old or the new certificates, never a mix.
use std::{collections::HashMap, sync::Arc};

use arc_swap::ArcSwap;
use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

/// Certificates by name. Names are lowercase; wildcards are stored by the suffix after `*.`.
#[derive(Debug, Default)]
pub struct CertStore {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

impl CertStore {
    /// Serves `key` for `names` (`host` or `*.suffix`); the first certificate given a name
    /// keeps it.
    pub fn insert(&mut self, names: &[String], key: &Arc<CertifiedKey>) {
        for name in names {
            let name = name.to_ascii_lowercase();
            let (table, name) = match name.strip_prefix("*.") {
                Some(suffix) => (&mut self.wildcard, suffix.to_owned()),
                None => (&mut self.exact, name),
            };
            table.entry(name).or_insert_with(|| Arc::clone(key));
        }
    }

    pub fn set_default(&mut self, key: &Arc<CertifiedKey>) {
        self.default = Some(Arc::clone(key));
    }

    /// The certificate for a client's SNI name (absent for clients that sent none).
    pub fn lookup(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let found = sni.and_then(|name| {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            self.exact.get(&name).or_else(|| {
                // A wildcard covers exactly one label: `*.example.com` serves `a.example.com`
                // but neither `example.com` nor `a.b.example.com`, as browsers check it.
                let (_, parent) = name.split_once('.')?;
                self.wildcard.get(parent)
            })
        });
        found.or(self.default.as_ref()).cloned()
    }
}

/// The rustls hook; cheap to read on every handshake.
#[derive(Debug)]
pub struct SniResolver {
    store: ArcSwap<CertStore>,
}

impl SniResolver {
    pub fn new(store: CertStore) -> Self {
        SniResolver {
            store: ArcSwap::from_pointee(store),
        }
    }

    /// Replaces every certificate at once; handshakes in progress keep what they picked.
    pub fn replace(&self, store: CertStore) {
        self.store.store(Arc::new(store));
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.store.load().lookup(client_hello.server_name())
    }
}

#[cfg(test)]
impl SniResolver {
    /// What a handshake with this SNI would get.
    pub(crate) fn lookup_for_test(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        self.store
            .load()
            .lookup(sni)
            .expect("a certificate for this name")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> Arc<CertifiedKey> {
        Arc::new(crate::tls::self_signed(&[name.to_owned()]).expect("generating a certificate"))
    }

    #[test]
    fn exact_then_wildcard_then_default() {
        let (api, wild, default) = (
            key("api.example.com"),
            key("x.example.com"),
            key("localhost"),
        );
        let mut store = CertStore::default();
        store.insert(&["api.example.com".to_owned()], &api);
        store.insert(&["*.example.com".to_owned()], &wild);
        store.set_default(&default);
        let pick = |sni| store.lookup(sni).expect("some certificate");
        assert!(Arc::ptr_eq(&pick(Some("api.example.com")), &api));
        assert!(Arc::ptr_eq(&pick(Some("API.Example.com.")), &api));
        assert!(Arc::ptr_eq(&pick(Some("www.example.com")), &wild));
        assert!(
            Arc::ptr_eq(&pick(Some("a.b.example.com")), &default),
            "one label only"
        );
        assert!(Arc::ptr_eq(&pick(Some("example.com")), &default));
        assert!(Arc::ptr_eq(&pick(None), &default));
    }

    #[test]
    fn no_default_means_no_certificate_for_unknown_names() {
        let mut store = CertStore::default();
        store.insert(&["api.example.com".to_owned()], &key("api.example.com"));
        assert!(store.lookup(Some("other.example.com")).is_none());
        assert!(store.lookup(None).is_none());
    }
}
