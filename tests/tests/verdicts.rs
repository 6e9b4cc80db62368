//! Verdicts of the real XDP program on crafted packets, through `BPF_PROG_TEST_RUN`: no network
//! card, no namespace, but the same object, verifier and maps as production.
use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use aya::programs::{TestRun as _, TestRunOptions};
use gateway_common::{Counter, Reason, RuntimeConfig, features, fragment_policy};
use gateway_tests::{
    packet::{Ext, Frame, TPID_8021AD, TPID_8021Q},
    require_root,
};
use gateway_userspace::{
    cidr::Cidr,
    xdp::{
        DataPlane as _, ListKind,
        clock::monotonic_now_ns,
        events::RateLimitTrip,
        loader::{self, LoadedProgram},
    },
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 5, 7);
const NEIGHBOUR: Ipv4Addr = Ipv4Addr::new(198, 18, 5, 8);
const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xbad, 0, 1, 0, 0, 0, 7);

/// The program, loaded without pins (nothing is left behind) and not attached anywhere.
struct Harness {
    loaded: LoadedProgram,
}

impl Harness {
    fn new(test: &str) -> Option<Harness> {
        if !require_root(test) {
            return None;
        }
        let mut loaded = loader::load(None).expect("the XDP program loads and verifies");
        loaded
            .maps
            .apply_settings(RuntimeConfig::default())
            .expect("settings are written");
        Some(Harness { loaded })
    }

    fn settings(&mut self, settings: RuntimeConfig) {
        self.loaded
            .maps
            .apply_settings(settings)
            .expect("settings are written");
    }

    fn run(&self, frame: &Frame) -> u32 {
        self.run_bytes(&frame.bytes())
    }

