//! Errors of the image layer.
//!
//! One variant per way an operation fails, each naming the thing (file,
//! offset, field, limit). [`Error::kind`] is the small classification callers
//! branch on, and [`Error::errno`] the one place that maps errors to the errno
//! values that NBD replies and exit codes are built from.

use std::io;
use std::path::PathBuf;

/// What a caller can branch on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The file or device could not be read or written.
    Io,
    /// No space left on the device holding the image.
    NoSpace,
    /// The named thing does not exist.
    NotFound,
    /// The request or an option is invalid (bad size, bad name ...).
    InvalidInput,
    /// The image is not valid for its format (hostile or damaged).
    InvalidImage,
    /// The image uses a feature diskstream does not handle.
    Unsupported,
    /// The image is marked corrupt or metadata is inconsistent.
    Corrupt,
    /// A write to something opened read-only.
    ReadOnly,
    /// A request outside the device.
    OutOfRange,
    /// Another process holds a conflicting lock.
    Locked,
    /// The backing chain is missing, loops or is too deep.
    Backing,
    /// A remote backing is not answering (an outage that outlasted the
    /// reconnect window). Unlike `Io` it is expected to pass: a stream job
    /// pauses and retries rather than failing.
    Unavailable,
    /// A bug: an invariant of diskstream itself did not hold.
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {op}: {source}", path = .path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {message}", path = .path.display())]
    NotFound { path: PathBuf, message: String },
    #[error("{0}")]
    InvalidInput(String),
    #[error("{path}: invalid {format} image: {message}", path = .path.display())]
    InvalidImage {
        path: PathBuf,
        format: &'static str,
        message: String,
    },
    #[error("{path}: unsupported {format} feature: {feature}", path = .path.display())]
    Unsupported {
        path: PathBuf,
        format: &'static str,
        feature: String,
    },
    #[error("{path}: corrupt image: {message}", path = .path.display())]
    Corrupt { path: PathBuf, message: String },
    #[error("{name}: device is read-only")]
    ReadOnly { name: String },
    #[error("request at offset {offset} length {len} is beyond the device size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("{path}: {message}", path = .path.display())]
    Locked { path: PathBuf, message: String },
    #[error("{path}: backing file {backing}: {message}", path = .path.display())]
    Backing {
        path: PathBuf,
        backing: String,
        message: String,
    },
    #[error("{0}")]
    Remote(String),
    /// See [`ErrorKind::Unavailable`].
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// An I/O error on `path` while doing `op`.
    pub fn io(path: impl Into<PathBuf>, op: &'static str, source: io::Error) -> Self {
        Error::Io {
            path: path.into(),
            op,
            source,
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            // A storage layer over the network (a qcow2 file read over HTTP)
            // past its retry window: the outage, not a failed read.
            Error::Io { source, .. }
                if source.get_ref().is_some_and(|e| e.is::<UnavailableIo>()) =>
            {
                ErrorKind::Unavailable
            }
            // StorageFull without an errno: an ENOSPC reply of an NBD peer.
            Error::Io { source, .. }
                if source.raw_os_error() == Some(libc::ENOSPC)
                    || source.kind() == io::ErrorKind::StorageFull =>
            {
                ErrorKind::NoSpace
            }
            Error::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                ErrorKind::NotFound
            }
            Error::Io { .. } | Error::Remote(_) => ErrorKind::Io,
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::InvalidInput(_) => ErrorKind::InvalidInput,
            Error::InvalidImage { .. } => ErrorKind::InvalidImage,
            Error::Unsupported { .. } => ErrorKind::Unsupported,
            Error::Corrupt { .. } => ErrorKind::Corrupt,
            Error::ReadOnly { .. } => ErrorKind::ReadOnly,
            Error::OutOfRange { .. } => ErrorKind::OutOfRange,
            Error::Locked { .. } => ErrorKind::Locked,
            Error::Backing { .. } => ErrorKind::Backing,
            Error::Unavailable(_) => ErrorKind::Unavailable,
            Error::Internal(_) => ErrorKind::Internal,
        }
    }

    /// The errno a wire protocol reports for this error (the one mapping).
    pub fn errno(&self) -> i32 {
        match self.kind() {
            ErrorKind::NoSpace => libc::ENOSPC,
            ErrorKind::ReadOnly => libc::EPERM,
            ErrorKind::OutOfRange | ErrorKind::InvalidInput => libc::EINVAL,
            ErrorKind::Unsupported => libc::ENOTSUP,
            ErrorKind::NotFound
            | ErrorKind::Io
            | ErrorKind::InvalidImage
            | ErrorKind::Corrupt
            | ErrorKind::Locked
            | ErrorKind::Backing
            | ErrorKind::Unavailable
            | ErrorKind::Internal => libc::EIO,
        }
    }
}

/// The [`io::Error`] a [`Storage`](crate::storage::Storage) over the network
/// returns when its remote stopped answering for longer than its window:
/// storage errors reach callers as [`Error::Io`], and this one makes its
/// [`Error::kind`] [`ErrorKind::Unavailable`], so a format engine running
/// over a remote file follows the outage policy like a remote device does.
pub fn unavailable_io(message: String) -> io::Error {
    io::Error::other(UnavailableIo(message))
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UnavailableIo(String);

pub type Result<T, E = Error> = std::result::Result<T, E>;
