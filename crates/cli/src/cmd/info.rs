//! `diskstream info`: what an image is, like `qemu-img info`, plus how much
//! of the disk is already local.
//!
//! The JSON carries qemu-img's keys, in the order qemu-img 10 prints them,
//! for every field the two share (`virtual-size`, `filename`, `format`,
//! `cluster-size`, `actual-size`, `backing-filename`, `full-backing-filename`,
//! `backing-filename-format`, `format-specific`, `dirty-flag`, and the `file`
//! child), then diskstream's own: `local-bytes` (guest bytes allocated in
//! this image, zero clusters included: what need not come from a backing),
//! `chain-bytes` (guest bytes allocated anywhere in the chain),
//! `local-percent` (the first as a share of the second; 100 when nothing is
//! allocated anywhere) and `backing-chain`, one entry per layer.

use std::process::ExitCode;

use image::BlockDevice;
use image::device::block_status_all;
use serde::Serialize;

use super::{ImageArgs, Output, actual_size, file_error, open_chain, walk_chain};

/// Show an image's format, size, backing chain and how much of it is local.
///
/// Opens the image and its backing chain read-only. While another process
/// (a VM, qemu-nbd, a diskstream daemon) has the image open for writing this
/// fails, as qemu-img does, unless -U is given.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    common: ImageArgs,
}

/// `children[].info` of qemu-img's JSON: the file under the format.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
struct FileChildInfo {
    children: Vec<()>,
    virtual_size: u64,
    filename: String,
    format: &'static str,
    actual_size: u64,
    format_specific: FileSpecific,
    dirty_flag: bool,
}

/// `{"type": "file", "data": {}}` in qemu-img's key order.
#[derive(Debug, Serialize)]
struct FileSpecific {
    r#type: &'static str,
    data: Empty,
}

#[derive(Debug, Serialize)]
struct Empty {}

#[derive(Debug, Serialize)]
struct Child {
    name: &'static str,
    info: FileChildInfo,
}

/// One layer in `backing-chain`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
struct LayerInfo {
    filename: String,
    format: String,
    virtual_size: u64,
    local_bytes: u64,
    actual_size: u64,
}

/// One entry of `snapshots`, in qemu-img's key order.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
struct SnapshotJson {
    #[serde(skip_serializing_if = "Option::is_none")]
    icount: Option<u64>,
    vm_clock_nsec: u64,
    name: String,
    date_sec: u64,
    date_nsec: u64,
    vm_clock_sec: u64,
    id: String,
    vm_state_size: u64,
}

