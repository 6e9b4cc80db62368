//! `gateway run`: loads and attaches the data plane, restores the lists, serves the admin API,
//! sweeps and persists in the background, and detaches cleanly on SIGINT or SIGTERM.
use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use anyhow::Context as _;
use gateway_common::Reason;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    abuse::{
        AbuseLoop, Outcome, OutcomeClass,
        audit::AuditLog,
        offences::{Escalation, Offences},
        verdicts::{Enforcer, Executor},
    },
    admin::{
        protocol::{
            BanExplanation, InterfaceView, ReasonCount, Request, Response, StatsView, StatusView,
        },
        server::{self, Handler},
    },
    auth::{Authenticator, SystemClock, apikeys::KeyStore},
    cidr::Cidr,
    config::{AttachMode, Config},
    lists::{EntrySpec, Lists, Origin, error_chain, state},
    metrics::{
        AbuseCounts, Metrics, ReloadLabels, XdpReader, XdpSnapshot,
        http::{self as metrics_http, AdminHttp},
    },
    proxy::{self, Services},
    xdp::{
        DataPlane, ListKind,
        clock::{ClockPair, monotonic_now_ns},
        events,
        loader::{self, Pinning},
        maps::KernelMaps,
    },
};

/// Command-line overrides of the config file.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// The file the config came from: reloads read it again.
    pub config_path: PathBuf,
    /// Attach mode for every interface, overriding `xdp.mode`.
    pub mode: Option<AttachMode>,
    /// Replace pinned maps of another layout instead of refusing to start.
    pub replace_stale_pins: bool,
}

/// What the admin API reads and changes.
struct Daemon {
    /// Shared with the metrics collector, which reads the kernel counters at scrape time.
    lists: Arc<Mutex<Lists<KernelMaps>>>,
    /// The config in force, and where it came from.
    config: Mutex<Config>,
    config_path: PathBuf,
    /// Swaps the L7 pipeline on reload; `None` when the config has no listeners.
    l7: Option<proxy::Reloader>,
    metrics: Metrics,
    instance: String,
    program_id: Option<u32>,
    interfaces: Vec<InterfaceView>,
    pin_dir: String,
    state_file: String,
    reused_pins: bool,
    started: Instant,
    rate_limit_events: AtomicU64,
    /// API keys; the L7 gateway's authenticator verifies against the same store.
    keys: Arc<KeyStore>,
    /// The abuse verdict loop (its bans live in `lists`, origin `auto`).
    abuse: Arc<AbuseLoop>,
    audit_log: PathBuf,
}

impl Daemon {
    /// Reloads the config file, all or nothing, and counts the outcome.
    fn reload(&self, trigger: &str) -> Result<String, String> {
        let result = self.try_reload().map_err(|error| format!("{error:#}"));
        let outcome = if result.is_ok() { "ok" } else { "rejected" };
        self.metrics
            .config_reloads
            .get_or_create(&ReloadLabels { result: outcome })
            .inc();
        match &result {
            Ok(()) => tracing::info!(trigger, "config reloaded"),
            Err(error) => tracing::error!(
                trigger,
                %error,
                "config reload rejected; the running config keeps serving"
            ),
        }
        result.map(|()| format!("reloaded {}", self.config_path.display()))
    }

