//! The CLI's side of the admin socket: blocking, one request at a time.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
};

use super::protocol::{Request, Response};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "the gateway daemon is not running (nothing listens on `{path}`); start it with `gateway run --config FILE`, or pass --socket/--instance if it uses another socket"
    )]
    NotRunning { path: PathBuf },
    #[error("permission denied on `{path}`: the admin API is root-only; run this as root (sudo)")]
    PermissionDenied { path: PathBuf },
    #[error("talking to the daemon on `{path}` failed")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the daemon sent a response this CLI does not understand (are the CLI and daemon the same version?)"
    )]
    Protocol(#[source] serde_json::Error),
    #[error("{0}")]
    Daemon(String),
}

pub struct AdminClient {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl AdminClient {
    pub fn connect(path: &Path) -> Result<AdminClient, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ClientError::NotRunning {
                    path: path.to_owned(),
                }
            }
            std::io::ErrorKind::PermissionDenied => ClientError::PermissionDenied {
                path: path.to_owned(),
            },
            _ => ClientError::Io {
                path: path.to_owned(),
                source,
            },
        })?;
        let writer = stream.try_clone().map_err(|source| ClientError::Io {
            path: path.to_owned(),
            source,
        })?;
        Ok(AdminClient {
            path: path.to_owned(),
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Sends a request and waits for its response; a daemon-side error becomes `Err`.
    pub fn call(&mut self, request: &Request) -> Result<Response, ClientError> {
        let io = |source| ClientError::Io {
            path: self.path.clone(),
            source,
        };
        let mut line = serde_json::to_vec(request).map_err(ClientError::Protocol)?;
        line.push(b'\n');
        self.writer.write_all(&line).map_err(io)?;
        let mut reply = String::new();
        let read = self
            .reader
            .read_line(&mut reply)
            .map_err(|source| ClientError::Io {
                path: self.path.clone(),
                source,
            })?;
        if read == 0 {
            return Err(ClientError::Io {
                path: self.path.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the daemon closed the connection",
                ),
            });
        }
        match serde_json::from_str(&reply).map_err(ClientError::Protocol)? {
            Response::Error { message } => Err(ClientError::Daemon(message)),
            response => Ok(response),
        }
    }
}
