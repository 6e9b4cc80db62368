//! Typed handles on the program's maps. Routes each list entry to its tier: single addresses
//! of the blocklist go to the large hash maps, everything else to the LPM tries.
use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, lpm_trie::Key};
use gateway_common::{
    BLOCK_EXACT_CAPACITY, Counter, ListEntry, PREFIX_CAPACITY, RATE_CAPACITY, RateKey, Reason,
    RuntimeConfig, TokenBucket, maps, presence,
};

use super::{DataPlane, ListKind, MapFill, XdpError};
use crate::cidr::Cidr;

/// Where an entry lives in the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tier {
    AllowV4,
    AllowV6,
    BlockV4,
    BlockV6,
    BlockV4Prefix,
    BlockV6Prefix,
}

impl Tier {
    fn of(list: ListKind, cidr: &Cidr) -> Tier {
        match (list, cidr.is_ipv4(), cidr.is_host()) {
            (ListKind::Allow, true, _) => Tier::AllowV4,
            (ListKind::Allow, false, _) => Tier::AllowV6,
            (ListKind::Block, true, true) => Tier::BlockV4,
            (ListKind::Block, false, true) => Tier::BlockV6,
            (ListKind::Block, true, false) => Tier::BlockV4Prefix,
            (ListKind::Block, false, false) => Tier::BlockV6Prefix,
        }
    }

