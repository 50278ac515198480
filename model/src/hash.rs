//! FNV-1a, the one checksum of the toolkit: which windows a saved teacher file belongs to,
//! whether data changed between a run and its resume, stable parameter ids. Hand-written
//! (a few lines) because none of these needs cryptographic strength, only the same value in
//! every process and version.

/// FNV-1a (64-bit) of a byte sequence.
pub fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// FNV-1a of token windows (their ids as little-endian u32, in order), as 16 hex digits.
pub fn windows_fnv1a(windows: &[Vec<u32>]) -> String {
    let h = fnv1a(windows.iter().flatten().flat_map(|t| t.to_le_bytes()));
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // Reference values of FNV-1a 64.
        assert_eq!(fnv1a(*b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(*b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(
            windows_fnv1a(&[vec![0x61]]),
            format!("{:016x}", fnv1a([0x61, 0, 0, 0]))
        );
    }
}
