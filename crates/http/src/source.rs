//! One remote file read through HTTP range requests.
//!
//! [`HttpSource::open`] asks `HEAD` for the size (`Content-Length`) and the
//! validators (`ETag`, `Last-Modified`), and refuses a server that does not
//! serve byte ranges. [`HttpSource::read`] sends one `GET` with a `Range`
//! header per request on a shared connection pool, so several requests are
//! in flight at once over reused connections.
//!
//! The decision a reader must know: **every range request is conditional**
//! (`If-Match` on a strong `ETag`, else `If-Unmodified-Since` on
//! `Last-Modified`), and every answer's validators and `Content-Range` total
//! are compared with the ones recorded at open. A file replaced on the server
//! — between two requests, or while the server was down and came back —
//! answers `412`, `416`, a `200` full body or a different `ETag`, and the read
//! fails with an error naming the change; no byte of the new version is
//! returned. Transient failures (connection refused or reset, timeouts, 5xx,
//! a short body) are retried with exponential backoff until the retry window
//! (counted from the first failure of that request) runs out; then the read
//! fails (EIO to an NBD client).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use image::identity::BackingIdentity;
use reqwest::StatusCode;
use reqwest::header::{self, HeaderMap};

/// How an [`HttpSource`] connects and retries.
#[derive(Clone, Debug)]
pub struct HttpOptions {
    /// Limit for establishing one connection (TCP and TLS).
    pub connect_timeout: Duration,
    /// Limit for one request, body included; past it the request is retried.
    pub request_timeout: Duration,
    /// How long one request keeps retrying transient failures, from its
    /// first failure; `None` = forever (as during a migration), zero = fail at
    /// once. The same outage rule as the NBD client's `reconnect_window`.
    pub retry_window: Option<Duration>,
    /// First and largest pause between retries (doubling in between).
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Idle connections kept per host for reuse.
    pub max_idle_connections: usize,
    /// Extra trusted roots (PEM), on top of the system's: a private CA.
    pub root_certificates_pem: Vec<Vec<u8>>,
    /// Accept any server certificate (QEMU's curl `sslverify: false`): for
    /// a test server, never for a repository whose content matters.
    pub accept_invalid_certs: bool,
    /// How long [`HttpSource::open`] retries transient failures; `None`
    /// takes `retry_window`. A daemon opening a node answers at once, as
    /// QEMU's curl driver does, instead of holding its command queue.
    pub open_retry_window: Option<Duration>,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            retry_window: Some(Duration::from_secs(60)),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            max_idle_connections: 16,
            root_certificates_pem: Vec::new(),
            accept_invalid_certs: false,
            open_retry_window: None,
        }
    }
}

/// Failures of HTTP range reads. Every message names the URL.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{url}: invalid URL: {message}")]
    InvalidUrl { url: String, message: String },
    #[error("{url}: cannot set up the HTTP client: {source}")]
    Client {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url}: server answered {status} to {request}")]
    Status {
        url: String,
        request: &'static str,
        status: StatusCode,
    },
    #[error(
        "{url}: the server does not support range requests ({detail}); diskstream \
         needs a server that answers 'Range: bytes=' with 206 Partial Content"
    )]
    NoRanges { url: String, detail: String },
    #[error("{url}: the server did not give the file size (no Content-Length in HEAD)")]
    NoSize { url: String },
    #[error("{0}")]
    Changed(String),
    #[error("{url}: {request}: no answer after {elapsed:?} of retries (last error: {last})")]
    Unavailable {
        url: String,
        request: String,
        elapsed: Duration,
        last: String,
    },
    #[error("{url}: {message}")]
    Protocol { url: String, message: String },
}

impl From<HttpError> for image::Error {
    fn from(e: HttpError) -> Self {
        match e {
            HttpError::InvalidUrl { .. } => image::Error::InvalidInput(e.to_string()),
            // Past the retry window: the outage policy's "unreachable", so a
            // stream job pauses and probes instead of failing (as for NBD).
            HttpError::Unavailable { .. } => image::Error::Unavailable(e.to_string()),
            other => image::Error::Remote(other.to_string()),
        }
    }
}

/// What one attempt of a request came to.
enum Attempt<T> {
    Done(T),
    /// Worth retrying: the message of what went wrong.
    Transient(String),
    Fatal(HttpError),
}

/// Counters for tests and statistics.
#[derive(Debug, Default)]
pub struct HttpStats {
    pub requests: AtomicU64,
    pub retries: AtomicU64,
    pub bytes: AtomicU64,
}

