//! The little HTTP/1.1 the benchmark's own clients need: reading one response off a
//! keep-alive connection, whatever carries it (TCP or TLS).
use anyhow::{Result, bail};
use tokio::io::{AsyncRead, AsyncReadExt as _};

/// Reads one response (head and `Content-Length` body) into `buffer`; returns its head. A
/// response must fit in the buffer: these clients only ask for small ones.
pub(crate) async fn read_response(
    stream: &mut (impl AsyncRead + Unpin),
    buffer: &mut [u8],
) -> Result<String> {
    let mut filled = 0;
    loop {
        if filled == buffer.len() {
            bail!("a response over {} bytes", buffer.len());
        }
        let read = stream.read(&mut buffer[filled..]).await?;
        if read == 0 {
            bail!("the server closed the connection before a whole response");
        }
        filled += read;
        let Some(end) = buffer[..filled].windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
        let length: usize = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                if name.eq_ignore_ascii_case("content-length") {
                    value.trim().parse().ok()
                } else {
                    None
                }
            })
            .unwrap_or(0);
        if filled >= end + 4 + length {
            return Ok(head);
        }
    }
}
