//! Checkpoints: how far each file has been delivered to every sink, kept in
//! `checkpoint_dir/logship.json` so a restart (even after `kill -9`) resumes there.
//!
//! Written whole to a temporary file, fsynced, renamed over the old one and the directory
//! fsynced: a crash leaves the old checkpoint or the new one, never half of either. Written on
//! its own thread, newest state only, so a slow disk delays checkpoints, never shipping.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use serde::{Deserialize, Serialize};

const FILE_NAME: &str = "logship.json";
const VERSION: u32 = 1;

/// One file's place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    pub source: String,
    pub path: String,
    pub dev: u64,
    pub ino: u64,
    /// Checksum of the file's first `fp_len` bytes (its first line, up to 256 bytes).
    pub fp: u64,
    pub fp_len: u32,
    /// Every byte before this is delivered.
    pub offset: u64,
    /// The file's size when last looked at: what is lost if it is gone at the next start.
    pub size: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct OnDisk {
    version: u32,
    files: Vec<Mark>,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot create the checkpoint directory {dir}: {source}")]
    Dir { dir: PathBuf, source: std::io::Error },
    #[error("cannot read the checkpoint {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
}

/// The marks saved by the last run; `None` if there was no checkpoint (a first start). A
/// checkpoint that cannot be parsed is set aside (renamed `.bad`) and reported: starting over
/// sends duplicates, refusing to start would send nothing.
pub fn load(dir: &Path) -> Result<Option<Vec<Mark>>, CheckpointError> {
    std::fs::create_dir_all(dir).map_err(|source| CheckpointError::Dir { dir: dir.to_owned(), source })?;
    let path = dir.join(FILE_NAME);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(CheckpointError::Read { path, source }),
    };
    match serde_json::from_slice::<OnDisk>(&text) {
        Ok(d) if d.version == VERSION => Ok(Some(d.files)),
        Ok(d) => {
            tracing::error!(path = %path.display(), version = d.version, "checkpoint of an unknown version set aside; files are read from their start");
            let _ = std::fs::rename(&path, path.with_extension("json.bad"));
            Ok(Some(Vec::new()))
        }
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "checkpoint unreadable, set aside; files are read from their start");
            let _ = std::fs::rename(&path, path.with_extension("json.bad"));
            Ok(Some(Vec::new()))
        }
    }
}

/// Writes checkpoints on its own thread.
pub struct Writer {
    tx: Option<mpsc::SyncSender<Vec<Mark>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    pub fn start(dir: PathBuf) -> std::io::Result<Writer> {
        // One slot: a newer state waiting replaces nothing, the sender skips when it is full
        // and sends again on the next change.
        let (tx, rx) = mpsc::sync_channel::<Vec<Mark>>(1);
        let thread = std::thread::Builder::new().name("sidecar-checkpoint".into()).spawn(move || {
            while let Ok(mut marks) = rx.recv() {
                // Take the newest if more came while this one waited.
                while let Ok(newer) = rx.try_recv() {
                    marks = newer;
                }
                if let Err(e) = write(&dir, marks) {
                    tracing::warn!(dir = %dir.display(), error = %e, "writing the checkpoint failed; trying again on the next change");
                }
            }
        })?;
        Ok(Writer { tx: Some(tx), thread: Some(thread) })
    }

    /// Queues `marks`; false if a write is already waiting (the caller sends again later).
    pub fn offer(&self, marks: Vec<Mark>) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.try_send(marks).is_ok())
    }

    /// Writes `marks` after anything queued, and waits.
    pub fn finish(mut self, marks: Vec<Mark>) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(marks);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn write(dir: &Path, files: Vec<Mark>) -> std::io::Result<()> {
    let path = dir.join(FILE_NAME);
    let tmp = dir.join(format!("{FILE_NAME}.tmp"));
    let body = serde_json::to_vec(&OnDisk { version: VERSION, files })?;
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&body)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    // The rename itself is durable only once the directory is.
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(offset: u64) -> Mark {
        Mark {
            source: "app".into(),
            path: "/l/a.log".into(),
            dev: 1,
            ino: 2,
            fp: 3,
            fp_len: 10,
            offset,
            size: 99,
        }
    }

    #[test]
    fn written_then_loaded_and_a_bad_file_is_set_aside() {
        let dir = std::env::temp_dir().join(format!("sidecar-ckpt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(load(&dir).unwrap(), None);
        let w = Writer::start(dir.clone()).unwrap();
        w.offer(vec![mark(5)]);
        w.finish(vec![mark(7)]);
        assert_eq!(load(&dir).unwrap(), Some(vec![mark(7)]));
        std::fs::write(dir.join(FILE_NAME), b"{ half").unwrap();
        assert_eq!(load(&dir).unwrap(), Some(vec![]));
        assert!(dir.join("logship.json.bad").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