/// A remote file read by ranges. Cheap to share: clone an `Arc` of it.
#[derive(Debug)]
pub struct HttpSource {
    client: reqwest::Client,
    url: reqwest::Url,
    name: String,
    size: u64,
    identity: BackingIdentity,
    opts: HttpOptions,
    pub stats: HttpStats,
}

/// Whether `url` is a name this crate opens.
pub fn is_http_url(url: &str) -> bool {
    let l = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    l.starts_with("http://") || l.starts_with("https://")
}

impl HttpSource {
    /// Opens `url`: HEAD for size and validators, a check that ranges are
    /// served, and — when `expect` holds the identity recorded by an
    /// overlay — a check that the file is still that version.
    pub async fn open(
        url: &str,
        opts: HttpOptions,
        expect: Option<&BackingIdentity>,
    ) -> Result<Self, HttpError> {
        let parsed = reqwest::Url::parse(url).map_err(|e| HttpError::InvalidUrl {
            url: url.into(),
            message: e.to_string(),
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(HttpError::InvalidUrl {
                url: url.into(),
                message: "only http:// and https:// are supported".into(),
            });
        }
        let client = build_client(url, &opts)?;
        let mut src = HttpSource {
            client,
            url: parsed,
            name: url.to_string(),
            size: 0,
            identity: BackingIdentity::default(),
            opts,
            stats: HttpStats::default(),
        };
        let open_window = src.opts.open_retry_window.or(src.opts.retry_window);
        let (head, now) = src.head(open_window).await?;
        let ranges = head
            .get(header::ACCEPT_RANGES)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.trim().to_ascii_lowercase());
        match ranges.as_deref() {
            Some("bytes") => {}
            Some(other) => {
                return Err(HttpError::NoRanges {
                    url: src.name.clone(),
                    detail: format!("Accept-Ranges: {other}"),
                });
            }
            // Not advertised: some servers serve ranges anyway. Ask for one
            // byte and see.
            None => src.probe_ranges(open_window).await?,
        }
        if let Some(expect) = expect {
            expect
                .check(&src.name, &now)
                .map_err(|e| HttpError::Changed(e.to_string()))?;
        }
        src.size = now.size;
        src.identity = now;
        Ok(src)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The identity the file had at open (size, `ETag`, `Last-Modified`);
    /// every later read is checked against it.
    pub fn identity(&self) -> &BackingIdentity {
        &self.identity
    }

    /// HEAD with retries: the headers and the identity they describe.
    async fn head(
        &self,
        window: Option<Duration>,
    ) -> Result<(HeaderMap, BackingIdentity), HttpError> {
        self.retrying_within(window, "HEAD".into(), || async {
            let resp = match self.client.head(self.url.clone()).send().await {
                Ok(r) => r,
                Err(e) => return transport(e, &self.name),
            };
            let status = resp.status();
            if status.is_server_error() || retryable_status(status) {
                return Attempt::Transient(format!("HEAD answered {status}"));
            }
            if !status.is_success() {
                return Attempt::Fatal(HttpError::Status {
                    url: self.name.clone(),
                    request: "HEAD",
                    status,
                });
            }
            let h = resp.headers().clone();
            // HEAD has no body, so the length must come from the header
            // itself (reqwest's content_length() sizes the empty body).
            let Some(size) = h
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.trim().parse::<u64>().ok())
            else {
                return Attempt::Fatal(HttpError::NoSize {
                    url: self.name.clone(),
                });
            };
            let id = identity_of(&h, size);
            Attempt::Done((h, id))
        })
        .await
    }

    async fn probe_ranges(&self, window: Option<Duration>) -> Result<(), HttpError> {
        self.retrying_within(window, "GET Range: bytes=0-0".into(), || async {
            let resp = match self
                .client
                .get(self.url.clone())
                .header(header::RANGE, "bytes=0-0")
                .send()
                .await
            {
                Ok(r) => r,
                Err(e) => return transport(e, &self.name),
            };
            let status = resp.status();
            match status {
                StatusCode::PARTIAL_CONTENT => Attempt::Done(()),
                // An empty file has no byte 0 to serve.
                StatusCode::RANGE_NOT_SATISFIABLE => Attempt::Done(()),
                StatusCode::OK => Attempt::Fatal(HttpError::NoRanges {
                    url: self.name.clone(),
                    detail: "no Accept-Ranges: bytes, and a Range request was answered \
                             200 with the whole file"
                        .into(),
                }),
                s if s.is_server_error() || retryable_status(s) => {
                    Attempt::Transient(format!("GET answered {s}"))
                }
                s => Attempt::Fatal(HttpError::Status {
                    url: self.name.clone(),
                    request: "GET (range probe)",
                    status: s,
                }),
            }
        })
        .await
    }

