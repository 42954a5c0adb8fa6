//! Node identity and pinned mutual TLS.
//!
//! Every node has a self-signed certificate (`node-cert.der`, `node-key.der` in
//! its state dir). Peers are named by the SHA-256 of their DER certificate, and
//! both ends of a connection accept only the fingerprints they were given: no
//! CA, no names, nothing else gets in. The TLS handshake signatures are still
//! verified (a stolen certificate without its key is useless).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::{Digest, Sha256};
use tracing::warn;

pub const CERT_FILE: &str = "node-cert.der";
pub const KEY_FILE: &str = "node-key.der";
/// The name every node's certificate carries (pinning, not names, decides trust).
pub const SERVER_NAME: &str = "replicafs";
pub const ALPN: &[u8] = b"replicafs/1";

/// A 32-byte SHA-256 of a DER certificate.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of(cert_der: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(cert_der).into())
    }

    /// Parses 64 hex digits (colons allowed, case ignored).
    pub fn parse(s: &str) -> Result<Fingerprint, String> {
        let clean: String = s.chars().filter(|c| *c != ':').collect();
        let bytes =
            hex::decode(clean.trim()).map_err(|e| format!("fingerprint {s:?} is not hex: {e}"))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| format!("fingerprint {s:?} is not 32 bytes (64 hex digits)"))?;
        Ok(Fingerprint(arr))
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

/// A node's certificate and key.
#[derive(Clone)]
pub struct Identity {
    pub cert: CertificateDer<'static>,
    key: Vec<u8>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({})", self.fingerprint())
    }
}

impl Identity {
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.cert)
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone()))
    }

    /// A fresh self-signed identity.
    pub fn generate() -> Result<Identity, String> {
        let ck = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])
            .map_err(|e| format!("cannot generate a certificate: {e}"))?;
        Ok(Identity {
            cert: ck.cert.der().clone(),
            key: ck.signing_key.serialize_der(),
        })
    }

    pub fn paths(state_dir: &Path) -> (PathBuf, PathBuf) {
        (state_dir.join(CERT_FILE), state_dir.join(KEY_FILE))
    }

    /// Loads the identity of `state_dir`.
    pub fn load(state_dir: &Path) -> Result<Identity, String> {
        let (c, k) = Identity::paths(state_dir);
        let cert = std::fs::read(&c).map_err(|e| {
            format!(
                "cannot read {}: {e} (run `replicafs keygen --state-dir {}` first)",
                c.display(),
                state_dir.display()
            )
        })?;
        let key = std::fs::read(&k).map_err(|e| format!("cannot read {}: {e}", k.display()))?;
        Ok(Identity {
            cert: CertificateDer::from(cert),
            key,
        })
    }

    /// Writes the identity into `state_dir` (mode 0600, the dir 0700), refusing to
    /// overwrite an existing one unless `force`.
    pub fn save(&self, state_dir: &Path, force: bool) -> Result<(), String> {
        use std::io::Write;
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        crate::mount::create_private_dir(state_dir)
            .map_err(|e| format!("cannot create {}: {e}", state_dir.display()))?;
        let (c, k) = Identity::paths(state_dir);
        if !force && (c.exists() || k.exists()) {
            return Err(format!(
                "{} already holds a node identity (fingerprint {}); pass --force to replace it",
                state_dir.display(),
                Identity::load(state_dir)
                    .map(|i| i.fingerprint().to_string())
                    .unwrap_or_else(|_| "unreadable".into())
            ));
        }
        let write = |path: &Path, bytes: &[u8], mode: u32| -> Result<(), String> {
            let tmp = path.with_extension("tmp");
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(&tmp)
                .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
            // A leftover temp file keeps its old mode through open: set it.
            f.set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
            f.write_all(bytes)
                .and_then(|_| f.sync_all())
                .and_then(|_| std::fs::rename(&tmp, path))
                .map_err(|e| format!("cannot write {}: {e}", path.display()))
        };
        write(&k, &self.key, 0o600)?;
        // The state dir is private, the certificate too (its fingerprint is
        // what peers are given).
        write(&c, &self.cert, 0o600)?;
        std::fs::File::open(state_dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| format!("cannot sync {}: {e}", state_dir.display()))
    }

    /// Loads the identity, generating and saving one if the state dir has none.
    pub fn load_or_generate(state_dir: &Path) -> Result<Identity, String> {
        let (c, _) = Identity::paths(state_dir);
        if c.exists() {
            return Identity::load(state_dir);
        }
        let id = Identity::generate()?;
        id.save(state_dir, false)?;
        Ok(id)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts exactly the pinned fingerprints, and verifies handshake signatures.
#[derive(Debug)]
struct Pinned {
    trusted: Vec<Fingerprint>,
    algs: WebPkiSupportedAlgorithms,
    role: &'static str,
}

impl Pinned {
    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let fp = Fingerprint::of(cert);
        if self.trusted.contains(&fp) {
            Ok(())
        } else {
            warn!(
                peer_fingerprint = %fp,
                "refusing {}: certificate fingerprint is not pinned", self.role
            );
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|_| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|_| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(std::time::Duration::from_secs(10)).expect("10 s fits"),
    ));
    t.keep_alive_interval(Some(std::time::Duration::from_secs(2)));
    t.stream_receive_window(quinn::VarInt::from_u32(16 << 20));
    t.receive_window(quinn::VarInt::from_u32(32 << 20));
    t.send_window(32 << 20);
    Arc::new(t)
}

/// The replica's QUIC server config: client certificates required and pinned.
pub fn server_config(
    id: &Identity,
    trusted: Vec<Fingerprint>,
) -> Result<quinn::ServerConfig, String> {
    let prov = provider();
    let verifier = Arc::new(Pinned {
        trusted,
        algs: prov.signature_verification_algorithms,
        role: "primary",
    });
    let mut tls = rustls::ServerConfig::builder_with_provider(prov)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![id.cert.clone()], id.key())
        .map_err(|e| format!("bad node key: {e}"))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| format!("TLS config unusable for QUIC: {e}"))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(transport_config());
    Ok(cfg)
}

/// The primary's QUIC client config for one peer: its certificate pinned.
pub fn client_config(id: &Identity, peer: Fingerprint) -> Result<quinn::ClientConfig, String> {
    let prov = provider();
    let verifier = Arc::new(Pinned {
        trusted: vec![peer],
        algs: prov.signature_verification_algorithms,
        role: "replica",
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(prov)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![id.cert.clone()], id.key())
        .map_err(|e| format!("bad node key: {e}"))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| format!("TLS config unusable for QUIC: {e}"))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(transport_config());
    Ok(cfg)
}

/// The fingerprint of a connection's peer certificate.
pub fn peer_fingerprint(conn: &quinn::Connection) -> Option<Fingerprint> {
    let any = conn.peer_identity()?;
    let certs = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certs.first().map(|c| Fingerprint::of(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_and_print() {
        let id = Identity::generate().unwrap();
        let fp = id.fingerprint();
        assert_eq!(Fingerprint::parse(&fp.to_string()).unwrap(), fp);
        assert_eq!(
            Fingerprint::parse(&fp.to_string().to_uppercase()).unwrap(),
            fp
        );
        assert!(Fingerprint::parse("abc").is_err());
        assert!(Fingerprint::parse(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn identity_saves_and_loads() {
        let d = tempfile::tempdir().unwrap();
        let id = Identity::generate().unwrap();
        id.save(d.path(), false).unwrap();
        assert!(id.save(d.path(), false).is_err());
        assert_eq!(
            Identity::load(d.path()).unwrap().fingerprint(),
            id.fingerprint()
        );
    }
}
