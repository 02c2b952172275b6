//! What a `send` is asked to do ([`SendOptions`]), what it reports
//! ([`SendReport`]) and how it fails ([`SendError`]).

use super::TransferError;
use super::pageout_sent::PageoutSentReport;
use super::postcopy::PostcopySendStats;
use super::progress::PassSent;
use super::resume;
use super::stores::ObjectChoice;
use crate::dump::{DumpError, DumpOptions, DumpReport, PrecopyEnd};

/// How to send.
#[derive(Clone, Debug)]
pub struct SendOptions {
    /// The passes (`out` only names the destination in the report).
    pub dump: DumpOptions,
    /// Only this shared object's pages (to `receive --into FILE`).
    pub object: Option<ObjectChoice>,
    /// The pre-shared key.
    pub psk: Option<Vec<u8>>,
    /// Bytes per second at most.
    pub bandwidth: Option<u64>,
    /// After the receiver's acknowledgement, page the sent pages out.
    pub pageout_sent: bool,
    /// Post-copy after at most this many pre-copy passes (`postcopy/`).
    pub postcopy_after: Option<u32>,
    /// Continue a transfer the receiver kept (`--resume`).
    pub resume: bool,
    /// Post-copy: where and how long to reconnect after a drop
    /// (`postcopy/reconnect.rs`); `None`: no reconnect.
    pub postcopy_reconnect: Option<super::postcopy::Reconnect>,
}

/// What a send did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SendReport {
    /// The dump's passes.
    pub dump: DumpReport,
    /// Bytes written to the stream.
    pub bytes_sent: u64,
    /// Pages sent (a page sent in several passes counts each time).
    pub pages_sent: u64,
    /// Seconds from the handshake to the acknowledgement.
    pub seconds: f64,
    /// Seconds the process was stopped (the final pass): the downtime.
    pub downtime_s: f64,
    /// The stream's measured bandwidth at the end, bytes/s (smoothed;
    /// never above `--bandwidth`).
    pub bandwidth_bytes_s: f64,
    /// Why pre-copy ended.
    pub precopy_end: PrecopyEnd,
    /// Whether pre-copy converged (what is left fit in `--max-downtime`,
    /// or nothing was written) rather than hit `--max-iterations` or
    /// `--max-time`.
    pub converged: bool,
    /// Every pass as the stream saw it: pages and bytes sent.
    pub passes: Vec<PassSent>,
    /// The receiver's acknowledgement.
    pub receiver: String,
    /// What `pageout_sent` did.
    pub pageout_sent: Option<PageoutSentReport>,
    /// The post-copy phase, if there was one.
    pub postcopy: Option<PostcopySendStats>,
    /// What `--resume` spared.
    pub resumed: resume::Resumed,
}

/// A send's failure: the stream's, or the dump's own.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The stream failed or the receiver refused.
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// The dump failed (the receiver was told to discard everything).
    #[error(transparent)]
    Dump(#[from] DumpError),
}
