//! Just enough DER to name a client: the subject's common name and the subject alternative
//! names (DNS, URI, email) of a certificate that rustls has already verified. rustls-webpki
//! checks certificates but exposes neither the common name nor email names, and a full X.509
//! parser is a dozen crates for three fields. Every read is bounds-checked; anything this
//! reader does not understand is skipped, never a panic.

/// The names a certificate gives its subject.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct CertNames {
    /// The last (most specific) `CN` of the subject, if any.
    pub(crate) common_name: Option<String>,
    pub(crate) dns: Vec<String>,
    pub(crate) uris: Vec<String>,
    pub(crate) emails: Vec<String>,
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const OCTET_STRING: u8 = 0x04;
const BOOLEAN: u8 = 0x01;
/// `[0]` explicit, the certificate's version.
const VERSION: u8 = 0xa0;
/// `[3]` explicit, the certificate's extensions.
const EXTENSIONS: u8 = 0xa3;
/// 2.5.4.3, `commonName`.
const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
/// 2.5.29.17, `subjectAltName`.
const OID_SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];
/// `GeneralName` choices, context-specific and implicitly `IA5String`.
const SAN_EMAIL: u8 = 0x81;
const SAN_DNS: u8 = 0x82;
const SAN_URI: u8 = 0x86;

/// A cursor over concatenated DER values.
struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    /// The next value's tag and contents. Single-byte tags only (all that certificates use
    /// where this reader looks) and definite lengths of up to four bytes, as DER requires.
    fn next(&mut self) -> Option<(u8, &'a [u8])> {
        let (&tag, rest) = self.0.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let count = usize::from(first & 0x7f);
            if !(1..=4).contains(&count) || rest.len() < count {
                return None;
            }
            let (bytes, rest) = rest.split_at(count);
            let len = bytes
                .iter()
                .fold(0usize, |len, &byte| (len << 8) | usize::from(byte));
            (len, rest)
        };
        if rest.len() < len {
            return None;
        }
        let (contents, rest) = rest.split_at(len);
        self.0 = rest;
        Some((tag, contents))
    }

    /// The next value's contents if it has `tag`.
    fn expect(&mut self, tag: u8) -> Option<&'a [u8]> {
        match self.next()? {
            (found, contents) if found == tag => Some(contents),
            _ => None,
        }
    }
}

/// The names in a DER certificate; empty where the certificate has none or cannot be read.
pub(crate) fn cert_names(der: &[u8]) -> CertNames {
    let mut names = CertNames::default();
    let _ = read_names(der, &mut names);
    names
}

fn read_names(der: &[u8], names: &mut CertNames) -> Option<()> {
    let certificate = Der(der).expect(SEQUENCE)?;
    let mut tbs = Der(Der(certificate).expect(SEQUENCE)?);
    // version (optional), serial, signature algorithm, issuer, validity, then the subject.
    let (first, _) = tbs.next()?;
    let before_subject = if first == VERSION { 4 } else { 3 };
    for _ in 0..before_subject {
        tbs.next()?;
    }
    names.common_name = common_name(tbs.expect(SEQUENCE)?);
    // The public key, then the optional unique ids, then the extensions.
    while let Some((tag, contents)) = tbs.next() {
        if tag == EXTENSIONS {
            read_alt_names(contents, names);
        }
    }
    Some(())
}

fn common_name(subject: &[u8]) -> Option<String> {
    let mut found = None;
    let mut rdns = Der(subject);
    while let Some(rdn) = rdns.expect(SET) {
        let mut attributes = Der(rdn);
        while let Some(attribute) = attributes.expect(SEQUENCE) {
            let mut attribute = Der(attribute);
            if attribute.expect(OID) == Some(OID_COMMON_NAME)
                && let Some((tag, value)) = attribute.next()
                && let Some(text) = directory_string(tag, value)
            {
                found = Some(text);
            }
        }
    }
    found
}