    /// Reads `len` bytes at `offset`; the range must lie inside the file.
    pub async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, HttpError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let end = offset + len as u64; // exclusive
        if end > self.size {
            return Err(HttpError::Protocol {
                url: self.name.clone(),
                message: format!(
                    "read at {offset} length {len} is beyond the file size {}",
                    self.size
                ),
            });
        }
        let range = format!("bytes={offset}-{}", end - 1);
        let what = format!("GET Range: {range}");
        let data = self
            .retrying(what, || async {
                self.stats.requests.fetch_add(1, Ordering::Relaxed);
                let mut req = self
                    .client
                    .get(self.url.clone())
                    .header(header::RANGE, &range);
                req = match (&self.identity.etag, &self.identity.last_modified) {
                    (Some(tag), _) if !tag.starts_with("W/") => req.header(header::IF_MATCH, tag),
                    (_, Some(date)) => req.header(header::IF_UNMODIFIED_SINCE, date),
                    _ => req,
                };
                let resp = match req.send().await {
                    Ok(r) => r,
                    Err(e) => return transport(e, &self.name),
                };
                let status = resp.status();
                match status {
                    StatusCode::PARTIAL_CONTENT => {}
                    StatusCode::PRECONDITION_FAILED | StatusCode::RANGE_NOT_SATISFIABLE => {
                        return Attempt::Fatal(self.changed(None, status).await);
                    }
                    StatusCode::OK => {
                        let now = identity_of(resp.headers(), self.size);
                        drop(resp); // do not download the whole file
                        if !self.identity.changes(&now).is_empty() {
                            return Attempt::Fatal(self.changed(Some(now), status).await);
                        }
                        return Attempt::Fatal(HttpError::NoRanges {
                            url: self.name.clone(),
                            detail: format!(
                                "'Range: {range}' was answered 200 with the whole file"
                            ),
                        });
                    }
                    s if s.is_server_error() || retryable_status(s) => {
                        return Attempt::Transient(format!("GET answered {s}"));
                    }
                    s => {
                        return Attempt::Fatal(HttpError::Status {
                            url: self.name.clone(),
                            request: "GET",
                            status: s,
                        });
                    }
                }
                // A server that ignores the precondition still tells which
                // version it served: compare before using a byte of it.
                let h = resp.headers();
                let total = match parse_content_range(h) {
                    Some((a, b, total)) if a == offset && b + 1 == end => total,
                    other => {
                        return Attempt::Fatal(HttpError::Protocol {
                            url: self.name.clone(),
                            message: format!(
                                "asked for {range}, the server answered Content-Range {other:?}"
                            ),
                        });
                    }
                };
                let mut now = identity_of(h, total.unwrap_or(self.size));
                if now.etag.is_none() {
                    now.etag.clone_from(&self.identity.etag);
                }
                if now.last_modified.is_none() {
                    now.last_modified.clone_from(&self.identity.last_modified);
                }
                if !self.identity.changes(&now).is_empty() {
                    drop(resp);
                    return Attempt::Fatal(self.changed(Some(now), status).await);
                }
                match resp.bytes().await {
                    Ok(b) if b.len() == len => Attempt::Done(b),
                    Ok(b) => Attempt::Transient(format!("short body: {} of {len} bytes", b.len())),
                    Err(e) => transport(e, &self.name),
                }
            })
            .await?;
        self.stats.bytes.fetch_add(len as u64, Ordering::Relaxed);
        Ok(data.to_vec())
    }

    /// The error for a file that changed on the server, naming the change;
    /// asks HEAD for the new validators when the answer did not carry them.
    async fn changed(&self, now: Option<BackingIdentity>, status: StatusCode) -> HttpError {
        let now = match now {
            Some(n) => Some(n),
            None => self
                .head(self.opts.retry_window)
                .await
                .ok()
                .map(|(_, id)| id),
        };
        let changes = now
            .map(|n| self.identity.changes(&n))
            .filter(|c| !c.is_empty())
            .map(|c| c.join(", "))
            .unwrap_or_else(|| format!("the server answered {status} to a conditional request"));
        HttpError::Changed(format!(
            "backing {} changed: {changes}; refusing to read from it (the overlay was \
             created on another version of it)",
            self.name
        ))
    }

    /// Runs `attempt` until it is done, fails for good, or transient failures
    /// outlast the retry window.
    async fn retrying<T, F, Fut>(&self, what: String, attempt: F) -> Result<T, HttpError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Attempt<T>>,
    {
        self.retrying_within(self.opts.retry_window, what, attempt)
            .await
    }

    /// [`HttpSource::retrying`] with its own window.
    async fn retrying_within<T, F, Fut>(
        &self,
        window: Option<Duration>,
        what: String,
        mut attempt: F,
    ) -> Result<T, HttpError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Attempt<T>>,
    {
        let mut first_failure: Option<Instant> = None;
        let mut pause = self.opts.backoff_min;
        loop {
            match attempt().await {
                Attempt::Done(v) => return Ok(v),
                Attempt::Fatal(e) => return Err(e),
                Attempt::Transient(last) => {
                    let since = *first_failure.get_or_insert_with(Instant::now);
                    let elapsed = since.elapsed();
                    let left = match window {
                        None => Duration::MAX,
                        Some(w) => w.saturating_sub(elapsed),
                    };
                    if left.is_zero() {
                        return Err(HttpError::Unavailable {
                            url: self.name.clone(),
                            request: what,
                            elapsed,
                            last,
                        });
                    }
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(pause.min(left)).await;
                    pause = (pause * 2).min(self.opts.backoff_max);
                }
            }
        }
    }
}