    fn try_reload(&self) -> anyhow::Result<()> {
        let new = Config::load(&self.config_path)?;
        let mut current = self.config.lock().unwrap_or_else(|p| p.into_inner());
        let start_only = [
            ("instance", current.instance != new.instance),
            ("state_dir", current.state_dir() != new.state_dir()),
            ("admin_socket", current.admin_socket() != new.admin_socket()),
            (
                "xdp.interfaces",
                current.xdp.interfaces != new.xdp.interfaces,
            ),
            ("xdp.mode", current.xdp.mode != new.xdp.mode),
            (
                "metrics",
                format!("{:?}", current.metrics) != format!("{:?}", new.metrics),
            ),
            (
                "auth",
                format!("{:?}", current.auth) != format!("{:?}", new.auth),
            ),
            (
                "abuse",
                format!("{:?}", current.abuse) != format!("{:?}", new.abuse),
            ),
        ];
        if let Some((key, _)) = start_only.iter().find(|(_, changed)| *changed) {
            anyhow::bail!("`{key}` changed, which applies only at start: restart the daemon");
        }
        // Everything that can fail is built before anything is applied.
        let prepared = match &self.l7 {
            Some(l7) => Some(l7.prepare(&new)?),
            None if !new.listeners.is_empty() => anyhow::bail!(
                "listeners were added, but the L7 gateway starts only with the daemon: restart it"
            ),
            None => None,
        };
        let mut lists = self.lists();
        lists
            .plane_mut()
            .apply_settings(new.xdp.runtime())
            .context("writing the new XDP settings")?;
        lists
            .apply_config(&new.xdp, ClockPair::now())
            .context("applying the config file's allowlist and blocklist")?;
        drop(lists);
        if let Some(prepared) = prepared {
            prepared.swap();
        }
        *current = new;
        Ok(())
    }

    fn explain(
        &self,
        address: std::net::IpAddr,
        clocks: ClockPair,
    ) -> Result<Response, crate::xdp::XdpError> {
        let entries = self.lists().containing(ListKind::Block, address, clocks)?;
        Ok(Response::Explained(BanExplanation {
            address: address.to_string(),
            entries,
            denied_at_l7: self.abuse.denied_at_l7(address),
            verdicts: recent_verdicts(&self.audit_log, address, 10),
        }))
    }

    fn lift(
        &self,
        address: std::net::IpAddr,
        clocks: ClockPair,
    ) -> Result<Response, crate::xdp::XdpError> {
        let mut lists = self.lists();
        let holding: Vec<String> = lists
            .containing(ListKind::Block, address, clocks)?
            .into_iter()
            .filter(|entry| entry.origin != Origin::Config)
            .map(|entry| entry.cidr.to_string())
            .collect();
        let report = lists.remove(ListKind::Block, holding.clone());
        drop(lists);
        let l7_denials = self.abuse.lift_l7(address);
        tracing::info!(%address, removed = report.removed, l7_denials, "bans lifted");
        Ok(Response::Lifted {
            removed: holding,
            l7_denials,
        })
    }

    fn lists(&self) -> MutexGuard<'_, Lists<KernelMaps>> {
        // A panic while holding the lock cannot leave the lists half-updated in a way that
        // matters more than stopping the control plane would, so keep serving.
        self.lists
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn stats(&self) -> Result<StatsView, crate::xdp::XdpError> {
        let counters = self.lists().plane().counters()?;
        Ok(StatsView {
            monotonic_ns: monotonic_now_ns(),
            reasons: Reason::ALL
                .iter()
                .zip(counters)
                .map(|(reason, counter)| ReasonCount {
                    reason: reason.name().to_owned(),
                    dropped: reason.is_drop(),
                    packets: counter.packets,
                    bytes: counter.bytes,
                })
                .collect(),
            rate_limit_events: self.rate_limit_events.load(Ordering::Relaxed),
        })
    }

    fn status(&self) -> Result<StatusView, crate::xdp::XdpError> {
        let lists = self.lists();
        Ok(StatusView {
            instance: self.instance.clone(),
            program_id: self.program_id,
            interfaces: self.interfaces.clone(),
            pin_dir: self.pin_dir.clone(),
            reused_pins: self.reused_pins,
            state_file: self.state_file.clone(),
            uptime_secs: self.started.elapsed().as_secs(),
            allow_entries: lists.len(ListKind::Allow),
            block_entries: lists.len(ListKind::Block),
            maps: {
                let mut maps = lists.plane().list_fill_levels();
                maps.push(lists.plane().rate_fill_level()?);
                maps
            },
        })
    }
}

