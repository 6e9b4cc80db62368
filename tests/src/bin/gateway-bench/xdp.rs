//! Section 1, "XDP cost per packet": nanoseconds the gateway's XDP program spends on one packet,
//! per path through it (pass with the rate limiter's state updated, allowlist hit, exact and
//! prefix blocklist hits with 1 to 1,000,000 entries, rate-limited drop; IPv4, IPv6, VLAN), next
//! to xdp-filter on the same frames with the same blocklist.
//!
//! No traffic is needed: both programs run on crafted frames through `BPF_PROG_TEST_RUN` with a
//! repeat count of a million, and the kernel reports the mean time per run. The gateway's program
//! is the release object embedded in `gateway-userspace`, loaded without pins exactly as
//! tests/tests/verdicts.rs does; xdp-filter is loaded by [`crate::xdp_filter`]. Each program's
//! verdict is checked on every run, so a figure always belongs to the path it is labelled with.
use std::{
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::AsFd as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    maps::{MapFd, MapInfo},
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use gateway_common::{BLOCK_EXACT_CAPACITY, ListEntry, RuntimeConfig, features, maps};
use gateway_tests::packet::{Frame, TPID_8021Q};
use gateway_userspace::{
    cidr::Cidr,
    xdp::{
        DataPlane as _, ListKind,
        loader::{self, LoadedProgram},
    },
};

use crate::{
    Ctx,
    report::{Chart, Section, Table, median, thousands},
    xdp_filter::XdpFilter,
    xdp_sys::{self, FixedActionProgram, XDP_DROP, XDP_PASS},
};

/// Runs per `BPF_PROG_TEST_RUN` call; the kernel reports the mean over them.
const REPEAT: u32 = 1_000_000;
/// Blocklist sizes the exact-address hit is measured at.
const BLOCKLIST_SIZES: [usize; 3] = [1, 10_000, 1_000_000];

/// Sources of the crafted frames (documentation and shared address space, never routed).
const PASS_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const ALLOWED_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const BLOCKED_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const PREFIX_BLOCKED_V4: Ipv4Addr = Ipv4Addr::new(100, 64, 3, 9);
const RATE_LIMITED_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 99);
const PASS_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 7);
const BLOCKED_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xdead, 0, 0, 0, 0, 7);
const PREFIX_BLOCKED_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xbad, 1, 0, 0, 0, 9);
/// The gateway's other lists, so that every tier it consults on the pass path holds an entry
/// (an empty trie is skipped, which would flatter the pass path).
const ALLOWLIST: [&str; 2] = ["198.51.100.0/24", "2001:db8:a11::/48"];
const PREFIX_BLOCKLIST: [&str; 2] = ["100.64.0.0/16", "2001:db8:bad::/48"];

/// One crafted frame and the path it must take.
struct Case {
    label: String,
    frame: Vec<u8>,
    settings: RuntimeConfig,
    gateway_action: u32,
    /// xdp-filter's action for the same frame; `None` where it has no such feature (allowlist,
    /// prefixes, rate limits), so there is nothing to compare with.
    reference_action: Option<u32>,
}

/// Figures of one case: per-run means in nanoseconds, one per repetition.
struct Measured {
    label: String,
    gateway: Result<Vec<f64>, String>,
    reference: Option<Result<Vec<f64>, String>>,
}

impl Measured {
    fn gateway_ns(&self) -> Option<f64> {
        self.gateway.as_ref().ok().map(|runs| median(runs))
    }

    fn reference_ns(&self) -> Option<f64> {
        self.reference
            .as_ref()
            .and_then(|r| r.as_ref().ok())
            .map(|runs| median(runs))
    }
}

/// Settings with the per-source rate limit on, far above what a test run sends, so the packet
/// passes but its token bucket is looked up and updated.
fn rate_limit_on() -> RuntimeConfig {
    rate_limit(1_000_000_000)
}

/// Settings where every source may send one packet, ever (within the run): the rest is dropped.
fn rate_limit_tiny() -> RuntimeConfig {
    rate_limit(1)
}

