//! Moving protocol frames over a QUIC stream.

use std::time::Duration;

use crate::protocol::frame::{self, Decoder};
use crate::protocol::message::Message;

/// How long a write may wait for the peer to read before the connection is
/// given up (a peer that stops reading).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(20);

/// Reads the next message; Ok(None) at a clean end of stream.
pub async fn read_message(
    recv: &mut quinn::RecvStream,
    dec: &mut Decoder,
) -> Result<Option<(Message, usize)>, String> {
    let mut buf = vec![0u8; 256 << 10];
    loop {
        if let Some(m) = dec.next_message().map_err(|e| e.to_string())? {
            return Ok(Some(m));
        }
        match recv.read(&mut buf).await {
            Ok(Some(n)) => dec.push(&buf[..n]),
            Ok(None) => {
                dec.finish().map_err(|e| e.to_string())?;
                return Ok(None);
            }
            Err(quinn::ReadError::ConnectionLost(quinn::ConnectionError::ApplicationClosed(c))) => {
                return Err(format!(
                    "the peer closed the connection: {}",
                    String::from_utf8_lossy(&c.reason)
                ));
            }
            Err(e) => return Err(format!("stream read failed: {e}")),
        }
    }
}

/// Writes already-encoded bytes, giving up when the peer does not read.
pub async fn write_bytes(send: &mut quinn::SendStream, bytes: &[u8]) -> Result<(), String> {
    match tokio::time::timeout(WRITE_TIMEOUT, send.write_all(bytes)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(quinn::WriteError::ConnectionLost(quinn::ConnectionError::ApplicationClosed(
            c,
        )))) => {
            // The peer said why it closed (close_with): that is the error.
            Err(format!(
                "the peer closed the connection: {}",
                String::from_utf8_lossy(&c.reason)
            ))
        }
        Ok(Err(e)) => Err(format!("stream write failed: {e}")),
        Err(_) => Err(format!(
            "peer stopped reading (a write waited {} s)",
            WRITE_TIMEOUT.as_secs()
        )),
    }
}

pub async fn write_message(send: &mut quinn::SendStream, m: &Message) -> Result<usize, String> {
    let e = frame::encode(m, 0);
    write_bytes(send, &e.bytes).await?;
    Ok(e.bytes.len())
}

/// Says why we close, best effort, then closes the connection.
pub async fn close_with(
    conn: &quinn::Connection,
    send: Option<&mut quinn::SendStream>,
    reason: &str,
) {
    if let Some(s) = send {
        let bye = frame::encode(
            &Message::Goodbye {
                reason: reason.to_string(),
            },
            0,
        );
        let _ = tokio::time::timeout(Duration::from_millis(500), s.write_all(&bye.bytes)).await;
        let _ = s.finish();
    }
    let mut r = reason.as_bytes().to_vec();
    r.truncate(200);
    conn.close(quinn::VarInt::from_u32(1), &r);
}
