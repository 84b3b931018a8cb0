//! The NBD wire format, as pure functions over byte slices: no I/O, no state.
//!
//! Every `decode_*` function looks at the front of a buffer and returns the
//! message and how many bytes it used, or [`DecodeError::Incomplete`] when
//! more bytes are needed (the caller reads more and tries again), or
//! [`DecodeError::Invalid`] when no amount of further input could make the
//! bytes valid (the caller replies with the protocol's error or closes).
//! Every `encode_*` function appends to a `Vec<u8>`. Server and client share
//! this module; the constants and layouts follow `doc/proto.md` of the NBD
//! project (fixed newstyle negotiation only; oldstyle is not supported).

use std::fmt;

// ---- handshake -----------------------------------------------------------

/// "NBDMAGIC": first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle magic, also the prefix of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Server handshake flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags (same bits).
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR + 1;
pub const REP_ERR_POLICY: u32 = REP_ERR + 2;
pub const REP_ERR_INVALID: u32 = REP_ERR + 3;
pub const REP_ERR_PLATFORM: u32 = REP_ERR + 4;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR + 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR + 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR + 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR + 8;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR + 9;

// Info types (OPT_INFO / OPT_GO).
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Longest option payload we accept or send; the spec lets a server reject
/// anything larger (names are at most 4096 bytes, same limit as qemu).
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Longest export name or meta context name (same limit as qemu: NBD_MAX_STRING_SIZE).
pub const MAX_STRING: usize = 4096;
/// Length of the padding after an `EXPORT_NAME` reply without `NO_ZEROES`.
pub const EXPORT_NAME_ZEROES: usize = 124;

// ---- transmission --------------------------------------------------------

pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const REQUEST_HEADER_LEN: usize = 28;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const CHUNK_HEADER_LEN: usize = 20;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Flags this implementation understands; any other bit is `EINVAL`.
pub const CMD_FLAGS_KNOWN: u16 =
    CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO;

// Structured reply chunk types and flags.
pub const CHUNK_FLAG_DONE: u16 = 1 << 0;
pub const CHUNK_NONE: u16 = 0;
pub const CHUNK_OFFSET_DATA: u16 = 1;
pub const CHUNK_OFFSET_HOLE: u16 = 2;
pub const CHUNK_BLOCK_STATUS: u16 = 5;
pub const CHUNK_ERROR: u16 = (1 << 15) + 1;
pub const CHUNK_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// `base:allocation` status bits.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
pub const CONTEXT_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";

/// Error values on the wire (the spec fixes them; they equal Linux's).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Why bytes could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// At least this many bytes in total are needed.
    #[error("incomplete message: need {0} bytes")]
    Incomplete(usize),
    /// The bytes can never form a valid message.
    #[error("{0}")]
    Invalid(Invalid),
}

/// The ways a message is invalid, each naming the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("bad {what} magic {found:#x}")]
    Magic { what: &'static str, found: u64 },
    #[error("server does not speak fixed newstyle NBD (handshake flags {0:#x})")]
    NotFixedNewstyle(u16),
    #[error("option {option} payload of {len} bytes exceeds the limit {limit}")]
    OptionTooLong { option: u32, len: u32, limit: u32 },
    #[error("option {option}: {message}")]
    OptionData { option: u32, message: String },
    #[error("write of {len} bytes (cookie {cookie:#x}) exceeds the maximum payload {limit}")]
    PayloadTooLarge { cookie: u64, len: u32, limit: u32 },
    #[error("reply {what}: {message}")]
    Reply { what: &'static str, message: String },
}

impl From<Invalid> for DecodeError {
    fn from(i: Invalid) -> Self {
        DecodeError::Invalid(i)
    }
}

pub type Decoded<T> = Result<(T, usize), DecodeError>;

fn need(buf: &[u8], n: usize) -> Result<(), DecodeError> {
    if buf.len() < n {
        Err(DecodeError::Incomplete(n))
    } else {
        Ok(())
    }
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

// ---- greeting ------------------------------------------------------------

/// The server's first message: magic, newstyle magic, handshake flags.
pub fn encode_greeting(flags: u16, out: &mut Vec<u8>) {
    out.extend_from_slice(&NBDMAGIC.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
}

/// Decodes the greeting, returning the handshake flags. Oldstyle servers and
/// servers without fixed newstyle are invalid.
pub fn decode_greeting(buf: &[u8]) -> Decoded<u16> {
    need(buf, 18)?;
    let m = be64(buf);
    if m != NBDMAGIC {
        return Err(Invalid::Magic {
            what: "server greeting",
            found: m,
        }
        .into());
    }
    let m = be64(&buf[8..]);
    if m != IHAVEOPT {
        return Err(Invalid::Magic {
            what: "newstyle (oldstyle servers are not supported)",
            found: m,
        }
        .into());
    }
    let flags = be16(&buf[16..]);
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(Invalid::NotFixedNewstyle(flags).into());
    }
    Ok((flags, 18))
}

pub fn encode_client_flags(flags: u32, out: &mut Vec<u8>) {
    out.extend_from_slice(&flags.to_be_bytes());
}

pub fn decode_client_flags(buf: &[u8]) -> Decoded<u32> {
    need(buf, 4)?;
    Ok((be32(buf), 4))
}

// ---- options -------------------------------------------------------------

/// An option as it travels: code and raw payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawOption {
    pub code: u32,
    pub data: Vec<u8>,
}

pub fn encode_option(code: u32, data: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Decodes one option request header and payload. A payload over
/// [`MAX_OPTION_LEN`] is invalid (the server then closes; it cannot skip
/// unbounded input).
pub fn decode_option(buf: &[u8]) -> Decoded<RawOption> {
    need(buf, 16)?;
    let m = be64(buf);
    if m != IHAVEOPT {
        return Err(Invalid::Magic {
            what: "option",
            found: m,
        }
        .into());
    }
    let code = be32(&buf[8..]);
    let len = be32(&buf[12..]);
    if len > MAX_OPTION_LEN {
        return Err(Invalid::OptionTooLong {
            option: code,
            len,
            limit: MAX_OPTION_LEN,
        }
        .into());
    }
    let total = 16 + len as usize;
    need(buf, total)?;
    Ok((
        RawOption {
            code,
            data: buf[16..total].to_vec(),
        },
        total,
    ))
}

/// An option with its payload parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Opt {
    ExportName(String),
    Abort,
    List,
    StartTls,
    Info {
        name: String,
        requests: Vec<u16>,
    },
    Go {
        name: String,
        requests: Vec<u16>,
    },
    StructuredReply,
    ListMetaContext {
        export: String,
        queries: Vec<String>,
    },
    SetMetaContext {
        export: String,
        queries: Vec<String>,
    },
    Unknown(u32),
}

/// A cursor over an option payload that reports what is missing.
struct Fields<'a> {
    option: u32,
    buf: &'a [u8],
}

