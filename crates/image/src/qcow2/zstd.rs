//! zstd-compressed clusters (compression type 1, incompatible bit 3).
//!
//! The decision to know: qemu writes one zstd frame per cluster and its L2
//! entry gives only a sector-rounded upper bound of the frame's length, so
//! the bytes after the frame are whatever follows in the file. Decoding
//! therefore stops when the cluster is full or the frame ends, never parses
//! what follows, and never produces more than a cluster (plus one zstd
//! block) whatever a hostile frame claims.

/// Inflates the zstd frame at the start of `input` into `out` (one cluster).
/// `Err` carries a reason when the frame is damaged or does not fill `out`
/// exactly.
pub fn decompress(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};
    use std::io::Read as _;
    let mut src = input;
    let mut d = FrameDecoder::new();
    d.init(&mut src).map_err(|e| e.to_string())?;
    let mut filled = 0;
    loop {
        let want = out.len() - filled;
        d.decode_blocks(&mut src, BlockDecodingStrategy::UptoBytes(want.max(1)))
            .map_err(|e| e.to_string())?;
        let n = d.read(&mut out[filled..]).map_err(|e| e.to_string())?;
        filled += n;
        if d.is_finished() && d.can_collect() == 0 {
            break;
        }
        if filled == out.len() {
            if d.can_collect() > 0 {
                return Err(format!("the frame holds more than {} bytes", out.len()));
            }
            break;
        }
        if n == 0 && src.is_empty() {
            return Err("the frame is truncated".into());
        }
    }
    if filled != out.len() {
        return Err(format!("the frame holds {filled} bytes, not {}", out.len()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A zstd frame of `data` in raw blocks (no compression needed to test
    /// the framing), as any conforming encoder may write it.
    fn raw_frame(data: &[u8]) -> Vec<u8> {
        let mut f = vec![0x28, 0xb5, 0x2f, 0xfd];
        // Frame header descriptor: single segment, 4-byte content size.
        f.push(0b1010_0000);
        f.extend_from_slice(&(data.len() as u32).to_le_bytes());
        let chunks: Vec<&[u8]> = data.chunks(128 << 10).collect();
        for (i, c) in chunks.iter().enumerate() {
            let last = u32::from(i + 1 == chunks.len());
            let header = last | ((c.len() as u32) << 3); // block type 0: raw
            f.extend_from_slice(&header.to_le_bytes()[..3]);
            f.extend_from_slice(c);
        }
        f
    }

    #[test]
    fn zstd_frame_followed_by_garbage_inflates_to_one_cluster() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i * 7) as u8).collect();
        let mut input = raw_frame(&data);
        input.extend_from_slice(&[0xaa; 700]);
        let mut out = vec![0u8; 65536];
        decompress(&input, &mut out).unwrap();
        assert!(out == data);
    }

    #[test]
    fn zstd_frame_of_the_wrong_size_is_an_error() {
        let data = vec![5u8; 4096];
        let mut out = vec![0u8; 8192];
        assert!(decompress(&raw_frame(&data), &mut out).is_err());
        let big = vec![5u8; 16384];
        assert!(decompress(&raw_frame(&big), &mut out).is_err());
    }

    #[test]
    fn zstd_garbage_is_an_error_not_a_panic() {
        let mut out = vec![0u8; 4096];
        assert!(decompress(&[0u8; 100], &mut out).is_err());
        assert!(decompress(&[], &mut out).is_err());
        let mut f = raw_frame(&[1u8; 4096]);
        f.truncate(50);
        assert!(decompress(&f, &mut out).is_err());
    }
}
