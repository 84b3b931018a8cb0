//! Command arguments checked the way QEMU's QAPI input visitor checks them.
//!
//! A command takes what it needs with typed getters (each names the
//! parameter on a missing value or a wrong type), then calls
//! [`Args::finish`], which rejects whatever it did not take. So a command
//! with a bad argument fails before it changes anything.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use super::QmpError;

/// The arguments of one command (or one nested object of them).
#[derive(Debug)]
pub struct Args {
    map: Map<String, Value>,
    taken: BTreeSet<String>,
    /// "" at the top level, "cache." inside `cache`, ...
    prefix: String,
}

fn missing(name: &str) -> QmpError {
    QmpError::generic(format!("Parameter '{name}' is missing"))
}

fn bad_type(name: &str, expected: &str) -> QmpError {
    QmpError::generic(format!(
        "Invalid parameter type for '{name}', expected: {expected}"
    ))
}

impl Args {
    pub fn new(map: Map<String, Value>) -> Self {
        Args {
            map,
            taken: BTreeSet::new(),
            prefix: String::new(),
        }
    }

    /// The members of a nested object taken out with [`Args::opt_value`],
    /// named under `prefix` (`"file."`) in messages, as QAPI names them.
    pub fn nested(map: Map<String, Value>, prefix: &str) -> Self {
        Args {
            map,
            taken: BTreeSet::new(),
            prefix: prefix.to_string(),
        }
    }

    /// `key` as messages name it (`file.url`).
    pub(crate) fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn take(&mut self, key: &str) -> Option<&Value> {
        self.taken.insert(key.to_string());
        self.map.get(key)
    }

    /// An optional value of any type, taken as it is.
    pub fn opt_value(&mut self, key: &str) -> Option<Value> {
        self.take(key).cloned()
    }

    pub fn opt_str(&mut self, key: &str) -> Result<Option<String>, QmpError> {
        let name = self.full(key);
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(bad_type(&name, "string")),
        }
    }

    pub fn str(&mut self, key: &str) -> Result<String, QmpError> {
        let name = self.full(key);
        self.opt_str(key)?.ok_or_else(|| missing(&name))
    }

    pub fn opt_bool(&mut self, key: &str) -> Result<Option<bool>, QmpError> {
        let name = self.full(key);
        match self.take(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(bad_type(&name, "boolean")),
        }
    }

    /// A QAPI `int` (signed 64-bit).
    pub fn opt_i64(&mut self, key: &str) -> Result<Option<i64>, QmpError> {
        let name = self.full(key);
        match self.take(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_i64()
                .map(Some)
                .ok_or_else(|| bad_type(&name, "integer")),
            Some(_) => Err(bad_type(&name, "integer")),
        }
    }

    /// A QAPI `int` that must not be negative (QEMU: "Parameter 'x' expects
    /// a non-negative value" and similar).
    pub fn opt_u64(&mut self, key: &str) -> Result<Option<u64>, QmpError> {
        let name = self.full(key);
        match self.opt_i64(key)? {
            None => Ok(None),
            Some(v) if v < 0 => Err(QmpError::generic(format!(
                "Parameter '{name}' expects a non-negative value"
            ))),
            Some(v) => Ok(Some(v as u64)),
        }
    }

    pub fn u64(&mut self, key: &str) -> Result<u64, QmpError> {
        let name = self.full(key);
        self.opt_u64(key)?.ok_or_else(|| missing(&name))
    }

    /// A nested object, checked with its own [`Args`].
    pub fn opt_object(&mut self, key: &str) -> Result<Option<Args>, QmpError> {
        let name = self.full(key);
        match self.take(key) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(Args {
                map: m.clone(),
                taken: BTreeSet::new(),
                prefix: format!("{name}."),
            })),
            Some(_) => Err(bad_type(&name, "object")),
        }
    }

    /// A string out of `allowed` (a QAPI enum).
    pub fn opt_enum(&mut self, key: &str, allowed: &[&str]) -> Result<Option<String>, QmpError> {
        let name = self.full(key);
        match self.opt_str(key)? {
            None => Ok(None),
            Some(s) if allowed.contains(&s.as_str()) => Ok(Some(s)),
            Some(s) => Err(QmpError::generic(format!(
                "Parameter '{name}' does not accept value '{s}'"
            ))),
        }
    }

    /// Fails on the first argument nobody took.
    pub fn finish(self) -> Result<(), QmpError> {
        match self.map.keys().find(|k| !self.taken.contains(*k)) {
            Some(k) => Err(QmpError::generic(format!(
                "Parameter '{}{k}' is unexpected",
                self.prefix
            ))),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(v: Value) -> Args {
        Args::new(v.as_object().unwrap().clone())
    }

    #[test]
    fn missing_wrong_type_and_unexpected_are_named() {
        let mut a = args(json!({"speed": "fast", "extra": 1}));
        assert_eq!(
            a.str("device").unwrap_err().desc,
            "Parameter 'device' is missing"
        );
        assert_eq!(
            a.opt_u64("speed").unwrap_err().desc,
            "Invalid parameter type for 'speed', expected: integer"
        );
        assert_eq!(
            a.finish().unwrap_err().desc,
            "Parameter 'extra' is unexpected"
        );
    }

    #[test]
    fn nested_objects_prefix_their_names() {
        let mut a = args(json!({"cache": {"direct": 1, "bogus": true}}));
        let mut c = a.opt_object("cache").unwrap().unwrap();
        assert_eq!(
            c.opt_bool("direct").unwrap_err().desc,
            "Invalid parameter type for 'cache.direct', expected: boolean"
        );
        assert_eq!(
            c.finish().unwrap_err().desc,
            "Parameter 'cache.bogus' is unexpected"
        );
        a.finish().unwrap();
    }

    #[test]
    fn negative_and_enum_values_are_refused() {
        let mut a = args(json!({"speed": -1, "on-error": "explode"}));
        assert!(
            a.opt_u64("speed")
                .unwrap_err()
                .desc
                .contains("non-negative")
        );
        assert_eq!(
            a.opt_enum("on-error", &["report", "stop"])
                .unwrap_err()
                .desc,
            "Parameter 'on-error' does not accept value 'explode'"
        );
    }
}
