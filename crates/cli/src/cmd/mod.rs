//! One module per command.

pub mod daemon;
pub mod job;
pub mod pull;
pub mod pull_step;
pub mod qmp;
pub mod serve;
pub mod stream;

/// Parses a size or offset: bytes, or a number with a K/M/G/T/P/E suffix
/// (powers of 1024, as qemu-img).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'B' => 0,
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                'P' => 50,
                'E' => 60,
                _ => return Err(format!("'{s}': unknown size suffix '{c}'")),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let v: u64 = num.parse().map_err(|_| format!("'{s}': not a size"))?;
    v.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{s}': size too large"))
}
