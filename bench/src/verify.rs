//! Verify mode's block tags.
//!
//! Every device block a verify job writes starts with a header (magic, the
//! block's own LBA, a generation) followed by a payload generated from the
//! LBA and generation, so a read can tell a correct block from one that is
//! corrupt, misplaced (another LBA's data), stale (an older generation than
//! the job last wrote), or missing (zeros where a write was acknowledged).
//!
//! A generation is `run nonce << 32 | write count of the block in that run`:
//! within a run the reader knows the exact generation to expect; a block
//! written by an earlier run is checked for integrity and placement only.

use serde::{Deserialize, Serialize};

use crate::rng::{splitmix64, Rng};

/// The first eight bytes of every tagged block.
pub const MAGIC: u64 = u64::from_le_bytes(*b"CAIRNVFY");
/// Bytes of header before the payload.
pub const HEADER_LEN: usize = 24;

/// What is wrong with a block that failed verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum MismatchKind {
    /// The block holds neither a tag nor zeros.
    NotTagged,
    /// The block is tagged for another LBA (a misdirected write or read).
    WrongLba { found: u64 },
    /// The payload differs from what the tag says was written.
    CorruptPayload { generation: u64, byte_offset: usize },
    /// The block holds another generation than the one last written.
    WrongGeneration { expected: u64, found: u64 },
    /// The block reads as zeros although a write to it completed.
    MissingWrite { expected: u64 },
}

/// One block that failed verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mismatch {
    /// Device LBA of the block.
    pub lba: u64,
    /// What was wrong.
    pub kind: MismatchKind,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            MismatchKind::NotTagged => write!(f, "lba {}: not a verify block", self.lba),
            MismatchKind::WrongLba { found } => {
                write!(f, "lba {}: holds the block of lba {found}", self.lba)
            }
            MismatchKind::CorruptPayload {
                generation,
                byte_offset,
            } => write!(
                f,
                "lba {}: payload of generation {generation:#x} differs at byte {byte_offset}",
                self.lba
            ),
            MismatchKind::WrongGeneration { expected, found } => write!(
                f,
                "lba {}: generation {found:#x}, expected {expected:#x}",
                self.lba
            ),
            MismatchKind::MissingWrite { expected } => write!(
                f,
                "lba {}: zeros, expected generation {expected:#x}",
                self.lba
            ),
        }
    }
}

/// What a read block holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockState {
    /// All zeros: never written.
    Zeroed,
    /// A valid tag of this LBA with this generation.
    Tagged { generation: u64 },
    /// Something else.
    Bad(MismatchKind),
}

fn payload_rng(lba: u64, generation: u64) -> Rng {
    Rng::new(splitmix64(lba ^ MAGIC) ^ generation.rotate_left(29))
}

/// Tags every `dev_block`-byte block of `buf`, the first of which is `lba`.
pub fn fill(buf: &mut [u8], lba: u64, dev_block: usize, generation: u64) {
    for (i, block) in buf.chunks_exact_mut(dev_block).enumerate() {
        let this = lba + i as u64;
        block[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        block[8..16].copy_from_slice(&this.to_le_bytes());
        block[16..24].copy_from_slice(&generation.to_le_bytes());
        let mut rng = payload_rng(this, generation);
        for word in block[HEADER_LEN..].chunks_exact_mut(8) {
            word.copy_from_slice(&rng.next_u64().to_le_bytes());
        }
    }
}

fn word(block: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&block[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Classifies one device block read from `lba`.
pub fn check_block(block: &[u8], lba: u64) -> BlockState {
    if block.len() < HEADER_LEN {
        return BlockState::Bad(MismatchKind::NotTagged);
    }
    if word(block, 0) != MAGIC {
        return if block.iter().all(|&b| b == 0) {
            BlockState::Zeroed
        } else {
            BlockState::Bad(MismatchKind::NotTagged)
        };
    }
    let found = word(block, 8);
    if found != lba {
        return BlockState::Bad(MismatchKind::WrongLba { found });
    }
    let generation = word(block, 16);
    let mut rng = payload_rng(lba, generation);
    for (i, w) in block[HEADER_LEN..].chunks_exact(8).enumerate() {
        if w != rng.next_u64().to_le_bytes() {
            let at = HEADER_LEN + i * 8;
            let byte_offset = at
                + w.iter()
                    .zip(rng_word_bytes(lba, generation, i))
                    .position(|(a, b)| *a != b)
                    .unwrap_or(0);
            return BlockState::Bad(MismatchKind::CorruptPayload {
                generation,
                byte_offset,
            });
        }
    }
    BlockState::Tagged { generation }
}

/// The bytes of payload word `i` (only used to locate a corrupt byte).
fn rng_word_bytes(lba: u64, generation: u64, i: usize) -> [u8; 8] {
    let mut rng = payload_rng(lba, generation);
    let mut w = 0;
    for _ in 0..=i {
        w = rng.next_u64();
    }
    w.to_le_bytes()
}

/// Checks a block against what this run last wrote to it: `expected` is the
/// generation of the last completed write in this run, if any.
pub fn verify_block(block: &[u8], lba: u64, expected: Option<u64>) -> Result<bool, Mismatch> {
    let bad = |kind| Err(Mismatch { lba, kind });
    match (check_block(block, lba), expected) {
        (BlockState::Bad(kind), _) => bad(kind),
        (BlockState::Zeroed, None) => Ok(false),
        (BlockState::Zeroed, Some(expected)) => bad(MismatchKind::MissingWrite { expected }),
        (BlockState::Tagged { .. }, None) => Ok(true),
        (BlockState::Tagged { generation }, Some(expected)) if generation == expected => Ok(true),
        (BlockState::Tagged { generation }, Some(expected)) => bad(MismatchKind::WrongGeneration {
            expected,
            found: generation,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_detect_every_kind_of_damage() {
        let mut buf = vec![0u8; 4 * 512];
        assert_eq!(verify_block(&buf[..512], 10, None), Ok(false));
        fill(&mut buf, 10, 512, 7);
        for i in 0..4 {
            let blk = &buf[i * 512..(i + 1) * 512];
            assert_eq!(verify_block(blk, 10 + i as u64, Some(7)), Ok(true));
            assert_eq!(verify_block(blk, 10 + i as u64, None), Ok(true));
        }
        let b1 = &buf[512..1024];
        assert_eq!(
            verify_block(b1, 10, None).unwrap_err().kind,
            MismatchKind::WrongLba { found: 11 }
        );
        assert_eq!(
            verify_block(b1, 11, Some(8)).unwrap_err().kind,
            MismatchKind::WrongGeneration {
                expected: 8,
                found: 7
            }
        );
        assert_eq!(
            verify_block(&[0u8; 512], 11, Some(8)).unwrap_err().kind,
            MismatchKind::MissingWrite { expected: 8 }
        );
        let mut corrupt = b1.to_vec();
        corrupt[300] ^= 0x40;
        assert_eq!(
            verify_block(&corrupt, 11, Some(7)).unwrap_err().kind,
            MismatchKind::CorruptPayload {
                generation: 7,
                byte_offset: 300
            }
        );
        let mut junk = vec![0u8; 512];
        junk[5] = 1;
        assert_eq!(
            verify_block(&junk, 11, None).unwrap_err().kind,
            MismatchKind::NotTagged
        );
    }
}
