//! Section 2, "Flood absorption": an attacker floods the gateway host with TCP SYNs and UDP from
//! blocklisted sources while a legitimate client makes HTTPS requests through the gateway, once
//! per defence: none, iptables (the source as 1 of 10,000 raw-table rules), ipset (one rule, a
//! 10,000-address set), an nftables set in the netdev ingress hook, xdp-filter, and this
//! gateway's XDP blocklist. For each it reports the packets dropped per second, the softirq time
//! per dropped packet on the CPU the flood arrives on (and the host's softirq time beside it),
//! and the client's success rate and latency against a no-flood baseline.
//!
//! The test bed is [`crate::flood_net`], the traffic [`crate::flood_traffic`]; the daemon and
//! upstream are [`crate::daemon`]'s guards, kept off the flood's CPU. Every defence holds the
//! same 10,000 IPv4 addresses (the 16 attacker sources last, after 9,984 others), and every
//! defence is removed again after its row, also when it fails: a row that cannot be measured
//! says why instead of failing the section.
use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use gateway_tests::netns::Netns;

use crate::{
    Ctx,
    daemon::{Background, Daemon, catching_panics, demo_upstream, wait_for_tcp},
    flood_net::{self, GATEWAY_CLIENT_V4, GATEWAY_PUBLIC_IF, TestBed},
    flood_traffic::{self, ClientRun, HTTPS_PORT, REQUEST_TIMEOUT, avoid_flood_cpu},
    report::{Chart, Section, Table, median, thousands},
    xdp_filter::XdpFilter,
    xdp_sys::XDP_DROP,
};

/// Entries in every defence's blocklist.
const BLOCKLIST_LEN: usize = 10_000;
/// Pause before each window, so the previous window's backlog is gone.
const SETTLE: Duration = Duration::from_millis(300);
/// Names of the netfilter objects the section creates (inside its own namespace).
const IPSET_NAME: &str = "gwbench_block";
const NFT_TABLE: &str = "gwbench";
/// Where the demo upstream listens, inside the gateway's namespace.
const UPSTREAM: &str = "127.0.0.1:18081";
/// Longest the daemon's HTTPS listener may take to accept once its admin socket answers.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(20);

/// The blocklist every defence holds: 9,984 addresses of 10.0.0.0/8 that send nothing, then the
/// attacker's sources, so a rule list is scanned to its end before an attacker's rule matches.
fn blocklist() -> Vec<Ipv4Addr> {
    let sources = flood_traffic::attacker_sources();
    let fillers = BLOCKLIST_LEN - sources.len();
    (1..=fillers)
        .map(|i| Ipv4Addr::from(0x0a00_0000_u32 + u32::try_from(i).expect("fits")))
        .chain(sources)
        .collect()
}

/// The defences, in the report's order.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Defence {
    /// No flood at all: the client's reference figures.
    Baseline,
    Undefended,
    Iptables,
    Ipset,
    Nftables,
    XdpFilter,
    Gateway,
}

impl Defence {
    const ALL: [Defence; 7] = [
        Defence::Baseline,
        Defence::Undefended,
        Defence::Iptables,
        Defence::Ipset,
        Defence::Nftables,
        Defence::XdpFilter,
        Defence::Gateway,
    ];

    fn label(self) -> &'static str {
        match self {
            Defence::Baseline => "no flood (baseline)",
            Defence::Undefended => "no defence",
            Defence::Iptables => "iptables raw, 1 of 10,000 rules",
            Defence::Ipset => "ipset hash:ip + 1 iptables rule",
            Defence::Nftables => "nftables set, netdev ingress",
            Defence::XdpFilter => "xdp-filter (XDP)",
            Defence::Gateway => "this gateway (XDP)",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Defence::Baseline => "baseline",
            Defence::Undefended => "none",
            Defence::Iptables => "iptables",
            Defence::Ipset => "ipset",
            Defence::Nftables => "nft set",
            Defence::XdpFilter => "xdp-filter",
            Defence::Gateway => "gateway",
        }
    }

    /// The kernel firewalls the gateway's CPU per drop is compared with.
    fn is_kernel_firewall(self) -> bool {
        matches!(self, Defence::Iptables | Defence::Ipset | Defence::Nftables)
    }
}