impl<'a> Fields<'a> {
    fn bad(&self, message: impl Into<String>) -> Invalid {
        Invalid::OptionData {
            option: self.option,
            message: message.into(),
        }
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], Invalid> {
        if self.buf.len() < n {
            return Err(self.bad(format!("payload too short for {what}")));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u16(&mut self, what: &str) -> Result<u16, Invalid> {
        Ok(be16(self.take(2, what)?))
    }
    fn u32(&mut self, what: &str) -> Result<u32, Invalid> {
        Ok(be32(self.take(4, what)?))
    }
    fn string(&mut self, len: usize, what: &str) -> Result<String, Invalid> {
        if len > MAX_STRING {
            return Err(self.bad(format!("{what} of {len} bytes exceeds {MAX_STRING}")));
        }
        let b = self.take(len, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.bad(format!("{what} is not UTF-8")))
    }
    fn end(&self) -> Result<(), Invalid> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.bad(format!("{} trailing bytes", self.buf.len())))
        }
    }
}

/// Parses an option payload. Errors mean the server replies `ERR_INVALID`.
pub fn parse_option(raw: &RawOption) -> Result<Opt, Invalid> {
    let mut f = Fields {
        option: raw.code,
        buf: &raw.data,
    };
    let no_data = |f: &Fields<'_>, o: Opt| f.end().map(|_| o);
    match raw.code {
        OPT_EXPORT_NAME => {
            let n = f.buf.len();
            Ok(Opt::ExportName(f.string(n, "export name")?))
        }
        OPT_ABORT => Ok(Opt::Abort), // the spec lets ABORT carry (ignored) data
        OPT_LIST => no_data(&f, Opt::List),
        OPT_STARTTLS => no_data(&f, Opt::StartTls),
        OPT_STRUCTURED_REPLY => no_data(&f, Opt::StructuredReply),
        OPT_INFO | OPT_GO => {
            let n = f.u32("name length")? as usize;
            let name = f.string(n, "export name")?;
            let count = f.u16("information request count")? as usize;
            let mut requests = Vec::with_capacity(count.min(16));
            for _ in 0..count {
                requests.push(f.u16("information request")?);
            }
            f.end()?;
            Ok(if raw.code == OPT_GO {
                Opt::Go { name, requests }
            } else {
                Opt::Info { name, requests }
            })
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            let n = f.u32("export name length")? as usize;
            let export = f.string(n, "export name")?;
            let count = f.u32("query count")? as usize;
            let mut queries = Vec::with_capacity(count.min(16));
            for _ in 0..count {
                let n = f.u32("query length")? as usize;
                queries.push(f.string(n, "query")?);
            }
            f.end()?;
            Ok(if raw.code == OPT_SET_META_CONTEXT {
                Opt::SetMetaContext { export, queries }
            } else {
                Opt::ListMetaContext { export, queries }
            })
        }
        other => Ok(Opt::Unknown(other)),
    }
}

/// Encodes an option with its payload (client side).
pub fn encode_opt(opt: &Opt, out: &mut Vec<u8>) {
    let mut d = Vec::new();
    let code = match opt {
        Opt::ExportName(name) => {
            d.extend_from_slice(name.as_bytes());
            OPT_EXPORT_NAME
        }
        Opt::Abort => OPT_ABORT,
        Opt::List => OPT_LIST,
        Opt::StartTls => OPT_STARTTLS,
        Opt::StructuredReply => OPT_STRUCTURED_REPLY,
        Opt::Info { name, requests } | Opt::Go { name, requests } => {
            d.extend_from_slice(&(name.len() as u32).to_be_bytes());
            d.extend_from_slice(name.as_bytes());
            d.extend_from_slice(&(requests.len() as u16).to_be_bytes());
            for r in requests {
                d.extend_from_slice(&r.to_be_bytes());
            }
            if matches!(opt, Opt::Go { .. }) {
                OPT_GO
            } else {
                OPT_INFO
            }
        }
        Opt::ListMetaContext { export, queries } | Opt::SetMetaContext { export, queries } => {
            d.extend_from_slice(&(export.len() as u32).to_be_bytes());
            d.extend_from_slice(export.as_bytes());
            d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
            for q in queries {
                d.extend_from_slice(&(q.len() as u32).to_be_bytes());
                d.extend_from_slice(q.as_bytes());
            }
            if matches!(opt, Opt::SetMetaContext { .. }) {
                OPT_SET_META_CONTEXT
            } else {
                OPT_LIST_META_CONTEXT
            }
        }
        Opt::Unknown(code) => *code,
    };
    encode_option(code, &d, out);
}

/// One `NBD_REP_INFO` item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InfoItem {
    Export { size: u64, flags: u16 },
    Name(String),
    Description(String),
    BlockSize { min: u32, preferred: u32, max: u32 },
    Unknown(u16),
}

/// A parsed option reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OptReply {
    Ack,
    Server {
        name: String,
        description: String,
    },
    Info(InfoItem),
    MetaContext {
        id: u32,
        name: String,
    },
    /// Any `NBD_REP_ERR_*` with the server's message.
    Error {
        code: u32,
        message: String,
    },
    Unknown(u32),
}

