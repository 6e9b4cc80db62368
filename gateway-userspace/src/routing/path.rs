//! Path normalisation: the one form in which request paths are matched against routes and sent
//! upstream, so that `/admin/../api`, `/%61dmin`, `//admin` or `/./admin` cannot reach a route
//! by another spelling, nor sneak around one.
//!
//! In order: percent-encoded *unreserved* characters (letters, digits, `-._~`) are decoded
//! (RFC 3986 §6.2.2.2); every other escape is kept, with uppercase hex; an encoded `/` or `\`
//! (and NUL) is refused, because an upstream may decode it into a separator the gateway never
//! saw; dot-segments are resolved (§5.2.4, clamped at the root) and duplicate slashes
//! collapsed. A trailing slash is kept.

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path does not start with `/`")]
    NotAbsolute,
    #[error("a `%` is not followed by two hexadecimal digits")]
    BadEscape,
    #[error("the path contains an encoded `/`, `\\` or NUL")]
    EncodedSeparator,
}

fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

fn hex(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

/// The normal form of a request path (without its query).
pub fn normalize_path(raw: &str) -> Result<String, PathError> {
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    // Decoding first, so that `%2e%2e` is a dot-segment like `..` when segments are resolved.
    let bytes = raw.as_bytes();
    let mut decoded = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let byte = bytes[i];
        if byte != b'%' {
            decoded.push(char::from(byte));
            i += 1;
            continue;
        }
        let (Some(high), Some(low)) = (
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(PathError::BadEscape);
        };
        let value = high << 4 | low;
        if matches!(value, b'/' | b'\\' | 0) {
            return Err(PathError::EncodedSeparator);
        }
        if is_unreserved(value) {
            decoded.push(char::from(value));
        } else {
            decoded.push('%');
            decoded.push(char::from(b"0123456789ABCDEF"[usize::from(high)]));
            decoded.push(char::from(b"0123456789ABCDEF"[usize::from(low)]));
        }
        i += 3;
    }

    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in decoded.split('/').skip(1) {
        trailing_slash = false;
        match segment {
            "" => trailing_slash = true,
            "." => trailing_slash = true,
            ".." => {
                segments.pop();
                trailing_slash = true;
            }
            _ => segments.push(segment),
        }
    }
    let mut normal = String::with_capacity(decoded.len());
    for segment in &segments {
        normal.push('/');
        normal.push_str(segment);
    }
    if trailing_slash || segments.is_empty() {
        normal.push('/');
    }
    Ok(normal)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normal(raw: &str) -> String {
        normalize_path(raw).unwrap_or_else(|e| panic!("`{raw}` should normalise: {e}"))
    }

    #[test]
    fn normal_paths_are_unchanged() {
        for path in [
            "/",
            "/api",
            "/api/",
            "/api/v1/users",
            "/a-b_c.d~e",
            "/x%20y",
            "/%C3%A9",
        ] {
            assert_eq!(normal(path), path);
        }
    }

    #[test]
    fn unreserved_escapes_are_decoded_others_kept_uppercase() {
        assert_eq!(normal("/%61dmin"), "/admin");
        assert_eq!(normal("/%41%7a%30%2D%2e%5F%7E"), "/Az0-._~");
        assert_eq!(normal("/a%3fb"), "/a%3Fb");
        assert_eq!(normal("/caf%c3%a9"), "/caf%C3%A9");
    }

    #[test]
    fn dot_segments_and_duplicate_slashes_are_resolved() {
        let cases = [
            ("/admin/../api", "/api"),
            ("//admin", "/admin"),
            ("/./admin", "/admin"),
            ("/api/%2e%2e/admin", "/admin"),
            ("/api/%2E%2e/admin", "/admin"),
            ("/api/.%2e/admin", "/admin"),
            ("/api//v1///users", "/api/v1/users"),
            ("/../../etc/passwd", "/etc/passwd"),
            ("/api/..", "/"),
            ("/api/v1/..", "/api/"),
            ("/api/.", "/api/"),
            ("/api/...", "/api/..."),
            ("/api/..x", "/api/..x"),
        ];
        for (raw, expected) in cases {
            assert_eq!(normal(raw), expected, "normalising `{raw}`");
        }
    }

    #[test]
    fn encoded_separators_and_bad_escapes_are_refused() {
        for raw in ["/admin%2fsecret", "/api%2F..%2Fadmin", "/a%5cb", "/a%00"] {
            assert_eq!(
                normalize_path(raw),
                Err(PathError::EncodedSeparator),
                "`{raw}` must be refused"
            );
        }
        for raw in ["/a%", "/a%2", "/a%zz", "/a%%41"] {
            assert_eq!(normalize_path(raw), Err(PathError::BadEscape), "`{raw}`");
        }
        assert_eq!(normalize_path("admin"), Err(PathError::NotAbsolute));
        assert_eq!(normalize_path(""), Err(PathError::NotAbsolute));
    }

    #[test]
    fn normalising_twice_changes_nothing() {
        for raw in ["/a/%2e%2e/b//c/./d/", "/%61%2520", "/x/../../y"] {
            let once = normal(raw);
            assert_eq!(normal(&once), once, "`{raw}`");
        }
    }
}
