//! Integer socket options, the one place the crate calls setsockopt and
//! getsockopt: the server's send buffer, the client's TCP keepalive.

use std::io;
use std::os::fd::AsRawFd;

/// Sets the `c_int` option `name` at `level` on socket `s`.
pub(crate) fn set(
    s: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `s` owns a valid socket for the whole call; the option value
    // points at a live c_int and its length is that of a c_int.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads the `c_int` option `name` at `level` of socket `s`.
#[cfg(test)]
pub(crate) fn get(
    s: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid socket, and `v`/`len` are live for the call.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r == 0 {
        Ok(v)
    } else {
        Err(io::Error::last_os_error())
    }
}