/// An option reply with the option it answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptionReply {
    pub option: u32,
    pub reply: OptReply,
}

pub fn encode_option_reply(option: u32, reply: &OptReply, out: &mut Vec<u8>) {
    let mut d = Vec::new();
    let ty = match reply {
        OptReply::Ack => REP_ACK,
        OptReply::Server { name, description } => {
            d.extend_from_slice(&(name.len() as u32).to_be_bytes());
            d.extend_from_slice(name.as_bytes());
            d.extend_from_slice(description.as_bytes());
            REP_SERVER
        }
        OptReply::Info(item) => {
            match item {
                InfoItem::Export { size, flags } => {
                    d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                    d.extend_from_slice(&size.to_be_bytes());
                    d.extend_from_slice(&flags.to_be_bytes());
                }
                InfoItem::Name(n) => {
                    d.extend_from_slice(&INFO_NAME.to_be_bytes());
                    d.extend_from_slice(n.as_bytes());
                }
                InfoItem::Description(n) => {
                    d.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
                    d.extend_from_slice(n.as_bytes());
                }
                InfoItem::BlockSize {
                    min,
                    preferred,
                    max,
                } => {
                    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                    d.extend_from_slice(&min.to_be_bytes());
                    d.extend_from_slice(&preferred.to_be_bytes());
                    d.extend_from_slice(&max.to_be_bytes());
                }
                InfoItem::Unknown(t) => d.extend_from_slice(&t.to_be_bytes()),
            }
            REP_INFO
        }
        OptReply::MetaContext { id, name } => {
            d.extend_from_slice(&id.to_be_bytes());
            d.extend_from_slice(name.as_bytes());
            REP_META_CONTEXT
        }
        OptReply::Error { code, message } => {
            d.extend_from_slice(message.as_bytes());
            *code
        }
        OptReply::Unknown(t) => *t,
    };
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&ty.to_be_bytes());
    out.extend_from_slice(&(d.len() as u32).to_be_bytes());
    out.extend_from_slice(&d);
}

fn bad_reply(what: &'static str, message: impl Into<String>) -> DecodeError {
    Invalid::Reply {
        what,
        message: message.into(),
    }
    .into()
}

fn utf8(what: &'static str, b: &[u8]) -> Result<String, DecodeError> {
    String::from_utf8(b.to_vec()).map_err(|_| bad_reply(what, "not UTF-8"))
}

/// Decodes one option reply (client side).
pub fn decode_option_reply(buf: &[u8]) -> Decoded<OptionReply> {
    need(buf, 20)?;
    let m = be64(buf);
    if m != REPLY_MAGIC {
        return Err(Invalid::Magic {
            what: "option reply",
            found: m,
        }
        .into());
    }
    let option = be32(&buf[8..]);
    let ty = be32(&buf[12..]);
    let len = be32(&buf[16..]);
    if len > MAX_OPTION_LEN {
        return Err(bad_reply("option", format!("payload of {len} bytes")));
    }
    let total = 20 + len as usize;
    need(buf, total)?;
    let d = &buf[20..total];
    let reply = match ty {
        REP_ACK => OptReply::Ack,
        REP_SERVER => {
            if d.len() < 4 || be32(d) as usize > d.len() - 4 {
                return Err(bad_reply("REP_SERVER", "name length past payload"));
            }
            let n = be32(d) as usize;
            OptReply::Server {
                name: utf8("REP_SERVER name", &d[4..4 + n])?,
                description: utf8("REP_SERVER description", &d[4 + n..])?,
            }
        }
        REP_INFO => {
            if d.len() < 2 {
                return Err(bad_reply("REP_INFO", "no info type"));
            }
            let it = be16(d);
            let p = &d[2..];
            OptReply::Info(match it {
                INFO_EXPORT if p.len() == 10 => InfoItem::Export {
                    size: be64(p),
                    flags: be16(&p[8..]),
                },
                INFO_NAME => InfoItem::Name(utf8("INFO_NAME", p)?),
                INFO_DESCRIPTION => InfoItem::Description(utf8("INFO_DESCRIPTION", p)?),
                INFO_BLOCK_SIZE if p.len() == 12 => InfoItem::BlockSize {
                    min: be32(p),
                    preferred: be32(&p[4..]),
                    max: be32(&p[8..]),
                },
                INFO_EXPORT | INFO_BLOCK_SIZE => {
                    return Err(bad_reply(
                        "REP_INFO",
                        format!("info {it} of {} bytes", p.len()),
                    ));
                }
                other => InfoItem::Unknown(other),
            })
        }
        REP_META_CONTEXT => {
            if d.len() < 4 {
                return Err(bad_reply("REP_META_CONTEXT", "no context id"));
            }
            OptReply::MetaContext {
                id: be32(d),
                name: utf8("REP_META_CONTEXT name", &d[4..])?,
            }
        }
        t if t & REP_ERR != 0 => OptReply::Error {
            code: t,
            message: String::from_utf8_lossy(d).into_owned(),
        },
        t => OptReply::Unknown(t),
    };
    Ok((OptionReply { option, reply }, total))
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zero bytes
/// unless both sides agreed on `NO_ZEROES`.
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool, out: &mut Vec<u8>) {
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0; EXPORT_NAME_ZEROES]);
    }
}

pub fn decode_export_name_reply(buf: &[u8], no_zeroes: bool) -> Decoded<(u64, u16)> {
    let n = if no_zeroes {
        10
    } else {
        10 + EXPORT_NAME_ZEROES
    };
    need(buf, n)?;
    Ok(((be64(buf), be16(&buf[8..])), n))
}

// ---- requests ------------------------------------------------------------

/// Transmission-phase commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    Unknown(u16),
}

impl Command {
    pub fn from_u16(v: u16) -> Self {
        match v {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disc,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }
    pub fn to_u16(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disc => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::Cache => 5,
            Command::WriteZeroes => 6,
            Command::BlockStatus => 7,
            Command::Unknown(v) => v,
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Unknown(v) => write!(f, "command {v}"),
            c => write!(f, "{}", format!("{c:?}").to_uppercase()),
        }
    }
}

