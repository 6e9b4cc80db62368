//! An in-memory [`DataPlane`] with the kernel maps' contract, so the list logic, persistence
//! and admin protocol can be tested without root or a loaded program.
use std::collections::BTreeMap;

use gateway_common::{Counter, ListEntry, Reason, RuntimeConfig};

use super::{DataPlane, ListKind, MapFill, XdpError};
use crate::cidr::Cidr;

#[derive(Debug, Default)]
pub struct FakeDataPlane {
    pub entries: BTreeMap<(ListKind, Cidr), ListEntry>,
    pub settings: Option<RuntimeConfig>,
    pub counters: [Counter; Reason::COUNT as usize],
    /// Inserts beyond this many entries fail as a full map would.
    pub capacity: Option<usize>,
}

impl DataPlane for FakeDataPlane {
    fn upsert(&mut self, list: ListKind, cidr: Cidr, expires_at_ns: u64) -> Result<(), XdpError> {
        let full = self.capacity.is_some_and(|cap| {
            self.entries.len() >= cap && !self.entries.contains_key(&(list, cidr))
        });
        if full {
            return Err(XdpError::Full {
                map: "fake",
                capacity: self.capacity.unwrap_or(0) as u32,
            });
        }
        let entry = self.entries.entry((list, cidr)).or_default();
        entry.expires_at_ns = expires_at_ns;
        Ok(())
    }

    fn remove(&mut self, list: ListKind, cidr: Cidr) -> Result<(), XdpError> {
        self.entries.remove(&(list, cidr));
        Ok(())
    }

    fn entries(&self, list: ListKind) -> Result<Vec<(Cidr, ListEntry)>, XdpError> {
        Ok(self
            .entries
            .iter()
            .filter(|((kind, _), _)| *kind == list)
            .map(|((_, cidr), entry)| (*cidr, *entry))
            .collect())
    }

    fn counters(&self) -> Result<[Counter; Reason::COUNT as usize], XdpError> {
        Ok(self.counters)
    }

    fn apply_settings(&mut self, settings: RuntimeConfig) -> Result<(), XdpError> {
        self.settings = Some(settings);
        Ok(())
    }

    fn list_fill_levels(&self) -> Vec<MapFill> {
        vec![MapFill {
            name: "fake".to_owned(),
            entries: self.entries.len(),
            capacity: self.capacity.map_or(u32::MAX, |c| c as u32),
        }]
    }

    fn rate_fill_level(&self) -> Result<MapFill, XdpError> {
        Ok(MapFill {
            name: "fake_rate".to_owned(),
            entries: 0,
            capacity: 0,
        })
    }
}