impl Handler for Daemon {
    fn handle(&self, request: Request) -> Response {
        let clocks = ClockPair::now();
        let failed = |error: crate::xdp::XdpError| Response::Error {
            message: error_chain(&error),
        };
        match request {
            Request::Add {
                list,
                entries,
                import,
            } => {
                let origin = if import {
                    Origin::Import
                } else {
                    Origin::Manual
                };
                let report = self.lists().add(list, entries, origin, clocks);
                if report.added + report.updated > 0 {
                    tracing::info!(
                        list = list.name(),
                        added = report.added,
                        updated = report.updated,
                        rejected = report.rejected.len(),
                        "entries added"
                    );
                }
                Response::Added(report)
            }
            Request::Remove { list, cidrs } => {
                let report = self.lists().remove(list, cidrs);
                if report.removed > 0 {
                    tracing::info!(
                        list = list.name(),
                        removed = report.removed,
                        "entries removed"
                    );
                }
                Response::Removed(report)
            }
            Request::List { list } => match self.lists().list(list, clocks) {
                Ok(entries) => Response::Entries { entries },
                Err(error) => failed(error),
            },
            Request::Stats => self.stats().map_or_else(failed, Response::Stats),
            Request::Status => self.status().map_or_else(failed, Response::Status),
            Request::Reload => match self.reload("admin API") {
                Ok(message) => Response::Reloaded { message },
                Err(message) => Response::Error { message },
            },
            Request::BansExplain { address } => match address.parse() {
                Ok(address) => self.explain(address, clocks).unwrap_or_else(failed),
                Err(_) => Response::Error {
                    message: format!("`{address}` is not an IP address"),
                },
            },
            Request::BansLift { address } => match address.parse() {
                Ok(address) => self.lift(address, clocks).unwrap_or_else(failed),
                Err(_) => Response::Error {
                    message: format!("`{address}` is not an IP address"),
                },
            },
            Request::KeysCreate {
                owner,
                scopes,
                ttl_ms,
            } => match self.keys.create(
                &owner,
                &scopes,
                ttl_ms.map(std::time::Duration::from_millis),
            ) {
                Ok(created) => Response::KeyCreated {
                    key: created.view,
                    secret: created.secret.expose().to_owned(),
                },
                Err(error) => Response::Error {
                    message: error_chain(&error),
                },
            },
            Request::KeysList => Response::Keys {
                keys: self.keys.list(),
            },
            Request::KeysRevoke { key_id } => match self.keys.revoke(&key_id) {
                Ok(key) => Response::KeyRevoked { key },
                Err(error) => Response::Error {
                    message: error_chain(&error),
                },
            },
        }
    }
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(config: Config, options: RunOptions) -> anyhow::Result<()> {
    let started = Instant::now();
    // Before anything is attached: a damaged key file stops the start.
    let keys = Arc::new(KeyStore::open(
        &config.auth.api_keys.file(&config.state_dir()),
        Arc::new(SystemClock),
    )?);
    let pinning = Pinning {
        dir: config.pin_dir(),
        replace_stale: options.replace_stale_pins,
    };
    let loader::LoadedProgram {
        mut program,
        mut maps,
        events: event_ring,
        reused_pins,
    } = loader::load(Some(&pinning))?;
    maps.apply_settings(config.xdp.runtime())
        .context("writing the runtime settings into the config map")?;

    let state_file = config.state_file();
    let (records, bad_lines) = state::read(&state_file)?;
    for (line, error) in &bad_lines {
        tracing::warn!(file = %state_file.display(), line, %error, "skipped a damaged state line");
    }
    let restored = records.len();
    let lists = Lists::restore(maps, records, &config.xdp, ClockPair::now())
        .context("restoring the lists into the kernel maps")?;
    let load_ms = started.elapsed().as_millis();

    let mode = options.mode.unwrap_or(config.xdp.mode);
    for interface in &config.xdp.interfaces {
        program.attach(interface, mode)?;
        if mode == AttachMode::Generic {
            tracing::warn!(
                interface,
                "XDP attached in GENERIC mode: packets are handled after the kernel built a socket buffer, so floods cost far more than in native mode. Fine for loopback demos and tests; production configs use native mode on real NICs"
            );
        } else {
            tracing::info!(interface, "XDP attached in native mode");
        }
    }

    let lists = Arc::new(Mutex::new(lists));
    let audit_log = config
        .abuse
        .audit_log
        .clone()
        .unwrap_or_else(|| config.state_dir().join("audit.jsonl"));
    let abuse = start_abuse_loop(&config, &audit_log, Arc::clone(&lists))?;
    let interfaces: Vec<InterfaceView> = config
        .xdp
        .interfaces
        .iter()
        .map(|name| InterfaceView {
            name: name.clone(),
            mode,
        })
        .collect();
    let metrics = Metrics::new(xdp_reader(
        Arc::clone(&lists),
        interfaces.clone(),
        Arc::clone(&abuse),
    ));

    // The L7 gateway starts once XDP guards its ports, and stops before XDP is detached.
    let auth = Arc::new(
        Authenticator::new(&config.auth, Arc::clone(&keys), Arc::new(SystemClock))
            .await
            .context("setting up authentication")?,
    );
    let l7 = proxy::start(
        &config,
        Services {
            metrics: metrics.clone(),
            abuse: Some(Arc::clone(&abuse)),
            auth: Some(Arc::clone(&auth)),
        },
    )
    .context("starting the L7 gateway")?;
    if let Some(l7) = &l7 {
        let reloader = l7.reloader.clone();
        metrics.read_upstreams_with(Arc::new(move || reloader.endpoint_states()));
    }

    let listener = server::bind(&config.admin_socket())?;
    let daemon = Arc::new(Daemon {
        lists,
        config: Mutex::new(config.clone()),
        config_path: options.config_path.clone(),
        l7: l7.as_ref().map(|l7| l7.reloader.clone()),
        metrics: metrics.clone(),
        instance: config.instance.clone(),
        program_id: program.id(),
        interfaces,
        pin_dir: pinning.dir.display().to_string(),
        state_file: state_file.display().to_string(),
        reused_pins,
        started,
        rate_limit_events: AtomicU64::new(0),
        keys,
        abuse,
        audit_log,
    });
    tracing::info!(
        instance = %config.instance,
        program_id = ?daemon.program_id,
        reused_pins,
        restored_entries = restored,
        load_ms,
        admin_socket = %config.admin_socket().display(),
        "gateway running; try `gateway status`, `gateway stats --watch` or `gateway block add 192.0.2.1 --ttl 10m`"
    );

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(server::serve(
        listener,
        Arc::clone(&daemon) as Arc<dyn Handler>,
    ));
    tasks.spawn(sweep(Arc::clone(&daemon), config.xdp.sweep_interval));
    tasks.spawn(persist(
        Arc::clone(&daemon),
        state_file.clone(),
        config.xdp.persist_interval,
    ));
    if let Some(address) = config.metrics.listen {
        let socket = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("cannot listen on `{address}` for `metrics.listen`"))?;
        tracing::info!(%address, "admin HTTP listener ready: /metrics, /healthz, /readyz");
        tasks.spawn(metrics_http::serve(
            socket,
            AdminHttp {
                metrics,
                // Config loaded, XDP attached and listeners bound hold once this point is
                // reached; what can change is whether every upstream has a healthy endpoint.
                readiness: {
                    let l7 = daemon.l7.clone();
                    Arc::new(move || {
                        let unhealthy = l7.as_ref().map(|l7| l7.unhealthy_upstreams());
                        match unhealthy {
                            Some(names) if !names.is_empty() => Err(format!(
                                "no healthy endpoint in upstream(s) {}",
                                names.join(", ")
                            )),
                            _ => Ok(()),
                        }
                    })
                },
                bearer_token: config.metrics.bearer_token.as_deref().map(Arc::from),
            },
        ));
    }
    if let Some(jwt) = auth.jwt() {
        tasks.spawn(Arc::clone(jwt).refresh_forever());
    }
    tasks.spawn(reload_on_signal(Arc::clone(&daemon)));
    tasks.spawn(reload_on_change(Arc::clone(&daemon)));
    let counter = Arc::clone(&daemon);
    tasks.spawn(async move {
        let forwarded = events::forward(event_ring, move |trip| {
            counter.rate_limit_events.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(source = %trip.source, dropped = trip.dropped, "source tripped the XDP rate limit");
            // One trip event stands for one trip: its drop count is how hard, not how often.
            counter.abuse.observe(&Outcome {
                source: trip.source.addr(),
                behind_proxy: false,
                class: OutcomeClass::XdpRateLimit,
                count: 1,
            });
        })
        .await;
        if let Err(error) = forwarded {
            tracing::error!(%error, "reading rate-limit events failed; events are no longer reported");
        }
    });