/// A request header (the write payload follows it on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

pub fn encode_request(r: &Request, out: &mut Vec<u8>) {
    out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out.extend_from_slice(&r.flags.to_be_bytes());
    out.extend_from_slice(&r.command.to_u16().to_be_bytes());
    out.extend_from_slice(&r.cookie.to_be_bytes());
    out.extend_from_slice(&r.offset.to_be_bytes());
    out.extend_from_slice(&r.length.to_be_bytes());
}

/// Decodes a request header and, for `WRITE`, tells how many payload bytes
/// follow: the frame is complete only when they are all in `buf`, and the
/// `usize` returned covers header and payload. A write longer than
/// `max_payload` is invalid ([`Invalid::PayloadTooLarge`] carries its cookie
/// so the server can answer before closing). Unknown commands decode fine:
/// rejecting them is the dispatcher's business.
pub fn decode_request(buf: &[u8], max_payload: u32) -> Decoded<Request> {
    need(buf, REQUEST_HEADER_LEN)?;
    let m = be32(buf);
    if m != REQUEST_MAGIC {
        return Err(Invalid::Magic {
            what: "request",
            found: m as u64,
        }
        .into());
    }
    let r = Request {
        flags: be16(&buf[4..]),
        command: Command::from_u16(be16(&buf[6..])),
        cookie: be64(&buf[8..]),
        offset: be64(&buf[16..]),
        length: be32(&buf[24..]),
    };
    let mut total = REQUEST_HEADER_LEN;
    if r.command == Command::Write {
        if r.length > max_payload {
            return Err(Invalid::PayloadTooLarge {
                cookie: r.cookie,
                len: r.length,
                limit: max_payload,
            }
            .into());
        }
        total += r.length as usize;
        need(buf, total)?;
    }
    Ok((r, total))
}

// ---- replies -------------------------------------------------------------

/// A simple reply header; for a successful `READ` the data follows.
pub fn encode_simple_reply(cookie: u64, error: u32, out: &mut Vec<u8>) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// One block status descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub length: u32,
    pub status: u32,
}

/// A structured reply chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Chunk {
    None,
    OffsetData {
        offset: u64,
        data: Vec<u8>,
    },
    OffsetHole {
        offset: u64,
        length: u32,
    },
    BlockStatus {
        context: u32,
        descriptors: Vec<Descriptor>,
    },
    Error {
        error: u32,
        message: String,
    },
    ErrorOffset {
        error: u32,
        message: String,
        offset: u64,
    },
    Unknown {
        kind: u16,
        payload: Vec<u8>,
    },
}

/// The header of a structured chunk; `payload_len` bytes follow it.
pub fn encode_chunk_header(
    cookie: u64,
    flags: u16,
    kind: u16,
    payload_len: u32,
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&payload_len.to_be_bytes());
}

/// Encodes a whole chunk. For large reads the server writes the
/// `OFFSET_DATA` header with [`encode_read_chunk_header`] and the data
/// separately, without copying it here.
pub fn encode_chunk(cookie: u64, done: bool, chunk: &Chunk, out: &mut Vec<u8>) {
    let flags = if done { CHUNK_FLAG_DONE } else { 0 };
    let mut p = Vec::new();
    let kind = match chunk {
        Chunk::None => CHUNK_NONE,
        Chunk::OffsetData { offset, data } => {
            p.extend_from_slice(&offset.to_be_bytes());
            p.extend_from_slice(data);
            CHUNK_OFFSET_DATA
        }
        Chunk::OffsetHole { offset, length } => {
            p.extend_from_slice(&offset.to_be_bytes());
            p.extend_from_slice(&length.to_be_bytes());
            CHUNK_OFFSET_HOLE
        }
        Chunk::BlockStatus {
            context,
            descriptors,
        } => {
            p.extend_from_slice(&context.to_be_bytes());
            for d in descriptors {
                p.extend_from_slice(&d.length.to_be_bytes());
                p.extend_from_slice(&d.status.to_be_bytes());
            }
            CHUNK_BLOCK_STATUS
        }
        Chunk::Error { error, message } => {
            p.extend_from_slice(&error.to_be_bytes());
            p.extend_from_slice(&(message.len() as u16).to_be_bytes());
            p.extend_from_slice(message.as_bytes());
            CHUNK_ERROR
        }
        Chunk::ErrorOffset {
            error,
            message,
            offset,
        } => {
            p.extend_from_slice(&error.to_be_bytes());
            p.extend_from_slice(&(message.len() as u16).to_be_bytes());
            p.extend_from_slice(message.as_bytes());
            p.extend_from_slice(&offset.to_be_bytes());
            CHUNK_ERROR_OFFSET
        }
        Chunk::Unknown { kind, payload } => {
            p.extend_from_slice(payload);
            *kind
        }
    };
    encode_chunk_header(cookie, flags, kind, p.len() as u32, out);
    out.extend_from_slice(&p);
}

/// Header of a final `OFFSET_DATA` chunk carrying `len` bytes read at `offset`.
pub fn encode_read_chunk_header(cookie: u64, offset: u64, len: u32, out: &mut Vec<u8>) {
    encode_chunk_header(cookie, CHUNK_FLAG_DONE, CHUNK_OFFSET_DATA, 8 + len, out);
    out.extend_from_slice(&offset.to_be_bytes());
}

/// A reply frame as the client sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// A simple reply; `data` holds the read payload for a successful READ.
    Simple {
        cookie: u64,
        error: u32,
        data: Vec<u8>,
    },
    /// One structured chunk; `done` marks the last one for its cookie.
    Chunk {
        cookie: u64,
        done: bool,
        chunk: Chunk,
    },
}

/// Longest error message in an error chunk we accept (same bound as qemu's
/// NBD_MAX_STRING_SIZE plus the fixed fields).
const MAX_CHUNK_META: u32 = 64 * 1024;

