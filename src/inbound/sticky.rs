//! The app connection one client connection keeps between its requests.
//!
//! A keep-alive client sends its next request on the app connection its last one used, so
//! the common case touches no shared state (no queue, no atomics beyond the slot). When the
//! client connection closes, the app connection goes to the endpoint's idle queue.

use crossbeam_queue::ArrayQueue;

use crate::proxy::pool::H1Conn;

pub struct Sticky {
    slot: ArrayQueue<H1Conn>,
}

impl Sticky {
    pub fn new() -> Self {
        Sticky { slot: ArrayQueue::new(1) }
    }

    /// The connection kept from the last request, if any.
    pub fn take(&self) -> Option<H1Conn> {
        self.slot.pop()
    }

    /// Keeps a connection that may carry the next request.
    pub fn keep(&self, conn: H1Conn) {
        // Occupied when an HTTP/2 client had several requests in flight: the extra
        // connection goes to the shared queue.
        if let Err(conn) = self.slot.push(conn) {
            conn.return_to_pool();
        }
    }
}

impl Drop for Sticky {
    fn drop(&mut self) {
        if let Some(conn) = self.slot.pop() {
            conn.return_to_pool();
        }
    }
}
