//! QMP error classes and the error a command returns.
//!
//! The classes are QEMU's (`qapi/error.json`): almost everything is
//! `GenericError` with a message naming the thing; the few special classes
//! are used exactly where QEMU uses them.

use serde_json::{Value, json};

/// QEMU's `QapiErrorClass`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotActive,
    DeviceNotFound,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "GenericError" => ErrorClass::GenericError,
            "CommandNotFound" => ErrorClass::CommandNotFound,
            "DeviceNotActive" => ErrorClass::DeviceNotActive,
            "DeviceNotFound" => ErrorClass::DeviceNotFound,
            _ => return None,
        })
    }
}

/// A failed command: `{"error": {"class": ..., "desc": ...}}`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{desc} ({class})", class = .class.as_str())]
pub struct QmpError {
    pub class: ErrorClass,
    pub desc: String,
}

impl QmpError {
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        QmpError {
            class,
            desc: desc.into(),
        }
    }

    /// The `error` member of a reply.
    pub fn to_json(&self) -> Value {
        json!({"class": self.class.as_str(), "desc": self.desc})
    }
}

/// The one mapping from image-layer errors to QMP errors. QEMU reports I/O
/// and format errors of `blockdev-add` and jobs as `GenericError` with the
/// message; so does this.
impl From<image::Error> for QmpError {
    fn from(e: image::Error) -> Self {
        QmpError::generic(e.to_string())
    }
}

impl From<stream::StreamError> for QmpError {
    fn from(e: stream::StreamError) -> Self {
        QmpError::generic(e.to_string())
    }
}
