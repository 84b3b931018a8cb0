//! Image locking compatible with QEMU's `file-posix` OFD byte-range locks.
//!
//! QEMU (`block/file-posix.c`) expresses "who may do what with this file" as
//! single-byte open-file-description locks: for every permission a user
//! *holds* it read-locks byte `RAW_LOCK_PERM_BASE + bit`, and for every
//! permission it does *not share* with others it read-locks byte
//! `RAW_LOCK_SHARED_BASE + bit`. Before taking a permission it tests (with
//! `F_OFD_GETLK` for a write lock) whether anybody else holds the matching
//! "not shared" byte, and before refusing to share one whether anybody holds
//! the matching "held" byte. diskstream takes exactly the bytes QEMU takes
//! for the same role, so QEMU and diskstream see each other's opens:
//!
//! | role | held | not shared |
//! |---|---|---|
//! | qcow2 read-write | read, write, resize | write, resize |
//! | qcow2 read-only, any backing | read | write, resize |
//! | raw read-write (like a guest disk, `share-rw=off`) | read, write | write, resize |
//! | raw read-only top image | read | — |
//! | `-U` / force-share | read | — |
//!
//! The one decision to know: locks are taken first and checked second (as
//! QEMU does), so two processes racing for the same image cannot both win;
//! on a conflict every byte this open took is released again. OFD locks
//! belong to the open file description, so they go away with the file.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::storage::Storage;
use crate::{Error, Result};

/// Byte of the first "permission held" lock (`RAW_LOCK_PERM_BASE` in QEMU).
pub const RAW_LOCK_PERM_BASE: u64 = 100;
/// Byte of the first "permission not shared" lock (`RAW_LOCK_SHARED_BASE`).
pub const RAW_LOCK_SHARED_BASE: u64 = 200;

/// QEMU's `BLK_PERM_*` bits (include/block/block-common.h), in bit order.
pub const PERM_CONSISTENT_READ: u32 = 1 << 0;
pub const PERM_WRITE: u32 = 1 << 1;
pub const PERM_WRITE_UNCHANGED: u32 = 1 << 2;
pub const PERM_RESIZE: u32 = 1 << 3;
pub const PERM_ALL: u32 = 0xf;

/// Names QEMU uses in its lock error messages (`bdrv_perm_names`).
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];

/// What the opener wants to do with the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The top image, read-only (`qemu-img info`, `map`, a convert source).
    Read,
    /// The top image, read-write.
    ReadWrite,
    /// A backing file below another image (QEMU's COW child role).
    Backing,
}

/// Permissions held and shared, as QEMU's `perm` / `shared_perm` masks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Perms {
    pub perm: u32,
    pub shared: u32,
}

/// The permissions QEMU's file node ends up with for a format node of this
/// kind opened this way. `metadata`: the format keeps metadata in the file
/// (qcow2), which QEMU never lets anyone else write or resize.
pub fn perms_for(metadata: bool, access: Access, force_share: bool) -> Perms {
    if force_share {
        return Perms {
            perm: PERM_CONSISTENT_READ,
            shared: PERM_ALL,
        };
    }
    let not_shared = PERM_WRITE | PERM_RESIZE;
    match (metadata, access) {
        (true, Access::ReadWrite) => Perms {
            perm: PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE,
            shared: PERM_ALL & !not_shared,
        },
        (false, Access::ReadWrite) => Perms {
            perm: PERM_CONSISTENT_READ | PERM_WRITE,
            shared: PERM_ALL & !not_shared,
        },
        (_, Access::Backing) | (true, Access::Read) => Perms {
            perm: PERM_CONSISTENT_READ,
            shared: PERM_ALL & !not_shared,
        },
        (false, Access::Read) => Perms {
            perm: PERM_CONSISTENT_READ,
            shared: PERM_ALL,
        },
    }
}

/// Takes the locks for a format node of this kind (`metadata`: qcow2) on
/// `storage`; a no-op for storage that is not a file.
pub fn apply(
    storage: &dyn Storage,
    metadata: bool,
    access: Access,
    force_share: bool,
) -> Result<()> {
    if force_share && access == Access::ReadWrite {
        return Err(Error::InvalidInput(format!(
            "{}: force-share can only be used with read-only images",
            storage.path().display()
        )));
    }
    let Some(file) = storage.file() else {
        return Ok(());
    };
    lock_file(
        file,
        storage.path(),
        perms_for(metadata, access, force_share),
    )
}

/// Takes the locks for `perms` on `file`, then checks for conflicts; on a
/// conflict (or an error) every lock byte of this open is released.
pub fn lock_file(file: &File, path: &Path, perms: Perms) -> Result<()> {
    let r = set_lock_bytes(file, path, perms).and_then(|()| check_lock_bytes(file, path, perms));
    if r.is_err() {
        let _ = set_lock_bytes(
            file,
            path,
            Perms {
                perm: 0,
                shared: PERM_ALL,
            },
        );
    }
    r
}

/// Locks what QEMU's `qemu-img create` locks before it truncates a file
/// (`raw_co_create`: write and resize held, resize not shared), so creating
/// over an image another process has open fails before anything is changed.
/// Returns the open file that holds the locks; drop it after the create.
/// `Ok(None)` when the file does not exist yet.
pub fn lock_for_create(path: &Path) -> Result<Option<File>> {
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, "open", e)),
    };
    lock_file(
        &file,
        path,
        Perms {
            perm: PERM_WRITE | PERM_RESIZE,
            shared: PERM_ALL & !PERM_RESIZE,
        },
    )?;
    Ok(Some(file))
}

