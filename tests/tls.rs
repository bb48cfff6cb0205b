//! Mutual TLS on the cluster transport: nodes form a cluster over TLS; a client with a
//! certificate the cluster's CA signed joins, one without `[tls]` or with a certificate of
//! another CA cannot; a missing certificate file is a clear error naming the key.
mod common;

use std::path::Path;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};

/// A CA, and a certificate it signs for `ragfleet`: (ca.pem, cert.pem, key.pem) in `dir`.
fn make_certs(dir: &Path, label: &str) -> (String, String, String) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{label} CA"));
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let mut params = CertificateParams::new(vec!["ragfleet".to_string()]).unwrap();
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let p = |name: &str, text: String| {
        let path = dir.join(format!("{label}-{name}"));
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    (
        p("ca.pem", ca.pem()),
        p("cert.pem", cert.pem()),
        p("key.pem", key.serialize_pem()),
    )
}

fn tls_section(ca: &str, cert: &str, key: &str) -> String {
    format!("[tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n")
}

#[test]
fn only_holders_of_a_certificate_the_ca_signed_join_a_tls_cluster() {
    let _g = serial();
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_certs(certs.path(), "cluster");
    let tls = tls_section(&ca, &cert, &key);
    // two nodes that must talk to each other over TLS (shards on both, replication 2)
    let c = Cluster::start(&[&["coordinator", "embedder", "shard"], &["shard"]], &tls);
    let p = c.corpus_path();
    let r = c.json(&["ingest", "--json", p.to_str().unwrap()]);
    assert!(r["documents"].as_u64().unwrap() > 10, "{r}");
    let r = c.retrieve("What causes ocean tides?");
    assert_eq!(top_doc(&r), "tides", "{r}");
    assert_eq!(answered(&r), 4, "{r}");
    assert!(c.alive("n2").unwrap_or(false), "n2 did not join over TLS");

    let config = std::fs::read_to_string(&c.config).unwrap();
    // the [tls] table is the file's last
    let base = config[..config.find("[tls]").expect("a [tls] table")].to_string();
    let with = |text: &str| {
        let path = c.dir.path().join(format!("client-{}.toml", rand_name()));
        std::fs::write(&path, text).unwrap();
        path
    };
    let try_status = |cfg: &Path| {
        let out = std::process::Command::new(bin())
            .args(["status", "--json", "--config"])
            .arg(cfg)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    // no [tls]: a plain TCP client cannot open a session (the cookie alone is not enough)
    let plain = with(&base);
    let (ok, err) = try_status(&plain);
    assert!(!ok, "a client without a certificate joined");
    assert!(err.contains("cannot reach the cluster"), "{err}");
    // a certificate another CA signed (trusting that CA) cannot join either
    let (oca, ocert, okey) = make_certs(certs.path(), "rogue");
    let rogue = with(&format!("{base}{}", tls_section(&oca, &ocert, &okey)));
    let (ok, err) = try_status(&rogue);
    assert!(!ok, "a client with a rogue certificate joined");
    assert!(err.contains("cannot reach the cluster"), "{err}");
    // a missing file is named
    let missing = with(&config.replace(&cert, "/nonexistent/cert.pem"));
    let (ok, err) = try_status(&missing);
    assert!(!ok);
    assert!(
        err.contains("tls.cert") && err.contains("/nonexistent/cert.pem"),
        "{err}"
    );
    // and the cluster still serves its own
    let r = c.retrieve("Why do volcanoes erupt?");
    assert_eq!(top_doc(&r), "volcano", "{r}");
}

fn rand_name() -> String {
    format!(
        "{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}