    fn run_bytes(&self, bytes: &[u8]) -> u32 {
        let result = self
            .loaded
            .program
            .xdp()
            .test_run(TestRunOptions {
                data_in: Some(bytes),
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN succeeds");
        result.return_value
    }

    fn block(&mut self, cidr: &str, expires_at_ns: u64) {
        let cidr: Cidr = cidr.parse().expect("valid CIDR");
        self.loaded
            .maps
            .upsert(ListKind::Block, cidr, expires_at_ns)
            .expect("insert");
    }

    fn allow(&mut self, cidr: &str) {
        let cidr: Cidr = cidr.parse().expect("valid CIDR");
        self.loaded
            .maps
            .upsert(ListKind::Allow, cidr, 0)
            .expect("insert");
    }

    fn counters(&self) -> [Counter; Reason::COUNT as usize] {
        self.loaded.maps.counters().expect("counters")
    }

    /// Runs the frame and checks both the action and the reason it was counted under.
    #[track_caller]
    fn expect(&self, frame: &Frame, action: u32, reason: Reason) {
        let before = self.counters();
        let got = self.run(frame);
        let after = self.counters();
        assert_eq!(got, action, "action for {frame:?}");
        let index = reason as usize;
        assert_eq!(
            after[index].packets,
            before[index].packets + 1,
            "counted under {reason:?}: before {before:?}, after {after:?}"
        );
        assert_eq!(
            after[index].bytes,
            before[index].bytes + frame.bytes().len() as u64,
            "bytes counted under {reason:?}"
        );
    }

    fn hits(&self, list: ListKind, cidr: &str) -> u64 {
        let cidr: Cidr = cidr.parse().expect("valid CIDR");
        self.loaded
            .maps
            .entries(list)
            .expect("entries")
            .into_iter()
            .find(|(c, _)| *c == cidr)
            .map_or(0, |(_, e)| e.hits)
    }

    fn next_event(&mut self) -> Option<RateLimitTrip> {
        let item = self.loaded.events.next()?;
        RateLimitTrip::decode(&item)
    }
}

fn rate_limited(pps: u64, burst: u64) -> RuntimeConfig {
    RuntimeConfig {
        features: RuntimeConfig::default().features | features::RATE_LIMIT,
        packets_per_second: pps,
        burst_packets: burst,
        ..RuntimeConfig::default()
    }
}

#[test]
fn unlisted_sources_pass_and_are_counted() {
    let Some(h) = Harness::new("unlisted_sources_pass_and_are_counted") else {
        return;
    };
    h.expect(&Frame::ipv4(CLIENT), XDP_PASS, Reason::Passed);
    h.expect(&Frame::ipv4_tcp_syn(CLIENT), XDP_PASS, Reason::Passed);
    h.expect(&Frame::ipv6(CLIENT_V6), XDP_PASS, Reason::Passed);
    h.expect(&Frame::ipv4_with_options(CLIENT), XDP_PASS, Reason::Passed);
    h.expect(&Frame::arp(), XDP_PASS, Reason::NonIp);
}

#[test]
fn exact_and_prefix_bans_drop_v4_and_v6() {
    let Some(mut h) = Harness::new("exact_and_prefix_bans_drop_v4_and_v6") else {
        return;
    };
    h.block("198.18.5.7", 0);
    h.expect(&Frame::ipv4(CLIENT), XDP_DROP, Reason::BlockedAddress);
    h.expect(
        &Frame::ipv4_tcp_syn(CLIENT),
        XDP_DROP,
        Reason::BlockedAddress,
    );
    h.expect(&Frame::ipv4(NEIGHBOUR), XDP_PASS, Reason::Passed);
    assert_eq!(h.hits(ListKind::Block, "198.18.5.7"), 2);

    h.block("198.18.5.0/24", 0);
    h.expect(&Frame::ipv4(NEIGHBOUR), XDP_DROP, Reason::BlockedPrefix);
    h.expect(
        &Frame::ipv4(Ipv4Addr::new(198, 18, 6, 1)),
        XDP_PASS,
        Reason::Passed,
    );
    assert_eq!(h.hits(ListKind::Block, "198.18.5.0/24"), 1);

    h.block("fd00:bad:0:1::7", 0);
    h.expect(&Frame::ipv6(CLIENT_V6), XDP_DROP, Reason::BlockedAddress);
    let other = Ipv6Addr::new(0xfd00, 0xbad, 0, 2, 0, 0, 0, 1);
    h.expect(&Frame::ipv6(other), XDP_PASS, Reason::Passed);
    h.block("fd00:bad::/32", 0);
    h.expect(&Frame::ipv6(other), XDP_DROP, Reason::BlockedPrefix);
}

#[test]
fn allowlist_wins_over_blocklist_and_rate_limit() {
    let Some(mut h) = Harness::new("allowlist_wins_over_blocklist_and_rate_limit") else {
        return;
    };
    h.settings(rate_limited(1, 1));
    h.block("198.18.5.7", 0);
    h.block("198.18.0.0/16", 0);
    h.allow("198.18.5.0/24");
    for _ in 0..3 {
        h.expect(&Frame::ipv4(CLIENT), XDP_PASS, Reason::Allowlisted);
    }
    h.expect(
        &Frame::ipv4(Ipv4Addr::new(198, 18, 9, 9)),
        XDP_DROP,
        Reason::BlockedPrefix,
    );

    h.block("fd00:bad:0:1::7", 0);
    h.allow("fd00:bad::/32");
    h.expect(&Frame::ipv6(CLIENT_V6), XDP_PASS, Reason::Allowlisted);
    assert_eq!(h.hits(ListKind::Allow, "198.18.5.0/24"), 3);
}

#[test]
fn expired_entries_are_treated_as_absent() {
    let Some(mut h) = Harness::new("expired_entries_are_treated_as_absent") else {
        return;
    };
    let now = monotonic_now_ns();
    h.block("198.18.5.7", now - 1);
    h.expect(&Frame::ipv4(CLIENT), XDP_PASS, Reason::Passed);
    // An expired exact ban must not hide a live prefix ban.
    h.block("198.18.5.0/24", now + 60_000_000_000);
    h.expect(&Frame::ipv4(CLIENT), XDP_DROP, Reason::BlockedPrefix);
    h.block("198.18.5.7", now + 60_000_000_000);
    h.expect(&Frame::ipv4(CLIENT), XDP_DROP, Reason::BlockedAddress);
    // An expired allow entry no longer overrides the ban.
    let cidr: Cidr = "198.18.5.7".parse().unwrap();
    h.loaded
        .maps
        .upsert(ListKind::Allow, cidr, now - 1)
        .unwrap();
    h.expect(&Frame::ipv4(CLIENT), XDP_DROP, Reason::BlockedAddress);
}

#[test]
fn vlan_and_qinq_tags_do_not_hide_a_banned_source() {
    let Some(mut h) = Harness::new("vlan_and_qinq_tags_do_not_hide_a_banned_source") else {
        return;
    };
    h.block("198.18.5.7", 0);
    h.block("fd00:bad:0:1::7", 0);
    let single = Frame::ipv4(CLIENT).tagged(TPID_8021Q, 100);
    h.expect(&single, XDP_DROP, Reason::BlockedAddress);
    let qinq = Frame::ipv4(CLIENT)
        .tagged(TPID_8021Q, 100)
        .tagged(TPID_8021AD, 200);
    h.expect(&qinq, XDP_DROP, Reason::BlockedAddress);
    let qinq_v6 = Frame::ipv6(CLIENT_V6)
        .tagged(TPID_8021Q, 100)
        .tagged(TPID_8021AD, 200);
    h.expect(&qinq_v6, XDP_DROP, Reason::BlockedAddress);
    h.expect(
        &Frame::ipv4(NEIGHBOUR).tagged(TPID_8021Q, 7),
        XDP_PASS,
        Reason::Passed,
    );
    // A third tag hides the source from us: refused rather than passed unchecked.
    let triple = Frame::ipv4(NEIGHBOUR)
        .tagged(TPID_8021Q, 1)
        .tagged(TPID_8021Q, 2)
        .tagged(TPID_8021AD, 3);
    h.expect(&triple, XDP_DROP, Reason::Malformed);
}

#[test]
fn ipv6_extension_headers_do_not_hide_a_banned_source() {
    let Some(mut h) = Harness::new("ipv6_extension_headers_do_not_hide_a_banned_source") else {
        return;
    };
    let chain = [
        Ext::HopByHop,
        Ext::Routing,
        Ext::DestinationOptions,
        Ext::Fragment { offset: 0 },
    ];
    h.expect(
        &Frame::ipv6_with(CLIENT_V6, &chain),
        XDP_PASS,
        Reason::Passed,
    );
    h.block("fd00:bad:0:1::7", 0);
    h.expect(
        &Frame::ipv6_with(CLIENT_V6, &chain),
        XDP_DROP,
        Reason::BlockedAddress,
    );
    // Even an extension chain too long to walk cannot smuggle a banned source.
    let long = [Ext::DestinationOptions; 12];
    h.expect(
        &Frame::ipv6_with(CLIENT_V6, &long),
        XDP_DROP,
        Reason::BlockedAddress,
    );
    let other = Ipv6Addr::new(0xfd00, 0xbad, 0, 2, 0, 0, 0, 1);
    h.expect(&Frame::ipv6_with(other, &long), XDP_DROP, Reason::Malformed);
}

#[test]
fn non_first_fragments_follow_the_policy() {
    let Some(mut h) = Harness::new("non_first_fragments_follow_the_policy") else {
        return;
    };
    let v6_later = Frame::ipv6_with(CLIENT_V6, &[Ext::Fragment { offset: 185 }]);
    let v6_first = Frame::ipv6_with(CLIENT_V6, &[Ext::Fragment { offset: 0 }]);
    h.expect(&Frame::ipv4_fragment(CLIENT, 185), XDP_PASS, Reason::Passed);
    h.expect(&v6_later, XDP_PASS, Reason::Passed);

    h.settings(RuntimeConfig {
        fragment_policy: fragment_policy::DROP,
        ..RuntimeConfig::default()
    });
    h.expect(
        &Frame::ipv4_fragment(CLIENT, 185),
        XDP_DROP,
        Reason::Fragment,
    );
    h.expect(&v6_later, XDP_DROP, Reason::Fragment);
    h.expect(&Frame::ipv4_fragment(CLIENT, 0), XDP_PASS, Reason::Passed);
    h.expect(&v6_first, XDP_PASS, Reason::Passed);

    // The source check still comes first: a banned fragment counts as blocked.
    h.block("198.18.5.7", 0);
    h.expect(
        &Frame::ipv4_fragment(CLIENT, 185),
        XDP_DROP,
        Reason::BlockedAddress,
    );
}

#[test]
fn truncation_at_every_header_boundary_is_malformed() {
    let Some(mut h) = Harness::new("truncation_at_every_header_boundary_is_malformed") else {
        return;
    };
    h.block("fd00:bad:0:1::7", 0);
    // QinQ + IPv6 + hop-by-hop + fragment header: every header the program reads.
    let unbanned = Ipv6Addr::new(0xfd00, 0xbad, 0, 2, 0, 0, 0, 1);
    let exts = [Ext::HopByHop, Ext::Fragment { offset: 0 }];
    let frame = Frame::ipv6_with(unbanned, &exts)
        .tagged(TPID_8021Q, 100)
        .tagged(TPID_8021AD, 200);
    let bytes = frame.bytes();
    let headers_end = frame.l3_offset() + 40 + 8 + 8;
    for len in 14..bytes.len() {
        let before = h.counters();
        let action = h.run_bytes(&bytes[..len]);
        let after = h.counters();
        let malformed =
            after[Reason::Malformed as usize].packets - before[Reason::Malformed as usize].packets;
        if len < headers_end {
            assert_eq!(
                action, XDP_DROP,
                "truncated at {len} of {headers_end} header bytes"
            );
            assert_eq!(malformed, 1, "truncated at {len}: counted as malformed");
        } else {
            // Only L4 is cut: the program never reads it.
            assert_eq!(action, XDP_PASS, "cut inside L4 at {len}");
        }
    }

    // IPv4 with options cut inside the options.
    let v4 = Frame::ipv4_with_options(CLIENT).tagged(TPID_8021Q, 5);
    let v4_bytes = v4.bytes();
    let options_end = v4.l3_offset() + 28;
    for len in 14..options_end {
        assert_eq!(h.run_bytes(&v4_bytes[..len]), XDP_DROP, "IPv4 cut at {len}");
    }
    assert_eq!(h.run_bytes(&v4_bytes[..options_end]), XDP_PASS);

    // Frames too short for an Ethernet header are refused by the kernel's test harness itself,
    // so the 0..14 range is covered by the program's bounds checks alone.
    h.block("198.18.5.7", 0);
    let blocked_v4 = Frame::ipv4(CLIENT).bytes();
    assert_eq!(
        h.run_bytes(&blocked_v4[..14 + 20]),
        XDP_DROP,
        "a bare header still names its source"
    );
}

#[test]
fn inconsistent_ipv4_headers_are_malformed() {
    let Some(h) = Harness::new("inconsistent_ipv4_headers_are_malformed") else {
        return;
    };
    let good = Frame::ipv4(CLIENT).bytes();
    let mut short_ihl = good[14..].to_vec();
    short_ihl[0] = 0x44; // IHL 4 (16 bytes) is below the minimum
    h.expect(
        &Frame::with_l3(0x0800, short_ihl),
        XDP_DROP,
        Reason::Malformed,
    );
    let mut wrong_version = good[14..].to_vec();
    wrong_version[0] = 0x65;
    h.expect(
        &Frame::with_l3(0x0800, wrong_version),
        XDP_DROP,
        Reason::Malformed,
    );
    let mut short_total = good[14..].to_vec();
    short_total[2..4].copy_from_slice(&10u16.to_be_bytes());
    h.expect(
        &Frame::with_l3(0x0800, short_total),
        XDP_DROP,
        Reason::Malformed,
    );
    let mut v6_as_v4 = Frame::ipv6(CLIENT_V6).bytes()[14..].to_vec();
    v6_as_v4[0] = 0x45;
    h.expect(
        &Frame::with_l3(0x86DD, v6_as_v4),
        XDP_DROP,
        Reason::Malformed,
    );
}

#[test]
fn rate_limit_drops_over_burst_and_refills() {
    let Some(mut h) = Harness::new("rate_limit_drops_over_burst_and_refills") else {
        return;
    };
    h.settings(rate_limited(1, 3));
    for _ in 0..3 {
        h.expect(&Frame::ipv4(CLIENT), XDP_PASS, Reason::Passed);
    }
    h.expect(&Frame::ipv4(CLIENT), XDP_DROP, Reason::RateLimited);
    // Another source has its own bucket.
    h.expect(&Frame::ipv4(NEIGHBOUR), XDP_PASS, Reason::Passed);
    // One second refills one packet at 1 pps.
    std::thread::sleep(Duration::from_millis(1100));
    h.expect(&Frame::ipv4(CLIENT), XDP_PASS, Reason::Passed);
    h.expect(&Frame::ipv4(CLIENT), XDP_DROP, Reason::RateLimited);

    // Changing the settings takes effect without a reload.
    h.settings(RuntimeConfig::default());
    h.expect(&Frame::ipv4(CLIENT), XDP_PASS, Reason::Passed);
}

#[test]
fn ipv6_sources_share_a_bucket_per_prefix() {
    let Some(mut h) = Harness::new("ipv6_sources_share_a_bucket_per_prefix") else {
        return;
    };
    h.settings(RuntimeConfig {
        ipv6_prefix_len: 64,
        ..rate_limited(1, 2)
    });
    let same_64 = Ipv6Addr::new(0xfd00, 0xbad, 0, 1, 0xffff, 0, 0, 1);
    h.expect(&Frame::ipv6(CLIENT_V6), XDP_PASS, Reason::Passed);
    h.expect(&Frame::ipv6(same_64), XDP_PASS, Reason::Passed);
    h.expect(&Frame::ipv6(same_64), XDP_DROP, Reason::RateLimited);
    let next_64 = Ipv6Addr::new(0xfd00, 0xbad, 0, 2, 0, 0, 0, 7);
    h.expect(&Frame::ipv6(next_64), XDP_PASS, Reason::Passed);
}

#[test]
fn byte_rate_limit_counts_frame_sizes() {
    let Some(mut h) = Harness::new("byte_rate_limit_counts_frame_sizes") else {
        return;
    };
    h.settings(RuntimeConfig {
        features: RuntimeConfig::default().features
            | features::RATE_LIMIT
            | features::BYTE_RATE_LIMIT,
        packets_per_second: 1000,
        burst_packets: 1000,
        bytes_per_second: 1500,
        burst_bytes: 1500,
        ..RuntimeConfig::default()
    });
    let big = Frame::ipv4_sized(CLIENT, 900);
    h.expect(&big, XDP_PASS, Reason::Passed);
    h.expect(&big, XDP_DROP, Reason::RateLimited);
    // Small frames still fit in what is left of the byte bucket.
    h.expect(&Frame::ipv4_sized(CLIENT, 10), XDP_PASS, Reason::Passed);
}

#[test]
fn rate_limit_trips_are_sampled_onto_the_ring_buffer() {
    let Some(mut h) = Harness::new("rate_limit_trips_are_sampled_onto_the_ring_buffer") else {
        return;
    };
    h.settings(RuntimeConfig {
        event_interval_ns: 60_000_000_000,
        ..rate_limited(1, 1)
    });
    while h.next_event().is_some() {}
    assert_eq!(h.run(&Frame::ipv4(CLIENT)), XDP_PASS);
    for _ in 0..50 {
        assert_eq!(h.run(&Frame::ipv4(CLIENT)), XDP_DROP);
    }
    let event = h.next_event().expect("the first drop produces an event");
    assert_eq!(event.source.to_string(), "198.18.5.7");
    assert_eq!(event.dropped, 1);
    assert!(
        h.next_event().is_none(),
        "at most one event per source per interval"
    );

    // A second source gets its own event; IPv6 events carry the aggregated prefix.
    h.settings(RuntimeConfig {
        event_interval_ns: 60_000_000_000,
        ipv6_prefix_len: 56,
        ..rate_limited(1, 1)
    });
    assert_eq!(h.run(&Frame::ipv6(CLIENT_V6)), XDP_PASS);
    assert_eq!(h.run(&Frame::ipv6(CLIENT_V6)), XDP_DROP);
    let event = h.next_event().expect("an event for the IPv6 source");
    assert_eq!(event.source.to_string(), "fd00:bad::/56");
}

#[test]
fn features_switch_off_without_a_reload() {
    let Some(mut h) = Harness::new("features_switch_off_without_a_reload") else {
        return;
    };
    h.block("198.18.5.7", 0);
    h.expect(&Frame::ipv4(CLIENT), XDP_DROP, Reason::BlockedAddress);
    h.settings(RuntimeConfig {
        features: features::ALLOWLIST,
        ..RuntimeConfig::default()
    });
    h.expect(&Frame::ipv4(CLIENT), XDP_PASS, Reason::Passed);
}