fn build_client(url: &str, opts: &HttpOptions) -> Result<reqwest::Client, HttpError> {
    let client_err = |source| HttpError::Client {
        url: url.into(),
        source,
    };
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .connect_timeout(opts.connect_timeout)
        .timeout(opts.request_timeout)
        .pool_max_idle_per_host(opts.max_idle_connections)
        .tcp_nodelay(true)
        .danger_accept_invalid_certs(opts.accept_invalid_certs)
        .user_agent(concat!("diskstream/", env!("CARGO_PKG_VERSION")));
    for pem in &opts.root_certificates_pem {
        b = b.add_root_certificate(reqwest::Certificate::from_pem(pem).map_err(client_err)?);
    }
    b.build().map_err(client_err)
}

/// Transport failures are transient (refused, reset, timed out, cut short);
/// only a request that cannot even be built is not.
fn transport<T>(e: reqwest::Error, url: &str) -> Attempt<T> {
    let chain = error_chain(&e);
    // A certificate the client does not trust will not become trusted by
    // asking again: fail at once instead of retrying for the window.
    if e.is_builder() || e.is_redirect() || chain.contains("invalid peer certificate") {
        return Attempt::Fatal(HttpError::Protocol {
            url: url.into(),
            message: chain,
        });
    }
    Attempt::Transient(chain)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s += &format!(": {c}");
        cur = c.source();
    }
    s
}

/// Statuses other than 5xx worth retrying: timeouts and rate limits.
fn retryable_status(s: StatusCode) -> bool {
    s == StatusCode::REQUEST_TIMEOUT || s == StatusCode::TOO_MANY_REQUESTS
}

fn identity_of(h: &HeaderMap, size: u64) -> BackingIdentity {
    let text = |name| {
        h.get(name)
            .and_then(|v: &header::HeaderValue| v.to_str().ok())
            .map(str::to_string)
    };
    BackingIdentity {
        size,
        etag: text(header::ETAG),
        last_modified: text(header::LAST_MODIFIED),
        ..BackingIdentity::default()
    }
}

/// `Content-Range: bytes A-B/TOTAL` as `(A, B, Some(TOTAL))` (`None` for `*`).
fn parse_content_range(h: &HeaderMap) -> Option<(u64, u64, Option<u64>)> {
    let v = h.get(header::CONTENT_RANGE)?.to_str().ok()?;
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_parses_total_and_star() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_RANGE,
            "bytes 0-511/1048576".parse().unwrap(),
        );
        assert_eq!(parse_content_range(&h), Some((0, 511, Some(1048576))));
        h.insert(header::CONTENT_RANGE, "bytes 5-9/*".parse().unwrap());
        assert_eq!(parse_content_range(&h), Some((5, 9, None)));
        h.insert(header::CONTENT_RANGE, "items 5-9/10".parse().unwrap());
        assert_eq!(parse_content_range(&h), None);
    }

    #[test]
    fn http_urls_are_recognised_case_insensitively() {
        assert!(is_http_url("http://h/x"));
        assert!(is_http_url("HTTPS://h/x"));
        assert!(!is_http_url("nbd://h/x"));
        assert!(!is_http_url("/tmp/http://x"));
    }
}