/// One flood window.
struct Window {
    elapsed: Duration,
    sent: u64,
    /// Dropped by the defence, where it counts drops.
    dropped: Option<u64>,
    /// Softirq time of the CPU the flood arrives on.
    softirq_seconds: f64,
    /// Softirq time of all CPUs together.
    host_softirq_seconds: f64,
    client: ClientRun,
}

struct Row {
    defence: Defence,
    windows: Result<Vec<Window>, String>,
}

impl Row {
    fn per_window(&self, f: impl Fn(&Window) -> Option<f64>) -> Option<f64> {
        let windows = self.windows.as_ref().ok()?;
        let values: Vec<f64> = windows.iter().filter_map(f).collect();
        (!values.is_empty()).then(|| median(&values))
    }

    fn offered_mpps(&self) -> Option<f64> {
        self.per_window(|w| Some(w.sent as f64 / w.elapsed.as_secs_f64() / 1e6))
    }

    fn dropped_mpps(&self) -> Option<f64> {
        self.per_window(|w| Some(w.dropped? as f64 / w.elapsed.as_secs_f64() / 1e6))
    }

    /// Softirq time on the flood's CPU, as a share of that CPU.
    fn softirq_share(&self) -> Option<f64> {
        self.per_window(|w| Some(w.softirq_seconds / w.elapsed.as_secs_f64()))
    }

    /// Softirq time of the whole host, in CPUs.
    fn host_softirq_cpus(&self) -> Option<f64> {
        self.per_window(|w| Some(w.host_softirq_seconds / w.elapsed.as_secs_f64()))
    }

    fn ns_per_drop(&self) -> Option<f64> {
        self.per_window(|w| {
            let dropped = w.dropped?;
            (dropped > 0).then(|| w.softirq_seconds * 1e9 / dropped as f64)
        })
    }

    fn success(&self) -> Option<f64> {
        self.per_window(|w| Some(w.client.success_rate() * 100.0))
    }

    fn p50_ms(&self) -> Option<f64> {
        self.per_window(|w| Some(w.client.quantile_ms(0.50)))
    }

    fn p99_ms(&self) -> Option<f64> {
        self.per_window(|w| Some(w.client.quantile_ms(0.99)))
    }

    fn requests(&self) -> Option<f64> {
        self.per_window(|w| Some(w.client.attempts as f64))
    }
}

pub(crate) fn bench(ctx: &Ctx) -> Result<Section> {
    catching_panics(|| measure_all(ctx))
}

/// Starts `gateway run` in `netns`, kept off the flood's CPU, with an HTTPS listener on every
/// address and, with `xdp_interface`, the XDP program attached natively there with its lists
/// and rate limit on. Returns once the admin socket answers and the listener accepts.
fn start_daemon(
    ctx: &Ctx,
    netns: &Netns,
    tag: &str,
    xdp_interface: Option<&str>,
) -> Result<Daemon> {
    let xdp = match xdp_interface {
        // The allowlist and prefix blocklist hold an entry each (documentation ranges), so the
        // program consults every tier, as in production; the rate limit is far above the
        // client's few hundred packets a second.
        Some(interface) => format!(
            "[xdp]\n\
             interfaces = [\"{interface}\"]\n\
             mode = \"native\"\n\
             allowlist = [\"192.0.2.0/24\"]\n\
             blocklist = [\"198.51.100.0/24\"]\n\
             [xdp.rate_limit]\n\
             enabled = true\n\
             packets_per_second = 20000\n\
             burst = 40000\n"
        ),
        None => "[xdp]\ninterfaces = []\n".to_owned(),
    };
    let mut daemon = Daemon::new(&ctx.gateway, tag)?;
    daemon.write_config(&format!(
        "{xdp}\n\
         [[listeners]]\n\
         name = \"public\"\n\
         address = \"0.0.0.0:{HTTPS_PORT}\"\n\
         routes = [\"api\"]\n\
         [listeners.tls]\n\
         self_signed = true\n\
         self_signed_names = [\"localhost\"]\n\
         \n\
         [[routes]]\n\
         name = \"api\"\n\
         path_prefix = \"/api/\"\n\
         upstream = \"app\"\n\
         \n\
         [[upstreams]]\n\
         name = \"app\"\n\
         endpoints = [\"{UPSTREAM}\"]"
    ))?;
    daemon.start_with(netns, &[("RUST_LOG", "warn")], avoid_flood_cpu)?;
    wait_for_tcp(
        netns,
        SocketAddr::from(([127, 0, 0, 1], HTTPS_PORT)),
        LISTEN_TIMEOUT,
    )?;
    Ok(daemon)
}