impl From<&image::format::SnapshotInfo> for SnapshotJson {
    fn from(s: &image::format::SnapshotInfo) -> Self {
        SnapshotJson {
            icount: s.icount,
            vm_clock_nsec: s.vm_clock_nsec % 1_000_000_000,
            name: s.name.clone(),
            date_sec: s.date_sec,
            date_nsec: s.date_nsec,
            vm_clock_sec: s.vm_clock_nsec / 1_000_000_000,
            id: s.id.clone(),
            vm_state_size: s.vm_state_size,
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
struct Info {
    children: Vec<Child>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backing_filename_format: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    snapshots: Vec<SnapshotJson>,
    #[serde(skip)]
    snapshot_list: Vec<image::format::SnapshotInfo>,
    virtual_size: u64,
    filename: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster_size: Option<u64>,
    format: String,
    actual_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    format_specific: Option<QemuOrder>,
    #[serde(skip_serializing_if = "Option::is_none")]
    full_backing_filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backing_filename: Option<String>,
    dirty_flag: bool,
    local_bytes: u64,
    chain_bytes: u64,
    local_percent: f64,
    backing_chain: Vec<LayerInfo>,
}

pub async fn run(a: Args) -> anyhow::Result<ExitCode> {
    let path = &a.common.image;
    let layers = walk_chain(path, a.common.format.clone(), a.common.force_share).await?;
    let chain = open_chain(path, a.common.format.clone(), a.common.force_share).await?;
    let size = chain.size();
    let extents = block_status_all(&*chain, 0, size)
        .await
        .map_err(|e| file_error(path, e))?;
    let local_bytes: u64 = extents
        .iter()
        .filter(|e| e.depth == Some(0))
        .map(|e| e.length)
        .sum();
    let chain_bytes: u64 = extents
        .iter()
        .filter(|e| e.depth.is_some())
        .map(|e| e.length)
        .sum();
    let local_percent = if chain_bytes == 0 {
        100.0
    } else {
        (local_bytes as f64 * 10000.0 / chain_bytes as f64).floor() / 100.0
    };

    let mut backing_chain = Vec::new();
    for l in &layers {
        let img = &l.image;
        let st = block_status_all(&**img, 0, img.size())
            .await
            .map_err(|e| file_error(path, e))?;
        backing_chain.push(LayerInfo {
            filename: l.filename.clone(),
            format: img.format().format_name().to_string(),
            virtual_size: img.size(),
            local_bytes: st
                .iter()
                .filter(|e| e.depth == Some(0))
                .map(|e| e.length)
                .sum(),
            actual_size: actual_size(std::path::Path::new(&l.filename))?,
        });
    }

    let top = &layers[0].image;
    let fmt = top.format();
    let format_specific = fmt.format_specific();
    let extended_l2 = format_specific
        .as_ref()
        .and_then(|v| v.pointer("/data/extended-l2"))
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let is_qcow2 = fmt.format_name() == "qcow2";
    let is_qed = fmt.format_name() == "qed";
    let cluster_size =
        (is_qcow2 || is_qed).then(|| fmt.granularity() * if extended_l2 { 32 } else { 1 });
    let spec = fmt.backing();
    let full_backing = layers
        .get(1)
        .map(|l| l.filename.clone())
        .or_else(|| spec.as_ref().map(|s| s.name.clone()));
    let actual = actual_size(path)?;
    let file_len = std::fs::metadata(path)
        .map_err(|e| anyhow::anyhow!("{}: stat: {e}", path.display()))?
        .len();
    let info = Info {
        children: vec![Child {
            name: "file",
            info: FileChildInfo {
                children: Vec::new(),
                // QEMU counts files in whole 512-byte sectors.
                virtual_size: file_len.next_multiple_of(512),
                filename: path.display().to_string(),
                format: "file",
                actual_size: actual,
                format_specific: FileSpecific {
                    r#type: "file",
                    data: Empty {},
                },
                dirty_flag: false,
            },
        }],
        backing_filename_format: spec.as_ref().and_then(|s| s.format.clone()),
        snapshots: fmt.snapshots().iter().map(SnapshotJson::from).collect(),
        snapshot_list: fmt.snapshots(),
        virtual_size: size,
        filename: path.display().to_string(),
        cluster_size,
        format: fmt.format_name().to_string(),
        actual_size: actual,
        format_specific: format_specific.map(QemuOrder),
        full_backing_filename: full_backing,
        backing_filename: spec.as_ref().map(|s| s.name.clone()),
        dirty_flag: (is_qcow2 && qcow2_dirty(path)?) || (is_qed && qed_need_check(path)?),
        local_bytes,
        chain_bytes,
        local_percent,
        backing_chain,
    };
    match a.common.output {
        Output::Json => println!("{}", to_qemu_json(&info)?),
        Output::Human => print_human(&info),
    }
    Ok(ExitCode::SUCCESS)
}

/// Keys in the order qemu-img 10 prints them (its QDict iteration order),
/// for the objects it prints; other keys follow in name order.
const QEMU_KEY_ORDER: [&str; 12] = [
    "type",
    "data",
    "compat",
    "compression-type",
    "lazy-refcounts",
    "bitmaps",
    "refcount-bits",
    "corrupt",
    "extended-l2",
    // In each `bitmaps` entry.
    "flags",
    "name",
    "granularity",
];

/// A JSON value whose object keys serialize in [`QEMU_KEY_ORDER`].
#[derive(Debug)]
struct QemuOrder(serde_json::Value);

impl Serialize for QemuOrder {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.0 {
            serde_json::Value::Object(m) => {
                let rank = |k: &str| {
                    QEMU_KEY_ORDER
                        .iter()
                        .position(|x| *x == k)
                        .unwrap_or(usize::MAX)
                };
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort_by(|a, b| rank(a).cmp(&rank(b)).then(a.cmp(b)));
                s.collect_map(keys.into_iter().map(|k| (k, QemuOrder(m[k].clone()))))
            }
            serde_json::Value::Array(a) => s.collect_seq(a.iter().map(|v| QemuOrder(v.clone()))),
            other => other.serialize(s),
        }
    }
}

/// The keys of `m` in [`QEMU_KEY_ORDER`].
fn qemu_ordered_keys(m: &serde_json::Map<String, serde_json::Value>) -> Vec<&String> {
    let rank = |k: &str| {
        QEMU_KEY_ORDER
            .iter()
            .position(|x| *x == k)
            .unwrap_or(usize::MAX)
    };
    let mut keys: Vec<&String> = m.keys().collect();
    keys.sort_by(|a, b| rank(a).cmp(&rank(b)).then(a.cmp(b)));
    keys
}

/// Whether the qcow2 v3 header has the dirty bit (incompatible feature 0) set.
fn qcow2_dirty(path: &std::path::Path) -> anyhow::Result<bool> {
    use std::os::unix::fs::FileExt;
    let f =
        std::fs::File::open(path).map_err(|e| anyhow::anyhow!("{}: open: {e}", path.display()))?;
    let mut h = [0u8; 80];
    f.read_exact_at(&mut h, 0)
        .map_err(|e| anyhow::anyhow!("{}: read header: {e}", path.display()))?;
    let version = u32::from_be_bytes(h[4..8].try_into().expect("4 bytes"));
    let incompatible = u64::from_be_bytes(h[72..80].try_into().expect("8 bytes"));
    Ok(version >= 3 && incompatible & 1 != 0)
}

/// Whether the QED header has the need-check flag set (qemu reports it as
/// the dirty flag).
fn qed_need_check(path: &std::path::Path) -> anyhow::Result<bool> {
    use std::os::unix::fs::FileExt;
    let f =
        std::fs::File::open(path).map_err(|e| anyhow::anyhow!("{}: open: {e}", path.display()))?;
    let mut h = [0u8; 24];
    f.read_exact_at(&mut h, 0)
        .map_err(|e| anyhow::anyhow!("{}: read header: {e}", path.display()))?;
    let features = u64::from_le_bytes(h[16..24].try_into().expect("8 bytes"));
    Ok(features & image::qed::header::F_NEED_CHECK != 0)
}

/// JSON indented by four spaces, as qemu-img prints it.
pub fn to_qemu_json<T: Serialize>(v: &T) -> anyhow::Result<String> {
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    v.serialize(&mut ser)?;
    Ok(String::from_utf8(out)?)
}

/// A size as qemu's `size_to_str`: three significant digits and a binary unit.
pub fn size_to_str(v: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let mut i = 0;
    // qemu picks the unit with frexp(val / (1000/1024)); equivalent: the
    // largest unit in which the value is at least 1000/1024.
    while i + 1 < SUFFIXES.len()
        && (v as f64) / ((1u64 << ((i + 1) * 10)) as f64) >= 1000.0 / 1024.0
    {
        i += 1;
    }
    let x = v as f64 / (1u64 << (i * 10)) as f64;
    let digits = if x >= 100.0 {
        0
    } else if x >= 10.0 {
        1
    } else if x >= 1.0 {
        2
    } else {
        3
    };
    let mut s = format!("{x:.digits$}");
    if s.contains('.') {
        s = s.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    format!("{s} {}B", SUFFIXES[i])
}

fn print_human(i: &Info) {
    println!("image: {}", i.filename);
    println!("file format: {}", i.format);
    println!(
        "virtual size: {} ({} bytes)",
        size_to_str(i.virtual_size),
        i.virtual_size
    );
    println!("disk size: {}", size_to_str(i.actual_size));
    if let Some(c) = i.cluster_size {
        println!("cluster_size: {c}");
    }
    if let Some(b) = &i.backing_filename {
        match &i.full_backing_filename {
            Some(full) if full != b => println!("backing file: {b} (actual path: {full})"),
            _ => println!("backing file: {b}"),
        }
        if let Some(f) = &i.backing_filename_format {
            println!("backing file format: {f}");
        }
    }
    if i.dirty_flag {
        println!("cleanly shut down: no");
    }
    if !i.snapshot_list.is_empty() {
        println!("Snapshot list:");
        print!("{}", snapshot_table(&i.snapshot_list));
    }
    if let Some(data) = i.format_specific.as_ref().and_then(|v| v.0.get("data")) {
        println!("Format specific information:");
        print_value(data, 1);
    }
    println!(
        "local data: {} ({} bytes, {:.2}% of the {} allocated in the chain)",
        size_to_str(i.local_bytes),
        i.local_bytes,
        i.local_percent,
        size_to_str(i.chain_bytes)
    );
    if i.backing_chain.len() > 1 {
        println!("backing chain:");
        for (n, l) in i.backing_chain.iter().enumerate() {
            println!(
                "    {n}: {} ({}, virtual size {}, local {}, disk size {})",
                l.filename,
                l.format,
                size_to_str(l.virtual_size),
                size_to_str(l.local_bytes),
                size_to_str(l.actual_size)
            );
        }
    }
}

/// qemu-img's human rendering of a format-specific QAPI object.
fn print_value(v: &serde_json::Value, level: usize) {
    let pad = "    ".repeat(level);
    match v {
        serde_json::Value::Object(m) => {
            for k in qemu_ordered_keys(m) {
                let val = &m[k];
                let key = k.replace('-', " ");
                match val {
                    serde_json::Value::Object(_) | serde_json::Value::Array(_) => {
                        println!("{pad}{key}:");
                        print_value(val, level + 1);
                    }
                    serde_json::Value::String(s) => println!("{pad}{key}: {s}"),
                    other => println!("{pad}{key}: {other}"),
                }
            }
        }
        serde_json::Value::Array(a) => {
            for (n, item) in a.iter().enumerate() {
                println!("{pad}[{n}]:");
                print_value(item, level + 1);
            }
        }
        serde_json::Value::String(s) => println!("{pad}{s}"),
        other => println!("{pad}{other}"),
    }
}

/// The snapshot list as `qemu-img info` and `qemu-img snapshot -l` print it
/// (qemu's `bdrv_snapshot_dump`; dates in local time).
pub fn snapshot_table(list: &[image::format::SnapshotInfo]) -> String {
    let mut out = format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    );
    for s in list {
        let secs = s.vm_clock_nsec / 1_000_000_000;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60,
            (s.vm_clock_nsec / 1_000_000) % 1000
        );
        let icount = s.icount.map(|c| c.to_string()).unwrap_or_default();
        out += &format!(
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
            s.id,
            s.name,
            size_to_str(s.vm_state_size),
            local_date(s.date_sec),
            clock,
            icount
        );
    }
    out
}

/// `%Y-%m-%d %H:%M:%S` of `secs` since the epoch in local time, as qemu's
/// `localtime_r` + `strftime`.
fn local_date(secs: u64) -> String {
    let t = secs.min(i64::MAX as u64) as libc::time_t;
    // SAFETY: `tm` is plain old data that localtime_r fills in; both
    // pointers are valid for the call and not retained.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            return secs.to_string();
        }
        tm
    };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

#[cfg(test)]
mod tests {
    use super::size_to_str;

    #[test]
    fn sizes_print_like_qemu() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(4096), "4 KiB");
        assert_eq!(size_to_str(331776), "324 KiB");
        assert_eq!(size_to_str(1 << 20), "1 MiB");
        assert_eq!(size_to_str(3 << 29), "1.5 GiB");
        assert_eq!(size_to_str(1000), "0.977 KiB");
    }
}
