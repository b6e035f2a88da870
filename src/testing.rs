//! Pieces the in-process tests share.

use std::path::PathBuf;
use std::time::SystemTime;

/// A directory of its own under the system temp dir, removed at the end.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// `sidecar-{test}-{pid}-{nanos}`: unique across tests running at once and runs.
    pub fn new(test: &str) -> TempDir {
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos();
        let dir = std::env::temp_dir().join(format!("sidecar-{test}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
