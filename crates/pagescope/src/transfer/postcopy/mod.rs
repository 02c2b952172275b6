//! Post-copy: the destination runs before all memory has arrived, and a
//! page it touches first is fetched then (`docs/stream-format.md`,
//! "Post-copy"). Kernel interface: userfaultfd missing-page faults of
//! shared memory (`UFFDIO_REGISTER_MODE_MISSING` with
//! `UFFD_FEATURE_MISSING_SHMEM`, `UFFDIO_COPY`, `UFFDIO_WAKE`:
//! `sys/uffd.rs`), on a userfaultfd created inside the destination
//! process by the injection helper (`sys/inject/`, as `watch` does).
//!
//! * `wire.rs`: the records (`PENDING`, `START`, `REQUEST`, and for a
//!   dropped connection `RESUMABLE`, `RECONNECT`, `LACK`) and the
//!   capability bits;
//! * `dest.rs`: the destination process, its registered mappings of
//!   `FILE`, installing a page;
//! * `spill.rs`: the pre-copy pages held until the switch, in memory up
//!   to a bound, the rest in a temporary file;
//! * `state.rs`: every page's state and the counts, under one lock;
//! * `receiver.rs`: [`receive`]: the stream, the fault thread, the filler;
//! * `sender.rs`: the stopped pass kept and served on request (a layer
//!   over the stream's page sink);
//! * `preempt.rs`: the sender's urgent channel (requested pages over a
//!   second connection);
//! * `urgent.rs`: the receiver's side of it;
//! * `faults.rs`: the receiver's fault thread and filler;
//! * `reconnect.rs`: the sender connecting again after a drop;
//! * `rejoin.rs`: the receiver waiting for that connection.

mod dest;
mod faults;
mod preempt;
mod receiver;
mod reconnect;
mod rejoin;
mod sender;
mod spill;
mod state;
mod urgent;
pub(crate) mod wire;

pub use dest::Destination;
pub use receiver::{PostcopyReport, Rejoin, receive, receive_rejoining};
pub use sender::{PostcopySendStats, Reconnect};
pub(super) use sender::{plan, wrap};
pub use state::PostcopyStats;
