//! The flood section's two kinds of traffic: the attacker's flood and the legitimate client.
//!
//! The flood is generated the way a NIC delivers packets: a two-instruction XDP program that
//! returns `XDP_TX`, run by the kernel in live-frames mode (`BPF_PROG_TEST_RUN` with
//! `BPF_F_TEST_XDP_LIVE_FRAMES`) as if each frame had arrived on the attacker's veth, so each
//! copy leaves through that veth's `ndo_xdp_xmit` and reaches the gateway's end as an XDP frame,
//! before any socket buffer exists. A flood written to an ordinary socket would reach the
//! gateway as socket buffers and hide most of what XDP saves. Frames are TCP SYNs to the HTTPS
//! port and UDP datagrams to port 443, from a handful of blocklisted sources, with valid IP and
//! L4 checksums so that an undefended stack does all its work on them.
//!
//! The client makes one HTTPS request at a time over a fresh connection (TCP and TLS handshake
//! included, `Connection: close`), at a steady pace, and times each from connect to the end of
//! the response. It does not verify the gateway's self-signed certificate (signatures are still
//! checked), which is irrelevant to what is measured.
use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use gateway_tests::netns::Netns;

use crate::{
    flood_net::{ATTACKER_IF, ATTACKER_MAC, GATEWAY_PUBLIC_MAC, GATEWAY_PUBLIC_V4},
    xdp_sys::{FixedActionProgram, XDP_TX},
};

/// The port the gateway serves HTTPS on (on every address, so the SYN flood hits the listener
/// the client uses).
pub(crate) const HTTPS_PORT: u16 = 8443;
/// UDP flood destination: nothing listens there.
const UDP_PORT: u16 = 443;
/// Frames in the first live-frames call of a window; later calls are sized from the rate seen.
/// Each call has a fixed cost of tens of milliseconds on this kernel whatever its repeat count
/// (measured: 4,096-frame calls flooded at a tenth of the rate of million-frame calls), so
/// calls must be long; but the gateway's softirq work runs on the
/// generator's CPU, so a slow defence also slows the generator, and a call must not outlast
/// the window by much.
const FIRST_CALL_FRAMES: u32 = 65_536;
/// How long each later call aims to take.
const TARGET_CALL_TIME: Duration = Duration::from_millis(400);
/// A window ends when less than this is left.
const MIN_CALL_TIME: Duration = Duration::from_millis(50);
const MAX_CALL_FRAMES: u32 = 1 << 24;
/// Frames per live-frames batch (the kernel's default).
const BATCH: u32 = 64;

/// The flood's sources: blocklisted in every defence.
pub(crate) fn attacker_sources() -> Vec<Ipv4Addr> {
    (1..=16).map(|i| Ipv4Addr::new(203, 0, 113, i)).collect()
}

fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in chunks {
        for pair in chunk.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet + IPv4 frame from the attacker's veth to the gateway's, carrying `l4` (whose
/// checksum field at `l4_checksum_at` is filled in here).
fn frame(src: Ipv4Addr, protocol: u8, mut l4: Vec<u8>, l4_checksum_at: usize) -> Vec<u8> {
    let dst = GATEWAY_PUBLIC_V4;
    let l4_len = u16::try_from(l4.len()).expect("small");
    let pseudo = [
        &src.octets()[..],
        &dst.octets()[..],
        &[0, protocol],
        &l4_len.to_be_bytes(),
    ]
    .concat();
    let sum = checksum(&[&pseudo, &l4]);
    l4[l4_checksum_at..l4_checksum_at + 2].copy_from_slice(&sum.to_be_bytes());

    let total = 20 + l4_len;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    // Identification, then "don't fragment".
    ip.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, protocol, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let sum = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());

    let mut out = GATEWAY_PUBLIC_MAC.to_vec();
    out.extend_from_slice(&ATTACKER_MAC);
    out.extend_from_slice(&0x0800_u16.to_be_bytes());
    out.extend(ip);
    out.extend(l4);
    // The Ethernet minimum (without the FCS, which the veth does not carry).
    out.resize(out.len().max(60), 0);
    out
}

/// A TCP SYN to the HTTPS port.
fn syn(src: Ipv4Addr, source_port: u16) -> Vec<u8> {
    let mut tcp = source_port.to_be_bytes().to_vec();
    tcp.extend_from_slice(&HTTPS_PORT.to_be_bytes());
    tcp.extend_from_slice(
        &0x1000_0000_u32
            .wrapping_add(u32::from(source_port))
            .to_be_bytes(),
    );
    tcp.extend_from_slice(&[0, 0, 0, 0]);
    // Header length 5 words, SYN, window 64240, checksum, urgent pointer.
    tcp.extend_from_slice(&[0x50, 0x02, 0xfa, 0xf0, 0, 0, 0, 0]);
    frame(src, 6, tcp, 16)
}

/// A UDP datagram with 18 bytes of payload to port 443.
fn udp(src: Ipv4Addr, source_port: u16) -> Vec<u8> {
    let mut datagram = source_port.to_be_bytes().to_vec();
    datagram.extend_from_slice(&UDP_PORT.to_be_bytes());
    datagram.extend_from_slice(&26_u16.to_be_bytes());
    datagram.extend_from_slice(&[0, 0]);
    datagram.resize(26, 0xab);
    frame(src, 17, datagram, 6)
}

/// The flood's frames: a SYN and a UDP datagram from each source, taken in turn.
pub(crate) fn flood_frames() -> Vec<Vec<u8>> {
    attacker_sources()
        .into_iter()
        .enumerate()
        .flat_map(|(i, src)| {
            let port = 40_000 + u16::try_from(i).expect("few sources");
            [syn(src, port), udp(src, port)]
        })
        .collect()
}

/// The CPU the generator runs on: the last online one. A veth runs its receive side on the CPU
/// that transmitted to it, so the gateway's work on the flood lands there too, as a NIC queue's
/// lands on the CPU its interrupt is bound to.
pub(crate) fn flood_cpu() -> Result<u32> {
    aya::util::online_cpus()
        .map_err(|(file, e)| anyhow::anyhow!("reading `{file}`: {e}"))?
        .into_iter()
        .max()
        .context("no online CPU")
}

/// Binds the calling thread to `cpus` (its children inherit that).
fn bind_to(cpus: &[u32]) -> Result<()> {
    // SAFETY: `cpu_set_t` is plain data; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        // SAFETY: `set` is a valid set and `cpu` is an online CPU's index, below CPU_SETSIZE.
        unsafe { libc::CPU_SET(cpu as usize, &mut set) };
    }
    // SAFETY: pid 0 is the calling thread; `set` is valid for its size.
    let rc = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set) };
    ensure!(
        rc == 0,
        "binding a thread to CPUs {cpus:?}: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// Keeps the calling thread, and the processes it starts, off the flood's CPU (when there is
/// another), so that CPU does nothing but generate the flood and receive it, as a NIC queue's
/// CPU would, and the daemon, upstream and client run on the others.
pub(crate) fn avoid_flood_cpu() -> Result<()> {
    let flood = flood_cpu()?;
    let others: Vec<u32> = aya::util::online_cpus()
        .map_err(|(file, e)| anyhow::anyhow!("reading `{file}`: {e}"))?
        .into_iter()
        .filter(|&cpu| cpu != flood)
        .collect();
    if others.is_empty() {
        return Ok(());
    }
    bind_to(&others)
}

/// Floods the gateway from the attacker's namespace for `duration`, as fast as one CPU (`cpu`)
/// can generate frames. Returns how many frames the generator sent.
pub(crate) fn flood(
    attacker: &Netns,
    frames: &[Vec<u8>],
    duration: Duration,
    cpu: u32,
) -> Result<u64> {
    let generator = FixedActionProgram::load(XDP_TX, "gwbench_flood")?;
    ensure!(
        generator.run(&frames[0], 1)?.0 == XDP_TX,
        "the flood generator's program does not answer XDP_TX"
    );
    attacker.run(|| -> Result<u64> {
        bind_to(&[cpu])?;
        let name = std::ffi::CString::new(ATTACKER_IF).expect("no NUL");
        // SAFETY: a valid C string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        ensure!(
            ifindex != 0,
            "no interface `{ATTACKER_IF}` in the attacker's namespace"
        );
        let started = Instant::now();
        let mut sent = 0_u64;
        let mut per_call = FIRST_CALL_FRAMES;
        for frame in frames.iter().cycle() {
            let remaining = duration.saturating_sub(started.elapsed());
            if remaining < MIN_CALL_TIME {
                break;
            }
            let call_started = Instant::now();
            generator
                .transmit_live(frame, ifindex, per_call, BATCH)
                .context("BPF_PROG_TEST_RUN in live-frames mode (needs Linux 5.18 or later)")?;
            sent += u64::from(per_call);
            // Size the next call from this one's rate: long enough that the fixed cost of a
            // live-frames run (tens of milliseconds here, whatever the repeat count) hardly
            // interrupts the flood, short enough to end the window on time.
            let rate = f64::from(per_call) / call_started.elapsed().as_secs_f64().max(1e-6);
            let remaining = duration.saturating_sub(started.elapsed());
            let next = rate * remaining.min(TARGET_CALL_TIME).as_secs_f64();
            per_call = (next as u32).clamp(BATCH, MAX_CALL_FRAMES);
        }
        Ok(sent)
    })
}