/// Settings with the per-source rate limit on at `packets` a second, and as many in a burst.
fn rate_limit(packets: u64) -> RuntimeConfig {
    RuntimeConfig {
        features: RuntimeConfig::default().features | features::RATE_LIMIT,
        packets_per_second: packets,
        burst_packets: packets,
        ..RuntimeConfig::default()
    }
}

fn rate_limit_off() -> RuntimeConfig {
    RuntimeConfig::default()
}

/// The gateway's program with handles on its exact-address maps for bulk fills.
struct GatewayProgram {
    loaded: LoadedProgram,
    block_v4: MapFd,
    block_v6: MapFd,
}

impl GatewayProgram {
    fn load() -> Result<GatewayProgram> {
        let mut loaded = loader::load(None).context(
            "loading the gateway's XDP program (build gateway-userspace with `cargo xtask build` so it embeds the object)",
        )?;
        loaded
            .maps
            .apply_settings(rate_limit_on())
            .context("writing the gateway's runtime settings")?;
        let map_ids = loaded
            .program
            .xdp()
            .info()
            .context("reading the gateway program's info")?
            .map_ids()
            .context("reading the gateway program's map ids")?
            .context("this kernel does not report a program's maps")?;
        let find = |name: &str| -> Result<MapFd> {
            for id in &map_ids {
                let info = MapInfo::from_id(*id).context("opening a map by id")?;
                if info.name_as_str() == Some(name) {
                    return info.fd().context("opening a map by id");
                }
            }
            bail!("the gateway's program uses no map `{name}`")
        };
        Ok(GatewayProgram {
            block_v4: find(maps::BLOCK_V4)?,
            block_v6: find(maps::BLOCK_V6)?,
            loaded,
        })
    }

    fn upsert(&mut self, list: ListKind, cidr: &str) -> Result<()> {
        let cidr: Cidr = cidr
            .parse()
            .map_err(|e| anyhow!("`{cidr}` is not a CIDR: {e}"))?;
        self.loaded
            .maps
            .upsert(list, cidr, 0)
            .with_context(|| format!("adding `{cidr}` to the gateway's {} list", list.name()))
    }

    /// Adds permanent exact-address bans straight into the hash maps, batched.
    fn block_many(&self, v4: &[[u8; 4]], v6: &[[u8; 16]]) -> Result<()> {
        // A permanent entry that has matched nothing yet: `ListEntry { 0, 0 }`.
        let entry = [0_u8; size_of::<ListEntry>()];
        for (map, keys, key_size, count) in [
            (&self.block_v4, v4.as_flattened(), 4, v4.len()),
            (&self.block_v6, v6.as_flattened(), 16, v6.len()),
        ] {
            xdp_sys::update_batch(
                map.as_fd(),
                keys,
                key_size,
                &entry.repeat(count),
                entry.len(),
            )
            .with_context(|| format!("inserting {count} bans into the gateway's maps"))?;
        }
        Ok(())
    }

    fn xdp(&self) -> &Xdp {
        self.loaded.program.xdp()
    }
}

/// Runs `program` [`REPEAT`] times on `frame`; the kernel's mean nanoseconds per run, after
/// checking the program's answer.
fn mean_ns(program: &Xdp, frame: &[u8], expected: u32) -> Result<f64, String> {
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            repeat: REPEAT,
            ..TestRunOptions::default()
        })
        .map_err(|e| format!("BPF_PROG_TEST_RUN failed: {e}"))?;
    if result.return_value != expected {
        return Err(format!(
            "answered {} where {} was expected",
            action_name(result.return_value),
            action_name(expected)
        ));
    }
    Ok(result.duration.as_nanos() as f64)
}

fn action_name(action: u32) -> &'static str {
    match action {
        0 => "XDP_ABORTED",
        XDP_DROP => "XDP_DROP",
        XDP_PASS => "XDP_PASS",
        3 => "XDP_TX",
        4 => "XDP_REDIRECT",
        _ => "an unknown action",
    }
}