/// Decodes one reply frame. A simple reply carries no length, so the caller
/// says how many data bytes a successful simple reply to `cookie` has
/// (`simple_len(cookie)`: the READ length, 0 otherwise; `None` for a cookie
/// it never sent, which is invalid). `max_data` bounds chunk payloads.
pub fn decode_reply(
    buf: &[u8],
    max_data: u32,
    simple_len: impl FnOnce(u64) -> Option<u32>,
) -> Decoded<Reply> {
    need(buf, 4)?;
    let m = be32(buf);
    match m {
        SIMPLE_REPLY_MAGIC => {
            need(buf, SIMPLE_REPLY_LEN)?;
            let error = be32(&buf[4..]);
            let cookie = be64(&buf[8..]);
            let Some(len) = simple_len(cookie) else {
                return Err(bad_reply("simple", format!("unknown cookie {cookie:#x}")));
            };
            let len = if error == 0 { len as usize } else { 0 };
            let total = SIMPLE_REPLY_LEN + len;
            need(buf, total)?;
            Ok((
                Reply::Simple {
                    cookie,
                    error,
                    data: buf[SIMPLE_REPLY_LEN..total].to_vec(),
                },
                total,
            ))
        }
        STRUCTURED_REPLY_MAGIC => {
            need(buf, CHUNK_HEADER_LEN)?;
            let flags = be16(&buf[4..]);
            let kind = be16(&buf[6..]);
            let cookie = be64(&buf[8..]);
            let len = be32(&buf[16..]);
            let limit = if kind == CHUNK_OFFSET_DATA {
                max_data.saturating_add(8)
            } else {
                MAX_CHUNK_META.max(max_data / 8 + 4)
            };
            if len > limit {
                return Err(bad_reply(
                    "chunk",
                    format!("type {kind} payload of {len} bytes exceeds {limit}"),
                ));
            }
            let total = CHUNK_HEADER_LEN + len as usize;
            need(buf, total)?;
            let chunk = parse_chunk(kind, &buf[CHUNK_HEADER_LEN..total])?;
            Ok((
                Reply::Chunk {
                    cookie,
                    done: flags & CHUNK_FLAG_DONE != 0,
                    chunk,
                },
                total,
            ))
        }
        other => Err(Invalid::Magic {
            what: "reply",
            found: other as u64,
        }
        .into()),
    }
}

fn parse_chunk(kind: u16, p: &[u8]) -> Result<Chunk, DecodeError> {
    let short = |what| bad_reply(what, format!("payload of {} bytes is too short", p.len()));
    Ok(match kind {
        CHUNK_NONE => {
            if !p.is_empty() {
                return Err(bad_reply("NONE chunk", "has a payload"));
            }
            Chunk::None
        }
        CHUNK_OFFSET_DATA => {
            if p.len() < 9 {
                return Err(short("OFFSET_DATA chunk"));
            }
            Chunk::OffsetData {
                offset: be64(p),
                data: p[8..].to_vec(),
            }
        }
        CHUNK_OFFSET_HOLE => {
            if p.len() != 12 {
                return Err(short("OFFSET_HOLE chunk"));
            }
            Chunk::OffsetHole {
                offset: be64(p),
                length: be32(&p[8..]),
            }
        }
        CHUNK_BLOCK_STATUS => {
            if p.len() < 12 || !(p.len() - 4).is_multiple_of(8) {
                return Err(bad_reply(
                    "BLOCK_STATUS chunk",
                    format!("payload of {} bytes is not 4 + 8n, n >= 1", p.len()),
                ));
            }
            Chunk::BlockStatus {
                context: be32(p),
                descriptors: p[4..]
                    .chunks_exact(8)
                    .map(|d| Descriptor {
                        length: be32(d),
                        status: be32(&d[4..]),
                    })
                    .collect(),
            }
        }
        CHUNK_ERROR | CHUNK_ERROR_OFFSET => {
            if p.len() < 6 {
                return Err(short("ERROR chunk"));
            }
            let error = be32(p);
            let n = be16(&p[4..]) as usize;
            let extra = if kind == CHUNK_ERROR_OFFSET { 8 } else { 0 };
            if p.len() != 6 + n + extra {
                return Err(bad_reply(
                    "ERROR chunk",
                    format!("message length {n} does not match payload of {}", p.len()),
                ));
            }
            let message = String::from_utf8_lossy(&p[6..6 + n]).into_owned();
            if error == 0 {
                return Err(bad_reply("ERROR chunk", "error value 0"));
            }
            if kind == CHUNK_ERROR {
                Chunk::Error { error, message }
            } else {
                Chunk::ErrorOffset {
                    error,
                    message,
                    offset: be64(&p[6 + n..]),
                }
            }
        }
        other => Chunk::Unknown {
            kind: other,
            payload: p.to_vec(),
        },
    })
}

/// Maps a local errno (as from `image::Error::errno`) to the wire value; the
/// spec allows only a few, anything else travels as `EIO`... except
/// `EINVAL`-like inputs, which keep their meaning.
pub fn wire_errno(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EROFS => EPERM,
        libc::ENOMEM => ENOMEM,
        libc::EINVAL => EINVAL,
        libc::ENOSPC | libc::EDQUOT => ENOSPC,
        libc::EOVERFLOW => EOVERFLOW,
        libc::ENOTSUP => ENOTSUP,
        libc::ESHUTDOWN => ESHUTDOWN,
        _ => EIO,
    }
}

/// A name for a wire errno, for messages.
pub fn errno_name(e: u32) -> &'static str {
    match e {
        EPERM => "EPERM (operation not permitted)",
        EIO => "EIO (input/output error)",
        ENOMEM => "ENOMEM (out of memory)",
        EINVAL => "EINVAL (invalid argument)",
        ENOSPC => "ENOSPC (no space left)",
        EOVERFLOW => "EOVERFLOW (value too large)",
        ENOTSUP => "ENOTSUP (not supported)",
        ESHUTDOWN => "ESHUTDOWN (server is shutting down)",
        _ => "unknown error",
    }
}

