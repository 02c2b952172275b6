//! Post-copy's records (`docs/stream-format.md`, "Post-copy"): the
//! sender's list of the pages still to come once the source stopped, the
//! switch, and the receiver's requests on the return path. Only a session
//! whose hellos both carry [`CAP_POSTCOPY`] exchanges them.

/// Capability bit 3: this side runs post-copy in this session.
pub const CAP_POSTCOPY: u64 = 1 << 3;
/// Capability bit 4: this side resumes post-copy over a new connection
/// after a drop (`RESUMABLE`, `RECONNECT`, `LACK`).
pub const CAP_POSTCOPY_RESUME: u64 = 1 << 4;

/// Capability bit 5: this side carries requested pages over a second
/// connection, the urgent channel (`PREEMPT`, `URGENT`, `URGENT_END`);
/// used only when both hellos also carry [`CAP_POSTCOPY_RESUME`].
pub const CAP_POSTCOPY_PREEMPT: u64 = 1 << 5;

/// Kind: pages of a store that are still to come (sender).
pub const PENDING: u8 = 30;
/// Kind: the switch: every page not pending is final (sender).
pub const START: u8 = 31;
/// Kind: pages the receiver wants first (receiver).
pub const REQUEST: u8 = 32;
/// Kind: the transfer's id, to reconnect with (receiver, first thing
/// after the handshake when the sender offered [`CAP_POSTCOPY_RESUME`]).
pub const RESUMABLE: u8 = 33;
/// Kind: a reconnecting sender names the transfer it continues (sender,
/// first thing after the handshake of the new connection).
pub const RECONNECT: u8 = 34;
/// Kind: pages the receiver still lacks, its answer to `RECONNECT`
/// (receiver; the last one says so).
pub const LACK: u8 = 35;

/// Kind: the sender opens the urgent channel now (sender, main stream,
/// before `START`).
pub const PREEMPT: u8 = 36;
/// Kind: the first record of the urgent channel, naming the transfer
/// (sender, after that connection's handshake).
pub const URGENT: u8 = 37;
/// Kind: the urgent channel's last record: the pages it carried (sender,
/// before `META` on the main stream).
pub const URGENT_END: u8 = 38;

/// Ranges one `PENDING` record carries at most (16 bytes each, under the
/// frame bound).
pub const MAX_RANGES: usize = 1 << 16;

/// Whether `kind` is one of post-copy's records.
pub fn owns(kind: u8) -> bool {
    matches!(
        kind,
        PENDING | START | REQUEST | RESUMABLE | RECONNECT | LACK | PREEMPT | URGENT | URGENT_END
    )
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
    /// The transfer's id (a random number the receiver chose).
    Resumable {
        /// The id.
        id: u64,
    },
    /// The sender reconnects to continue transfer `id`.
    Reconnect {
        /// The id the receiver gave.
        id: u64,
    },
    /// The sender opens the urgent channel now.
    Preempt,
    /// The urgent channel of transfer `id`.
    Urgent {
        /// The id the receiver gave.
        id: u64,
    },
    /// The urgent channel ends: `pages` pages went over it.
    UrgentEnd {
        /// Pages sent over the urgent channel.
        pages: u64,
    },
    /// Pages `(first, count)` of the object the receiver still lacks.
    Lack {
        /// Whether this is the last `LACK` record.
        last: bool,
        /// Ranges of pages: first and count.
        ranges: Vec<(u64, u64)>,
    },
}

impl PostcopyRecord {
    /// The frame kind.
    pub fn kind(&self) -> u8 {
        match self {
            Self::Pending { .. } => PENDING,
            Self::Start { .. } => START,
            Self::Request { .. } => REQUEST,
            Self::Resumable { .. } => RESUMABLE,
            Self::Reconnect { .. } => RECONNECT,
            Self::Lack { .. } => LACK,
            Self::Preempt => PREEMPT,
            Self::Urgent { .. } => URGENT,
            Self::UrgentEnd { .. } => URGENT_END,
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
            Self::Resumable { id } | Self::Reconnect { id } | Self::Urgent { id } => {
                b.extend_from_slice(&id.to_le_bytes())
            }
            Self::UrgentEnd { pages } => b.extend_from_slice(&pages.to_le_bytes()),
            Self::Preempt => {}
            Self::Lack { last, ranges } => {
                b.push(u8::from(*last));
                for (first, count) in ranges {
                    b.extend_from_slice(&first.to_le_bytes());
                    b.extend_from_slice(&count.to_le_bytes());
                }
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
            LACK => {
                let n = p.len().wrapping_sub(1);
                if p.is_empty() || !n.is_multiple_of(16) || n / 16 > MAX_RANGES || p[0] > 1 {
                    return Err(bad());
                }
                let ranges = (1..p.len())
                    .step_by(16)
                    .map(|o| (u64_at(o), u64_at(o + 8)))
                    .collect();
                Ok(Self::Lack {
                    last: p[0] == 1,
                    ranges,
                })
            }
            START if p.len() == 8 => Ok(Self::Start { pending: u64_at(0) }),
            RESUMABLE if p.len() == 8 => Ok(Self::Resumable { id: u64_at(0) }),
            RECONNECT if p.len() == 8 => Ok(Self::Reconnect { id: u64_at(0) }),
            PREEMPT if p.is_empty() => Ok(Self::Preempt),
            URGENT if p.len() == 8 => Ok(Self::Urgent { id: u64_at(0) }),
            URGENT_END if p.len() == 8 => Ok(Self::UrgentEnd { pages: u64_at(0) }),
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
            PostcopyRecord::Resumable { id: 7 },
            PostcopyRecord::Reconnect { id: u64::MAX },
            PostcopyRecord::Lack {
                last: true,
                ranges: vec![(0, 4), (9, 1)],
            },
            PostcopyRecord::Urgent { id: 9 },
            PostcopyRecord::UrgentEnd { pages: 3 },
        ];
        for r in recs {
            let b = r.encode();
            assert_eq!(PostcopyRecord::decode(r.kind(), &b), Ok(r.clone()));
            assert!(PostcopyRecord::decode(r.kind(), &b[..b.len() - 1]).is_err());
        }
        assert!(PostcopyRecord::decode(PENDING, &[0; 3]).is_err());
        assert!(PostcopyRecord::decode(REQUEST, &[0; 21]).is_err());
        assert!(PostcopyRecord::decode(LACK, &[2]).is_err());
        let p = PostcopyRecord::Preempt;
        assert_eq!(PostcopyRecord::decode(PREEMPT, &p.encode()), Ok(p));
        assert!(PostcopyRecord::decode(PREEMPT, &[0]).is_err());
    }
}
