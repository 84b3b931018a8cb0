//! `diskstream map`: where each guest range of an image lives, printed
//! exactly as `qemu-img map` of QEMU 10 prints it.
//!
//! Block status of the whole chain comes from `block_status_all`; each
//! extent becomes qemu-img's `MapEntry` (`present` = allocated in some layer,
//! `zero`, `data`, `compressed`, `offset` when the layer stores the range
//! uncompressed at a known place, `depth` by [`image::Extent::qemu_map_depth`]:
//! an unallocated range reports the bottom layer with `present: false`), and
//! entries are merged with qemu-img's `entry_mergeable` rule, so the JSON is
//! byte-for-byte what qemu-img prints. The human format lists only data, with
//! the file of the layer that holds it.

use std::process::ExitCode;

use image::device::block_status_all;
use image::{BlockDevice, Extent, ExtentKind};

use super::{ImageArgs, Output, file_error, open_chain, walk_chain};

/// Show which ranges of an image hold data, zeros or nothing, and in which
/// layer of the backing chain.
///
/// `depth` is the layer (0 = IMAGE, 1 = its backing ...); ranges allocated
/// nowhere report the bottom layer with present=false. The JSON output is
/// identical to `qemu-img map --output=json`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    common: ImageArgs,
}

/// qemu-img's `MapEntry`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub length: u64,
    pub depth: u32,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub compressed: bool,
    pub offset: Option<u64>,
}

impl MapEntry {
    pub fn from_extent(e: &Extent, layers: u32) -> Self {
        MapEntry {
            start: e.offset,
            length: e.length,
            depth: e.qemu_map_depth(layers),
            present: e.kind != ExtentKind::Hole,
            zero: e.kind != ExtentKind::Data,
            data: e.kind == ExtentKind::Data,
            compressed: e.compressed,
            offset: e.host_offset,
        }
    }

    /// qemu-img's `entry_mergeable` (same depth implies the same file).
    fn mergeable(&self, next: &MapEntry) -> bool {
        self.length > 0
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && self.depth == next.depth
            && self.present == next.present
            && match (self.offset, next.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + self.length == b,
                _ => false,
            }
    }

    /// One JSON object as qemu-img's `dump_map_entry` prints it.
    pub fn to_json(&self) -> String {
        let mut s = format!(
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
            self.start,
            self.length,
            self.depth,
            self.present,
            self.zero,
            self.data,
            self.compressed
        );
        if let Some(o) = self.offset {
            s += &format!(", \"offset\": {o}");
        }
        s.push('}');
        s
    }
}

/// Turns block status into qemu-img's merged entries. `sizes` are the
/// virtual sizes of the chain's layers, top first: a range allocated nowhere
/// reports the bottom layer, except past the end of a shorter backing, where
/// QEMU stops at the layer whose backing ends (it reads as zeros there
/// without asking further down).
/// `layers` counts the whole chain (`sizes` may stop early, at a URI backing).
pub fn entries(extents: &[Extent], layers: u32, sizes: &[u64]) -> Vec<MapEntry> {
    let mut out: Vec<MapEntry> = Vec::new();
    let mut push = |next: MapEntry| match out.last_mut() {
        Some(cur) if cur.mergeable(&next) => cur.length += next.length,
        _ => out.push(next),
    };
    for e in extents {
        if e.kind != ExtentKind::Hole {
            push(MapEntry::from_extent(e, layers));
            continue;
        }
        // Split the hole where a backing ends, then give each piece the
        // first layer whose backing ends at or before it.
        let mut cuts: Vec<u64> = sizes
            .iter()
            .skip(1)
            .copied()
            .filter(|&s| s > e.offset && s < e.end())
            .collect();
        cuts.sort_unstable();
        cuts.push(e.end());
        let mut start = e.offset;
        for cut in cuts {
            if cut <= start {
                continue;
            }
            let mut piece = MapEntry::from_extent(e, layers);
            piece.start = start;
            piece.length = cut - start;
            if let Some(d) = (0..sizes.len().saturating_sub(1)).find(|&i| start >= sizes[i + 1]) {
                piece.depth = d as u32;
            }
            push(piece);
            start = cut;
        }
    }
    out
}

/// The whole `--output=json` text, trailing newline included.
pub fn render_json(entries: &[MapEntry]) -> String {
    let body: Vec<String> = entries.iter().map(MapEntry::to_json).collect();
    format!("[{}]\n", body.join(",\n"))
}

pub async fn run(a: Args) -> anyhow::Result<ExitCode> {
    let path = &a.common.image;
    let chain = open_chain(path, a.common.format.clone(), a.common.force_share).await?;
    let extents = block_status_all(&*chain, 0, chain.size())
        .await
        .map_err(|e| file_error(path, e))?;
    let layers = walk_chain(path, a.common.format.clone(), a.common.force_share).await?;
    let sizes: Vec<u64> = layers.iter().map(|l| l.image.size()).collect();
    let mut entries = entries(&extents, chain.info().layers, &sizes);
    if entries.is_empty() {
        // An empty image: qemu-img prints its zero-initialised first entry.
        entries.push(MapEntry {
            start: 0,
            length: 0,
            depth: 0,
            present: false,
            zero: false,
            data: false,
            compressed: false,
            offset: None,
        });
    }
    match a.common.output {
        Output::Json => print!("{}", render_json(&entries)),
        Output::Human => {
            let names: Vec<&str> = layers.iter().map(|l| l.filename.as_str()).collect();
            println!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
            for e in entries.iter().filter(|e| e.data && !e.zero) {
                let Some(off) = e.offset else {
                    anyhow::bail!(
                        "{}: file contains compressed clusters; use --output json",
                        path.display()
                    );
                };
                let file = names.get(e.depth as usize).copied().unwrap_or("");
                println!(
                    "{:<16}{:<16}{:<16}{file}",
                    hex(e.start),
                    hex(e.length),
                    hex(off)
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// C's `%#x`: `0` stays `0`, anything else gets `0x`.
fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}
