//! TLS certificates for terminated routes: checked when uploaded (parses,
//! the key is the certificate's, the host is among its names), stored whole
//! under `/keel/certs/{host}`, listed without their keys, and sent with the
//! route table to routers, which are the only readers of the keys.

use std::sync::Arc;

use keel_protocol::RouteCertificate;
use keel_store::{Op, Store, Txn};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use crate::api::{ApiError, FieldProblem};
use crate::apps::{decode, encode, list_records};

pub mod keys {
    pub fn certs() -> String {
        "/keel/certs/".to_owned()
    }

    pub fn cert(host: &str) -> String {
        format!("/keel/certs/{host}")
    }
}

/// A certificate to store (`POST /v1/certs`).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewCert {
    /// The host name it serves, as routes name it (`*.example.com` for a
    /// wildcard).
    pub host: String,
    /// PEM: the leaf certificate first, then its intermediates.
    pub cert_pem: String,
    /// PEM: the leaf's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: String,
}

/// A stored certificate, key included: never leaves the controller except
/// on the route stream.
#[derive(Clone, Serialize, Deserialize)]
struct CertRecord {
    host: String,
    cert_pem: String,
    key_pem: String,
    not_after: String,
    fingerprint_sha256: String,
}

/// What the API shows of a stored certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CertSummary {
    pub host: String,
    /// When the leaf certificate expires (UTC, RFC 3339).
    pub not_after: String,
    /// SHA-256 of the leaf certificate (DER), hex.
    pub fingerprint_sha256: String,
}

