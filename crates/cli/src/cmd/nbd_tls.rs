//! TLS for the NBD connections a command makes as a client (backings named
//! `nbd://...` in an image header, `--from` sources), chosen on the command
//! line with the global `--nbd-tls-ca` / `--nbd-tls-hostname`, as QEMU
//! chooses it with a `tls-creds-x509` object (`endpoint=client`) and the
//! nbd driver's `tls-creds` / `tls-hostname`: a URI never says TLS (QEMU has
//! no `nbds://` scheme), so the backing name in a header stays one QEMU
//! opens.
//!
//! Set once in `main` before any command runs; every NBD client of the
//! process then negotiates STARTTLS and refuses a server that does not.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::Context;
use nbd::client::ClientOptions;
use nbd::tls::ClientTls;

static TLS: OnceLock<ClientTls> = OnceLock::new();

/// Turns TLS on for every NBD client of this process: the server's
/// certificate must chain to a CA in `ca` (PEM) and carry `hostname`
/// (default: the host of the URI connected to, "localhost" for a Unix
/// socket).
pub fn init(ca: &Path, hostname: Option<&str>) -> anyhow::Result<()> {
    let tls = ClientTls::new(ca, hostname.unwrap_or(""))
        .with_context(|| format!("--nbd-tls-ca {}", ca.display()))?;
    // Called once, from main.
    let _ = TLS.set(tls);
    Ok(())
}

/// The client options every NBD connection of a command starts from: the
/// library's defaults, with TLS when the command line asked for it.
pub fn client_options() -> ClientOptions {
    ClientOptions {
        tls: TLS.get().cloned(),
        ..ClientOptions::default()
    }
}
