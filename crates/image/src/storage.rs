//! Positional, blocking storage under the format engines.
//!
//! Format engines (qcow2, raw) do their file I/O through [`Storage`], never
//! through a `File` directly, for two reasons: the cache mode (`writeback`
//! through the page cache, or `none` = `O_DIRECT` with aligned bounce buffers)
//! lives in one place, and tests can put a recording layer underneath that
//! logs every write and flush to replay power-loss states.
//!
//! Every method blocks; callers on the async runtime go through
//! `tokio::task::spawn_blocking`.

use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::iobuf::IoBuf;

/// Byte-addressed blocking storage.
#[allow(clippy::len_without_is_empty)] // a length, not a collection
pub trait Storage: Send + Sync + Debug {
    /// Reads `buf.len()` bytes at `offset`; bytes past the end read as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// [`Storage::read_at`] only if it cannot block: the bytes are in the
    /// page cache. `Ok(false)` means it would have to wait for the device
    /// (or the storage cannot tell), and `buf` holds nothing useful: call
    /// `read_at` from a blocking thread. This lets the async layer answer a
    /// cached read on the spot instead of paying two thread handoffs.
    fn read_at_nowait(&self, _buf: &mut [u8], _offset: u64) -> io::Result<bool> {
        Ok(false)
    }
    /// Writes all of `buf` at `offset`, growing the storage as needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable (fdatasync).
    fn flush(&self) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Deallocates a range so it reads as zeros. The default writes zeros.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        write_zeros(self, offset, len)
    }
    /// The first offset at or after `offset` that holds data, if any
    /// (`SEEK_DATA`). The default treats everything below `len()` as data.
    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        Ok((offset < self.len()?).then_some(offset))
    }
    /// The first offset at or after `offset` that is a hole (`SEEK_HOLE`);
    /// the end of the storage counts as a hole.
    fn next_hole(&self, offset: u64) -> io::Result<u64> {
        Ok(self.len()?.max(offset))
    }
    /// The path for messages and locks, when this is a file.
    fn path(&self) -> &Path;
    /// The open file, for OFD locks; `None` for storage that is not a file.
    fn file(&self) -> Option<&File> {
        None
    }
    /// Whether writes bypass the page cache (O_DIRECT): such writes run in
    /// parallel in the device, page-cache writes to one file do not.
    fn direct(&self) -> bool {
        false
    }
}

/// Writes `len` zero bytes at `offset` in chunks.
pub fn write_zeros<S: Storage + ?Sized>(s: &S, offset: u64, len: u64) -> io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(len) as usize];
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let n = (end - pos).min(CHUNK) as usize;
        s.write_at(&zeros[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

/// How a file is cached, as QEMU's `cache=` option.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// Through the page cache; flush calls fdatasync.
    #[default]
    Writeback,
    /// `O_DIRECT`: no page cache; flush still calls fdatasync.
    None,
}

impl std::str::FromStr for CacheMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "writeback" => Ok(CacheMode::Writeback),
            "none" => Ok(CacheMode::None),
            _ => Err(format!(
                "unknown cache mode '{s}' (expected writeback or none)"
            )),
        }
    }
}

/// O_DIRECT alignment for offsets, lengths and buffers. 4 KiB is safe on
/// every device with 512-byte or 4 KiB logical sectors.
const DIRECT_ALIGN: usize = crate::iobuf::IO_ALIGN;

/// A file on the local filesystem.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: PathBuf,
    direct: bool,
    /// Serialises O_DIRECT read-modify-write of partial blocks.
    rmw: Mutex<()>,
    /// Set when the kernel refuses `RWF_NOWAIT` reads: stop asking.
    no_nowait: AtomicBool,
}