impl From<&CertRecord> for CertSummary {
    fn from(r: &CertRecord) -> Self {
        CertSummary {
            host: r.host.clone(),
            not_after: r.not_after.clone(),
            fingerprint_sha256: r.fingerprint_sha256.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Certs {
    store: Arc<dyn Store>,
}

impl Certs {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    /// Checks and stores a certificate, replacing the host's previous one.
    pub async fn put(&self, new: NewCert) -> Result<CertSummary, ApiError> {
        let (not_after, fingerprint_sha256) = check(&new).map_err(ApiError::Invalid)?;
        let record = CertRecord {
            host: new.host,
            cert_pem: new.cert_pem,
            key_pem: new.key_pem,
            not_after,
            fingerprint_sha256,
        };
        self.store
            .txn(Txn::new().and_then([Op::put(keys::cert(&record.host), encode(&record)?)]))
            .await?;
        Ok(CertSummary::from(&record))
    }

    pub async fn list(&self) -> Result<Vec<CertSummary>, ApiError> {
        let records: Vec<(CertRecord, _)> =
            list_records(self.store.as_ref(), &keys::certs()).await?;
        Ok(records.iter().map(|(r, _)| CertSummary::from(r)).collect())
    }

    pub async fn delete(&self, host: &str) -> Result<CertSummary, ApiError> {
        keel_manifest::check_hostname(host)
            .map_err(|message| ApiError::Invalid(vec![FieldProblem::new("host", message)]))?;
        let key = keys::cert(host);
        let Some(kv) = self.store.get(&key).await? else {
            return Err(ApiError::NotFound(format!("certificate for {host}")));
        };
        let record: CertRecord = decode(&kv)?;
        self.store.delete(&key).await?;
        Ok(CertSummary::from(&record))
    }

    /// Every stored certificate with its key, for the route stream.
    pub async fn for_routers(&self) -> Result<Vec<RouteCertificate>, ApiError> {
        let records: Vec<(CertRecord, _)> =
            list_records(self.store.as_ref(), &keys::certs()).await?;
        Ok(records
            .into_iter()
            .map(|(r, _)| RouteCertificate {
                host: r.host,
                cert_pem: r.cert_pem,
                key_pem: r.key_pem,
            })
            .collect())
    }
}

/// Every problem with an upload, by field; on success the leaf's expiry
/// and fingerprint.
fn check(new: &NewCert) -> Result<(String, String), Vec<FieldProblem>> {
    let mut problems = Vec::new();
    if let Err(message) = keel_manifest::check_hostname(&new.host) {
        problems.push(FieldProblem::new("host", message));
    }
    let chain = match CertificateDer::pem_slice_iter(new.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(chain) if chain.is_empty() => {
            problems.push(FieldProblem::new(
                "cert_pem",
                "holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            ));
            None
        }
        Ok(chain) => Some(chain),
        Err(e) => {
            problems.push(FieldProblem::new(
                "cert_pem",
                format!("is not valid PEM: {e}"),
            ));
            None
        }
    };
    let key = match PrivateKeyDer::from_pem_slice(new.key_pem.as_bytes()) {
        Ok(key) => Some(key),
        Err(e) => {
            problems.push(FieldProblem::new(
                "key_pem",
                format!("holds no PEM private key: {e}"),
            ));
            None
        }
    };
    let mut leaf_facts = None;
    if let Some(chain) = &chain {
        let leaf = &chain[0];
        match webpki::EndEntityCert::try_from(leaf) {
            Err(e) => problems.push(FieldProblem::new(
                "cert_pem",
                format!("the first certificate is not a valid X.509 certificate: {e}"),
            )),
            Ok(parsed) => {
                // Read only from a certificate webpki accepted; an
                // unreadable validity is still a problem, never a panic.
                match not_after(leaf) {
                    Some(not_after) => {
                        leaf_facts = Some((not_after, hex::encode(Sha256::digest(leaf))));
                    }
                    None => problems.push(FieldProblem::new(
                        "cert_pem",
                        "the first certificate's validity cannot be read",
                    )),
                }
                // A wildcard upload must be a wildcard certificate: a name
                // only `*.` can cover stands for every name under it.
                let probe = match new.host.strip_prefix("*.") {
                    Some(parent) => format!("keel-wildcard-probe.{parent}"),
                    None => new.host.clone(),
                };
                if let Ok(name) = ServerName::try_from(probe.as_str())
                    && parsed.verify_is_valid_for_subject_name(&name).is_err()
                {
                    problems.push(FieldProblem::new(
                        "host",
                        format!("{} is not among the certificate's names", new.host),
                    ));
                }
            }
        }
    }
    if let (Some(chain), Some(key)) = (chain, key) {
        let provider = rustls::crypto::ring::default_provider();
        match rustls::sign::CertifiedKey::from_der(chain, key, &provider) {
            Ok(_) => {}
            Err(rustls::Error::InconsistentKeys(_)) => problems.push(FieldProblem::new(
                "key_pem",
                "is not the private key of the first certificate in cert_pem",
            )),
            Err(e) => problems.push(FieldProblem::new(
                "key_pem",
                format!("is not a usable private key: {e}"),
            )),
        }
    }
    match (problems.is_empty(), leaf_facts) {
        (true, Some(facts)) => Ok(facts),
        _ => Err(problems),
    }
}

/// The `notAfter` of a DER certificate as RFC 3339, read from the TBS
/// structure directly (webpki checks validity but does not expose it).
fn not_after(der: &[u8]) -> Option<String> {
    /// One DER element: (tag, content, rest).
    fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            (len, &rest[n..])
        };
        (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
    }
    let (_, cert, _) = tlv(der)?;
    let (_, tbs, _) = tlv(cert)?;
    let mut rest = tbs;
    let (tag, _, after) = tlv(rest)?;
    if tag == 0xa0 {
        rest = after; // explicit version
    }
    for _ in 0..3 {
        // serial, signature algorithm, issuer
        rest = tlv(rest)?.2;
    }
    let (_, validity, _) = tlv(rest)?;
    let (_, _, validity) = tlv(validity)?; // notBefore
    let (tag, time, _) = tlv(validity)?;
    // Bytes, never string slices: the certificate is untrusted, and a byte
    // index inside a multi-byte character panics.
    let digits = time.strip_suffix(b"Z")?;
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let century: &[u8] = match (tag, digits.len()) {
        // UTCTime: YYMMDDHHMMSSZ, 1950..2049.
        (0x17, 12) if digits[0] < b'5' => b"20",
        (0x17, 12) => b"19",
        // GeneralizedTime: YYYYMMDDHHMMSSZ.
        (0x18, 14) => b"",
        _ => return None,
    };
    let full: Vec<char> = century
        .iter()
        .chain(digits)
        .map(|&b| char::from(b))
        .collect();
    let part =
        |range: std::ops::Range<usize>| full.get(range).map(|c| c.iter().collect::<String>());
    Some(format!(
        "{}-{}-{}T{}:{}:{}Z",
        part(0..4)?,
        part(4..6)?,
        part(6..8)?,
        part(8..10)?,
        part(10..12)?,
        part(12..14)?
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn made(names: &[&str]) -> rcgen::CertifiedKey<rcgen::KeyPair> {
        rcgen::generate_simple_self_signed(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .expect("cert")
    }

    fn upload(host: &str, cert: &rcgen::CertifiedKey<rcgen::KeyPair>) -> NewCert {
        NewCert {
            host: host.into(),
            cert_pem: cert.cert.pem(),
            key_pem: cert.signing_key.serialize_pem(),
        }
    }

    fn paths(result: Result<(String, String), Vec<FieldProblem>>) -> Vec<String> {
        result
            .err()
            .unwrap_or_default()
            .into_iter()
            .map(|p| format!("{}: {}", p.path, p.message))
            .collect()
    }

    #[test]
    fn a_good_certificate_gives_its_expiry_and_fingerprint() {
        let cert = made(&["shop.example.com"]);
        let (not_after, fingerprint) = check(&upload("shop.example.com", &cert)).expect("valid");
        // rcgen's default validity ends in 4096.
        assert_eq!(not_after, "4096-01-01T00:00:00Z");
        assert_eq!(fingerprint, hex::encode(Sha256::digest(cert.cert.der())));
    }

    #[test]
    fn problems_name_their_field() {
        let cert = made(&["shop.example.com"]);
        let other = made(&["shop.example.com"]);
        assert_eq!(
            paths(check(&upload("www.example.com", &cert))),
            ["host: www.example.com is not among the certificate's names"]
        );
        let mut mismatched = upload("shop.example.com", &cert);
        mismatched.key_pem = other.signing_key.serialize_pem();
        assert_eq!(
            paths(check(&mismatched)),
            ["key_pem: is not the private key of the first certificate in cert_pem"]
        );
        let garbage = NewCert {
            host: "Bad Host".into(),
            cert_pem: "hello".into(),
            key_pem: "".into(),
        };
        let problems = paths(check(&garbage));
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].starts_with("host: "), "{problems:?}");
        assert!(
            problems[1].starts_with("cert_pem: holds no PEM certificate"),
            "{problems:?}"
        );
        assert!(
            problems[2].starts_with("key_pem: holds no PEM private key"),
            "{problems:?}"
        );
    }

    #[test]
    fn a_wildcard_host_needs_a_wildcard_certificate() {
        let wild = made(&["*.example.com"]);
        assert!(check(&upload("*.example.com", &wild)).is_ok());
        let exact = made(&["a.example.com"]);
        assert_eq!(
            paths(check(&upload("*.example.com", &exact))),
            ["host: *.example.com is not among the certificate's names"]
        );
    }

    /// A DER element with a short-form length.
    fn der(tag: u8, content: &[u8]) -> Vec<u8> {
        let len = u8::try_from(content.len()).expect("short content");
        assert!(len < 0x80);
        [&[tag, len][..], content].concat()
    }

    fn pem(der: &[u8]) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in der.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
                } else {
                    out.push('=');
                }
            }
        }
        format!("-----BEGIN CERTIFICATE-----\n{out}\n-----END CERTIFICATE-----\n")
    }

    /// A certificate-shaped DER whose validity times are 13 bytes of UTF-8
    /// with a two-byte character across byte 2.
    fn crafted() -> Vec<u8> {
        let time = der(0x17, "1\u{e9}345678901Z".as_bytes());
        let validity = der(0x30, &[time.clone(), time].concat());
        let tbs = der(
            0x30,
            &[der(0x02, &[1]), der(0x30, &[]), der(0x30, &[]), validity].concat(),
        );
        der(0x30, &tbs)
    }

    #[test]
    fn a_validity_that_is_not_ascii_digits_is_unreadable_not_a_panic() {
        assert_eq!(not_after(&crafted()), None);
        let cert = made(&["shop.example.com"]);
        let crafted = NewCert {
            host: "shop.example.com".into(),
            cert_pem: pem(&crafted()),
            key_pem: cert.signing_key.serialize_pem(),
        };
        let problems = paths(check(&crafted));
        assert!(
            problems[0]
                .starts_with("cert_pem: the first certificate is not a valid X.509 certificate"),
            "{problems:?}"
        );
    }

    #[test]
    fn utc_and_generalized_times_both_read() {
        let cert = |time: Vec<u8>| {
            let validity = der(0x30, &[time.clone(), time].concat());
            der(
                0x30,
                &der(
                    0x30,
                    &[der(0x02, &[1]), der(0x30, &[]), der(0x30, &[]), validity].concat(),
                ),
            )
        };
        assert_eq!(
            not_after(&cert(der(0x17, b"491231235959Z"))).as_deref(),
            Some("2049-12-31T23:59:59Z")
        );
        assert_eq!(
            not_after(&cert(der(0x17, b"500101000000Z"))).as_deref(),
            Some("1950-01-01T00:00:00Z")
        );
        assert_eq!(
            not_after(&cert(der(0x18, b"20300615120000Z"))).as_deref(),
            Some("2030-06-15T12:00:00Z")
        );
        assert_eq!(not_after(&cert(der(0x18, b"2030061512000Z"))), None);
    }

    /// Bounded fuzzing of the upload checker: arbitrary input and
    /// mutations of a valid certificate give problems or facts, never a
    /// panic. A few seconds in all.
    mod fuzz {
        use std::sync::OnceLock;

        use proptest::prelude::*;
        use proptest::test_runner::Config;

        use super::*;

        fn config(cases: u32) -> Config {
            Config {
                cases,
                failure_persistence: None,
                ..Config::default()
            }
        }

        /// A valid certificate (DER) and its key (PEM), made once.
        fn valid() -> &'static (Vec<u8>, String) {
            static VALID: OnceLock<(Vec<u8>, String)> = OnceLock::new();
            VALID.get_or_init(|| {
                let cert = made(&["shop.example.com"]);
                (cert.cert.der().to_vec(), cert.signing_key.serialize_pem())
            })
        }

        /// Gives problems or facts; facts only with no problem.
        fn checks(new: &NewCert) {
            match check(new) {
                Ok((not_after, fingerprint)) => {
                    assert_eq!(not_after.len(), "2000-01-01T00:00:00Z".len());
                    assert_eq!(fingerprint.len(), 64);
                }
                Err(problems) => assert!(!problems.is_empty()),
            }
        }

        /// One edit of a DER certificate.
        #[derive(Debug, Clone)]
        enum Edit {
            Set { at: usize, byte: u8 },
            Flip { at: usize, bit: u8 },
            Insert { at: usize, bytes: Vec<u8> },
            Delete { at: usize, len: usize },
            Truncate { at: usize },
        }

        fn edit() -> impl Strategy<Value = Edit> {
            prop_oneof![
                (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Edit::Set { at, byte }),
                (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Edit::Flip { at, bit }),
                (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
                    .prop_map(|(at, bytes)| Edit::Insert { at, bytes }),
                (any::<usize>(), 1usize..16).prop_map(|(at, len)| Edit::Delete { at, len }),
                any::<usize>().prop_map(|at| Edit::Truncate { at }),
            ]
        }

        fn apply(der: &mut Vec<u8>, edit: &Edit) {
            let n = der.len();
            match edit {
                Edit::Set { at, byte } if n > 0 => der[at % n] = *byte,
                Edit::Flip { at, bit } if n > 0 => der[at % n] ^= 1 << bit,
                Edit::Insert { at, bytes } => {
                    let at = at % (n + 1);
                    der.splice(at..at, bytes.iter().copied());
                }
                Edit::Delete { at, len } if n > 0 => {
                    let at = at % n;
                    der.drain(at..(at + len).min(n));
                }
                Edit::Truncate { at } => der.truncate(at % (n + 1)),
                _ => {}
            }
        }

        proptest! {
            #![proptest_config(config(2000))]

            #[test]
            fn arbitrary_text_never_panics(
                host in ".{0,40}",
                cert in prop::collection::vec(any::<u8>(), 0..300),
                key in prop::collection::vec(any::<u8>(), 0..300),
            ) {
                checks(&NewCert {
                    host,
                    cert_pem: String::from_utf8_lossy(&cert).into_owned(),
                    key_pem: String::from_utf8_lossy(&key).into_owned(),
                });
            }

            #[test]
            fn arbitrary_der_never_panics(der in prop::collection::vec(any::<u8>(), 0..400)) {
                let _ = not_after(&der);
                checks(&NewCert {
                    host: "shop.example.com".into(),
                    cert_pem: pem(&der),
                    key_pem: valid().1.clone(),
                });
            }
        }

        proptest! {
            #![proptest_config(config(1000))]

            #[test]
            fn mutated_certificates_never_panic(edits in prop::collection::vec(edit(), 1..4)) {
                let (der, key) = valid();
                let mut der = der.clone();
                for edit in &edits {
                    apply(&mut der, edit);
                }
                let _ = not_after(&der);
                checks(&NewCert {
                    host: "shop.example.com".into(),
                    cert_pem: pem(&der),
                    key_pem: key.clone(),
                });
            }

            #[test]
            fn any_validity_time_never_panics(
                tag in prop::sample::select(vec![0x17u8, 0x18, 0x0c, 0x04]),
                time in prop::collection::vec(any::<u8>(), 0..20),
                text in ".{0,8}",
            ) {
                for time in [time, text.into_bytes()] {
                    if time.len() >= 0x80 {
                        continue;
                    }
                    let time = der(tag, &time);
                    let validity = der(0x30, &[time.clone(), time].concat());
                    let tbs = der(
                        0x30,
                        &[der(0x02, &[1]), der(0x30, &[]), der(0x30, &[]), validity].concat(),
                    );
                    let _ = not_after(&der(0x30, &tbs));
                }
            }
        }
    }
}
