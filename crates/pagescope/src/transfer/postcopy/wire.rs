//! Post-copy's records (`docs/stream-format.md`, "Post-copy"): the
//! sender's list of the pages still to come once the source stopped, the
//! switch, and the receiver's requests on the return path. Only a session
//! whose hellos both carry [`CAP_POSTCOPY`] exchanges them.

/// Capability bit 3: this side runs post-copy in this session.
pub const CAP_POSTCOPY: u64 = 1 << 3;

/// Kind: pages of a store that are still to come (sender).
pub const PENDING: u8 = 30;
/// Kind: the switch: every page not pending is final (sender).
pub const START: u8 = 31;
/// Kind: pages the receiver wants first (receiver).
pub const REQUEST: u8 = 32;

/// Ranges one `PENDING` record carries at most (16 bytes each, under the
/// frame bound).
pub const MAX_RANGES: usize = 1 << 16;

/// Whether `kind` is one of post-copy's records.
pub fn owns(kind: u8) -> bool {
    matches!(kind, PENDING | START | REQUEST)
}

/// A post-copy record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PostcopyRecord {
    /// Pages `(first, count)` of `store` will be sent after the switch.
    Pending {
        /// The store.
        store: u32,
        /// Ranges of pages: first and count.
        ranges: Vec<(u64, u64)>,
    },
    /// The switch: `pending` pages in all are still to come; every other
    /// page the receiver holds is final.
    Start {
        /// Pages listed in the `PENDING` records.
        pending: u64,
    },
    /// Send pages `first..first + count` of `store` before the others.
    Request {
        /// The store.
        store: u32,
        /// The first page.
        first: u64,
        /// How many.
        count: u64,
    },
}

impl PostcopyRecord {
    /// The frame kind.
    pub fn kind(&self) -> u8 {
        match self {
            Self::Pending { .. } => PENDING,
            Self::Start { .. } => START,
            Self::Request { .. } => REQUEST,
        }
    }

    /// The payload bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        match self {
            Self::Pending { store, ranges } => {
                b.extend_from_slice(&store.to_le_bytes());
                for (first, count) in ranges {
                    b.extend_from_slice(&first.to_le_bytes());
                    b.extend_from_slice(&count.to_le_bytes());
                }
            }
            Self::Start { pending } => b.extend_from_slice(&pending.to_le_bytes()),
            Self::Request {
                store,
                first,
                count,
            } => {
                b.extend_from_slice(&store.to_le_bytes());
                b.extend_from_slice(&first.to_le_bytes());
                b.extend_from_slice(&count.to_le_bytes());
            }
        }
        b
    }

    /// Decodes a payload of `kind` (one [`owns`]): exact lengths only.
    pub fn decode(kind: u8, p: &[u8]) -> Result<Self, String> {
        let u32_at = |o: usize| u32::from_le_bytes(p[o..o + 4].try_into().unwrap_or_default());
        let u64_at = |o: usize| u64::from_le_bytes(p[o..o + 8].try_into().unwrap_or_default());
        let bad = || format!("post-copy record of kind {kind}: {} bytes", p.len());
        match kind {
            PENDING => {
                if p.len() < 4
                    || !(p.len() - 4).is_multiple_of(16)
                    || (p.len() - 4) / 16 > MAX_RANGES
                {
                    return Err(bad());
                }
                let ranges = (4..p.len())
                    .step_by(16)
                    .map(|o| (u64_at(o), u64_at(o + 8)))
                    .collect();
                Ok(Self::Pending {
                    store: u32_at(0),
                    ranges,
                })
            }
            START if p.len() == 8 => Ok(Self::Start { pending: u64_at(0) }),
            REQUEST if p.len() == 20 => Ok(Self::Request {
                store: u32_at(0),
                first: u64_at(4),
                count: u64_at(12),
            }),
            _ => Err(bad()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_bad_lengths_are_refused() {
        let recs = [
            PostcopyRecord::Pending {
                store: 0,
                ranges: vec![(1, 2), (10, 1)],
            },
            PostcopyRecord::Start { pending: 3 },
            PostcopyRecord::Request {
                store: 0,
                first: 7,
                count: 16,
            },
        ];
        for r in recs {
            let b = r.encode();
            assert_eq!(PostcopyRecord::decode(r.kind(), &b), Ok(r.clone()));
            assert!(PostcopyRecord::decode(r.kind(), &b[..b.len() - 1]).is_err());
        }
        assert!(PostcopyRecord::decode(PENDING, &[0; 3]).is_err());
        assert!(PostcopyRecord::decode(REQUEST, &[0; 21]).is_err());
    }
}