fn flock(start: u64, ty: libc::c_short) -> libc::flock {
    // SAFETY: `flock` is plain old data; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start as libc::off_t;
    fl.l_len = 1;
    fl
}

fn fcntl_lock(file: &File, cmd: libc::c_int, fl: &mut libc::flock) -> std::io::Result<()> {
    // SAFETY: the fd is open for the lifetime of `file`, and `fl` is a valid,
    // exclusively borrowed `struct flock` as F_OFD_SETLK / F_OFD_GETLK expect.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), cmd, fl as *mut libc::flock) };
    if r == -1 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// QEMU's `raw_apply_lock_bytes`: read-lock the held and the unshared bytes,
/// unlock the rest.
fn set_lock_bytes(file: &File, path: &Path, perms: Perms) -> Result<()> {
    for bit in 0..PERM_NAMES.len() as u32 {
        for (base, want) in [
            (RAW_LOCK_PERM_BASE, perms.perm & (1 << bit) != 0),
            (RAW_LOCK_SHARED_BASE, perms.shared & (1 << bit) == 0),
        ] {
            let ty = if want { libc::F_RDLCK } else { libc::F_UNLCK };
            let mut fl = flock(base + bit as u64, ty as libc::c_short);
            if let Err(e) = fcntl_lock(file, libc::F_OFD_SETLK, &mut fl) {
                if want && matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) {
                    return Err(locked(path, bit, base == RAW_LOCK_SHARED_BASE));
                }
                return Err(Error::io(path, "lock", e));
            }
        }
    }
    Ok(())
}

/// QEMU's `raw_check_lock_bytes`: nobody else may refuse to share what we
/// hold, nor hold what we refuse to share.
fn check_lock_bytes(file: &File, path: &Path, perms: Perms) -> Result<()> {
    for bit in 0..PERM_NAMES.len() as u32 {
        if perms.perm & (1 << bit) != 0
            && held_by_other(file, path, RAW_LOCK_SHARED_BASE + bit as u64)?
        {
            return Err(locked(path, bit, false));
        }
        if perms.shared & (1 << bit) == 0
            && held_by_other(file, path, RAW_LOCK_PERM_BASE + bit as u64)?
        {
            return Err(locked(path, bit, true));
        }
    }
    Ok(())
}

/// Whether another open file description holds a lock on byte `at`.
fn held_by_other(file: &File, path: &Path, at: u64) -> Result<bool> {
    let mut fl = flock(at, libc::F_WRLCK as libc::c_short);
    fcntl_lock(file, libc::F_OFD_GETLK, &mut fl).map_err(|e| Error::io(path, "test lock", e))?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

fn locked(path: &Path, bit: u32, shared: bool) -> Error {
    Error::Locked {
        path: path.to_owned(),
        message: format!(
            "failed to get {}\"{}\" lock: is another process using the image?",
            if shared { "shared " } else { "" },
            PERM_NAMES[bit as usize]
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock_bytes(perms: Perms) -> (Vec<u64>, Vec<u64>) {
        let held = (0..4)
            .filter(|b| perms.perm & (1 << b) != 0)
            .map(|b| 100 + b)
            .collect();
        let unshared = (0..4)
            .filter(|b| perms.shared & (1 << b) == 0)
            .map(|b| 200 + b)
            .collect();
        (held, unshared)
    }

    #[test]
    fn qcow2_roles_take_the_bytes_qemu_takes() {
        // What /proc/locks shows for qemu-io / qemu-nbd on QEMU 10.0.
        assert_eq!(
            lock_bytes(perms_for(true, Access::ReadWrite, false)),
            (vec![100, 101, 103], vec![201, 203])
        );
        assert_eq!(
            lock_bytes(perms_for(true, Access::Read, false)),
            (vec![100], vec![201, 203])
        );
        assert_eq!(
            lock_bytes(perms_for(true, Access::Backing, false)),
            (vec![100], vec![201, 203])
        );
        assert_eq!(
            lock_bytes(perms_for(true, Access::Read, true)),
            (vec![100], vec![])
        );
    }

    #[test]
    fn raw_roles_take_the_bytes_qemu_takes() {
        assert_eq!(
            lock_bytes(perms_for(false, Access::Read, false)),
            (vec![100], vec![])
        );
        assert_eq!(
            lock_bytes(perms_for(false, Access::Backing, false)),
            (vec![100], vec![201, 203])
        );
        assert_eq!(
            lock_bytes(perms_for(false, Access::ReadWrite, false)),
            (vec![100, 101], vec![201, 203])
        );
    }

    #[test]
    fn a_second_writer_is_refused_and_releases_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, [0u8; 512]).unwrap();
        let a = File::options().read(true).write(true).open(&path).unwrap();
        let b = File::options().read(true).write(true).open(&path).unwrap();
        lock_file(&a, &path, perms_for(true, Access::ReadWrite, false)).unwrap();
        let e = lock_file(&b, &path, perms_for(true, Access::ReadWrite, false)).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Locked);
        assert!(e.to_string().contains("img"), "{e}");
        // Force-share reads still work; a plain reader does not.
        lock_file(&b, &path, perms_for(true, Access::Read, true)).unwrap();
        let c = File::open(&path).unwrap();
        assert!(lock_file(&c, &path, perms_for(true, Access::Read, false)).is_err());
        drop(a);
        lock_file(&c, &path, perms_for(true, Access::Read, false)).unwrap();
    }
}
