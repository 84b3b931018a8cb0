//! Where `deploy`, `migrate receive` and `demo` get their data: the one
//! place that knows the kinds of source (a local image, an `nbd://` or
//! `nbd+unix://` export), and the one place that parses `--policy`.
//!
//! The decision to know: a source is opened once, here, into a
//! [`BlockDevice`], together with the backing name and format the overlay's
//! header will record (the name QEMU can open: an absolute path for a local
//! file, the URI itself for NBD). The overlay is then opened on that very
//! device, so nothing connects twice and the header never names something
//! other than what was read.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use image::open::{Opener, is_uri};
use image::{BlockDevice, OpenOptions};
use nbd::client::{ClientOptions, NbdClient, Target};

/// How a remote source behaves when it stops answering (DESIGN.md's
/// outage policy).
#[derive(Clone, Copy, Debug)]
pub struct SourceOptions {
    /// How long guest I/O to remote data waits for a lost source to come
    /// back; `None` = forever (the sensible choice during a migration).
    pub reconnect_window: Option<Duration>,
}

/// An opened source.
#[derive(Debug)]
pub struct Source {
    /// The backing name for the overlay header.
    pub name: String,
    /// The backing format for the overlay header.
    pub format: String,
    pub device: Arc<dyn BlockDevice>,
}

/// The opener for URI backings below a local source (and for images that
/// name a remote backing): NBD with this source's reconnect window, HTTP(S).
pub fn opener(opts: &SourceOptions) -> Arc<dyn Opener> {
    ::daemon::core::remote_opener_with(client_options(opts))
}

fn client_options(opts: &SourceOptions) -> ClientOptions {
    ClientOptions {
        reconnect_window: opts.reconnect_window,
        ..super::nbd_tls::client_options()
    }
}

/// Opens `spec` read-only: a local image path (its format probed unless
/// `format` names it, its own backing chain opened too), an NBD URI
/// (always raw) or an HTTP(S) URL (raw unless `format` says qcow2; read
/// with range requests).
pub async fn open_source(spec: &str, format: Option<&str>, opts: &SourceOptions) -> Result<Source> {
    if Target::is_nbd_uri(spec) {
        if let Some(f) = format.filter(|f| *f != "raw") {
            bail!("{spec}: an NBD export is a raw device; it cannot be read as {f}");
        }
        let client = NbdClient::connect_uri(spec, client_options(opts))
            .await
            .with_context(|| format!("{spec}: connect to the source"))?;
        return Ok(Source {
            name: spec.to_string(),
            format: "raw".into(),
            device: Arc::new(client),
        });
    }
    if http::is_http_url(spec) {
        let fmt = format.unwrap_or("raw");
        let oopts = OpenOptions {
            opener: Some(opener(opts)),
            ..OpenOptions::default()
        };
        let device = http::HttpOpener::default()
            .open_url(spec, Some(fmt), &oopts)
            .await
            .with_context(|| format!("{spec}: open the source"))?;
        return Ok(Source {
            name: spec.to_string(),
            format: fmt.to_string(),
            device,
        });
    }
    if is_uri(spec) {
        let scheme = spec.split("://").next().unwrap_or_default();
        bail!(
            "{spec}: '{scheme}' sources are not available in this build \
             (sources: a local image, nbd://HOST:PORT/EXPORT, nbd+unix:///EXPORT?socket=PATH, \
             http(s)://URL)"
        );
    }
    let path = Path::new(spec);
    let canonical =
        std::fs::canonicalize(path).with_context(|| format!("{spec}: the source image"))?;
    let oopts = OpenOptions {
        format: format.map(str::to_string),
        // The source may be served to others at the same time (qemu-nbd,
        // a running daemon): share it as a backing is shared.
        force_share: true,
        opener: Some(opener(opts)),
        ..OpenOptions::default()
    };
    let img = image::open(&canonical, &oopts)
        .await
        .map_err(|e| super::file_error(path, e))?;
    let format = img.format().format_name().to_string();
    Ok(Source {
        name: canonical.display().to_string(),
        format,
        device: img,
    })
}

/// A stream policy (`--policy`): the stream engine's policies.
pub type Policy = stream::policy::PolicyKind;

/// Parses `--policy`: the one place the workflows name policies.
pub fn parse_policy(s: &str) -> Result<Policy, String> {
    Policy::parse(s).ok_or_else(|| {
        format!(
            "unknown policy '{s}' (policies: {})",
            Policy::NAMES.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_names_parse_or_say_why_not() {
        assert_eq!(parse_policy("fixed"), Ok(Policy::Fixed));
        assert_eq!(parse_policy("adaptive"), Ok(Policy::Adaptive));
        assert_eq!(parse_policy("idle"), Ok(Policy::Idle));
        assert!(parse_policy("fast").unwrap_err().contains("unknown policy"));
    }
}
