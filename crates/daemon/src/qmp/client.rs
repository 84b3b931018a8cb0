//! A small QMP client for the CLI: connect, negotiate, execute, and read
//! events, keeping events that arrive before a reply for later.
//!
//! Every wait takes a deadline, so a daemon that stops answering makes the
//! caller fail with a message instead of hanging.

use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::{Instant, timeout_at};

use super::{ErrorClass, QmpError};

/// How long a command may take before the client gives up.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP connection: {0}")]
    Protocol(String),
    #[error("{0}")]
    Command(QmpError),
    #[error("timed out waiting for {0}")]
    Timeout(String),
}

/// A QMP event as received.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientEvent {
    pub name: String,
    pub data: Value,
}

#[derive(Debug)]
pub struct Client {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    events: VecDeque<ClientEvent>,
    next_id: u64,
    pub greeting: Value,
}

impl Client {
    /// Connects to `path`, reads the greeting and negotiates capabilities.
    pub async fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let (r, w) = stream.into_split();
        let mut c = Client {
            reader: BufReader::new(r),
            writer: w,
            events: VecDeque::new(),
            next_id: 0,
            greeting: Value::Null,
        };
        let deadline = Instant::now() + REPLY_TIMEOUT;
        c.greeting = c.read_message(deadline, "the QMP greeting").await?;
        if c.greeting.get("QMP").is_none() {
            return Err(ClientError::Protocol(format!(
                "expected a QMP greeting, got {}",
                c.greeting
            )));
        }
        c.execute("qmp_capabilities", json!({})).await?;
        Ok(c)
    }

    async fn read_message(&mut self, deadline: Instant, what: &str) -> Result<Value, ClientError> {
        let mut line = String::new();
        let n = timeout_at(deadline, self.reader.read_line(&mut line))
            .await
            .map_err(|_| ClientError::Timeout(what.to_string()))??;
        if n == 0 {
            return Err(ClientError::Protocol(format!(
                "the daemon closed the connection while waiting for {what}"
            )));
        }
        serde_json::from_str(&line)
            .map_err(|e| ClientError::Protocol(format!("bad JSON from the daemon: {e}: {line}")))
    }

    /// Sends a raw request (an object with `execute`) and returns its reply
    /// object (`return` or `error`, untouched).
    pub async fn raw(&mut self, mut request: Map<String, Value>) -> Result<Value, ClientError> {
        self.next_id += 1;
        let id = json!(format!("ds-{}", self.next_id));
        let user_id = request.insert("id".into(), id.clone());
        let mut bytes = serde_json::to_vec(&Value::Object(request)).expect("JSON serializes");
        bytes.push(b'\n');
        self.writer.write_all(&bytes).await?;
        let deadline = Instant::now() + REPLY_TIMEOUT;
        // Bounded by the deadline.
        loop {
            let mut msg = self.read_message(deadline, "the reply").await?;
            if let Some(ev) = msg.get("event").and_then(Value::as_str) {
                let data = msg.get("data").cloned().unwrap_or(Value::Null);
                self.events.push_back(ClientEvent {
                    name: ev.to_string(),
                    data,
                });
                continue;
            }
            if msg.get("id") == Some(&id) {
                if let (Some(obj), Some(uid)) = (msg.as_object_mut(), user_id) {
                    obj.insert("id".into(), uid);
                } else if let Some(obj) = msg.as_object_mut() {
                    obj.remove("id");
                }
                return Ok(msg);
            }
            return Err(ClientError::Protocol(format!("unexpected message {msg}")));
        }
    }

    /// Runs a command; `Ok` holds its `return` value.
    pub async fn execute(&mut self, name: &str, arguments: Value) -> Result<Value, ClientError> {
        let mut req = Map::new();
        req.insert("execute".into(), json!(name));
        req.insert("arguments".into(), arguments);
        let reply = self.raw(req).await?;
        if let Some(r) = reply.get("return") {
            return Ok(r.clone());
        }
        let err = reply.get("error").cloned().unwrap_or(Value::Null);
        let class = err
            .get("class")
            .and_then(Value::as_str)
            .and_then(ErrorClass::parse)
            .unwrap_or(ErrorClass::GenericError);
        let desc = err
            .get("desc")
            .and_then(Value::as_str)
            .unwrap_or("(no description)")
            .to_string();
        Err(ClientError::Command(QmpError { class, desc }))
    }

    /// The next event, waiting until `deadline`; `None` on timeout.
    pub async fn next_event(
        &mut self,
        deadline: Instant,
    ) -> Result<Option<ClientEvent>, ClientError> {
        if let Some(ev) = self.events.pop_front() {
            return Ok(Some(ev));
        }
        // Bounded by the deadline.
        loop {
            let msg = match self.read_message(deadline, "an event").await {
                Ok(m) => m,
                Err(ClientError::Timeout(_)) => return Ok(None),
                Err(e) => return Err(e),
            };
            if let Some(ev) = msg.get("event").and_then(Value::as_str) {
                let data = msg.get("data").cloned().unwrap_or(Value::Null);
                return Ok(Some(ClientEvent {
                    name: ev.to_string(),
                    data,
                }));
            }
        }
    }
}