/// Packets the daemon's XDP program counted under `reason` (`gateway stats --json`).
fn xdp_packets(daemon: &Daemon, reason: &str) -> Result<u64> {
    daemon.json(&["stats", "--json"])?["reasons"]
        .as_array()
        .and_then(|reasons| reasons.iter().find(|r| r["reason"] == reason))
        .and_then(|r| r["packets"].as_u64())
        .with_context(|| format!("`gateway stats --json` has no packet count for `{reason}`"))
}

/// What a defence reads to count its drops.
type DropCounter<'a> = Box<dyn Fn() -> Result<u64> + 'a>;

fn measure_all(ctx: &Ctx) -> Result<Section> {
    let window = if ctx.quick {
        Duration::from_millis(1500)
    } else {
        Duration::from_secs(8)
    };
    let bed = TestBed::new()?;
    // NAPI on the public veth's receive side for the defences without an XDP program (see
    // flood_net); the XDP defences get it from their program, GRO stays on for all.
    bed.set_public_gro(true)?;
    let _upstream = Background::spawn_in(
        "gateway demo-upstream",
        &bed.gateway,
        demo_upstream(&ctx.gateway, UPSTREAM),
        avoid_flood_cpu,
    )?;
    let frames = flood_traffic::flood_frames();
    let blocklist = blocklist();
    let bench = Bench {
        ctx,
        bed: &bed,
        frames: &frames,
        window,
        cpu: flood_traffic::flood_cpu()?,
    };

    let mut rows = Vec::new();
    let l7_only = start_daemon(ctx, &bed.gateway, "flood-l7", None)?;
    for defence in Defence::ALL {
        if defence == Defence::Gateway {
            continue;
        }
        eprintln!("   {}", defence.label());
        let windows = bench
            .defence(defence, &blocklist)
            .map_err(|e| format!("{e:#}"));
        if let Err(e) = &windows {
            eprintln!("   {}: not measured: {e}", defence.label());
        }
        rows.push(Row { defence, windows });
    }
    // The gateway's own row: the same daemon build, now attached to the public interface.
    drop(l7_only);
    eprintln!("   {}", Defence::Gateway.label());
    let windows = bench.gateway(&blocklist).map_err(|e| format!("{e:#}"));
    if let Err(e) = &windows {
        eprintln!("   {}: not measured: {e}", Defence::Gateway.label());
    }
    rows.push(Row {
        defence: Defence::Gateway,
        windows,
    });
    Ok(report(ctx, window, bench.cpu, &rows))
}

struct Bench<'a> {
    ctx: &'a Ctx,
    bed: &'a TestBed,
    frames: &'a [Vec<u8>],
    window: Duration,
    /// The CPU the generator is bound to, where the flood's receive work happens.
    cpu: u32,
}

