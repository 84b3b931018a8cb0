//! `diskstream check`: metadata consistency of an image, with qemu-img
//! check's output and exit codes.
//!
//! Exit codes are qemu-img's contract, which scripts rely on: 0 clean,
//! 1 the check could not be completed (the image did not open, or the check
//! itself failed), 2 corruptions, 3 only leaked clusters, 63 the format has
//! no checks (raw). The image is opened read-only unless `-r` asks for a
//! repair, and without its backing chain (a check never needs it).

use std::process::ExitCode;

use image::format::{CheckReport, Repair};
use image::open::{BackingChoice, OpenOptions};
use image::{CacheMode, ErrorKind, Image};
use serde::Serialize;

use super::{ImageArgs, Output, file_error};
use crate::cmd::info::to_qemu_json;

/// Check an image's metadata for corruption and leaked clusters.
///
/// Exit status: 0 no problem, 1 check not completed, 2 corruptions found,
/// 3 only leaks found, 63 the format has no checks. With -r the image is
/// opened read-write and repaired (leaks: leaked clusters only; all: also
/// corruptions), then checked again; -t sets how it is opened.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Repair: `leaks` or `all`.
    #[arg(short = 'r', long = "repair", value_enum)]
    repair: Option<RepairArg>,
    /// With -r: discard the image's persistent dirty bitmaps (qcow2), which
    /// a read-write open would otherwise refuse to leave stale.
    #[arg(long = "drop-bitmaps")]
    drop_bitmaps: bool,
    /// Cache mode of IMAGE: writeback (page cache) or none (O_DIRECT). A
    /// repair writes the image, and a host that keeps disk images out of
    /// the page cache wants those writes direct too.
    #[arg(short = 't', long = "cache", default_value = "writeback")]
    cache: CacheMode,
    #[command(flatten)]
    common: ImageArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum RepairArg {
    /// Free leaked clusters.
    Leaks,
    /// Free leaked clusters and fix corruptions.
    All,
}

/// qemu-img's `ImageCheck` JSON (fields that are zero are left out, as
/// qemu-img does; key order as qemu-img 10 prints the common case).
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
struct CheckJson<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    image_end_offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    total_clusters: Option<u64>,
    check_errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    allocated_clusters: Option<u64>,
    filename: String,
    format: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    fragmented_clusters: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    compressed_clusters: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    corruptions: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    leaks: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    corruptions_fixed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    leaks_fixed: Option<u64>,
}

fn nz(v: Option<u64>) -> Option<u64> {
    v.filter(|v| *v != 0)
}

pub async fn run(a: Args) -> anyhow::Result<ExitCode> {
    let path = &a.common.image;
    let repair = a.repair.map(|r| match r {
        RepairArg::Leaks => Repair::Leaks,
        RepairArg::All => Repair::All,
    });
    let opts = OpenOptions {
        writable: repair.is_some(),
        cache: a.cache,
        force_share: a.common.force_share,
        format: a.common.format.clone(),
        backing: BackingChoice::None,
        drop_bitmaps: a.drop_bitmaps,
        ..OpenOptions::default()
    };
    let img: std::sync::Arc<Image> = image::open(path, &opts)
        .await
        .map_err(|e| file_error(path, e))?;
    let fmt = std::sync::Arc::clone(img.format());
    let result = tokio::task::spawn_blocking(move || fmt.check(repair)).await?;
    let report = match result {
        Ok(r) => r,
        Err(e) if e.kind() == ErrorKind::Unsupported && img.format().format_name() == "raw" => {
            eprintln!(
                "diskstream: {}: this image format does not support checks",
                path.display()
            );
            return Ok(ExitCode::from(63));
        }
        Err(e) => {
            eprintln!("diskstream: {:#}", file_error(path, e));
            return Ok(ExitCode::from(1));
        }
    };
    img.close().await.map_err(|e| file_error(path, e))?;
    match a.common.output {
        Output::Human => print_human(&report),
        Output::Json => {
            let j = CheckJson {
                image_end_offset: nz(report.image_end_offset),
                total_clusters: nz(report.total_clusters),
                check_errors: report.check_errors,
                allocated_clusters: nz(report.allocated_clusters),
                filename: path.display().to_string(),
                format: img.format().format_name(),
                fragmented_clusters: nz(report.fragmented_clusters),
                compressed_clusters: nz(report.compressed_clusters),
                corruptions: nz(Some(report.corruptions)),
                leaks: nz(Some(report.leaks)),
                corruptions_fixed: nz(Some(report.corruptions_fixed)),
                leaks_fixed: nz(Some(report.leaks_fixed)),
            };
            println!("{}", to_qemu_json(&j)?);
        }
    }
    Ok(ExitCode::from(exit_code(&report)))
}

/// qemu-img check's exit status for a completed check.
pub fn exit_code(r: &CheckReport) -> u8 {
    if r.check_errors > 0 {
        1
    } else if r.corruptions > 0 {
        2
    } else if r.leaks > 0 {
        3
    } else {
        0
    }
}

/// qemu-img's `dump_human_image_check`.
fn print_human(r: &CheckReport) {
    for m in &r.messages {
        eprintln!("{m}");
    }
    if r.corruptions_fixed > 0 || r.leaks_fixed > 0 {
        println!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...",
            r.leaks_fixed, r.corruptions_fixed
        );
    }
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        println!("No errors were found on the image.");
    } else {
        if r.corruptions > 0 {
            println!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.",
                r.corruptions
            );
        }
        if r.leaks > 0 {
            println!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.",
                r.leaks
            );
        }
        if r.check_errors > 0 {
            println!(
                "\n{} internal errors have occurred during the check.",
                r.check_errors
            );
        }
    }
    let total = r.total_clusters.unwrap_or(0);
    let alloc = r.allocated_clusters.unwrap_or(0);
    if total != 0 && alloc != 0 {
        let pct = |n: u64, d: u64| n as f64 * 100.0 / d as f64;
        println!(
            "{alloc}/{total} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
            pct(alloc, total),
            pct(r.fragmented_clusters.unwrap_or(0), alloc),
            pct(r.compressed_clusters.unwrap_or(0), alloc)
        );
    }
    if let Some(end) = r.image_end_offset.filter(|e| *e != 0) {
        println!("Image end offset: {end}");
    }
}