    wait_for_shutdown().await?;
    tracing::info!("shutting down");
    if let Some(l7) = l7 {
        l7.shutdown(config.http.shutdown_grace).await;
    }
    tasks.shutdown().await;
    if let Some(bytes) = daemon.lists().take_dirty_state(ClockPair::now()) {
        state::write_atomic(&state_file, &bytes)?;
    }
    let _ = std::fs::remove_file(config.admin_socket());
    drop(program); // detaches from every interface
    tracing::info!(
        "XDP detached; maps stay pinned in {}",
        pinning.dir.display()
    );
    Ok(())
}

/// The last `limit` audit records (current and first rotated file) about prefixes that hold
/// `address`, oldest first. Damaged lines are skipped.
fn recent_verdicts(
    audit_log: &Path,
    address: std::net::IpAddr,
    limit: usize,
) -> Vec<serde_json::Value> {
    let mut rotated = audit_log.as_os_str().to_owned();
    rotated.push(".1");
    let mut found: Vec<serde_json::Value> = [PathBuf::from(rotated), audit_log.to_owned()]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .flat_map(|text| {
            text.lines()
                .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
                .collect::<Vec<_>>()
        })
        .filter(|record| {
            record["source"]
                .as_str()
                .and_then(|s| s.parse::<Cidr>().ok())
                .is_some_and(|cidr| cidr.contains(address))
        })
        .collect();
    let skip = found.len().saturating_sub(limit);
    found.drain(..skip);
    found
}

