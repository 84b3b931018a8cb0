//! The NBD protocol for diskstream: [`codec`] (the wire format as pure
//! functions, shared by both sides), [`server`] (exports any
//! [`image::BlockDevice`] over Unix or TCP sockets) and [`client`] (an NBD
//! export seen as a [`image::BlockDevice`], with pipelining and reconnect).
//!
//! The one decision to know: the codec never does I/O and tells
//! "incomplete" from "invalid", so the connection code above it is only
//! buffering, and hostile input is rejected in one place.

pub mod client;
pub mod codec;
pub mod conn;
pub mod fuzzing;
pub mod server;
mod sockopt;
pub mod tls;
