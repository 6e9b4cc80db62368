//! Helpers shared by unit tests across modules.
use http::{HeaderMap, HeaderName, HeaderValue};

/// A header map of `(name, value)` pairs, in order; a repeated name is appended.
pub(crate) fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).expect("test header name"),
            HeaderValue::from_str(value).expect("test header value"),
        );
    }
    map
}
