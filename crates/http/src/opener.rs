//! [`HttpOpener`]: opens `http://` and `https://` backing names for
//! [`image::open()`].
//!
//! A raw backing becomes an [`HttpDevice`]; any other format runs its engine
//! over [`HttpStorage`] (a qcow2 backing reads its own metadata through range
//! requests) and may have a backing of its own: a URI goes back through the
//! opener chain, a relative name is resolved against the image's URL, as
//! QEMU does for its curl driver.

use std::sync::Arc;

use async_trait::async_trait;
use image::identity::BackingIdentity;
use image::open::{BackingChoice, FormatKind, OpenOptions, Opener, is_uri, open_format};
use image::storage::Storage;
use image::{BlockDevice, Error, Image, Result};

use crate::device::{HttpDevice, HttpStorage};
use crate::source::{HttpOptions, HttpSource, is_http_url};

/// Opens HTTP(S) backings; `Ok(None)` for other names.
#[derive(Clone, Debug, Default)]
pub struct HttpOpener {
    pub options: HttpOptions,
}

impl HttpOpener {
    /// Opens `url` as an image of `format` (raw when `None`).
    pub async fn open_url(
        &self,
        url: &str,
        format: Option<&str>,
        opts: &OpenOptions,
    ) -> Result<Arc<dyn BlockDevice>> {
        let kind = FormatKind::parse(format.unwrap_or("raw"))?;
        let src = Arc::new(
            HttpSource::open(url, self.options.clone(), opts.expect_identity.as_ref()).await?,
        );
        if kind == FormatKind::Raw {
            return Ok(Arc::new(HttpDevice::new(src)));
        }
        Ok(self.open_image(src, kind, opts).await?)
    }

    /// Runs the `kind` engine over an open `source`, as an [`Image`] with
    /// its backing (from `opts.backing`; a name in the header goes through
    /// `opts.opener`, a relative one resolved against the URL). Unlike
    /// [`HttpOpener::open_url`], a raw file also becomes an `Image` (the raw
    /// engine over [`HttpStorage`]): what a daemon format node over an
    /// `http` protocol node needs. Must be called inside a tokio runtime.
    pub async fn open_image(
        &self,
        source: Arc<HttpSource>,
        kind: FormatKind,
        opts: &OpenOptions,
    ) -> Result<Arc<Image>> {
        let url = source.name().to_string();
        let url = url.as_str();
        let storage: Arc<dyn Storage> = Arc::new(HttpStorage::new(source));
        let fopts = OpenOptions {
            writable: false,
            ..opts.clone()
        };
        let fmt = open_format(storage, kind, &fopts).await?;
        let backing = match (&opts.backing, fmt.backing()) {
            (BackingChoice::None, _) | (BackingChoice::FromHeader, None) => None,
            (BackingChoice::Device(d), _) => Some(Arc::clone(d)),
            (BackingChoice::FromHeader, Some(spec)) => {
                let fail = |message: String| Error::Backing {
                    path: url.into(),
                    backing: spec.name.clone(),
                    message,
                };
                if opts.max_depth <= 1 {
                    return Err(fail(format!("backing chain deeper than {} images", {
                        image::open::MAX_CHAIN_DEPTH
                    })));
                }
                let Some(bfmt) = spec.format.as_deref() else {
                    return Err(fail(
                        "the image does not record the backing format; diskstream never \
                         probes a backing"
                            .into(),
                    ));
                };
                let name = if is_uri(&spec.name) {
                    spec.name.clone()
                } else {
                    reqwest::Url::parse(url)
                        .and_then(|u| u.join(&spec.name))
                        .map_err(|e| fail(format!("cannot resolve against {url}: {e}")))?
                        .to_string()
                };
                let bopts = OpenOptions {
                    max_depth: opts.max_depth - 1,
                    expect_identity: None,
                    ..opts.clone()
                };
                let dev = match &opts.opener {
                    Some(o) => o.open_backing(&name, Some(bfmt), &bopts).await,
                    None => self.open_backing(&name, Some(bfmt), &bopts).await,
                };
                match dev {
                    Ok(Some(d)) => Some(d),
                    Ok(None) => return Err(fail(format!("no opener for {name}"))),
                    Err(e) => return Err(fail(e.to_string())),
                }
            }
        };
        Ok(Arc::new(Image::new(fmt, backing)))
    }
}

#[async_trait]
impl Opener for HttpOpener {
    async fn open_backing(
        &self,
        name: &str,
        format: Option<&str>,
        opts: &OpenOptions,
    ) -> Result<Option<Arc<dyn BlockDevice>>> {
        if !is_http_url(name) {
            return Ok(None);
        }
        self.open_url(name, format, opts).await.map(Some)
    }

    /// The file's size (of the file, whatever its format), `ETag` and
    /// `Last-Modified`: what every later range request is conditional on.
    async fn identify(&self, name: &str, _format: Option<&str>) -> Result<Option<BackingIdentity>> {
        if !is_http_url(name) {
            return Ok(None);
        }
        let src = HttpSource::open(name, self.options.clone(), None).await?;
        Ok(Some(src.identity().clone()))
    }
}
