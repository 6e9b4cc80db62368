//! The daemon's side of the admin socket. Connections are accepted only from root (or the
//! daemon's own user); each request line is answered by the [`Handler`] on a blocking thread,
//! because list operations touch kernel maps with one syscall per entry.
use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};

use super::protocol::{MAX_LINE_BYTES, Request, Response};

/// Answers admin requests.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, request: Request) -> Response;
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("another gateway daemon already serves `{0}`; stop it or choose another instance name")]
    InUse(PathBuf),
    #[error("cannot create the admin socket `{path}`")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the socket: a stale socket file from a crashed daemon is replaced, a live one refused.
pub fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    let bind_error = |source| ServerError::Bind {
        path: path.to_owned(),
        source,
    };
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServerError::InUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(bind_error)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(bind_error)?;
    }
    let listener = UnixListener::bind(path).map_err(bind_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_error)?;
    Ok(listener)
}

/// Serves connections until the task is dropped.
pub async fn serve(listener: UnixListener, handler: Arc<dyn Handler>) {
    // SAFETY: geteuid has no preconditions.
    let own_uid = unsafe { libc::geteuid() };
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "admin socket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let peer_uid = stream.peer_cred().map(|cred| cred.uid()).ok();
        if !matches!(peer_uid, Some(uid) if uid == 0 || uid == own_uid) {
            tracing::warn!(
                ?peer_uid,
                "refused an admin connection from a non-root user"
            );
            continue;
        }
        tokio::spawn(serve_connection(stream, Arc::clone(&handler)));
    }
}

async fn serve_connection(stream: UnixStream, handler: Arc<dyn Handler>) {
    let (read_half, mut write_half) = stream.into_split();
    let mut reader = BufReader::new(read_half);
    let mut line = Vec::new();
    loop {
        line.clear();
        let mut limited = (&mut reader).take(MAX_LINE_BYTES as u64 + 1);
        match limited.read_until(b'\n', &mut line).await {
            Ok(0) => return,
            Ok(_) => {}
            Err(error) => {
                tracing::debug!(%error, "admin connection read failed");
                return;
            }
        }
        let response = if line.len() > MAX_LINE_BYTES {
            Response::Error {
                message: format!(
                    "request larger than {MAX_LINE_BYTES} bytes; send smaller batches"
                ),
            }
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Ok(request) => {
                    let handler = Arc::clone(&handler);
                    tokio::task::spawn_blocking(move || handler.handle(request))
                        .await
                        .unwrap_or_else(|_| Response::Error {
                            message: "the request failed inside the daemon; see its log".to_owned(),
                        })
                }
                Err(error) => Response::Error {
                    message: format!("malformed request: {error}"),
                },
            }
        };
        let mut reply = serde_json::to_vec(&response).unwrap_or_else(|_| {
            br#"{"result":"error","message":"response could not be encoded"}"#.to_vec()
        });
        reply.push(b'\n');
        if write_half.write_all(&reply).await.is_err() {
            return;
        }
        if line.len() > MAX_LINE_BYTES {
            // The rest of the oversized line is still unread; the stream cannot be resynced.
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::{
        client::{AdminClient, ClientError},
        protocol::StatsView,
    };

    struct Echo;

    impl Handler for Echo {
        fn handle(&self, request: Request) -> Response {
            match request {
                Request::Stats => Response::Stats(StatsView {
                    monotonic_ns: 7,
                    reasons: vec![],
                    rate_limit_events: 0,
                }),
                other => Response::Error {
                    message: format!("unsupported: {other:?}"),
                },
            }
        }
    }

    #[tokio::test]
    async fn socket_is_private_and_answers_requests() {
        let dir = std::env::temp_dir().join(format!("gateway-admin-test-{}", std::process::id()));
        let path = dir.join("admin.sock");
        let listener = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let server = tokio::spawn(serve(listener, Arc::new(Echo)));

        assert!(
            matches!(bind(&path), Err(ServerError::InUse(_))),
            "a live socket is not replaced"
        );

        let client_path = path.clone();
        tokio::task::spawn_blocking(move || {
            let mut client = AdminClient::connect(&client_path).unwrap();
            let Response::Stats(stats) = client.call(&Request::Stats).unwrap() else {
                panic!("expected stats");
            };
            assert_eq!(stats.monotonic_ns, 7);
            let err = client.call(&Request::Status).unwrap_err();
            assert!(matches!(err, ClientError::Daemon(m) if m.contains("unsupported")));
        })
        .await
        .unwrap();

        // Garbage gets an error line, and the connection stays usable.
        let stream = tokio::net::UnixStream::connect(&path).await.unwrap();
        let (read_half, mut write_half) = stream.into_split();
        write_half
            .write_all(b"{not json\n{\"op\":\"stats\"}\n")
            .await
            .unwrap();
        let mut lines = BufReader::new(read_half).lines();
        let first = lines.next_line().await.unwrap().unwrap();
        assert!(first.contains("malformed request"), "{first}");
        let second = lines.next_line().await.unwrap().unwrap();
        assert!(second.contains("\"monotonic_ns\":7"), "{second}");

        server.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_daemon_gets_a_clear_error() {
        let err = AdminClient::connect(Path::new("/nonexistent/gateway.sock"))
            .err()
            .unwrap();
        assert!(err.to_string().contains("not running"), "{err}");
    }

    #[tokio::test]
    async fn a_stale_socket_file_is_replaced() {
        let dir = std::env::temp_dir().join(format!("gateway-admin-stale-{}", std::process::id()));
        let path = dir.join("admin.sock");
        drop(bind(&path).unwrap()); // leaves the file, with nobody listening
        assert!(path.exists());
        let listener = bind(&path).unwrap();
        drop(listener);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
