//! Pieces every HTTP proxy path shares (inbound today, outbound later): body wrappers that
//! count bytes and notice the end of a request, hop-by-hop header handling, and the pool of
//! connections to one upstream address.

pub mod body;
pub mod connect;
pub mod error;
pub mod headers;
pub mod pool;