/// Blocklist fillers number `range`: IPv4 addresses in 10.0.0.0/8 and IPv6 addresses in
/// 2001:db8:f111::/48, all distinct and none of them a source of the crafted frames.
fn filler(range: std::ops::Range<usize>) -> (Vec<[u8; 4]>, Vec<[u8; 16]>) {
    let v4 = range
        .clone()
        .map(|i| (0x0a00_0000_u32 + u32::try_from(i).expect("fits")).to_be_bytes())
        .collect();
    let v6 = range
        .map(|i| {
            let low = u32::try_from(i).expect("fits");
            let segments = [
                0x2001,
                0xdb8,
                0xf111,
                0,
                0,
                0,
                (low >> 16) as u16,
                low as u16,
            ];
            Ipv6Addr::from(segments).octets()
        })
        .collect();
    (v4, v6)
}

fn cases_at(entries: usize) -> Vec<Case> {
    let case = |label: String, frame: Frame, settings, gateway_action, reference_action| Case {
        label,
        frame: frame.bytes(),
        settings,
        gateway_action,
        reference_action,
    };
    let size = entries_label(entries);
    let mut cases = vec![
        case(
            format!("IPv4 blocklist hit, exact, {size}"),
            Frame::ipv4(BLOCKED_V4),
            rate_limit_on(),
            XDP_DROP,
            Some(XDP_DROP),
        ),
        case(
            format!("IPv4 pass + rate limit, {size}"),
            Frame::ipv4(PASS_V4),
            rate_limit_on(),
            XDP_PASS,
            Some(XDP_PASS),
        ),
    ];
    if entries == 10_000 {
        return cases;
    }
    cases.extend([
        case(
            format!("IPv6 blocklist hit, exact, {size}"),
            Frame::ipv6(BLOCKED_V6),
            rate_limit_on(),
            XDP_DROP,
            Some(XDP_DROP),
        ),
        case(
            format!("IPv6 pass + rate limit, {size}"),
            Frame::ipv6(PASS_V6),
            rate_limit_on(),
            XDP_PASS,
            Some(XDP_PASS),
        ),
    ]);
    if entries > 1 {
        return cases;
    }
    // The paths whose cost does not depend on the exact tier's size: measured once.
    cases.extend([
        case(
            "IPv4 pass, rate limit off".to_owned(),
            Frame::ipv4(PASS_V4),
            rate_limit_off(),
            XDP_PASS,
            Some(XDP_PASS),
        ),
        case(
            "IPv4 802.1Q-tagged blocklist hit".to_owned(),
            Frame::ipv4(BLOCKED_V4).tagged(TPID_8021Q, 100),
            rate_limit_on(),
            XDP_DROP,
            Some(XDP_DROP),
        ),
        case(
            "IPv4 802.1Q-tagged pass + rate limit".to_owned(),
            Frame::ipv4(PASS_V4).tagged(TPID_8021Q, 100),
            rate_limit_on(),
            XDP_PASS,
            Some(XDP_PASS),
        ),
        case(
            "IPv4 TCP SYN blocklist hit".to_owned(),
            Frame::ipv4_tcp_syn(BLOCKED_V4),
            rate_limit_on(),
            XDP_DROP,
            Some(XDP_DROP),
        ),
        case(
            "IPv4 allowlist hit".to_owned(),
            Frame::ipv4(ALLOWED_V4),
            rate_limit_on(),
            XDP_PASS,
            None,
        ),
        case(
            "IPv4 blocklist hit, prefix (/16)".to_owned(),
            Frame::ipv4(PREFIX_BLOCKED_V4),
            rate_limit_on(),
            XDP_DROP,
            None,
        ),
        case(
            "IPv6 blocklist hit, prefix (/48)".to_owned(),
            Frame::ipv6(PREFIX_BLOCKED_V6),
            rate_limit_on(),
            XDP_DROP,
            None,
        ),
        case(
            "IPv4 rate-limited drop".to_owned(),
            Frame::ipv4(RATE_LIMITED_V4),
            rate_limit_tiny(),
            XDP_DROP,
            None,
        ),
    ]);
    cases
}

/// "1 entry", "10,000 entries".
fn entries_label(n: usize) -> String {
    if n == 1 {
        "1 entry".to_owned()
    } else {
        format!("{} entries", thousands(n))
    }
}

