//! `gateway run`: loads and attaches the data plane, restores the lists, serves the admin API,
//! sweeps and persists in the background, and detaches cleanly on SIGINT or SIGTERM.
use std::{
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
    admin::{
        protocol::{InterfaceView, ReasonCount, Request, Response, StatsView, StatusView},
        server::{self, Handler},
    },
    config::{AttachMode, Config},
    lists::{Lists, Origin, error_chain, state},
    proxy,
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
    /// Attach mode for every interface, overriding `xdp.mode`.
    pub mode: Option<AttachMode>,
    /// Replace pinned maps of another layout instead of refusing to start.
    pub replace_stale_pins: bool,
}

/// What the admin API reads and changes.
struct Daemon {
    lists: Mutex<Lists<KernelMaps>>,
    instance: String,
    program_id: Option<u32>,
    interfaces: Vec<InterfaceView>,
    pin_dir: String,
    state_file: String,
    reused_pins: bool,
    started: Instant,
    rate_limit_events: AtomicU64,
}

impl Daemon {
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
        }
    }
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(config: Config, options: RunOptions) -> anyhow::Result<()> {
    let started = Instant::now();
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

    // The L7 gateway starts once XDP guards its ports, and stops before XDP is detached.
    let l7 = proxy::start(&config).context("starting the L7 gateway")?;

    let listener = server::bind(&config.admin_socket())?;
    let daemon = Arc::new(Daemon {
        lists: Mutex::new(lists),
        instance: config.instance.clone(),
        program_id: program.id(),
        interfaces: config
            .xdp
            .interfaces
            .iter()
            .map(|name| InterfaceView {
                name: name.clone(),
                mode,
            })
            .collect(),
        pin_dir: pinning.dir.display().to_string(),
        state_file: state_file.display().to_string(),
        reused_pins,
        started,
        rate_limit_events: AtomicU64::new(0),
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
    let counter = Arc::clone(&daemon);
    tasks.spawn(async move {
        let forwarded = events::forward(event_ring, move |trip| {
            counter.rate_limit_events.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(source = %trip.source, dropped = trip.dropped, "source tripped the XDP rate limit");
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
