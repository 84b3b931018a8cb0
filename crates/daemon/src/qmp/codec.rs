//! QMP framing with no I/O: decoding requests from a byte buffer and
//! encoding greetings, replies and events.
//!
//! QEMU reads a stream of JSON values, not lines; so does [`decode`], which
//! tells a message that is not complete yet ([`Decoded::Incomplete`]: read
//! more) from one that can never parse ([`Decoded::Invalid`]: reply with a
//! `GenericError` "JSON parse error, ..." and drop the bad bytes up to the
//! end of the line, so the connection stays usable). Output is one JSON
//! object per line ending in CRLF, as QEMU writes it.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};

use super::QmpError;

/// One command as the client sent it.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub execute: String,
    pub arguments: Map<String, Value>,
    /// Echoed in the reply, whatever JSON value it is.
    pub id: Option<Value>,
}

/// What [`decode`] found at the start of the buffer.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    /// Nothing but (possibly) whitespace, or a message cut short: read more.
    Incomplete,
    /// A well-formed request, and the bytes it used.
    Request(Request, usize),
    /// A JSON value that is not a valid QMP request: the error to reply
    /// with (the `id` if one could be found), and the bytes it used.
    BadRequest(QmpError, Option<Value>, usize),
    /// Bytes that are not JSON: the error and how many bytes to drop.
    Invalid(QmpError, usize),
}

/// Decodes the first message in `buf`.
pub fn decode(buf: &[u8]) -> Decoded {
    let start = buf
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(buf.len());
    if start == buf.len() {
        return Decoded::Incomplete;
    }
    let mut it = serde_json::Deserializer::from_slice(&buf[start..]).into_iter::<Value>();
    match it.next() {
        None => Decoded::Incomplete,
        Some(Ok(v)) => {
            let used = start + it.byte_offset();
            // A bare number at the very end may still be growing ("12" of "123").
            if v.is_number() && used == buf.len() {
                return Decoded::Incomplete;
            }
            match parse_request(v) {
                Ok(r) => Decoded::Request(r, used),
                Err((e, id)) => Decoded::BadRequest(e, id, used),
            }
        }
        Some(Err(e)) if e.is_eof() => Decoded::Incomplete,
        Some(Err(e)) => {
            // Drop the rest of the line holding the error.
            let err_at = start + error_offset(&buf[start..], e.line(), e.column());
            let drop = buf[err_at..]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(buf.len(), |p| err_at + p + 1);
            Decoded::Invalid(
                QmpError::generic(format!("JSON parse error, {}", strip_position(&e))),
                drop.max(start + 1),
            )
        }
    }
}

