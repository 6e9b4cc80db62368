//! The kernel data plane as userspace sees it: loading, pinning and attaching the XDP program
//! ([`loader`]), typed handles on its maps behind the [`DataPlane`] trait ([`maps`], with an
//! in-memory [`fake`] for tests), the rate-limit event stream ([`events`]) and the monotonic
//! clock the kernel uses for expiry ([`clock`]).
pub mod clock;
pub mod events;
pub mod fake;
pub mod loader;
pub mod maps;

use gateway_common::{Counter, ListEntry, Reason, RuntimeConfig};
use serde::{Deserialize, Serialize};

use crate::cidr::Cidr;

/// Which list an entry belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListKind {
    Allow,
    Block,
}

impl ListKind {
    pub fn name(self) -> &'static str {
        match self {
            ListKind::Allow => "allow",
            ListKind::Block => "block",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error("map `{map}`: {operation} failed")]
    Map {
        map: &'static str,
        operation: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("map `{map}` is full ({capacity} entries); remove entries or raise its capacity")]
    Full { map: &'static str, capacity: u32 },
}

/// Everything the daemon needs from the kernel maps. The real implementation is
/// [`maps::KernelMaps`]; [`fake::FakeDataPlane`] keeps the same contract in memory.
pub trait DataPlane: Send + 'static {
    /// Inserts or updates an entry; an update keeps the entry's hit count.
    fn upsert(&mut self, list: ListKind, cidr: Cidr, expires_at_ns: u64) -> Result<(), XdpError>;
    /// Removes an entry; removing an absent entry is not an error.
    fn remove(&mut self, list: ListKind, cidr: Cidr) -> Result<(), XdpError>;
    /// Every entry of a list with its kernel-side expiry and hit count.
    fn entries(&self, list: ListKind) -> Result<Vec<(Cidr, ListEntry)>, XdpError>;
    /// Packet and byte counters per [`Reason`], summed over CPUs.
    fn counters(&self) -> Result<[Counter; Reason::COUNT as usize], XdpError>;
    /// Replaces the runtime settings the program reads on every packet.
    fn apply_settings(&mut self, settings: RuntimeConfig) -> Result<(), XdpError>;
    /// Entries and capacity of each list map (cheap: counts are kept as entries change).
    fn list_fill_levels(&self) -> Vec<MapFill>;
    /// Entries and capacity of the rate-limit state (walks the map: one syscall per source).
    fn rate_fill_level(&self) -> Result<MapFill, XdpError>;
}

/// Fill level of one map, for `gateway status`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MapFill {
    pub name: String,
    pub entries: usize,
    pub capacity: u32,
}
