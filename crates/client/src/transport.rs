//! The cluster transport: a ractor_cluster node server on a TCP address, with the cookie, and
//! mutual TLS when `[tls]` is configured (every node and client presents a certificate the
//! cluster's CA signed; one without cannot open a session).
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use ractor::{Actor, ActorRef};
use ractor_cluster::node::NodeConnectionMode;
use ractor_cluster::{IncomingEncryptionMode, NodeServer, NodeServerMessage};
use ragfleet_config::TlsConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// Why the transport could not start.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The address cannot be listened on (taken, not local).
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// Address.
        addr: String,
        /// Cause.
        reason: String,
    },
    /// The node server actor could not start.
    #[error("cannot start the node server {name}: {reason}")]
    Spawn {
        /// Node name.
        name: String,
        /// Cause.
        reason: String,
    },
    /// A `[tls]` file is missing or not what it should be.
    #[error("tls: {field} ({path}): {reason}")]
    Tls {
        /// The `[tls]` key.
        field: &'static str,
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// The TLS side of the transport, loaded from `[tls]`: one acceptor for sessions peers open,
/// one connector for sessions this process opens.
#[derive(Clone)]
pub struct Tls {
    acceptor: tokio_rustls::TlsAcceptor,
    connector: tokio_rustls::TlsConnector,
    server_name: ServerName<'static>,
}

fn tls_err(field: &'static str, path: &Path, reason: impl ToString) -> TransportError {
    TransportError::Tls {
        field,
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

impl Tls {
    /// Loads the CA, the certificate and the key of `cfg`.
    pub fn load(cfg: &TlsConfig) -> Result<Tls, TransportError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let certs = |field, path: &Path| -> Result<Vec<CertificateDer<'static>>, TransportError> {
            let certs: Vec<_> = CertificateDer::pem_file_iter(path)
                .map_err(|e| tls_err(field, path, e))?
                .collect::<Result<_, _>>()
                .map_err(|e| tls_err(field, path, e))?;
            if certs.is_empty() {
                return Err(tls_err(field, path, "no certificate in the file"));
            }
            Ok(certs)
        };
        let ca = certs("tls.ca", &cfg.ca)?;
        let chain = certs("tls.cert", &cfg.cert)?;
        let key =
            PrivateKeyDer::from_pem_file(&cfg.key).map_err(|e| tls_err("tls.key", &cfg.key, e))?;
        let mut roots = rustls::RootCertStore::empty();
        for c in ca {
            roots.add(c).map_err(|e| tls_err("tls.ca", &cfg.ca, e))?;
        }
        let roots = Arc::new(roots);
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(|e| tls_err("tls.ca", &cfg.ca, e))?;
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_err("tls.cert", &cfg.cert, e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| tls_err("tls.key", &cfg.key, e))?;
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_err("tls.cert", &cfg.cert, e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| tls_err("tls.key", &cfg.key, e))?;
        let server_name = ServerName::try_from(cfg.server_name.clone())
            .map_err(|e| tls_err("tls.server_name", Path::new(""), e))?;
        Ok(Tls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
            server_name,
        })
    }

    /// `[tls]` of a cluster, loaded, or `None` without one.
    pub fn of(cfg: &ragfleet_config::ClusterConfig) -> Result<Option<Tls>, TransportError> {
        cfg.tls.as_ref().map(Tls::load).transpose()
    }
}

/// Starts the transport of node `name` on `addr` (TLS sessions only, with `tls`).
pub async fn start_server(
    name: &str,
    addr: SocketAddr,
    cookie: &str,
    tls: Option<&Tls>,
) -> Result<ActorRef<NodeServerMessage>, TransportError> {
    // bind once ourselves so that a taken port is a clear error, not a dead listener actor
    std::net::TcpListener::bind(addr).map_err(|e| TransportError::Listen {
        addr: addr.to_string(),
        reason: e.to_string(),
    })?;
    let encryption = tls.map(|t| IncomingEncryptionMode::Tls(t.acceptor.clone()));
    let server = NodeServer::new(
        addr.port(),
        cookie.to_string(),
        name.to_string(),
        addr.ip().to_string(),
        encryption,
        Some(NodeConnectionMode::Isolated),
    )
    .with_listen_addr(addr.ip());
    let (r, _) = Actor::spawn(None, server, ())
        .await
        .map_err(|e| TransportError::Spawn {
            name: name.to_string(),
            reason: e.to_string(),
        })?;
    Ok(r)
}

/// Opens a session from `server` to the node at `addr` (over TLS with `tls`).
pub async fn connect(
    server: &ActorRef<NodeServerMessage>,
    addr: &str,
    tls: Option<&Tls>,
) -> Result<(), String> {
    match tls {
        None => ractor_cluster::client_connect(server, addr)
            .await
            .map_err(|e| e.to_string()),
        Some(t) => ractor_cluster::client_connect_enc(
            server,
            addr,
            t.connector.clone(),
            t.server_name.clone(),
        )
        .await
        .map_err(|e| e.to_string()),
    }
}