    fn map_name(self) -> &'static str {
        match self {
            Tier::AllowV4 => maps::ALLOW_V4,
            Tier::AllowV6 => maps::ALLOW_V6,
            Tier::BlockV4 => maps::BLOCK_V4,
            Tier::BlockV6 => maps::BLOCK_V6,
            Tier::BlockV4Prefix => maps::BLOCK_V4_PREFIX,
            Tier::BlockV6Prefix => maps::BLOCK_V6_PREFIX,
        }
    }

    fn capacity(self) -> u32 {
        match self {
            Tier::BlockV4 | Tier::BlockV6 => BLOCK_EXACT_CAPACITY,
            _ => PREFIX_CAPACITY,
        }
    }

    /// The presence bit the program checks before looking into this tier's trie.
    fn presence_bit(self) -> u32 {
        match self {
            Tier::AllowV4 => presence::ALLOW_V4,
            Tier::AllowV6 => presence::ALLOW_V6,
            Tier::BlockV4Prefix => presence::BLOCK_V4_PREFIX,
            Tier::BlockV6Prefix => presence::BLOCK_V6_PREFIX,
            // Hash lookups are cheap enough to do unconditionally.
            Tier::BlockV4 | Tier::BlockV6 => 0,
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    const ALL: [Tier; 6] = [
        Tier::AllowV4,
        Tier::AllowV6,
        Tier::BlockV4,
        Tier::BlockV6,
        Tier::BlockV4Prefix,
        Tier::BlockV6Prefix,
    ];
}

/// The program's maps, taken out of the loaded object.
pub struct KernelMaps {
    config: Array<MapData, RuntimeConfig>,
    allow_v4: LpmTrie<MapData, [u8; 4], ListEntry>,
    allow_v6: LpmTrie<MapData, [u8; 16], ListEntry>,
    block_v4: HashMap<MapData, [u8; 4], ListEntry>,
    block_v6: HashMap<MapData, [u8; 16], ListEntry>,
    block_v4_prefix: LpmTrie<MapData, [u8; 4], ListEntry>,
    block_v6_prefix: LpmTrie<MapData, [u8; 16], ListEntry>,
    rate: HashMap<MapData, RateKey, TokenBucket>,
    stats: PerCpuArray<MapData, Counter>,
    /// Entries per tier, to keep the presence bits and fill levels without walking the maps.
    counts: [usize; 6],
    /// Settings as last applied, without the presence bits.
    settings: RuntimeConfig,
}

fn map_error(map: &'static str, operation: &'static str) -> impl FnOnce(MapError) -> XdpError {
    move |source| XdpError::Map {
        map,
        operation,
        source,
    }
}

fn take<T: TryFrom<Map, Error = MapError>>(
    ebpf: &mut aya::Ebpf,
    name: &'static str,
) -> Result<T, XdpError> {
    let map = ebpf.take_map(name).ok_or(XdpError::Map {
        map: name,
        operation: "finding the map in the object",
        source: MapError::InvalidName {
            name: name.to_owned(),
        },
    })?;
    T::try_from(map).map_err(map_error(name, "opening the map"))
}

impl KernelMaps {
    /// Takes the list, config and stats maps out of a loaded object and counts what the maps
    /// already hold (pinned maps survive a restart with their entries).
    pub fn take(ebpf: &mut aya::Ebpf) -> Result<KernelMaps, XdpError> {
        let mut maps = KernelMaps {
            config: take(ebpf, maps::CONFIG)?,
            allow_v4: take(ebpf, maps::ALLOW_V4)?,
            allow_v6: take(ebpf, maps::ALLOW_V6)?,
            block_v4: take(ebpf, maps::BLOCK_V4)?,
            block_v6: take(ebpf, maps::BLOCK_V6)?,
            block_v4_prefix: take(ebpf, maps::BLOCK_V4_PREFIX)?,
            block_v6_prefix: take(ebpf, maps::BLOCK_V6_PREFIX)?,
            rate: take(ebpf, maps::RATE)?,
            stats: take(ebpf, maps::STATS)?,
            counts: [0; 6],
            settings: RuntimeConfig::default(),
        };
        maps.settings = maps
            .config
            .get(&0, 0)
            .map_err(map_error(maps::CONFIG, "reading"))?;
        for tier in Tier::ALL {
            maps.counts[tier.index()] = maps.tier_len(tier)?;
        }
        maps.write_settings(0)?;
        Ok(maps)
    }

    fn presence(&self) -> u32 {
        Tier::ALL
            .into_iter()
            .zip(self.counts)
            .filter(|(_, count)| *count > 0)
            .fold(0, |bits, (tier, _)| bits | tier.presence_bit())
    }

    /// Writes the settings with the presence bits of the non-empty tries plus `extra_presence`.
    fn write_settings(&mut self, extra_presence: u32) -> Result<(), XdpError> {
        let mut settings = self.settings;
        settings.presence = self.presence() | extra_presence;
        self.config
            .set(0, settings, 0)
            .map_err(map_error(maps::CONFIG, "writing"))
    }

    fn tier_entries(&self, tier: Tier) -> Result<Vec<(Cidr, ListEntry)>, XdpError> {
        let name = tier.map_name();
        let mut out = Vec::new();
        match tier {
            Tier::AllowV4 | Tier::BlockV4Prefix => {
                let trie = if tier == Tier::AllowV4 {
                    &self.allow_v4
                } else {
                    &self.block_v4_prefix
                };
                for item in trie.iter() {
                    let (key, entry) = item.map_err(map_error(name, "reading"))?;
                    out.extend(
                        Cidr::from_v4_bytes(key.data(), key.prefix_len()).map(|c| (c, entry)),
                    );
                }
            }
            Tier::AllowV6 | Tier::BlockV6Prefix => {
                let trie = if tier == Tier::AllowV6 {
                    &self.allow_v6
                } else {
                    &self.block_v6_prefix
                };
                for item in trie.iter() {
                    let (key, entry) = item.map_err(map_error(name, "reading"))?;
                    out.extend(
                        Cidr::from_v6_bytes(key.data(), key.prefix_len()).map(|c| (c, entry)),
                    );
                }
            }
            Tier::BlockV4 => {
                for item in self.block_v4.iter() {
                    let (addr, entry) = item.map_err(map_error(name, "reading"))?;
                    out.extend(Cidr::from_v4_bytes(addr, 32).map(|c| (c, entry)));
                }
            }
            Tier::BlockV6 => {
                for item in self.block_v6.iter() {
                    let (addr, entry) = item.map_err(map_error(name, "reading"))?;
                    out.extend(Cidr::from_v6_bytes(addr, 128).map(|c| (c, entry)));
                }
            }
        }
        Ok(out)
    }

    /// Number of entries in a tier, walking keys only (one syscall per entry).
    fn tier_len(&self, tier: Tier) -> Result<usize, XdpError> {
        let keys: Box<dyn Iterator<Item = Result<(), MapError>>> = match tier {
            Tier::AllowV4 => Box::new(self.allow_v4.keys().map(|k| k.map(drop))),
            Tier::AllowV6 => Box::new(self.allow_v6.keys().map(|k| k.map(drop))),
            Tier::BlockV4Prefix => Box::new(self.block_v4_prefix.keys().map(|k| k.map(drop))),
            Tier::BlockV6Prefix => Box::new(self.block_v6_prefix.keys().map(|k| k.map(drop))),
            Tier::BlockV4 => Box::new(self.block_v4.keys().map(|k| k.map(drop))),
            Tier::BlockV6 => Box::new(self.block_v6.keys().map(|k| k.map(drop))),
        };
        let mut count = 0;
        for key in keys {
            key.map_err(map_error(tier.map_name(), "reading"))?;
            count += 1;
        }
        Ok(count)
    }

    fn tier_get(&self, tier: Tier, cidr: &Cidr) -> Result<ListEntry, MapError> {
        let len = u32::from(cidr.prefix_len());
        match tier {
            Tier::AllowV4 => self.allow_v4.get(&Key::new(len, v4_bytes(cidr)), 0),
            Tier::AllowV6 => self.allow_v6.get(&Key::new(len, v6_bytes(cidr)), 0),
            Tier::BlockV4Prefix => self.block_v4_prefix.get(&Key::new(len, v4_bytes(cidr)), 0),
            Tier::BlockV6Prefix => self.block_v6_prefix.get(&Key::new(len, v6_bytes(cidr)), 0),
            Tier::BlockV4 => self.block_v4.get(&v4_bytes(cidr), 0),
            Tier::BlockV6 => self.block_v6.get(&v6_bytes(cidr), 0),
        }
    }

    fn tier_insert(
        &mut self,
        tier: Tier,
        cidr: &Cidr,
        entry: ListEntry,
        flags: u64,
    ) -> Result<(), MapError> {
        let len = u32::from(cidr.prefix_len());
        match tier {
            Tier::AllowV4 => self
                .allow_v4
                .insert(&Key::new(len, v4_bytes(cidr)), entry, flags),
            Tier::AllowV6 => self
                .allow_v6
                .insert(&Key::new(len, v6_bytes(cidr)), entry, flags),
            Tier::BlockV4Prefix => {
                self.block_v4_prefix
                    .insert(&Key::new(len, v4_bytes(cidr)), entry, flags)
            }
            Tier::BlockV6Prefix => {
                self.block_v6_prefix
                    .insert(&Key::new(len, v6_bytes(cidr)), entry, flags)
            }
            Tier::BlockV4 => self.block_v4.insert(v4_bytes(cidr), entry, flags),
            Tier::BlockV6 => self.block_v6.insert(v6_bytes(cidr), entry, flags),
        }
    }

    fn tier_remove(&mut self, tier: Tier, cidr: &Cidr) -> Result<(), MapError> {
        let len = u32::from(cidr.prefix_len());
        match tier {
            Tier::AllowV4 => self.allow_v4.remove(&Key::new(len, v4_bytes(cidr))),
            Tier::AllowV6 => self.allow_v6.remove(&Key::new(len, v6_bytes(cidr))),
            Tier::BlockV4Prefix => self.block_v4_prefix.remove(&Key::new(len, v4_bytes(cidr))),
            Tier::BlockV6Prefix => self.block_v6_prefix.remove(&Key::new(len, v6_bytes(cidr))),
            Tier::BlockV4 => self.block_v4.remove(&v4_bytes(cidr)),
            Tier::BlockV6 => self.block_v6.remove(&v6_bytes(cidr)),
        }
    }
}

/// The kernel key bytes of a prefix.
fn v4_bytes(cidr: &Cidr) -> [u8; 4] {
    match cidr.addr() {
        std::net::IpAddr::V4(v4) => v4.octets(),
        std::net::IpAddr::V6(_) => unreachable!("routed to an IPv4 tier"),
    }
}

fn v6_bytes(cidr: &Cidr) -> [u8; 16] {
    match cidr.addr() {
        std::net::IpAddr::V6(v6) => v6.octets(),
        std::net::IpAddr::V4(_) => unreachable!("routed to an IPv6 tier"),
    }
}

/// Whether a lookup error means "no such key" rather than a failure.
fn absent<V>(result: Result<V, MapError>) -> Result<Option<V>, MapError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(other) => Err(other),
    }
}