impl FileStorage {
    /// Opens an existing file.
    pub fn open(path: &Path, writable: bool, cache: CacheMode) -> io::Result<Self> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(writable);
        Self::open_with(path, opts, cache)
    }

    /// Creates (or truncates) a file.
    pub fn create(path: &Path, cache: CacheMode) -> io::Result<Self> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(true).create(true).truncate(true);
        Self::open_with(path, opts, cache)
    }

    fn open_with(path: &Path, mut opts: OpenOptions, cache: CacheMode) -> io::Result<Self> {
        let direct = cache == CacheMode::None;
        if direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(path)?;
        Ok(FileStorage {
            file,
            path: path.to_owned(),
            direct,
            rmw: Mutex::new(()),
            no_nowait: AtomicBool::new(false),
        })
    }

    fn aligned(offset: u64, len: usize) -> bool {
        offset.is_multiple_of(DIRECT_ALIGN as u64) && len.is_multiple_of(DIRECT_ALIGN)
    }

    fn read_exact_zero_fill(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if !self.direct
            || (Self::aligned(offset, buf.len())
                && (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN))
        {
            return self.read_exact_zero_fill(buf, offset);
        }
        let start = offset - offset % DIRECT_ALIGN as u64;
        let end = (offset + buf.len() as u64).next_multiple_of(DIRECT_ALIGN as u64);
        let skip = (offset - start) as usize;
        let mut bounce = IoBuf::take((end - start) as usize);
        self.read_exact_zero_fill(&mut bounce, start)?;
        buf.copy_from_slice(&bounce[skip..skip + buf.len()]);
        Ok(())
    }

    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        // O_DIRECT reads always go to the device.
        if self.direct || self.no_nowait.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let mut done = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            let iov = libc::iovec {
                iov_base: rest.as_mut_ptr().cast(),
                iov_len: rest.len(),
            };
            // SAFETY: one iovec over a live, exclusively borrowed buffer of
            // iov_len bytes, on an owned, open descriptor.
            let n = unsafe {
                libc::preadv2(
                    self.file.as_raw_fd(),
                    &iov,
                    1,
                    (offset + done as u64) as libc::off_t,
                    libc::RWF_NOWAIT,
                )
            };
            match n {
                0 => {
                    rest.fill(0);
                    return Ok(true);
                }
                n if n > 0 => done += n as usize,
                _ => {
                    let e = io::Error::last_os_error();
                    return match e.raw_os_error() {
                        Some(libc::EAGAIN) => Ok(false),
                        Some(libc::EINTR) => continue,
                        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOSYS) => {
                            self.no_nowait.store(true, Ordering::Relaxed);
                            Ok(false)
                        }
                        _ => Err(e),
                    };
                }
            }
        }
        Ok(true)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if !self.direct
            || (Self::aligned(offset, buf.len())
                && (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN))
        {
            return self.file.write_all_at(buf, offset);
        }
        let start = offset - offset % DIRECT_ALIGN as u64;
        let end = (offset + buf.len() as u64).next_multiple_of(DIRECT_ALIGN as u64);
        let skip = (offset - start) as usize;
        let partial = !Self::aligned(offset, buf.len());
        // A partial block is read, patched and written back; two such
        // read-modify-writes of one block must not interleave.
        let _guard = partial.then(|| self.rmw.lock().unwrap_or_else(|e| e.into_inner()));
        let old_len = self.file.metadata()?.len();
        // Pooled: no mmap and page faults per request.
        let mut bounce = IoBuf::take((end - start) as usize);
        if partial {
            // Only the first and the last block can be partial.
            for block in [start, end - DIRECT_ALIGN as u64] {
                let b = (block - start) as usize;
                if block < old_len {
                    self.read_exact_zero_fill(&mut bounce[b..b + DIRECT_ALIGN], block)?;
                } else {
                    bounce[b..b + DIRECT_ALIGN].fill(0);
                }
            }
        }
        bounce[skip..skip + buf.len()].copy_from_slice(buf);
        self.file.write_all_at(&bounce, start)?;
        let new_end = offset + buf.len() as u64;
        if end > old_len.max(new_end) {
            // The padding grew the file past what was asked: trim it back.
            self.file.set_len(old_len.max(new_end))?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        // SAFETY: fallocate on an owned, open descriptor with plain integers.
        let r = unsafe {
            libc::fallocate(
                fd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => write_zeros(self, offset, len),
            _ => Err(err),
        }
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        seek(&self.file, offset, libc::SEEK_DATA)
    }

    fn next_hole(&self, offset: u64) -> io::Result<u64> {
        Ok(seek(&self.file, offset, libc::SEEK_HOLE)?.unwrap_or(offset.max(self.len()?)))
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn file(&self) -> Option<&File> {
        Some(&self.file)
    }

    fn direct(&self) -> bool {
        self.direct
    }
}

/// `lseek` with `SEEK_DATA` / `SEEK_HOLE`; `None` when past the end (ENXIO).
fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    // SAFETY: lseek on an owned, open descriptor. The file position it moves
    // is never used: all I/O here is positional.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENXIO) {
        return Ok(None);
    }
    Err(err)
}

/// Storage in memory, for tests and the power-loss recorder.
#[derive(Debug, Default)]
pub struct MemStorage {
    data: Mutex<Vec<u8>>,
    path: PathBuf,
}

impl MemStorage {
    pub fn new(name: &str) -> Self {
        MemStorage {
            data: Mutex::new(Vec::new()),
            path: PathBuf::from(name),
        }
    }
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Self {
        MemStorage {
            data: Mutex::new(bytes),
            path: PathBuf::from(name),
        }
    }
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let data = self.data.lock().unwrap_or_else(|e| e.into_inner());
        buf.fill(0);
        if let Ok(off) = usize::try_from(offset)
            && off < data.len()
        {
            let n = buf.len().min(data.len() - off);
            buf[..n].copy_from_slice(&data[off..off + n]);
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut data = self.data.lock().unwrap_or_else(|e| e.into_inner());
        let off =
            usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let end = off + buf.len();
        if data.len() < end {
            data.resize(end, 0);
        }
        data[off..end].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.data.lock().unwrap_or_else(|e| e.into_inner()).len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        self.data
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .resize(len, 0);
        Ok(())
    }
    fn path(&self) -> &Path {
        &self.path
    }
}