/// Bans from abuse verdicts go into the same lists as manual ones, with origin `auto`.
struct ListsEnforcer(Arc<Mutex<Lists<KernelMaps>>>);

impl ListsEnforcer {
    fn lists(&self) -> MutexGuard<'_, Lists<KernelMaps>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Enforcer for ListsEnforcer {
    fn protected(&self, key: &Cidr) -> bool {
        // If the allowlist cannot be read, err on the side of not banning.
        self.lists()
            .allowlisted(key, monotonic_now_ns())
            .unwrap_or(true)
    }

    fn ban(&self, key: Cidr, ttl: std::time::Duration, reason: String) -> Result<(), String> {
        let report = self.lists().add(
            ListKind::Block,
            vec![EntrySpec {
                cidr: key.to_string(),
                ttl_ms: Some(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
                reason: Some(reason),
            }],
            Origin::Auto,
            ClockPair::now(),
        );
        match report.rejected.first() {
            Some(rejected) => Err(rejected.error.clone()),
            None => Ok(()),
        }
    }
}

/// The abuse loop, with everything that must never be banned: `abuse.never_ban`, trusted
/// proxies and upstream endpoints (the allowlist is asked at verdict time).
fn start_abuse_loop(
    config: &Config,
    audit_log: &Path,
    lists: Arc<Mutex<Lists<KernelMaps>>>,
) -> anyhow::Result<Arc<AbuseLoop>> {
    let abuse = &config.abuse;
    let mut protected = abuse.never_ban.clone();
    for listener in &config.listeners {
        protected.extend(listener.trusted_proxies.iter().copied());
    }
    for upstream in &config.upstreams {
        for address in upstream.endpoint_addrs() {
            protected.push(Cidr::host(address.ip()));
        }
    }
    let offences = Offences::open(
        &config.state_dir().join("offences.tsv"),
        Escalation {
            factor: abuse.escalation_factor,
            max_ban: abuse.max_ban,
            memory: abuse.offence_memory,
        },
    )?;
    let audit = AuditLog::open(audit_log, abuse.audit_max_bytes, abuse.audit_keep)
        .with_context(|| format!("opening the audit log `{}`", audit_log.display()))?;
    Ok(AbuseLoop::start(
        abuse,
        Executor::new(protected, offences, audit),
        Arc::new(ListsEnforcer(lists)),
    ))
}

/// The kernel side of the metrics: counters, attach modes and list fill levels.
fn xdp_reader(
    lists: Arc<Mutex<Lists<KernelMaps>>>,
    interfaces: Vec<InterfaceView>,
    abuse: Arc<AbuseLoop>,
) -> XdpReader {
    Arc::new(move || {
        let lists = lists.lock().unwrap_or_else(|p| p.into_inner());
        let counters = match lists.plane().counters() {
            Ok(counters) => counters,
            Err(error) => {
                tracing::warn!(error = %error_chain(&error), "reading XDP counters for metrics failed");
                return None;
            }
        };
        Some(XdpSnapshot {
            counters: Reason::ALL
                .iter()
                .zip(counters)
                .map(|(reason, c)| (*reason, c.packets, c.bytes))
                .collect(),
            interfaces: interfaces
                .iter()
                .map(|i| (i.name.clone(), i.mode))
                .collect(),
            maps: lists.plane().list_fill_levels(),
            abuse: {
                let counts = abuse.counts();
                let (evicted, dropped_verdicts) = abuse.losses();
                AbuseCounts {
                    banned: counts.banned.load(Ordering::Relaxed),
                    denied_at_l7: counts.denied_at_l7.load(Ordering::Relaxed),
                    would_ban: counts.would_ban.load(Ordering::Relaxed),
                    protected: counts.protected.load(Ordering::Relaxed),
                    tracked: abuse.tracked(),
                    evicted,
                    dropped_verdicts,
                }
            },
        })
    })
}

/// Reloads on SIGHUP, the signal operators and service managers use for it.
async fn reload_on_signal(daemon: Arc<Daemon>) {
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(hangup) => hangup,
        Err(error) => {
            tracing::error!(%error, "cannot install the SIGHUP handler; reload with `gateway reload`");
            return;
        }
    };
    while hangup.recv().await.is_some() {
        let daemon = Arc::clone(&daemon);
        let _ = tokio::task::spawn_blocking(move || daemon.reload("SIGHUP")).await;
    }
}

