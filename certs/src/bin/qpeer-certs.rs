//! `qpeer-certs`: identities and development certificates for testing qpeer.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use qpeer_certs::ca::{self, IssueRequest};
use qpeer_certs::{resolve_home, Identity};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// Identities and self-signed / dev-CA certificates for qpeer.
///
/// A qpeer NodeId is the Ed25519 public key kept in a home directory's identity.key.
/// The dev CA is for testing trackers that present CA-issued certificates
/// (`qpeer-tracker --cert/--key`, `qpeer --tracker-ca`); its keys are stored unencrypted.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the NodeId of a home's identity, creating the identity if it does not exist.
    Id {
        /// Home directory (default: $QPEER_HOME, else ~/.local/share/qpeer).
        #[arg(long, env = "QPEER_HOME")]
        home: Option<PathBuf>,
    },
    /// Create a development CA: DIR/ca.pem and DIR/ca.key (never overwrites).
    Ca {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: i64,
    },
    /// Issue a tracker certificate signed by a dev CA: DIR/cert.pem and DIR/key.pem.
    Issue {
        /// Directory holding ca.pem and ca.key.
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// DNS name the certificate is valid for (repeatable).
        #[arg(long = "name", value_name = "HOST")]
        names: Vec<String>,
        /// IP address the certificate is valid for (repeatable).
        #[arg(long = "ip", value_name = "IP")]
        ips: Vec<IpAddr>,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 90)]
        days: i64,
    },
    /// Show a PEM certificate (subject, key type, validity, NodeId or fingerprint) or identity key.
    Show { file: PathBuf },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Id { home } => {
            let home = resolve_home(home.as_deref())?;
            let identity = Identity::load_or_create(&home)?;
            println!("{}", identity.node_id());
        }
        Command::Ca { out, days } => {
            let pair = ca::create_ca(&out, days)?;
            println!("CA certificate: {}", pair.cert.display());
            println!("CA key:         {}", pair.key.display());
        }
        Command::Issue { ca: ca_dir, names, ips, out, days } => {
            if names.is_empty() && ips.is_empty() {
                bail!("give at least one --name HOST or --ip IP for the certificate");
            }
            let pair = ca::issue_to_dir(&ca_dir, &IssueRequest::new(names, ips, days), &out)?;
            println!("certificate: {}", pair.cert.display());
            println!("key:         {}", pair.key.display());
        }
        Command::Show { file } => show(&file)?,
    }
    Ok(())
}

fn show(file: &std::path::Path) -> Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    if text.contains("PRIVATE KEY") {
        let identity = Identity::load(file)?;
        println!("file:     {}", file.display());
        println!("kind:     identity key");
        println!("key type: Ed25519");
        println!("node id:  {}", identity.node_id());
        return Ok(());
    }
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} is not a PEM certificate file", file.display()))?;
    if certs.is_empty() {
        bail!("{} holds no PEM certificate", file.display());
    }
    for (index, cert) in certs.iter().enumerate() {
        let summary = ca::summarize(cert)?;
        if certs.len() > 1 {
            println!("certificate #{}", index + 1);
        }
        println!("subject:    {}", summary.subject);
        println!("issuer:     {}", summary.issuer);
        println!("key type:   {}", summary.key_type);
        println!("not before: {}", summary.not_before);
        println!("not after:  {}", summary.not_after);
        match summary.node_id {
            Some(id) => println!("node id:    {id}"),
            None => println!("sha256:     {}", summary.sha256),
        }
    }
    Ok(())
}
