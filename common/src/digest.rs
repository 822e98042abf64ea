//! sha256 digests that name artifacts everywhere in convoy.

use std::fmt;
use std::io::{self, Read};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest([u8; 32]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid sha256 digest {0:?}: expected 64 lowercase hex digits")]
pub struct InvalidDigest(pub String);

impl Digest {
    pub fn parse(hex_str: &str) -> Result<Self, InvalidDigest> {
        let bad = || InvalidDigest(hex_str.to_owned());
        if hex_str.len() != 64 || hex_str.chars().any(|c| c.is_ascii_uppercase()) {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_str, &mut out).map_err(|_| bad())?;
        Ok(Self(out))
    }

    pub fn of_bytes(data: &[u8]) -> Self {
        Self(Sha256::digest(data).into())
    }

    pub fn of_reader(reader: impl Read) -> io::Result<Self> {
        let mut hasher = Hasher::new();
        hasher.update_from(reader)?;
        Ok(hasher.finish())
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

/// Incremental hashing, for bytes that arrive in chunks.
#[derive(Default)]
pub struct Hasher(Sha256);

impl Hasher {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }
    /// Hashes everything `reader` yields; returns how many bytes that was.
    pub fn update_from(&mut self, mut reader: impl Read) -> io::Result<u64> {
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            self.update(&buf[..n]);
            total += n as u64;
        }
    }
    pub fn finish(self) -> Digest {
        Digest(self.0.finalize().into())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_hex())
    }
}

impl TryFrom<String> for Digest {
    type Error = InvalidDigest;
    fn try_from(value: String) -> Result<Self, InvalidDigest> {
        Self::parse(&value)
    }
}

impl From<Digest> for String {
    fn from(value: Digest) -> String {
        value.to_hex()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_known_value() {
        let d = Digest::of_bytes(b"abc");
        assert_eq!(
            d.to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(Digest::parse(&d.to_hex()).unwrap(), d);
        assert_eq!(Digest::of_reader(&b"abc"[..]).unwrap(), d);
    }

    #[test]
    fn refuses_bad_hex() {
        assert!(Digest::parse("abc").is_err());
        assert!(Digest::parse(&"A".repeat(64)).is_err());
        assert!(Digest::parse(&"g".repeat(64)).is_err());
    }
}