impl Bench<'_> {
    /// Installs a defence (not the gateway's), measures it and removes it again.
    fn defence(&self, defence: Defence, blocklist: &[Ipv4Addr]) -> Result<Vec<Window>> {
        let gateway = &self.bed.gateway;
        match defence {
            Defence::Baseline => self.windows(false, None),
            Defence::Undefended => self.windows(true, None),
            Defence::Iptables => {
                let mut rules = String::from("*raw\n:PREROUTING ACCEPT [0:0]\n");
                for addr in blocklist {
                    let _ = writeln!(rules, "-A PREROUTING -s {addr}/32 -j DROP");
                }
                rules.push_str("COMMIT\n");
                let _cleanup = Cleanup::new(gateway, &[&["iptables", "-t", "raw", "-F"]]);
                TestBed::command_in(gateway, "iptables-restore", &[], Some(&rules))
                    .context("loading 10,000 rules with iptables-restore")?;
                self.windows(true, Some(Box::new(|| iptables_drops(self.bed))))
            }
            Defence::Ipset => {
                let mut set = format!(
                    "create {IPSET_NAME} hash:ip family inet hashsize 16384 maxelem 65536\n"
                );
                for addr in blocklist {
                    let _ = writeln!(set, "add {IPSET_NAME} {addr}");
                }
                // Rule first, set second: a set in use cannot be destroyed.
                let _cleanup = Cleanup::new(
                    gateway,
                    &[
                        &["iptables", "-t", "raw", "-F"],
                        &["ipset", "destroy", IPSET_NAME],
                    ],
                );
                TestBed::command_in(gateway, "ipset", &["restore"], Some(&set))
                    .context("loading the set with `ipset restore`")?;
                TestBed::command_in(
                    gateway,
                    "iptables",
                    &[
                        "-t",
                        "raw",
                        "-A",
                        "PREROUTING",
                        "-m",
                        "set",
                        "--match-set",
                        IPSET_NAME,
                        "src",
                        "-j",
                        "DROP",
                    ],
                    None,
                )?;
                self.windows(true, Some(Box::new(|| iptables_drops(self.bed))))
            }
            Defence::Nftables => {
                let elements = blocklist
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ");
                let ruleset = format!(
                    "table netdev {NFT_TABLE} {{\n\
                     \tset blocked {{ type ipv4_addr; size 65536; elements = {{ {elements} }} }}\n\
                     \tchain ingress {{\n\
                     \t\ttype filter hook ingress device \"{GATEWAY_PUBLIC_IF}\" priority -500; policy accept;\n\
                     \t\tip saddr @blocked counter drop\n\
                     \t}}\n\
                     }}\n"
                );
                let _cleanup =
                    Cleanup::new(gateway, &[&["nft", "delete", "table", "netdev", NFT_TABLE]]);
                TestBed::command_in(gateway, "nft", &["-f", "-"], Some(&ruleset))
                    .context("loading the nftables set")?;
                self.windows(true, Some(Box::new(|| nft_drops(self.bed))))
            }
            Defence::XdpFilter => {
                let capacity = u32::try_from(blocklist.len()).expect("fits");
                let mut filter = XdpFilter::load(capacity)?;
                let octets: Vec<[u8; 4]> = blocklist.iter().map(Ipv4Addr::octets).collect();
                filter.deny_v4(&octets)?;
                gateway.run(|| filter.attach(GATEWAY_PUBLIC_IF))?;
                // Dropping `filter` after the windows detaches and unloads it.
                self.windows(true, Some(Box::new(|| filter.packets(XDP_DROP))))
            }
            Defence::Gateway => unreachable!("measured by `Bench::gateway`"),
        }
    }

    /// Starts the daemon attached to the public interface, bans the blocklist through the CLI
    /// (`gateway block import`), and measures.
    fn gateway(&self, blocklist: &[Ipv4Addr]) -> Result<Vec<Window>> {
        let daemon = start_daemon(
            self.ctx,
            &self.bed.gateway,
            "flood-xdp",
            Some(GATEWAY_PUBLIC_IF),
        )?;
        let text: String = blocklist.iter().map(|addr| format!("{addr}\n")).collect();
        let list = daemon.dir().join("blocklist.txt");
        std::fs::write(&list, text).context("writing the blocklist file")?;
        let path = list.to_str().context("a UTF-8 temporary path")?;
        daemon.cli(&["block", "import", path, "--reason", "bench"])?;
        self.windows(
            true,
            Some(Box::new(|| xdp_packets(&daemon, "blocked_address"))),
        )
    }

    /// Measures [`Ctx::repetitions`] windows: the client alone, or with the flood.
    fn windows(&self, with_flood: bool, dropped: Option<DropCounter<'_>>) -> Result<Vec<Window>> {
        let target = SocketAddr::from((GATEWAY_CLIENT_V4, HTTPS_PORT));
        let mut windows = Vec::new();
        for _ in 0..self.ctx.repetitions {
            std::thread::sleep(SETTLE);
            let dropped_before = dropped.as_ref().map(|count| count()).transpose()?;
            let softirq_before = flood_net::softirq_seconds(Some(self.cpu))?;
            let host_softirq_before = flood_net::softirq_seconds(None)?;
            let started = Instant::now();
            let (sent, elapsed, softirq_after, client) = std::thread::scope(|scope| {
                let client =
                    scope.spawn(|| flood_traffic::client(&self.bed.client, target, self.window));
                let sent = if with_flood {
                    flood_traffic::flood(&self.bed.attacker, self.frames, self.window, self.cpu)
                } else {
                    std::thread::sleep(self.window);
                    Ok(0)
                };
                let elapsed = started.elapsed();
                let softirq_after = flood_net::softirq_seconds(Some(self.cpu))
                    .and_then(|cpu| Ok((cpu, flood_net::softirq_seconds(None)?)));
                let client = client
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                (sent, elapsed, softirq_after, client)
            });
            let dropped_after = dropped.as_ref().map(|count| count()).transpose()?;
            let (softirq_after, host_softirq_after) = softirq_after?;
            windows.push(Window {
                elapsed,
                sent: sent?,
                dropped: dropped_after
                    .zip(dropped_before)
                    .map(|(after, before)| after.saturating_sub(before)),
                softirq_seconds: softirq_after - softirq_before,
                host_softirq_seconds: host_softirq_after - host_softirq_before,
                client: client?,
            });
        }
        Ok(windows)
    }
}

