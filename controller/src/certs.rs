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
        match not_after(leaf) {
            Some(not_after) => leaf_facts = Some((not_after, hex::encode(Sha256::digest(leaf)))),
            None => problems.push(FieldProblem::new(
                "cert_pem",
                "the first certificate's validity cannot be read",
            )),
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
    let time = std::str::from_utf8(time).ok()?;
    let full = match tag {
        // UTCTime: YYMMDDHHMMSSZ, 1950..2049.
        0x17 if time.len() == 13 => {
            let yy: u32 = time[..2].parse().ok()?;
            format!("{}{time}", if yy < 50 { "20" } else { "19" })
        }
        0x18 if time.len() == 15 => time.to_owned(),
        _ => return None,
    };
    let digits = full.strip_suffix('Z')?;
    if digits.len() != 14 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(format!(
        "{}-{}-{}T{}:{}:{}Z",
        &digits[..4],
        &digits[4..6],
        &digits[6..8],
        &digits[8..10],
        &digits[10..12],
        &digits[12..14]
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
}