/// Reloads when the config file changes on disk (checked every two seconds).
async fn reload_on_change(daemon: Arc<Daemon>) {
    let stamp = |path: &Path| {
        std::fs::metadata(path)
            .ok()
            .map(|m| (m.modified().ok(), m.len()))
    };
    let mut last = stamp(&daemon.config_path);
    let mut ticker = tokio::time::interval(std::time::Duration::from_secs(2));
    loop {
        ticker.tick().await;
        let now = stamp(&daemon.config_path);
        if now.is_some() && now != last {
            last = now;
            let daemon = Arc::clone(&daemon);
            let _ = tokio::task::spawn_blocking(move || daemon.reload("config file changed")).await;
        }
    }
}

async fn wait_for_shutdown() -> anyhow::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    Ok(())
}

/// Removes expired entries from the maps now and then (the kernel already ignores them).
async fn sweep(daemon: Arc<Daemon>, every: std::time::Duration) {
    let mut ticker = tokio::time::interval(every);
    loop {
        ticker.tick().await;
        let daemon = Arc::clone(&daemon);
        let swept =
            tokio::task::spawn_blocking(move || daemon.lists().sweep(monotonic_now_ns())).await;
        match swept {
            Ok(Ok(0)) => {}
            Ok(Ok(count)) => tracing::info!(count, "expired entries swept"),
            Ok(Err(error)) => {
                tracing::error!(error = %error_chain(&error), "sweeping expired entries failed")
            }
            Err(error) => tracing::error!(%error, "the sweeper panicked"),
        }
    }
}

/// Writes the state file when the lists changed, at most once per `every`.
async fn persist(daemon: Arc<Daemon>, path: std::path::PathBuf, every: std::time::Duration) {
    let mut ticker = tokio::time::interval(every);
    loop {
        ticker.tick().await;
        let daemon = Arc::clone(&daemon);
        let path = path.clone();
        let written = tokio::task::spawn_blocking(move || {
            let Some(bytes) = daemon.lists().take_dirty_state(ClockPair::now()) else {
                return Ok(());
            };
            state::write_atomic(&path, &bytes).inspect_err(|_| daemon.lists().mark_dirty())
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::error!(error = %error_chain(&error), "persisting the lists failed; will retry")
            }
            Err(error) => tracing::error!(%error, "the persister panicked"),
        }
    }
}
