//! Image locking compatible with QEMU's `file-posix` OFD byte-range locks.
//! Placeholder: being written.

use crate::Result;
use crate::storage::Storage;

/// What the opener wants to do with the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    ReadWrite,
}

/// Takes the locks for `access` on `storage` (no-op for non-file storage).
pub fn apply(_storage: &dyn Storage, _access: Access, _force_share: bool) -> Result<()> {
    Ok(())
}