/// A `DirectoryString` as text: UTF8String, PrintableString, IA5String, TeletexString (when
/// ASCII, as it is in practice) or BMPString.
fn directory_string(tag: u8, value: &[u8]) -> Option<String> {
    match tag {
        0x0c | 0x13 | 0x16 => std::str::from_utf8(value).ok().map(str::to_owned),
        0x14 => value
            .is_ascii()
            .then(|| String::from_utf8_lossy(value).into_owned()),
        0x1e if value.len().is_multiple_of(2) => {
            let units = value
                .chunks_exact(2)
                .map(|pair| u16::from_be_bytes([pair[0], pair[1]]));
            char::decode_utf16(units)
                .collect::<Result<String, _>>()
                .ok()
        }
        _ => None,
    }
}

fn read_alt_names(extensions: &[u8], names: &mut CertNames) -> Option<()> {
    let mut extensions = Der(Der(extensions).expect(SEQUENCE)?);
    while let Some(extension) = extensions.expect(SEQUENCE) {
        let mut extension = Der(extension);
        if extension.expect(OID) != Some(OID_SUBJECT_ALT_NAME) {
            continue;
        }
        let mut value = extension.next()?;
        if value.0 == BOOLEAN {
            value = extension.next()?;
        }
        if value.0 != OCTET_STRING {
            return None;
        }
        let mut general_names = Der(Der(value.1).expect(SEQUENCE)?);
        while let Some((tag, name)) = general_names.next() {
            let list = match tag {
                SAN_DNS => &mut names.dns,
                SAN_URI => &mut names.uris,
                SAN_EMAIL => &mut names.emails,
                _ => continue,
            };
            if let Ok(text) = std::str::from_utf8(name)
                && text.is_ascii()
            {
                list.push(text.to_owned());
            }
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    use super::*;

    #[test]
    fn names_are_read_from_a_certificate() {
        let mut params =
            CertificateParams::new(vec!["client.test".to_owned()]).expect("certificate params");
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Acme");
        params
            .distinguished_name
            .push(DnType::CommonName, "billing-service");
        params.subject_alt_names.extend([
            SanType::URI(
                "spiffe://acme.test/billing"
                    .try_into()
                    .expect("an IA5 string"),
            ),
            SanType::Rfc822Name("ops@acme.test".try_into().expect("an IA5 string")),
            SanType::IpAddress("10.0.0.1".parse().expect("an address")),
            SanType::DnsName("other.test".try_into().expect("an IA5 string")),
        ]);
        let key = KeyPair::generate().expect("a key");
        let cert = params.self_signed(&key).expect("a certificate");
        let names = cert_names(cert.der());
        assert_eq!(names.common_name.as_deref(), Some("billing-service"));
        assert_eq!(names.dns, ["client.test", "other.test"]);
        assert_eq!(names.uris, ["spiffe://acme.test/billing"]);
        assert_eq!(names.emails, ["ops@acme.test"]);
    }

    #[test]
    fn a_certificate_without_names_or_garbage_yields_nothing() {
        let params = CertificateParams::new(Vec::<String>::new()).expect("certificate params");
        let key = KeyPair::generate().expect("a key");
        let cert = params.self_signed(&key).expect("a certificate");
        let names = cert_names(cert.der());
        // rcgen puts a default `CN=rcgen self signed cert` in.
        assert!(names.dns.is_empty() && names.uris.is_empty() && names.emails.is_empty());
        for garbage in [
            &[][..],
            &[0x30],
            &[0x30, 0x84, 0xff, 0xff, 0xff, 0xff],
            &[0x30, 0x02, 0x30],
        ] {
            assert_eq!(cert_names(garbage), CertNames::default(), "{garbage:?}");
        }
        // Truncating a real certificate anywhere never panics.
        let der = cert.der();
        for end in 0..der.len() {
            let _ = cert_names(&der[..end]);
        }
    }
}