fn errno(error: &MapError) -> Option<i32> {
    match error {
        MapError::SyscallError(e) => e.io_error.raw_os_error(),
        _ => None,
    }
}

/// E2BIG / ENOSPC / ENOMEM from an insert: the map is at capacity.
fn is_full(error: &MapError) -> bool {
    matches!(
        errno(error),
        Some(libc::E2BIG | libc::ENOSPC | libc::ENOMEM)
    )
}

/// `BPF_NOEXIST`: insert only if the key is new.
const BPF_NOEXIST: u64 = 1;

impl DataPlane for KernelMaps {
    fn upsert(&mut self, list: ListKind, cidr: Cidr, expires_at_ns: u64) -> Result<(), XdpError> {
        let tier = Tier::of(list, &cidr);
        let index = tier.index();
        let insert_error = |source: MapError| {
            if is_full(&source) {
                XdpError::Full {
                    map: tier.map_name(),
                    capacity: tier.capacity(),
                }
            } else {
                XdpError::Map {
                    map: tier.map_name(),
                    operation: "inserting",
                    source,
                }
            }
        };
        if self.counts[index] == 0 && tier.presence_bit() != 0 {
            // The program must never skip a trie that holds an entry: announce it first.
            self.write_settings(tier.presence_bit())?;
        }
        let mut entry = ListEntry {
            expires_at_ns,
            hits: 0,
        };
        // One syscall for the common case of a new entry; an existing one keeps its hit count.
        match self.tier_insert(tier, &cidr, entry, BPF_NOEXIST) {
            Ok(()) => {
                self.counts[index] += 1;
                Ok(())
            }
            Err(error) if errno(&error) == Some(libc::EEXIST) => {
                let previous = absent(self.tier_get(tier, &cidr))
                    .map_err(map_error(tier.map_name(), "looking up"))?;
                entry.hits = previous.map_or(0, |p| p.hits);
                self.tier_insert(tier, &cidr, entry, 0)
                    .map_err(insert_error)
            }
            Err(error) => {
                if self.counts[index] == 0 {
                    self.write_settings(0)?;
                }
                Err(insert_error(error))
            }
        }
    }

