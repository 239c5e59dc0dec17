//! TLS: the ClientHello is read (not decrypted) to learn the SNI host, so
//! that passthrough routes get the raw stream and terminated ones get
//! rustls with the host's certificate: stored, else self-signed.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::proxy::Shared;
use crate::table::normalize_host;

/// The largest ClientHello record accepted (a TLS record's maximum).
const MAX_RECORD: usize = 5 + 16 * 1024;

/// Reads the first TLS record (the ClientHello) whole.
pub(crate) async fn read_client_hello(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        if buf.len() >= 5 {
            if buf[0] != 22 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "not a TLS handshake",
                ));
            }
            let need = 5 + usize::from(u16::from_be_bytes([buf[3], buf[4]]));
            if need > MAX_RECORD {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "TLS record too large",
                ));
            }
            if buf.len() >= need {
                return Ok(buf);
            }
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The SNI host name of a ClientHello record, if it has one.
pub(crate) fn sni(record: &[u8]) -> Option<String> {
    struct Reader<'a>(&'a [u8]);
    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize) -> Option<&'a [u8]> {
            if self.0.len() < n {
                return None;
            }
            let (head, tail) = self.0.split_at(n);
            self.0 = tail;
            Some(head)
        }
        fn u8(&mut self) -> Option<usize> {
            self.take(1).map(|b| usize::from(b[0]))
        }
        fn u16(&mut self) -> Option<usize> {
            self.take(2)
                .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        }
    }
    let mut r = Reader(record.get(5..)?);
    if r.u8()? != 1 {
        return None; // not a ClientHello
    }
    r.take(3)?; // handshake length
    r.take(2 + 32)?; // version, random
    let n = r.u8()?;
    r.take(n)?; // session id
    let n = r.u16()?;
    r.take(n)?; // cipher suites
    let n = r.u8()?;
    r.take(n)?; // compression methods
    let n = r.u16()?;
    let mut extensions = Reader(r.take(n)?);
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let n = extensions.u16()?;
        let data = extensions.take(n)?;
        if kind == 0 {
            let mut names = Reader(data);
            let n = names.u16()?;
            let mut names = Reader(names.take(n)?);
            while !names.0.is_empty() {
                let name_type = names.u8()?;
                let n = names.u16()?;
                let name = names.take(n)?;
                if name_type == 0 {
                    return std::str::from_utf8(name)
                        .ok()
                        .map(|h| normalize_host(h).into_owned());
                }
            }
        }
    }
    None
}

/// A stream that yields bytes already read from it before the rest.
#[derive(Debug)]
pub(crate) struct Prefixed {
    prefix: Vec<u8>,
    at: usize,
    inner: TcpStream,
}

impl Prefixed {
    pub fn new(prefix: Vec<u8>, inner: TcpStream) -> Self {
        Self {
            prefix,
            at: 0,
            inner,
        }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = buf.remaining().min(self.prefix.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            if self.at == self.prefix.len() {
                self.prefix = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Chooses the certificate by SNI: a stored one from the current table,
/// else a self-signed one made for the host (once; kept while the router
/// runs). Hosts the table does not know share one self-signed certificate,
/// so a scan of random names cannot grow the cache.
#[derive(Debug)]
pub(crate) struct Resolver {
    shared: Arc<Shared>,
    self_signed: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

/// The name of the certificate for hosts without a route.
const FALLBACK_NAME: &str = "keel-router.invalid";

impl Resolver {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            self_signed: Mutex::new(HashMap::new()),
        }
    }

    fn self_signed(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        let mut cache = self.self_signed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(key) = cache.get(host) {
            return Some(key.clone());
        }
        match self_signed(host) {
            Ok(key) => {
                let key = Arc::new(key);
                cache.insert(host.to_owned(), key.clone());
                Some(key)
            }
            Err(error) => {
                tracing::error!(host, %error, "cannot make a self-signed certificate");
                None
            }
        }
    }
}

/// Why a self-signed certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SelfSignedError {
    #[error("generating the certificate failed")]
    Generate(#[from] rcgen::Error),
    #[error("rustls refused the generated key")]
    Key(#[from] rustls::Error),
}

/// A fresh self-signed certificate (ECDSA P-256) for `host`.
pub fn self_signed(host: &str) -> Result<CertifiedKey, SelfSignedError> {
    let made = rcgen::generate_simple_self_signed(vec![host.to_owned()])?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(made.signing_key.serialize_der()));
    let chain: Vec<CertificateDer<'static>> = vec![made.cert.der().clone()];
    Ok(CertifiedKey::from_der(
        chain,
        key,
        &rustls::crypto::ring::default_provider(),
    )?)
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let host = hello.server_name().map(|h| normalize_host(h).into_owned());
        let table = self.shared.table.load();
        match host {
            Some(host) => {
                if let Some(key) = table.cert(&host) {
                    return Some(key.clone());
                }
                if table.has_host(&host) {
                    drop(table);
                    return self.self_signed(&host);
                }
                drop(table);
                self.self_signed(FALLBACK_NAME)
            }
            None => {
                drop(table);
                self.self_signed(FALLBACK_NAME)
            }
        }
    }
}

/// The server side of TLS for terminated routes: HTTP/2 or HTTP/1.1 by
/// ALPN.
pub(crate) fn server_config(shared: Arc<Shared>) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_cert_resolver(Arc::new(Resolver::new(shared)));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_is_read_from_a_real_client_hello() {
        // A ClientHello made by rustls itself, for "app.example.com".
        let mut roots = rustls::RootCertStore::empty();
        let key = self_signed("app.example.com").expect("cert");
        roots.add(key.cert[0].clone()).expect("root");
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("App.Example.com").expect("name");
        let mut client = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
        let mut hello = Vec::new();
        client.write_tls(&mut hello).expect("hello");
        assert_eq!(sni(&hello).as_deref(), Some("app.example.com"));
        assert_eq!(sni(&hello[..hello.len() / 2]), None);
        assert_eq!(sni(b"GET / HTTP/1.1\r\n"), None);
    }
}