fn measure(
    ctx: &Ctx,
    gateway: &mut GatewayProgram,
    reference: Option<&XdpFilter>,
    case: &Case,
) -> Result<Measured> {
    gateway
        .loaded
        .maps
        .apply_settings(case.settings)
        .context("writing the gateway's runtime settings")?;
    let mut gateway_runs = Ok(Vec::new());
    let mut reference_runs = case.reference_action.and(reference).map(|_| Ok(Vec::new()));
    for _ in 0..ctx.repetitions {
        if let Ok(runs) = &mut gateway_runs {
            match mean_ns(gateway.xdp(), &case.frame, case.gateway_action) {
                Ok(ns) => runs.push(ns),
                Err(e) => gateway_runs = Err(e),
            }
        }
        if let (Some(Ok(runs)), Some(filter), Some(action)) =
            (&mut reference_runs, reference, case.reference_action)
        {
            match mean_ns(filter.program(), &case.frame, action) {
                Ok(ns) => runs.push(ns),
                Err(e) => reference_runs = Some(Err(e)),
            }
        }
    }
    Ok(Measured {
        label: case.label.clone(),
        gateway: gateway_runs,
        reference: reference_runs,
    })
}

/// One step of the blocklist fill: how many entries were added and how long each side took.
struct Fill {
    total: usize,
    added: usize,
    gateway: Duration,
    reference: Option<Duration>,
}

pub(crate) fn bench(ctx: &Ctx) -> Result<Section> {
    let mut gateway = GatewayProgram::load()?;
    for cidr in ALLOWLIST {
        gateway.upsert(ListKind::Allow, cidr)?;
    }
    for cidr in PREFIX_BLOCKLIST {
        gateway.upsert(ListKind::Block, cidr)?;
    }
    gateway.upsert(ListKind::Block, &BLOCKED_V4.to_string())?;
    gateway.upsert(ListKind::Block, &BLOCKED_V6.to_string())?;

    let capacity = BLOCK_EXACT_CAPACITY;
    let reference = XdpFilter::load(capacity).and_then(|filter| {
        filter.deny_v4(&[BLOCKED_V4.octets()])?;
        filter.deny_v6(&[BLOCKED_V6.octets()])?;
        Ok(filter)
    });
    let reference_error = reference.as_ref().err().map(|e| format!("{e:#}"));
    let reference = reference.ok();

    // What BPF_PROG_TEST_RUN itself costs per run: an XDP program that only returns XDP_PASS.
    let empty = FixedActionProgram::load(XDP_PASS, "gwbench_empty")?;
    let mut harness = Vec::new();
    for _ in 0..ctx.repetitions {
        let (action, ns) = empty.run(&Frame::ipv4(PASS_V4).bytes(), REPEAT)?;
        if action != XDP_PASS {
            bail!("the empty program answered {}", action_name(action));
        }
        harness.push(f64::from(ns));
    }
    let harness_ns = median(&harness);

    let mut measured = Vec::new();
    let mut fills = Vec::new();
    let mut listed = 1;
    for size in BLOCKLIST_SIZES {
        if size > listed {
            // Filler indexes start at 1: 10.0.0.0 stays out, the listed count includes the one
            // address the frames use.
            let (v4, v6) = filler(listed..size);
            let started = Instant::now();
            gateway.block_many(&v4, &v6)?;
            let gateway_took = started.elapsed();
            let reference_took = match &reference {
                Some(filter) => {
                    let started = Instant::now();
                    filter.deny_v4(&v4)?;
                    filter.deny_v6(&v6)?;
                    Some(started.elapsed())
                }
                None => None,
            };
            fills.push(Fill {
                total: size,
                added: size - listed,
                gateway: gateway_took,
                reference: reference_took,
            });
            listed = size;
        }
        for case in cases_at(size) {
            eprintln!("   {}", case.label);
            measured.push(measure(ctx, &mut gateway, reference.as_ref(), &case)?);
        }
    }
    Ok(report(
        ctx,
        &measured,
        &fills,
        harness_ns,
        reference_error.as_deref(),
    ))
}

