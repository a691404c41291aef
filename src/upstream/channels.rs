//! The two HTTP/2 connections to the upstream: one for clients' work, one
//! with small flow-control windows for prefetch (`Priority::Prefetch`), so
//! a paused prefetch stream holds little of the link. Both share the
//! endpoint settings: TLS, keep-alive, frame size, connect timeout.

use std::time::Duration;

use anyhow::Context;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::config::UpstreamConfig;
use crate::context::Priority;
use crate::upstream::traffic::PREFETCH_LANES;

/// HTTP/2 windows of the client channel, per stream and per connection:
/// large, so one stream fills a long fat link.
const CLIENT_WINDOWS: (u32, u32) = (16 << 20, 32 << 20);
/// HTTP/2 windows of the prefetch channel, per stream and per connection.
/// When prefetch pauses (stops reading), at most the connection window of
/// it is still on its way over the link, ahead of the client's bytes; while
/// it runs, one stream moves at most a stream window per round trip.
/// Measured with the WAN relay at 40 ms / 50 Mbit/s (`docs/architecture.md`,
/// "Priority"): 512 KiB is the smallest stream window that still fills the
/// link (its bandwidth-delay product is 250 KB; 256 KiB prefetched at two
/// thirds of the link rate), and a client's 4 MiB read during a prefetch
/// took 1.04-1.08x its time on a quiet link (1.9x with the client windows).
///
/// The connection window must leave room beyond what paused streams hold:
/// a paused stream's unread bytes keep their share of the connection
/// window, and with the connection window no larger than one stream's, a
/// single paused lane starved every other stream on the connection, among
/// them a promoted one the client waits for, which kept the link "busy" so
/// the paused lane never resumed (a deadlock the `wan_exec` bench hit).
/// So: a stream window for each lane that may pause, plus one for promoted
/// transfers, which never pause.
const PREFETCH_WINDOWS: (u32, u32) = (
    PREFETCH_STREAM_WINDOW,
    PREFETCH_STREAM_WINDOW * (PREFETCH_LANES as u32 + 1),
);
/// See [`PREFETCH_WINDOWS`].
const PREFETCH_STREAM_WINDOW: u32 = 512 << 10;

/// The client and prefetch channels to one upstream endpoint.
pub struct Channels {
    /// Clients' work: large windows, so one stream fills a long fat link.
    client: Channel,
    /// Prefetch: [`PREFETCH_WINDOWS`].
    prefetch: Channel,
}

impl Channels {
    /// Sets up both channels for `config`'s endpoint; neither connects
    /// before its first call.
    pub fn new(config: &UpstreamConfig) -> anyhow::Result<Self> {
        let mut endpoint = Endpoint::from_shared(config.uri.clone())
            .with_context(|| format!("invalid upstream endpoint {}", config.uri))?
            .connect_timeout(config.connect_timeout)
            .tcp_nodelay(true)
            // Without it the upstream sends 16 KiB DATA frames: reads at half speed.
            .max_frame_size(1 << 20)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true);
        if config.tls {
            let mut tls = ClientTlsConfig::new();
            tls = match &config.ca_file {
                Some(path) => tls.ca_certificate(Certificate::from_pem(
                    std::fs::read(path)
                        .with_context(|| format!("cannot read ca_file {}", path.display()))?,
                )),
                None => tls.with_native_roots(),
            };
            if let Some((cert, key)) = &config.client_identity {
                let cert = std::fs::read(cert)
                    .with_context(|| format!("cannot read client_cert {}", cert.display()))?;
                let key = std::fs::read(key)
                    .with_context(|| format!("cannot read client_key {}", key.display()))?;
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            endpoint = endpoint
                .tls_config(tls)
                .context("invalid upstream TLS settings")?;
        }
        let with_windows = |(stream, connection): (u32, u32)| {
            endpoint
                .clone()
                .initial_stream_window_size(stream)
                .initial_connection_window_size(connection)
                .connect_lazy()
        };
        Ok(Channels {
            client: with_windows(CLIENT_WINDOWS),
            prefetch: with_windows(PREFETCH_WINDOWS),
        })
    }

    /// The channel for work at `priority`.
    pub fn for_priority(&self, priority: Priority) -> Channel {
        match priority {
            Priority::Client => self.client.clone(),
            Priority::Prefetch => self.prefetch.clone(),
        }
    }
}