/// Runs every decoder over `data` and checks the contract each must keep
/// on any input: no panic, a success consumes no more than it was given,
/// and "incomplete" always asks for more than it has. The fuzz target and
/// the corpus replay test both call this.
#[doc(hidden)]
pub fn check_all_decoders(data: &[u8]) {
    fn ok<T>(data: &[u8], r: Decoded<T>) {
        match r {
            Ok((_, n)) => assert!(n <= data.len(), "consumed {n} of {}", data.len()),
            Err(DecodeError::Incomplete(need)) => {
                assert!(
                    need > data.len(),
                    "incomplete asks {need} of {}",
                    data.len()
                )
            }
            Err(DecodeError::Invalid(_)) => {}
        }
    }
    ok(data, decode_greeting(data));
    ok(data, decode_client_flags(data));
    ok(data, decode_option_reply(data));
    ok(data, decode_export_name_reply(data, true));
    ok(data, decode_export_name_reply(data, false));
    ok(data, decode_request(data, 1 << 20));
    ok(
        data,
        decode_reply(data, 1 << 20, |c| Some((c % 4096) as u32)),
    );
    let r = decode_option(data);
    if let Ok((raw, _)) = &r {
        let _ = parse_option(raw);
    }
    ok(data, r);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every strict prefix of a valid encoding is `Incomplete`, never `Invalid`.
    fn assert_prefixes_incomplete<T: fmt::Debug>(bytes: &[u8], dec: impl Fn(&[u8]) -> Decoded<T>) {
        for n in 0..bytes.len() {
            match dec(&bytes[..n]) {
                Err(DecodeError::Incomplete(need)) => {
                    assert!(need > n && need <= bytes.len(), "prefix {n}: need {need}")
                }
                other => panic!("prefix of {n} bytes: {other:?}"),
            }
        }
    }

    #[test]
    fn greeting_roundtrips_and_prefixes_are_incomplete() {
        let mut b = Vec::new();
        encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, &mut b);
        assert_eq!(b.len(), 18);
        assert_eq!(&b[..8], b"NBDMAGIC");
        assert_eq!(&b[8..16], b"IHAVEOPT");
        assert_eq!(decode_greeting(&b), Ok((3, 18)));
        assert_prefixes_incomplete(&b, decode_greeting);
    }

    #[test]
    fn greeting_rejects_oldstyle_and_non_fixed_newstyle() {
        let mut b = Vec::new();
        encode_greeting(0, &mut b);
        assert_eq!(
            decode_greeting(&b),
            Err(Invalid::NotFixedNewstyle(0).into())
        );
        b[8..16].copy_from_slice(&0x0000_4202_8186_1253u64.to_be_bytes());
        assert!(matches!(
            decode_greeting(&b),
            Err(DecodeError::Invalid(Invalid::Magic { .. }))
        ));
        b[0] = b'X';
        assert!(matches!(
            decode_greeting(&b),
            Err(DecodeError::Invalid(Invalid::Magic { .. }))
        ));
    }

    #[test]
    fn client_flags_roundtrip() {
        let mut b = Vec::new();
        encode_client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, &mut b);
        assert_eq!(decode_client_flags(&b), Ok((3, 4)));
        assert_prefixes_incomplete(&b, decode_client_flags);
    }

    fn opt_roundtrip(o: Opt) {
        let mut b = Vec::new();
        encode_opt(&o, &mut b);
        let (raw, n) = decode_option(&b).unwrap();
        assert_eq!(n, b.len());
        assert_eq!(parse_option(&raw).unwrap(), o);
        assert_prefixes_incomplete(&b, decode_option);
    }

    #[test]
    fn every_option_roundtrips() {
        opt_roundtrip(Opt::ExportName("disk0".into()));
        opt_roundtrip(Opt::Abort);
        opt_roundtrip(Opt::List);
        opt_roundtrip(Opt::StartTls);
        opt_roundtrip(Opt::StructuredReply);
        opt_roundtrip(Opt::Info {
            name: "".into(),
            requests: vec![INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE],
        });
        opt_roundtrip(Opt::Go {
            name: "vm0".into(),
            requests: vec![INFO_EXPORT],
        });
        opt_roundtrip(Opt::ListMetaContext {
            export: "".into(),
            queries: vec![],
        });
        opt_roundtrip(Opt::SetMetaContext {
            export: "x".into(),
            queries: vec![
                CONTEXT_BASE_ALLOCATION.into(),
                CONTEXT_ALLOCATION_DEPTH.into(),
            ],
        });
        opt_roundtrip(Opt::Unknown(4242));
    }

    #[test]
    fn option_with_bad_magic_is_invalid() {
        let mut b = Vec::new();
        encode_opt(&Opt::List, &mut b);
        b[0] ^= 1;
        assert!(matches!(
            decode_option(&b),
            Err(DecodeError::Invalid(Invalid::Magic { what: "option", .. }))
        ));
    }

    #[test]
    fn option_longer_than_limit_is_invalid_before_payload_arrives() {
        let mut b = Vec::new();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&OPT_GO.to_be_bytes());
        b.extend_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
        assert!(matches!(
            decode_option(&b),
            Err(DecodeError::Invalid(Invalid::OptionTooLong { .. }))
        ));
    }

    #[test]
    fn option_payloads_with_lying_lengths_are_invalid() {
        // GO whose name length runs past the payload.
        let raw = RawOption {
            code: OPT_GO,
            data: vec![0, 0, 0, 9, b'a'],
        };
        assert!(parse_option(&raw).is_err());
        // GO with trailing garbage.
        let mut d = Vec::new();
        encode_opt(
            &Opt::Go {
                name: "a".into(),
                requests: vec![],
            },
            &mut d,
        );
        let mut raw = decode_option(&d).unwrap().0;
        raw.data.push(0);
        assert!(parse_option(&raw).is_err());
        // LIST must have no payload.
        let raw = RawOption {
            code: OPT_LIST,
            data: vec![1],
        };
        assert!(parse_option(&raw).is_err());
        // Meta context query count larger than the payload.
        let raw = RawOption {
            code: OPT_SET_META_CONTEXT,
            data: vec![0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff],
        };
        assert!(parse_option(&raw).is_err());
        // A name that is not UTF-8.
        let raw = RawOption {
            code: OPT_EXPORT_NAME,
            data: vec![0xff, 0xfe],
        };
        assert!(parse_option(&raw).is_err());
    }

    fn reply_roundtrip(r: OptReply) {
        let mut b = Vec::new();
        encode_option_reply(OPT_GO, &r, &mut b);
        let (d, n) = decode_option_reply(&b).unwrap();
        assert_eq!(n, b.len());
        assert_eq!(
            d,
            OptionReply {
                option: OPT_GO,
                reply: r
            }
        );
        assert_prefixes_incomplete(&b, decode_option_reply);
    }

    #[test]
    fn every_option_reply_roundtrips() {
        reply_roundtrip(OptReply::Ack);
        reply_roundtrip(OptReply::Server {
            name: "disk".into(),
            description: "a disk".into(),
        });
        reply_roundtrip(OptReply::Info(InfoItem::Export {
            size: 1 << 40,
            flags: TFLAG_HAS_FLAGS | TFLAG_READ_ONLY,
        }));
        reply_roundtrip(OptReply::Info(InfoItem::Name("n".into())));
        reply_roundtrip(OptReply::Info(InfoItem::Description("d".into())));
        reply_roundtrip(OptReply::Info(InfoItem::BlockSize {
            min: 1,
            preferred: 4096,
            max: 32 << 20,
        }));
        reply_roundtrip(OptReply::MetaContext {
            id: 7,
            name: CONTEXT_BASE_ALLOCATION.into(),
        });
        reply_roundtrip(OptReply::Error {
            code: REP_ERR_UNSUP,
            message: "no".into(),
        });
        reply_roundtrip(OptReply::Error {
            code: REP_ERR_UNKNOWN,
            message: String::new(),
        });
    }

    #[test]
    fn option_reply_with_short_info_export_is_invalid() {
        let mut b = Vec::new();
        encode_option_reply(
            OPT_GO,
            &OptReply::Info(InfoItem::Unknown(INFO_EXPORT)),
            &mut b,
        );
        assert!(matches!(
            decode_option_reply(&b),
            Err(DecodeError::Invalid(Invalid::Reply { .. }))
        ));
    }

    #[test]
    fn export_name_reply_with_and_without_zeroes() {
        for nz in [false, true] {
            let mut b = Vec::new();
            encode_export_name_reply(12345, 3, nz, &mut b);
            assert_eq!(b.len(), if nz { 10 } else { 134 });
            assert_eq!(decode_export_name_reply(&b, nz), Ok(((12345, 3), b.len())));
            assert_prefixes_incomplete(&b, |x| decode_export_name_reply(x, nz));
        }
    }

    #[test]
    fn every_request_roundtrips() {
        for (cmd, flags) in [
            (Command::Read, CMD_FLAG_DF),
            (Command::Disc, 0),
            (Command::Flush, 0),
            (Command::Trim, CMD_FLAG_FUA),
            (Command::Cache, 0),
            (
                Command::WriteZeroes,
                CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO | CMD_FLAG_FUA,
            ),
            (Command::BlockStatus, CMD_FLAG_REQ_ONE),
            (Command::Unknown(99), 0),
        ] {
            let r = Request {
                flags,
                command: cmd,
                cookie: 0xdead_beef_0000_0001,
                offset: 1 << 33,
                length: 65536,
            };
            let mut b = Vec::new();
            encode_request(&r, &mut b);
            assert_eq!(b.len(), REQUEST_HEADER_LEN);
            assert_eq!(decode_request(&b, 1 << 20), Ok((r, REQUEST_HEADER_LEN)));
            assert_prefixes_incomplete(&b, |x| decode_request(x, 1 << 20));
        }
    }

    #[test]
    fn write_request_is_incomplete_until_its_payload_arrives() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            command: Command::Write,
            cookie: 1,
            offset: 512,
            length: 5,
        };
        let mut b = Vec::new();
        encode_request(&r, &mut b);
        b.extend_from_slice(b"hello");
        assert_eq!(decode_request(&b, 16), Ok((r, 33)));
        assert_prefixes_incomplete(&b, |x| decode_request(x, 16));
    }

    #[test]
    fn request_with_bad_magic_is_invalid() {
        let mut b = Vec::new();
        encode_request(
            &Request {
                flags: 0,
                command: Command::Read,
                cookie: 1,
                offset: 0,
                length: 1,
            },
            &mut b,
        );
        b[3] ^= 0x80;
        assert!(matches!(
            decode_request(&b, 16),
            Err(DecodeError::Invalid(Invalid::Magic {
                what: "request",
                ..
            }))
        ));
    }

    #[test]
    fn oversized_write_is_invalid_with_its_cookie() {
        let mut b = Vec::new();
        encode_request(
            &Request {
                flags: 0,
                command: Command::Write,
                cookie: 77,
                offset: 0,
                length: 1 << 30,
            },
            &mut b,
        );
        assert_eq!(
            decode_request(&b, 32 << 20),
            Err(Invalid::PayloadTooLarge {
                cookie: 77,
                len: 1 << 30,
                limit: 32 << 20
            }
            .into())
        );
    }

    #[test]
    fn simple_replies_roundtrip_with_read_payload() {
        let mut b = Vec::new();
        encode_simple_reply(9, 0, &mut b);
        b.extend_from_slice(b"abcd");
        let (r, n) = decode_reply(&b, 1 << 20, |c| (c == 9).then_some(4)).unwrap();
        assert_eq!(n, 20);
        assert_eq!(
            r,
            Reply::Simple {
                cookie: 9,
                error: 0,
                data: b"abcd".to_vec()
            }
        );
        assert_prefixes_incomplete(&b, |x| decode_reply(x, 1 << 20, |_| Some(4)));
        // An error reply carries no data even for a READ.
        let mut b = Vec::new();
        encode_simple_reply(9, EIO, &mut b);
        assert_eq!(
            decode_reply(&b, 1 << 20, |_| Some(4)),
            Ok((
                Reply::Simple {
                    cookie: 9,
                    error: EIO,
                    data: vec![]
                },
                16
            ))
        );
        // A cookie the client never sent is invalid.
        assert!(matches!(
            decode_reply(&b, 1 << 20, |_| None),
            Err(DecodeError::Invalid(_))
        ));
    }

    #[test]
    fn every_chunk_roundtrips() {
        for (done, c) in [
            (true, Chunk::None),
            (
                false,
                Chunk::OffsetData {
                    offset: 4096,
                    data: vec![1, 2, 3],
                },
            ),
            (
                false,
                Chunk::OffsetHole {
                    offset: 0,
                    length: 512,
                },
            ),
            (
                true,
                Chunk::BlockStatus {
                    context: 1,
                    descriptors: vec![
                        Descriptor {
                            length: 65536,
                            status: STATE_HOLE | STATE_ZERO,
                        },
                        Descriptor {
                            length: 512,
                            status: 0,
                        },
                    ],
                },
            ),
            (
                true,
                Chunk::Error {
                    error: EINVAL,
                    message: "out of range".into(),
                },
            ),
            (
                true,
                Chunk::ErrorOffset {
                    error: EIO,
                    message: "bad sector".into(),
                    offset: 8192,
                },
            ),
        ] {
            let mut b = Vec::new();
            encode_chunk(5, done, &c, &mut b);
            let expect = Reply::Chunk {
                cookie: 5,
                done,
                chunk: c,
            };
            assert_eq!(decode_reply(&b, 1 << 20, |_| None), Ok((expect, b.len())));
            assert_prefixes_incomplete(&b, |x| decode_reply(x, 1 << 20, |_| None));
        }
    }

    #[test]
    fn read_chunk_header_matches_encode_chunk() {
        let mut a = Vec::new();
        encode_read_chunk_header(3, 100, 4, &mut a);
        a.extend_from_slice(b"wxyz");
        let mut b = Vec::new();
        encode_chunk(
            3,
            true,
            &Chunk::OffsetData {
                offset: 100,
                data: b"wxyz".to_vec(),
            },
            &mut b,
        );
        assert_eq!(a, b);
    }

    #[test]
    fn malformed_chunks_are_invalid() {
        let cases: Vec<(u16, Vec<u8>)> = vec![
            (CHUNK_NONE, vec![1]),
            (CHUNK_OFFSET_DATA, vec![0; 8]),
            (CHUNK_OFFSET_HOLE, vec![0; 11]),
            (CHUNK_BLOCK_STATUS, vec![0; 4]),
            (CHUNK_BLOCK_STATUS, vec![0; 13]),
            (CHUNK_ERROR, vec![0, 0, 0, 5, 0, 9, b'x']),
            (CHUNK_ERROR, vec![0, 0, 0, 0, 0, 0]),
        ];
        for (kind, payload) in cases {
            let mut b = Vec::new();
            encode_chunk_header(1, CHUNK_FLAG_DONE, kind, payload.len() as u32, &mut b);
            b.extend_from_slice(&payload);
            assert!(
                matches!(
                    decode_reply(&b, 1 << 20, |_| None),
                    Err(DecodeError::Invalid(_))
                ),
                "chunk type {kind} payload {payload:?}"
            );
        }
    }

    #[test]
    fn oversized_chunk_is_invalid_before_payload_arrives() {
        let mut b = Vec::new();
        encode_chunk_header(1, 0, CHUNK_OFFSET_DATA, (1 << 20) + 9, &mut b);
        assert!(matches!(
            decode_reply(&b, 1 << 20, |_| None),
            Err(DecodeError::Invalid(_))
        ));
    }

    #[test]
    fn reply_with_bad_magic_is_invalid() {
        assert!(matches!(
            decode_reply(&[0, 0, 0, 0], 16, |_| None),
            Err(DecodeError::Invalid(Invalid::Magic { what: "reply", .. }))
        ));
    }

    /// Replays the fuzz corpus (seeds and any findings) through every decoder.
    #[test]
    fn fuzz_corpus_replays_cleanly() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/codec");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("fuzz/corpus/codec exists") {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            check_all_decoders(&data);
            for cut in 0..data.len().min(64) {
                check_all_decoders(&data[..cut]);
            }
            n += 1;
        }
        assert!(n >= 5, "corpus has only {n} files");
    }

    /// A bounded, deterministic mutation run over the corpus on stable Rust
    /// (cargo-fuzz needs nightly): flips, truncations and length-field edits.
    #[test]
    fn mutated_corpus_never_breaks_the_decoder_contract() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/codec");
        let seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| std::fs::read(e.unwrap().path()).unwrap())
            .collect();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let mut d = seeds[rnd() as usize % seeds.len()].clone();
            for _ in 0..1 + rnd() % 4 {
                if d.is_empty() {
                    break;
                }
                let i = rnd() as usize % d.len();
                match rnd() % 3 {
                    0 => d[i] ^= 1 << (rnd() % 8),
                    1 => d[i] = [0, 0xff, 0x7f, 0x80][rnd() as usize % 4],
                    _ => d.truncate(i),
                }
            }
            check_all_decoders(&d);
        }
    }

    #[test]
    fn errno_mapping_keeps_the_spec_values() {
        assert_eq!(wire_errno(libc::EPERM), 1);
        assert_eq!(wire_errno(libc::EIO), 5);
        assert_eq!(wire_errno(libc::EINVAL), 22);
        assert_eq!(wire_errno(libc::ENOSPC), 28);
        assert_eq!(wire_errno(libc::ENOTSUP), 95);
        assert_eq!(wire_errno(libc::ENOENT), EIO);
    }
}