fn ns_cell(runs: &Result<Vec<f64>, String>) -> String {
    match runs {
        Ok(runs) => {
            let (low, high) = runs.iter().fold((f64::INFINITY, 0.0_f64), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
            format!("{:.0} ({low:.0}–{high:.0})", median(runs))
        }
        Err(why) => format!("not measured: {why}"),
    }
}

/// "met"/"missed" for a goal `value <= limit`, or why it could not be judged.
fn verdict(value: Option<f64>, limit: f64) -> &'static str {
    match value {
        Some(v) if v <= limit => "**met**",
        Some(_) => "**missed**",
        None => "not evaluated (a figure is missing)",
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or("–".to_owned(), |r| format!("{r:.2}×"))
}

fn fmt_ns(ns: Option<f64>) -> String {
    ns.map_or("–".to_owned(), |ns| format!("{ns:.0} ns"))
}

fn report(
    ctx: &Ctx,
    measured: &[Measured],
    fills: &[Fill],
    harness_ns: f64,
    reference_error: Option<&str>,
) -> Section {
    let find = |label: &str| measured.iter().find(|m| m.label == label);
    let million = thousands(1_000_000);
    let hit_million = find(&format!(
        "IPv4 blocklist hit, exact, {}",
        entries_label(1_000_000)
    ));
    let hit_one = find(&format!("IPv4 blocklist hit, exact, {}", entries_label(1)));
    let pass_one = find(&format!("IPv4 pass + rate limit, {}", entries_label(1)));

    // The ratios the summary quotes: the hit against the reference, the hit's growth from one
    // entry to a million, the pass path against the reference.
    let compared = [
        (
            hit_million.and_then(Measured::gateway_ns),
            hit_million.and_then(Measured::reference_ns),
        ),
        (
            hit_million.and_then(Measured::gateway_ns),
            hit_one.and_then(Measured::gateway_ns),
        ),
        (
            pass_one.and_then(Measured::gateway_ns),
            pass_one.and_then(Measured::reference_ns),
        ),
    ];
    let [hit_vs_reference, hit_growth, pass_vs_reference] = compared.map(|(a, b)| ratio(a, b));
    // The same ratios with the harness's own time taken out of both sides.
    let own = |ns: Option<f64>| ns.map(|ns| (ns - harness_ns).max(0.0));
    let [own_hit, own_growth, own_pass] = compared.map(|(a, b)| ratio(own(a), own(b)));

    let mut summary = format!(
        "Each figure is the kernel's mean time per run of `BPF_PROG_TEST_RUN` with a repeat count \
         of {repeat} on one crafted frame (Ethernet, IPv4 or IPv6, UDP with 18 bytes of payload \
         unless noted), median of {reps} such calls (min–max in brackets). The gateway's program \
         is the release build's embedded object, loaded without pins; its allowlist and prefix \
         blocklist hold one IPv4 and one IPv6 prefix each, so the pass path consults every tier \
         as it does in production, and \"+ rate limit\" means the per-source token bucket is on \
         (looked up and updated on every packet, limit far above the test rate). The reference is \
         xdp-filter 1.3.1's `xdpfilt_alw_ip` object (what `xdp-filter load -f ipv4,ipv6` \
         selects), loaded with aya because libxdp's dispatcher fails on this kernel, its maps \
         filled as `xdp-filter ip --mode src` fills them, and raised from the shipped 10,000 to \
         {capacity} entries per family (the gateway's own capacity) so that both hold the same \
         blocklist: the frame's source plus distinct fillers in 10.0.0.0/8 and \
         2001:db8:f111::/48. xdp-filter has no allowlist, prefixes or rate limits: those rows \
         have no reference figure. Test runs hit the same map entry a million times, so every \
         lookup is cache-warm: these are the programs' costs, not a DRAM-bound worst case. \
         Part of every figure is the test harness itself: an XDP program that only returns \
         `XDP_PASS` measures {harness:.0} ns per run here, so a program's own work is roughly its \
         figure minus that; the goals below are judged on the raw figures, as stated, with the \
         ratios of the programs' own work in brackets.\n\n",
        repeat = thousands(REPEAT),
        reps = ctx.repetitions,
        capacity = thousands(BLOCK_EXACT_CAPACITY),
        harness = harness_ns,
    );
    if let Some(error) = reference_error {
        summary.push_str(&format!(
            "**xdp-filter could not be loaded in this run, so there is no reference:** `{error}`\n\n"
        ));
    }
    summary.push_str(&format!(
        "Goals (the issue states xdp-filter at about 18 ns per drop and 16 ns per pass on this \
         machine; this run measured {ref_drop} and {ref_pass}):\n\n\
         - Blocklist hit at {million} entries ≤ 1.5× xdp-filter's drop at {million} entries: \
         {gw_hit} vs {ref_hit} = {hit_ratio} ({own_hit}) — {hit_verdict}.\n\
         - Blocklist hit at {million} entries ≤ 1.5× the gateway's own hit at 1 entry: \
         {gw_hit} vs {gw_hit_one} = {growth} ({own_growth}) — {growth_verdict}.\n\
         - Pass with rate limiting ≤ 3× xdp-filter's pass: {gw_pass} vs {ref_pass} = \
         {pass_ratio} ({own_pass}) — {pass_verdict}.\n",
        ref_drop = fmt_ns(hit_million.and_then(Measured::reference_ns)),
        ref_pass = fmt_ns(pass_one.and_then(Measured::reference_ns)),
        gw_hit = fmt_ns(hit_million.and_then(Measured::gateway_ns)),
        ref_hit = fmt_ns(hit_million.and_then(Measured::reference_ns)),
        hit_ratio = fmt_ratio(hit_vs_reference),
        hit_verdict = verdict(hit_vs_reference, 1.5),
        gw_hit_one = fmt_ns(hit_one.and_then(Measured::gateway_ns)),
        growth = fmt_ratio(hit_growth),
        growth_verdict = verdict(hit_growth, 1.5),
        gw_pass = fmt_ns(pass_one.and_then(Measured::gateway_ns)),
        pass_ratio = fmt_ratio(pass_vs_reference),
        pass_verdict = verdict(pass_vs_reference, 3.0),
        own_hit = fmt_ratio(own_hit),
        own_growth = fmt_ratio(own_growth),
        own_pass = fmt_ratio(own_pass),
    ));

    let mut costs = Table::new(
        "Nanoseconds per packet (median, min–max of the repetitions):",
        &["Frame and path", "This gateway", "xdp-filter", "Ratio"],
    );
    for m in measured {
        costs.row(vec![
            m.label.clone(),
            ns_cell(&m.gateway),
            m.reference
                .as_ref()
                .map_or("– (no such feature)".to_owned(), ns_cell),
            fmt_ratio(ratio(m.gateway_ns(), m.reference_ns())),
        ]);
    }

    let mut fill_table = Table::new(
        "Filling the exact-address blocklists (IPv4 and IPv6 together, batched \
         `BPF_MAP_UPDATE_BATCH`, 65,536 entries per call; the gateway's exact maps are not \
         preallocated, so kernel memory follows the bans in use and each insert allocates, \
         while xdp-filter's per-CPU hashes are allocated whole at load):",
        &[
            "Entries per family",
            "Added per family",
            "This gateway",
            "xdp-filter",
        ],
    );
    for fill in fills {
        let rate = |took: Duration| {
            format!(
                "{:.2} s ({:.1} M entries/s)",
                took.as_secs_f64(),
                (2 * fill.added) as f64 / took.as_secs_f64() / 1e6
            )
        };
        fill_table.row(vec![
            thousands(fill.total),
            thousands(fill.added),
            rate(fill.gateway),
            fill.reference.map_or("–".to_owned(), rate),
        ]);
    }

    let compared: Vec<&Measured> = measured
        .iter()
        .filter(|m| m.gateway_ns().is_some() && m.reference_ns().is_some())
        .collect();
    let chart = Chart {
        file: "xdp-cost.png".to_owned(),
        title: "XDP cost per packet (BPF_PROG_TEST_RUN)".to_owned(),
        y_label: "ns per packet".to_owned(),
        labels: compared.iter().map(|m| m.label.clone()).collect(),
        series: vec![
            (
                "this gateway".to_owned(),
                compared.iter().filter_map(|m| m.gateway_ns()).collect(),
            ),
            (
                "xdp-filter".to_owned(),
                compared.iter().filter_map(|m| m.reference_ns()).collect(),
            ),
        ],
        log_scale: false,
    };
    Section {
        summary,
        tables: vec![costs, fill_table],
        charts: vec![chart],
    }
}
