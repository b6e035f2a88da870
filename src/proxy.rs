//! Pieces every HTTP proxy path shares (inbound today, outbound later): body wrappers that
//! count bytes and notice the end of a request, hop-by-hop header handling, and the pool of
//! connections to one upstream address.

pub mod body;
pub mod connect;
pub mod error;
pub mod h1;
pub mod headers;
pub mod pool;

/// HTTP/2 flow control on every hop, both directions: how much body one stream (64 KiB, the
/// RFC 9113 default) and one connection (256 KiB) may have in flight towards us, and how much
/// body we queue per stream before we stop reading from the other side. hyper's defaults
/// (1-5 MiB) let one slow peer make us hold megabytes (issue 9, bug 9).
pub const H2_STREAM_WINDOW: u32 = 64 * 1024;
pub const H2_CONNECTION_WINDOW: u32 = 256 * 1024;
pub const H2_MAX_SEND_BUF: usize = 64 * 1024;