/// Commands run in the gateway's namespace on drop, errors ignored: the namespace's deletion at
/// the end of the section removes whatever they miss.
struct Cleanup<'a> {
    netns: &'a gateway_tests::netns::Netns,
    commands: Vec<Vec<String>>,
}

impl<'a> Cleanup<'a> {
    fn new(netns: &'a gateway_tests::netns::Netns, commands: &[&[&str]]) -> Cleanup<'a> {
        Cleanup {
            netns,
            commands: commands
                .iter()
                .map(|c| c.iter().map(|s| (*s).to_owned()).collect())
                .collect(),
        }
    }
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for command in &self.commands {
            let args: Vec<&str> = command[1..].iter().map(String::as_str).collect();
            let _ = TestBed::command_in(self.netns, &command[0], &args, None);
        }
    }
}

/// Packets dropped by DROP rules of the raw table (`iptables-save -c`: `[packets:bytes] -A ...`).
fn iptables_drops(bed: &TestBed) -> Result<u64> {
    let output = TestBed::command_in(&bed.gateway, "iptables-save", &["-c", "-t", "raw"], None)?;
    let text = String::from_utf8_lossy(&output.stdout);
    let mut total = 0;
    for line in text.lines().filter(|l| l.ends_with("-j DROP")) {
        let counters = line
            .strip_prefix('[')
            .and_then(|rest| rest.split_once(']'))
            .and_then(|(counters, _)| counters.split_once(':'))
            .with_context(|| format!("unexpected `iptables-save -c` line: {line}"))?;
        total += counters
            .0
            .parse::<u64>()
            .with_context(|| format!("unexpected `iptables-save -c` line: {line}"))?;
    }
    Ok(total)
}

/// Packets the nftables rule's counter saw (`counter packets N bytes M drop`).
fn nft_drops(bed: &TestBed) -> Result<u64> {
    let output = TestBed::command_in(
        &bed.gateway,
        "nft",
        &["list", "chain", "netdev", NFT_TABLE, "ingress"],
        None,
    )?;
    let text = String::from_utf8_lossy(&output.stdout);
    let words: Vec<&str> = text.split_whitespace().collect();
    words
        .windows(3)
        .find(|w| w[0] == "counter" && w[1] == "packets")
        .and_then(|w| w[2].parse().ok())
        .context("the nftables chain shows no counter")
}