/// What the client saw in one window.
#[derive(Default)]
pub(crate) struct ClientRun {
    pub(crate) attempts: usize,
    /// Latencies of the successful requests.
    pub(crate) latencies: Vec<Duration>,
    /// One example of why a request failed, for the report.
    pub(crate) first_error: Option<String>,
}

impl ClientRun {
    pub(crate) fn success_rate(&self) -> f64 {
        if self.attempts == 0 {
            return 0.0;
        }
        self.latencies.len() as f64 / self.attempts as f64
    }

    /// The `q` quantile (0..=1) of the successful requests' latencies, in milliseconds; failed
    /// requests count as the request timeout, so a failure can only raise it.
    pub(crate) fn quantile_ms(&self, q: f64) -> f64 {
        let mut all: Vec<f64> = self
            .latencies
            .iter()
            .map(|d| d.as_secs_f64() * 1e3)
            .chain(std::iter::repeat_n(
                REQUEST_TIMEOUT.as_secs_f64() * 1e3,
                self.attempts - self.latencies.len(),
            ))
            .collect();
        if all.is_empty() {
            return f64::NAN;
        }
        all.sort_by(f64::total_cmp);
        let rank = (q * all.len() as f64).ceil() as usize;
        all[rank.clamp(1, all.len()) - 1]
    }
}

/// Longest a request may take before it counts as failed.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Time between the starts of two requests (a request that takes longer delays the next).
const REQUEST_INTERVAL: Duration = Duration::from_millis(10);

/// Accepts any certificate but still checks handshake signatures with the provider's algorithms.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_config() -> Result<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("rustls protocol versions")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// One request over a fresh connection: `Ok` when the answer was a 200.
fn request(config: &Arc<rustls::ClientConfig>, target: SocketAddr) -> Result<()> {
    let started = Instant::now();
    let remaining = || {
        REQUEST_TIMEOUT
            .checked_sub(started.elapsed())
            .filter(|d| !d.is_zero())
            .context("timed out")
    };
    let mut tcp = TcpStream::connect_timeout(&target, REQUEST_TIMEOUT).context("connect")?;
    tcp.set_nodelay(true)?;
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("a valid name");
    let mut tls = rustls::ClientConnection::new(config.clone(), name).context("TLS setup")?;
    let mut stream = rustls::Stream::new(&mut tls, &mut tcp);
    stream.sock.set_write_timeout(Some(remaining()?))?;
    stream
        .write_all(b"GET /api/bench HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .context("TLS handshake or request")?;
    let mut response = Vec::new();
    let mut buffer = [0_u8; 4096];
    loop {
        stream.sock.set_read_timeout(Some(remaining()?))?;
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => response.extend_from_slice(&buffer[..n]),
            // A peer that closes without close_notify, after the whole response.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e).context("reading the response"),
        }
    }
    ensure!(
        response.starts_with(b"HTTP/1.1 200"),
        "answer: {:?}",
        String::from_utf8_lossy(&response[..response.len().min(40)])
    );
    Ok(())
}

/// Makes requests from the client's namespace to `target` for `duration`.
pub(crate) fn client(client: &Netns, target: SocketAddr, duration: Duration) -> Result<ClientRun> {
    let config = tls_config()?;
    client.run(|| {
        avoid_flood_cpu()?;
        let mut run = ClientRun::default();
        let deadline = Instant::now() + duration;
        let mut next = Instant::now();
        while Instant::now() < deadline {
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            next += REQUEST_INTERVAL;
            let started = Instant::now();
            run.attempts += 1;
            match request(&config, target) {
                Ok(()) => run.latencies.push(started.elapsed()),
                Err(e) => {
                    run.first_error.get_or_insert_with(|| format!("{e:#}"));
                }
            }
            // A slow request delays the next one instead of causing a burst of catch-ups.
            next = next.max(Instant::now());
        }
        Ok(run)
    })
}