    fn remove(&mut self, list: ListKind, cidr: Cidr) -> Result<(), XdpError> {
        let tier = Tier::of(list, &cidr);
        match self.tier_remove(tier, &cidr) {
            Ok(()) => {
                let index = tier.index();
                self.counts[index] = self.counts[index].saturating_sub(1);
                if self.counts[index] == 0 && tier.presence_bit() != 0 {
                    self.write_settings(0)?;
                }
                Ok(())
            }
            Err(MapError::KeyNotFound) => Ok(()),
            Err(error) if errno(&error) == Some(libc::ENOENT) => Ok(()),
            Err(source) => Err(XdpError::Map {
                map: tier.map_name(),
                operation: "removing",
                source,
            }),
        }
    }

    fn entries(&self, list: ListKind) -> Result<Vec<(Cidr, ListEntry)>, XdpError> {
        let mut out = Vec::new();
        for tier in Tier::ALL {
            let belongs = matches!(
                (list, tier),
                (ListKind::Allow, Tier::AllowV4 | Tier::AllowV6)
                    | (
                        ListKind::Block,
                        Tier::BlockV4 | Tier::BlockV6 | Tier::BlockV4Prefix | Tier::BlockV6Prefix
                    )
            );
            if belongs {
                out.extend(self.tier_entries(tier)?);
            }
        }
        Ok(out)
    }

    fn counters(&self) -> Result<[Counter; Reason::COUNT as usize], XdpError> {
        let mut out = [Counter::default(); Reason::COUNT as usize];
        for (index, slot) in out.iter_mut().enumerate() {
            let per_cpu = self
                .stats
                .get(&(index as u32), 0)
                .map_err(map_error(maps::STATS, "reading"))?;
            for counter in per_cpu.iter() {
                slot.packets += counter.packets;
                slot.bytes += counter.bytes;
            }
        }
        Ok(out)
    }

    fn apply_settings(&mut self, settings: RuntimeConfig) -> Result<(), XdpError> {
        self.settings = settings;
        self.write_settings(0)
    }

    fn list_fill_levels(&self) -> Vec<MapFill> {
        Tier::ALL
            .into_iter()
            .map(|tier| MapFill {
                name: tier.map_name().to_owned(),
                entries: self.counts[tier.index()],
                capacity: tier.capacity(),
            })
            .collect()
    }

    fn rate_fill_level(&self) -> Result<MapFill, XdpError> {
        let mut entries = 0;
        for key in self.rate.keys() {
            key.map_err(map_error(maps::RATE, "reading"))?;
            entries += 1;
        }
        Ok(MapFill {
            name: maps::RATE.to_owned(),
            entries,
            capacity: RATE_CAPACITY,
        })
    }
}