fn fmt(value: Option<f64>, decimals: usize, unit: &str) -> String {
    value.map_or("–".to_owned(), |v| format!("{v:.decimals$}{unit}"))
}

fn report(ctx: &Ctx, window: Duration, cpu: u32, rows: &[Row]) -> Section {
    let row = |d: Defence| rows.iter().find(|r| r.defence == d);
    let gateway = row(Defence::Gateway);
    let xdp_filter = row(Defence::XdpFilter);
    let nft = row(Defence::Nftables);
    let baseline = row(Defence::Baseline);
    let ratio = |a: Option<&Row>, b: Option<&Row>, f: fn(&Row) -> Option<f64>| {
        let (a, b) = (a.and_then(f)?, b.and_then(f)?);
        (b > 0.0).then(|| a / b)
    };
    let vs_xdp_filter = ratio(gateway, xdp_filter, Row::dropped_mpps);
    let vs_nft = ratio(gateway, nft, Row::dropped_mpps);
    let judge = |value: Option<f64>, ok: fn(f64) -> bool| match value {
        Some(v) if ok(v) => "**met**",
        Some(_) => "**missed**",
        None => "not evaluated (a figure is missing)",
    };
    let gateway_success = gateway.and_then(Row::success);
    let gateway_p99 = gateway.and_then(Row::p99_ms);
    let client_verdict = match (gateway_success, gateway_p99) {
        (Some(s), Some(p)) if s >= 99.0 && p < 10.0 => "**met**",
        (Some(_), Some(_)) => "**missed**",
        _ => "not evaluated (a figure is missing)",
    };
    let gateway_cpu = gateway.and_then(Row::ns_per_drop);
    let firewalls: Vec<(Defence, f64)> = rows
        .iter()
        .filter(|r| r.defence.is_kernel_firewall())
        .filter_map(|r| Some((r.defence, r.ns_per_drop()?)))
        .collect();
    let least_cpu = match gateway_cpu {
        Some(g) if !firewalls.is_empty() => {
            if firewalls.iter().all(|(_, ns)| g < *ns) {
                "**met**"
            } else {
                "**missed**"
            }
        }
        _ => "not evaluated (a figure is missing)",
    };
    let firewall_list = firewalls
        .iter()
        .map(|(d, ns)| format!("{} {ns:.0} ns", d.short()))
        .collect::<Vec<_>>()
        .join(", ");

    let mut summary = format!(
        "Three network namespaces joined by veth pairs: attacker ↔ gateway (the \"public\" link \
         every defence guards) and client ↔ gateway. The attacker floods TCP SYNs to the HTTPS \
         port and UDP to port 443 from blocklisted sources, as fast as one CPU generates them, \
         for {window:?} per window (each live-frames call below repeats one frame, and calls \
         take in turn a SYN and a datagram from each of 16 sources, so a window carries both \
         kinds from the first few sources). The flood is made by a two-instruction XDP program returning \
         `XDP_TX`, run by the kernel in live-frames mode (`BPF_PROG_TEST_RUN` with \
         `BPF_F_TEST_XDP_LIVE_FRAMES`, batches of 64 frames) on the attacker's veth, so frames \
         reach the gateway's veth through `ndo_xdp_xmit` as XDP frames, the way a NIC driver \
         delivers them, not as socket buffers. A veth takes such frames only while its receive \
         side runs NAPI, so GRO is switched on on the public veth for every row (without it, \
         and without an XDP program attached, the kernel refuses the frames). Meanwhile the \
         client, in its own namespace, makes one HTTPS request every 10 ms through the gateway \
         daemon (`gateway run`, the binary under test, proxying to `gateway demo-upstream`), each \
         over a fresh TCP + TLS connection, and times it from connect to the end of the answer \
         (a failure counts as the {timeout:?} timeout in the percentiles). The HTTPS listener is \
         on every address, so the SYN flood hits the same listening socket the client uses. For \
         every row but the gateway's, the daemon runs without XDP (no interface) and only serves \
         HTTPS; for the gateway's row it is attached natively to the public veth with its \
         allowlist, both blocklist tiers and the per-source rate limit on. Every defence holds \
         the same {entries} IPv4 addresses, the 16 attacker sources last (iptables: one \
         `-s ADDR -j DROP` rule each in the raw table's PREROUTING, so a flood packet is checked \
         against every rule before its own; iptables 1.8.9 with its nf_tables backend, the \
         Debian default; the gateway's list is loaded with `gateway block import`). Dropped \
         packets come from each defence's own counters (`gateway stats --json`, xdp-filter's \
         stats map, the iptables and nftables rule counters). CPU is softirq time from \
         `/proc/stat` over the window. The generator is bound to CPU {cpu}, and a veth runs its \
         receive side (NAPI poll: the XDP program, or the stack with its netfilter hooks) on the \
         CPU that transmitted to it, so the gateway's whole receive work on the flood is softirq \
         time of CPU {cpu}, as a NIC queue's is on the CPU its interrupt is bound to: that CPU's \
         softirq time per dropped packet is the cost figure. The host-wide softirq time (all \
         CPUs) is shown beside it; it also holds the client's traffic and anything else the \
         machine does. The generator's own work is system time, counted in neither. Figures are \
         medians of {reps} windows. The machine has {cpus} CPUs: CPU {cpu} generates and receives \
         the flood, as a NIC queue's CPU would, and the daemon, the upstream and the client are \
         bound to the others (anything else running on the machine is not).\n\n",
        timeout = REQUEST_TIMEOUT,
        entries = thousands(BLOCKLIST_LEN),
        reps = ctx.repetitions,
        cpus = std::thread::available_parallelism().map_or(0, usize::from),
        cpu = cpu,
    );
    let _ = write!(
        summary,
        "Goals:\n\n\
         - The gateway drops ≥ 0.9× what xdp-filter drops per second: {gw} vs {xf} = {r1} — \
         {v1}; and ≥ 2.5× the nftables set: vs {nf} = {r2} — {v2}.\n\
         - The client sees ≥ 99% success with p99 under 10 ms during the flood on the gateway: \
         {succ} success, p99 {p99} — {v3}.\n\
         - The least CPU per dropped packet of the kernel-firewall defences: gateway {gcpu} vs \
         {firewall_list} — {v4}.\n",
        gw = fmt(gateway.and_then(Row::dropped_mpps), 2, " Mpps"),
        xf = fmt(xdp_filter.and_then(Row::dropped_mpps), 2, " Mpps"),
        r1 = fmt(vs_xdp_filter, 2, "×"),
        v1 = judge(vs_xdp_filter, |r| r >= 0.9),
        nf = fmt(nft.and_then(Row::dropped_mpps), 2, " Mpps"),
        r2 = fmt(vs_nft, 2, "×"),
        v2 = judge(vs_nft, |r| r >= 2.5),
        succ = fmt(gateway_success, 1, "%"),
        p99 = fmt(gateway_p99, 1, " ms"),
        v3 = client_verdict,
        gcpu = fmt(gateway_cpu, 0, " ns"),
        v4 = least_cpu,
    );

    let mut table = Table::new(
        "Per defence (medians of the windows; latency ratios against the no-flood baseline):",
        &[
            "Defence",
            "Flood sent (Mpps)",
            "Dropped (Mpps)",
            "Softirq, flood CPU (share)",
            "Softirq ns / drop",
            "Softirq, host (CPUs)",
            "Requests",
            "Success",
            "p50 ms (× baseline)",
            "p99 ms (× baseline)",
        ],
    );
    for r in rows {
        if let Err(why) = &r.windows {
            let mut cells = vec![r.defence.label().to_owned(), format!("not measured: {why}")];
            cells.resize(10, "–".to_owned());
            table.row(cells);
            continue;
        }
        let relative = |value: Option<f64>, f: fn(&Row) -> Option<f64>| {
            let base = baseline.and_then(f);
            match (value, base) {
                (Some(v), Some(b)) if b > 0.0 && r.defence != Defence::Baseline => {
                    format!("{v:.1} ({:.1}×)", v / b)
                }
                (Some(v), _) => format!("{v:.1}"),
                _ => "–".to_owned(),
            }
        };
        let flooded = r.defence != Defence::Baseline;
        table.row(vec![
            r.defence.label().to_owned(),
            if flooded {
                fmt(r.offered_mpps(), 2, "")
            } else {
                "–".to_owned()
            },
            fmt(r.dropped_mpps(), 2, ""),
            fmt(r.softirq_share().map(|s| s * 100.0), 0, "%"),
            fmt(r.ns_per_drop(), 0, ""),
            fmt(r.host_softirq_cpus(), 2, ""),
            fmt(r.requests(), 0, ""),
            fmt(r.success(), 1, "%"),
            relative(r.p50_ms(), Row::p50_ms),
            relative(r.p99_ms(), Row::p99_ms),
        ]);
    }
    let failures: Vec<String> = rows
        .iter()
        .filter_map(|r| {
            let windows = r.windows.as_ref().ok()?;
            let error = windows.iter().find_map(|w| w.client.first_error.clone())?;
            Some(format!("- {}: {error}", r.defence.label()))
        })
        .collect();
    if !failures.is_empty() {
        let _ = write!(
            summary,
            "\nFirst failed request per row, for the record:\n\n{}\n",
            failures.join("\n")
        );
    }

    let measured: Vec<&Row> = rows
        .iter()
        .filter(|r| r.defence != Defence::Baseline && r.dropped_mpps().is_some())
        .collect();
    // How to read the drop rates: the generator and the defence share one CPU, so a rate is
    // what that CPU sustains generating and defending, and frames lost before the defence
    // (a full veth ring) would show as a gap between sent and dropped.
    let lossless: Vec<&str> = rows
        .iter()
        .filter(
            |r| matches!((r.dropped_mpps(), r.offered_mpps()), (Some(d), Some(o)) if d >= 0.99 * o),
        )
        .map(|r| r.defence.short())
        .collect();
    let _ = write!(
        summary,
        "\nHow to read the rates: a veth runs its receive side (NAPI, in softirq) on the CPU that \
         transmitted to it, so the defence's work runs on the generator's CPU and slows it down. \
         A flood rate is therefore what one CPU sustains generating frames plus defending against \
         them: a costlier defence gets a slower flood, and the generator's own share (system \
         time, not counted above) is the same for every row. {lossless}Softirq nanoseconds per \
         drop isolate the defence's cost.\n",
        lossless = if lossless.is_empty() {
            String::new()
        } else {
            format!(
                "These rows dropped at least 99% of what was sent, so no frame was lost before \
                 the defence: {}. ",
                lossless.join(", ")
            )
        },
    );

    let cpu_rows: Vec<&Row> = rows.iter().filter(|r| r.ns_per_drop().is_some()).collect();
    let cpu_chart = Chart {
        file: "flood-cpu.png".to_owned(),
        title: "Flood absorption: softirq time per dropped packet (flood CPU)".to_owned(),
        y_label: "ns of softirq per drop (median)".to_owned(),
        labels: cpu_rows
            .iter()
            .map(|r| r.defence.short().to_owned())
            .collect(),
        series: vec![(
            "softirq ns / drop".to_owned(),
            cpu_rows.iter().filter_map(|r| r.ns_per_drop()).collect(),
        )],
        log_scale: true,
    };
    let chart = Chart {
        file: "flood.png".to_owned(),
        title: "Flood absorption: packets dropped per second".to_owned(),
        y_label: "Mpps dropped (median)".to_owned(),
        labels: measured
            .iter()
            .map(|r| r.defence.short().to_owned())
            .collect(),
        series: vec![(
            "dropped".to_owned(),
            measured.iter().filter_map(|r| r.dropped_mpps()).collect(),
        )],
        log_scale: true,
    };
    Section {
        summary,
        tables: vec![table],
        charts: vec![chart, cpu_chart],
    }
}