/// serde_json's message without its " at line L column C" suffix.
fn strip_position(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Byte offset of a 1-based line and column (serde_json's error position).
fn error_offset(buf: &[u8], line: usize, column: usize) -> usize {
    let mut off = 0;
    for _ in 1..line {
        match buf[off..].iter().position(|&b| b == b'\n') {
            Some(p) => off += p + 1,
            None => return buf.len(),
        }
    }
    (off + column.saturating_sub(1)).min(buf.len())
}

/// Checks the shape of a request as QEMU's `qmp_dispatch` does.
fn parse_request(v: Value) -> Result<Request, (QmpError, Option<Value>)> {
    let Value::Object(mut obj) = v else {
        return Err((QmpError::generic("QMP input must be a JSON object"), None));
    };
    let id = obj.remove("id");
    let fail = |m: String, id: &Option<Value>| Err((QmpError::generic(m), id.clone()));
    if obj.contains_key("exec-oob") {
        return fail(
            "QMP input member 'exec-oob' is not supported: out-of-band execution was not negotiated"
                .into(),
            &id,
        );
    }
    let execute = match obj.remove("execute") {
        None => return fail("QMP input lacks member 'execute'".into(), &id),
        Some(Value::String(s)) => s,
        Some(_) => return fail("QMP input member 'execute' must be a string".into(), &id),
    };
    let arguments = match obj.remove("arguments") {
        None => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => return fail("QMP input member 'arguments' must be an object".into(), &id),
    };
    if let Some(k) = obj.keys().next() {
        return fail(format!("QMP input member '{k}' is unexpected"), &id);
    }
    Ok(Request {
        execute,
        arguments,
        id,
    })
}

fn line(v: Value) -> Vec<u8> {
    let mut out = serde_json::to_vec(&v).expect("a JSON value always serializes");
    out.extend_from_slice(b"\r\n");
    out
}

/// The greeting sent when a client connects.
pub fn greeting(package: &str) -> Vec<u8> {
    let (major, minor, micro) = super::QEMU_VERSION;
    line(json!({"QMP": {
        "version": {"qemu": {"micro": micro, "minor": minor, "major": major}, "package": package},
        "capabilities": []
    }}))
}

/// A reply: `return` or `error`, with the request's `id` echoed.
pub fn reply(result: &Result<Value, QmpError>, id: Option<&Value>) -> Vec<u8> {
    let mut obj = Map::new();
    match result {
        Ok(v) => obj.insert("return".into(), v.clone()),
        Err(e) => obj.insert("error".into(), e.to_json()),
    };
    if let Some(id) = id {
        obj.insert("id".into(), id.clone());
    }
    line(Value::Object(obj))
}

/// An asynchronous event.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub name: String,
    pub data: Value,
    /// Microseconds since the Unix epoch, taken when the event happened.
    pub micros: u64,
}

impl Event {
    pub fn now(name: &str, data: Value) -> Self {
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        Event {
            name: name.to_string(),
            data,
            micros,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        line(json!({
            "event": self.name,
            "data": self.data,
            "timestamp": {"seconds": self.micros / 1_000_000, "microseconds": self.micros % 1_000_000},
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmp::ErrorClass;

    fn parse_line(b: &[u8]) -> Value {
        assert!(b.ends_with(b"\r\n"), "{:?}", String::from_utf8_lossy(b));
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn greeting_has_qemu_shape() {
        let v = parse_line(&greeting("diskstream-0.1.0"));
        let q = &v["QMP"];
        assert_eq!(q["version"]["qemu"]["major"], 10);
        assert_eq!(q["version"]["qemu"]["minor"], 0);
        assert_eq!(q["version"]["qemu"]["micro"], 2);
        assert_eq!(q["version"]["package"], "diskstream-0.1.0");
        assert_eq!(q["capabilities"], json!([]));
    }

    #[test]
    fn decodes_request_with_id_and_arguments() {
        let b = br#"{"execute": "query-version", "arguments": {"a": 1}, "id": [1, "x"]} "#;
        match decode(b) {
            Decoded::Request(r, used) => {
                assert_eq!(r.execute, "query-version");
                assert_eq!(r.arguments["a"], 1);
                assert_eq!(r.id, Some(json!([1, "x"])));
                assert_eq!(used, b.len() - 1);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn two_requests_in_one_buffer_decode_one_at_a_time() {
        let b = b"{\"execute\":\"a\"}{\"execute\":\"b\"}\n";
        let Decoded::Request(r, used) = decode(b) else {
            panic!()
        };
        assert_eq!(r.execute, "a");
        let Decoded::Request(r, _) = decode(&b[used..]) else {
            panic!()
        };
        assert_eq!(r.execute, "b");
    }

    #[test]
    fn partial_message_is_incomplete() {
        assert_eq!(decode(b"{\"execute\": \"qu"), Decoded::Incomplete);
        assert_eq!(decode(b"  \r\n "), Decoded::Incomplete);
        assert_eq!(decode(b""), Decoded::Incomplete);
        assert_eq!(decode(b"12"), Decoded::Incomplete);
    }

    #[test]
    fn broken_json_is_invalid_and_drops_the_line() {
        let b = b"{\"execute\": nope}\n{\"execute\": \"b\"}\n";
        let Decoded::Invalid(e, used) = decode(b) else {
            panic!("{:?}", decode(b))
        };
        assert_eq!(e.class, ErrorClass::GenericError);
        assert!(e.desc.starts_with("JSON parse error"), "{}", e.desc);
        let Decoded::Request(r, _) = decode(&b[used..]) else {
            panic!()
        };
        assert_eq!(r.execute, "b");
    }

    #[test]
    fn request_shape_errors_name_the_member() {
        let cases: &[(&[u8], &str)] = &[
            (b"[1]\n", "QMP input must be a JSON object"),
            (b"{}\n", "QMP input lacks member 'execute'"),
            (
                b"{\"execute\": 1}\n",
                "QMP input member 'execute' must be a string",
            ),
            (
                b"{\"execute\": \"x\", \"arguments\": []}\n",
                "QMP input member 'arguments' must be an object",
            ),
            (
                b"{\"execute\": \"x\", \"foo\": 1}\n",
                "QMP input member 'foo' is unexpected",
            ),
        ];
        for (input, want) in cases {
            match decode(input) {
                Decoded::BadRequest(e, _, _) => assert_eq!(e.desc, *want),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn bad_request_keeps_its_id() {
        match decode(b"{\"id\": 7, \"execute\": 1}\n") {
            Decoded::BadRequest(_, id, _) => assert_eq!(id, Some(json!(7))),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reply_echoes_id_and_encodes_errors() {
        let v = parse_line(&reply(&Ok(json!({})), Some(&json!("abc"))));
        assert_eq!(v, json!({"return": {}, "id": "abc"}));
        let e = QmpError::new(
            ErrorClass::CommandNotFound,
            "The command x has not been found",
        );
        let v = parse_line(&reply(&Err(e), None));
        assert_eq!(
            v,
            json!({"error": {"class": "CommandNotFound", "desc": "The command x has not been found"}})
        );
    }

    #[test]
    fn event_has_timestamp_split_in_seconds_and_microseconds() {
        let ev = Event {
            name: "JOB_STATUS_CHANGE".into(),
            data: json!({"id": "j", "status": "running"}),
            micros: 1_700_000_000_123_456,
        };
        let v = parse_line(&ev.encode());
        assert_eq!(v["event"], "JOB_STATUS_CHANGE");
        assert_eq!(v["timestamp"]["seconds"], 1_700_000_000u64);
        assert_eq!(v["timestamp"]["microseconds"], 123_456);
        assert_eq!(v["data"]["status"], "running");
    }
}
