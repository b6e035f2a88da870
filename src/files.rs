//! One file watcher for the process: groups of paths polled by content digest on a thread of
//! its own (`sidecar-files`), off the data plane.
//!
//! The config reloader, TLS rotation and log shipping register here instead of each polling on
//! a tokio worker. It tells callers *that* files changed, never what they hold: it keeps only
//! SHA-256 digests, so TLS private keys live in rustls and nowhere else. Callers read the files
//! themselves when told.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use ring::digest;
use tokio::sync::watch;
use zeroize::{Zeroize, Zeroizing};

/// Bytes per `read` call. Config, certificates and keys are a few KiB, so one or two reads
/// each; a fixed buffer (not `std::fs::read`) also means no growing `Vec` leaves copies of a
/// key behind in freed memory when it reallocates.
const READ_CHUNK: usize = 16 * 1024;

/// The shortest poll interval honoured: a zero interval would make the thread spin.
const MIN_POLL: Duration = Duration::from_millis(10);

/// How deep a tree group follows subdirectories. A ConfigMap's `items[].path` makes a few
/// levels at most; the bound also ends a symlink loop.
const MAX_TREE_DEPTH: usize = 8;

/// Files one tree group reads at most each poll. A ConfigMap or Secret holds at most 1 MiB, so
/// its files are few; the bound keeps a watch put on a large directory by mistake from
/// turning this thread into a disk scanner.
const MAX_TREE_FILES: usize = 1024;

/// The watcher thread could not be started.
#[derive(Debug, thiserror::Error)]
#[error("start the sidecar-files thread: {0}")]
pub struct FilesError(#[from] io::Error);

/// What one poll saw at one path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileState {
    /// SHA-256 of the file's content.
    Content([u8; 32]),
    /// The path could not be opened or read: `NotFound` when it is absent, or why not
    /// (permission denied, a directory). A state of its own, so a file that disappears and
    /// comes back is two changes.
    Unreadable(io::ErrorKind),
}

/// A group's files as one poll saw them, in the order they were given to [`FileWatcher::watch`]
/// (a tree group's directories expanded in place, by name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub files: Vec<(PathBuf, FileState)>,
}

/// A handle to the watcher thread; cheap to clone. The thread ends when every handle and
/// every [`Watch`] is dropped, or at [`FileWatcher::stop`].
#[derive(Clone)]
pub struct FileWatcher {
    tx: mpsc::Sender<Command>,
    next_id: Arc<AtomicU64>,
}

/// One watched group. Dropping it stops the watch.
pub struct Watch {
    id: u64,
    rx: watch::Receiver<Option<Snapshot>>,
    tx: mpsc::Sender<Command>,
}

/// What handles ask of the thread. A channel and not a shared list, so registering never
/// waits for the thread, which may be stuck in a read for as long as the volume is.
enum Command {
    Add(Group),
    Remove(u64),
    Stop,
}

/// The thread's own record of one group.
struct Group {
    id: u64,
    paths: Vec<PathBuf>,
    /// Directories among `paths` stand for the files under them ([`FileWatcher::watch_tree`]).
    tree: bool,
    settle: Duration,
    tx: watch::Sender<Option<Snapshot>>,
    /// The states last reported (or the baseline of the first poll); `None` before it.
    reported: Option<Vec<(PathBuf, FileState)>>,
    /// States that differ from `reported`, and when they were first seen.
    pending: Option<(Vec<(PathBuf, FileState)>, Instant)>,
    /// When this group is read next.
    due: Instant,
}

impl FileWatcher {
    /// Starts the thread. `poll` is how often each group is read (at least 10 ms).
    pub fn start(poll: Duration) -> Result<FileWatcher, FilesError> {
        let poll = poll.max(MIN_POLL);
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new().name("sidecar-files".into()).spawn(move || run(&rx, poll))?;
        Ok(FileWatcher { tx, next_id: Arc::default() })
    }

    /// Watches `paths` as one group. The first poll (at once, then every `poll`) takes the
    /// baseline; after that [`Watch::changed`] resolves when any file's content changed and
    /// then stayed the same for `settle`, so a writer replacing a cert and then its key is
    /// seen as one change and the cert is never paired with the previous key. Each poll
    /// re-opens every path, which follows symlink swaps (a Kubernetes volume's `..data`).
    ///
    /// Never waits for the thread. After [`FileWatcher::stop`] the watch just never fires.
    pub fn watch(&self, paths: Vec<PathBuf>, settle: Duration) -> Watch {
        self.add(paths, false, settle)
    }

    /// As [`FileWatcher::watch`], but a path that is a directory (or a symlink to one) stands
    /// for the files under it, subdirectories included, found again at every poll: a file
    /// added or removed is a change too. Entries whose names start with `..` are left out:
    /// in a ConfigMap or Secret volume they are the kubelet's own (`..data`, the timestamped
    /// `..2026_12_03_…` directories, `..data_tmp`), and the user-visible names link through
    /// `..data`, so one update is seen once, as the files the app reads.
    pub fn watch_tree(&self, paths: Vec<PathBuf>, settle: Duration) -> Watch {
        self.add(paths, true, settle)
    }

    fn add(&self, paths: Vec<PathBuf>, tree: bool, settle: Duration) -> Watch {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (state_tx, rx) = watch::channel(None);
        let group = Group {
            id,
            paths,
            tree,
            settle,
            tx: state_tx,
            reported: None,
            pending: None,
            due: Instant::now(),
        };
        // When the thread has ended the group is dropped with the failed send, and its
        // sender with it: `changed` then returns `None`, which is all a caller needs to know.
        let _ = self.tx.send(Command::Add(group));
        Watch { id, rx, tx: self.tx.clone() }
    }

    /// Ends the thread (at the drain) once its read in progress, if any, returns; every
    /// [`Watch::changed`] then returns `None`.
    pub fn stop(&self) {
        let _ = self.tx.send(Command::Stop);
    }
}

impl Watch {
    /// Waits for the group's next settled change; `None` once the watcher has stopped.
    /// Cancel safe (a `select!` branch). Changes not yet awaited collapse into the latest,
    /// which is what a reloader wants: it reads the files as they are now.
    pub async fn changed(&mut self) -> Option<Snapshot> {
        self.rx.changed().await.ok()?;
        self.rx.borrow_and_update().clone()
    }

    /// The group's settled state: the last change, or the baseline; `None` until the first
    /// poll has read the group.
    pub fn current(&self) -> Option<Snapshot> {
        self.rx.borrow().clone()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // Queued, not awaited: the thread may be in a read that never returns.
        let _ = self.tx.send(Command::Remove(self.id));
    }
}

/// The thread: sleep until a group is due (taking commands as they come), read the groups
/// that are due one after another, repeat.
fn run(rx: &mpsc::Receiver<Command>, poll: Duration) {
    let mut groups: Vec<Group> = Vec::new();
    // Zeroed after every file (see `digest_file`); `Zeroizing` covers the thread's end too.
    let mut buf = Zeroizing::new(vec![0u8; READ_CHUNK]);
    loop {
        let next = match groups.iter().map(|g| g.due).min() {
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(due) => rx.recv_timeout(due.saturating_duration_since(Instant::now())),
        };
        match next {
            Ok(cmd) => {
                if !apply(cmd, &mut groups) {
                    return;
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            // Every handle and every watch is gone.
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        let due: Vec<u64> = groups.iter().filter(|g| g.due <= now).map(|g| g.id).collect();
        for id in due {
            // Take what arrived while the last group was read first, so a watch dropped
            // meanwhile (perhaps the one on a hung file) is not read again.
            loop {
                match rx.try_recv() {
                    Ok(cmd) => {
                        if !apply(cmd, &mut groups) {
                            return;
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
            if let Some(group) = groups.iter_mut().find(|g| g.id == id) {
                group.poll(&mut buf, poll);
            }
        }
    }
}

/// Applies one command; false when the thread should end.
fn apply(cmd: Command, groups: &mut Vec<Group>) -> bool {
    match cmd {
        Command::Add(group) => groups.push(group),
        Command::Remove(id) => groups.retain(|g| g.id != id),
        Command::Stop => return false,
    }
    true
}

impl Group {
    /// Reads every file of the group once and reports a change that has settled.
    fn poll(&mut self, buf: &mut [u8], poll: Duration) {
        let states: Vec<(PathBuf, FileState)> = if self.tree {
            let mut out = Vec::new();
            for p in &self.paths {
                digest_tree(p, 0, buf, &mut out);
            }
            out
        } else {
            self.paths.iter().map(|p| (p.clone(), digest_file(p, buf))).collect()
        };
        let now = Instant::now();
        self.due = now + poll;
        let Some(reported) = &self.reported else {
            // The baseline is not a change: store it without waking `changed`.
            let snapshot = Snapshot { files: states.clone() };
            self.tx.send_if_modified(|v| {
                *v = Some(snapshot);
                false
            });
            self.reported = Some(states);
            return;
        };
        if states == *reported {
            // Back to what was reported (or never left): nothing to say.
            self.pending = None;
            return;
        }
        let since = match &self.pending {
            Some((seen, since)) if *seen == states => *since,
            _ => now,
        };
        if now.duration_since(since) >= self.settle {
            self.tx.send_replace(Some(Snapshot { files: states.clone() }));
            self.reported = Some(states);
            self.pending = None;
        } else {
            // Look again when it will have settled, sooner than the next poll if need be.
            self.due = self.due.min(since + self.settle);
            self.pending = Some((states, since));
        }
    }
}

/// `path`'s state, or, when it is a directory, the states of the files under it by name
/// (see [`FileWatcher::watch_tree`]), appended to `out`.
fn digest_tree(path: &Path, depth: usize, buf: &mut [u8], out: &mut Vec<(PathBuf, FileState)>) {
    if out.len() >= MAX_TREE_FILES {
        return;
    }
    // `metadata` follows symlinks: a volume's `config -> ..data/config` is read as what it
    // points to.
    let is_dir = std::fs::metadata(path).is_ok_and(|m| m.is_dir());
    if !is_dir {
        out.push((path.to_owned(), digest_file(path, buf)));
        return;
    }
    if depth >= MAX_TREE_DEPTH {
        return;
    }
    let mut names: Vec<std::ffi::OsString> = match std::fs::read_dir(path) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .filter(|n| !n.as_encoded_bytes().starts_with(b".."))
            .collect(),
        Err(e) => {
            out.push((path.to_owned(), FileState::Unreadable(e.kind())));
            return;
        }
    };
    names.sort();
    for name in names {
        digest_tree(&path.join(name), depth + 1, buf, out);
    }
}

/// Opens `path` afresh and digests it through `buf`, then zeroes what of `buf` was used. The
/// one other copy we cannot reach is ring's digest context, which holds at most one partial
/// 64-byte block (the file's tail) on this thread's stack until later calls overwrite it.
fn digest_file(path: &Path, buf: &mut [u8]) -> FileState {
    let mut used = 0;
    let state = match read_digest(path, buf, &mut used) {
        Ok(d) => FileState::Content(d),
        Err(e) => FileState::Unreadable(e.kind()),
    };
    buf[..used].zeroize();
    state
}

fn read_digest(path: &Path, buf: &mut [u8], used: &mut usize) -> io::Result<[u8; 32]> {
    let mut file = File::open(path)?;
    let mut ctx = digest::Context::new(&digest::SHA256);
    loop {
        match file.read(buf) {
            Ok(0) => break,
            Ok(n) => {
                *used = (*used).max(n);
                ctx.update(&buf[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let mut out = [0u8; 32];
    // A SHA-256 digest is always 32 bytes, so the lengths match and this cannot panic.
    out.copy_from_slice(ctx.finish().as_ref());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLL: Duration = Duration::from_millis(20);
    /// Long enough for a loaded CI machine, short next to a human's patience.
    const WAIT: Duration = Duration::from_secs(3);

    use crate::testing::TempDir;

    /// Replaces a file atomically, as a careful writer does, so no poll sees it half written.
    fn put(path: &Path, bytes: &[u8]) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    fn sha(bytes: &[u8]) -> FileState {
        let mut out = [0u8; 32];
        out.copy_from_slice(digest::digest(&digest::SHA256, bytes).as_ref());
        FileState::Content(out)
    }

    fn states(s: &Snapshot) -> Vec<FileState> {
        s.files.iter().map(|(_, state)| *state).collect()
    }

    async fn baseline(w: &Watch) -> Snapshot {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(s) = w.current() {
                return s;
            }
            assert!(Instant::now() < deadline, "no baseline within {WAIT:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn next(w: &mut Watch) -> Snapshot {
        tokio::time::timeout(WAIT, w.changed())
            .await
            .expect("no change reported in time")
            .expect("the watcher stopped")
    }

    async fn quiet(w: &mut Watch, for_: Duration) {
        if let Ok(change) = tokio::time::timeout(for_, w.changed()).await {
            panic!("unexpected change: {change:?}");
        }
    }

    #[tokio::test]
    async fn a_content_change_is_reported() {
        let dir = TempDir::new("files-change");
        let (cert, key) = (dir.path("cert.pem"), dir.path("key.pem"));
        put(&cert, b"cert 1");
        put(&key, b"key 1");
        let files = FileWatcher::start(POLL).unwrap();
        let mut w = files.watch(vec![cert.clone(), key.clone()], Duration::ZERO);
        let first = baseline(&w).await;
        assert_eq!(first.files, vec![(cert.clone(), sha(b"cert 1")), (key.clone(), sha(b"key 1"))]);

        put(&key, b"key 2");
        let change = next(&mut w).await;
        assert_eq!(states(&change), vec![sha(b"cert 1"), sha(b"key 2")]);
        assert_eq!(w.current(), Some(change));
    }

    #[tokio::test]
    async fn the_same_bytes_written_again_are_no_change() {
        let dir = TempDir::new("files-same");
        let f = dir.path("config.yaml");
        put(&f, b"a: 1\n");
        let files = FileWatcher::start(POLL).unwrap();
        let mut w = files.watch(vec![f.clone()], Duration::ZERO);
        baseline(&w).await;
        // A new inode and a new mtime, the same content.
        put(&f, b"a: 1\n");
        quiet(&mut w, Duration::from_millis(300)).await;
    }

    #[tokio::test]
    async fn a_symlink_swap_is_followed() {
        // A Kubernetes ConfigMap volume: config.yaml -> ..data/config.yaml, ..data -> a
        // timestamped directory, and an update swaps `..data` with a rename.
        let dir = TempDir::new("files-symlink");
        std::fs::create_dir(dir.path("v1")).unwrap();
        std::fs::create_dir(dir.path("v2")).unwrap();
        std::fs::write(dir.path("v1/config.yaml"), b"version: 1\n").unwrap();
        std::fs::write(dir.path("v2/config.yaml"), b"version: 2\n").unwrap();
        std::os::unix::fs::symlink("v1", dir.path("..data")).unwrap();
        std::os::unix::fs::symlink("..data/config.yaml", dir.path("config.yaml")).unwrap();

        let files = FileWatcher::start(POLL).unwrap();
        let mut w = files.watch(vec![dir.path("config.yaml")], Duration::ZERO);
        assert_eq!(states(&baseline(&w).await), vec![sha(b"version: 1\n")]);

        std::os::unix::fs::symlink("v2", dir.path("..data_tmp")).unwrap();
        std::fs::rename(dir.path("..data_tmp"), dir.path("..data")).unwrap();
        assert_eq!(states(&next(&mut w).await), vec![sha(b"version: 2\n")]);
    }

    #[tokio::test]
    async fn a_tree_is_its_visible_files_and_follows_a_volume_update() {
        // A Secret volume with a nested key: `tls.crt` and `sub/` link through `..data`.
        let dir = TempDir::new("files-tree");
        for (ts, crt, extra) in [("..v1", "crt 1", "x 1"), ("..v2", "crt 2", "x 1")] {
            std::fs::create_dir_all(dir.path(ts).join("sub")).unwrap();
            std::fs::write(dir.path(ts).join("tls.crt"), crt).unwrap();
            std::fs::write(dir.path(ts).join("sub/extra"), extra).unwrap();
        }
        std::os::unix::fs::symlink("..v1", dir.path("..data")).unwrap();
        std::os::unix::fs::symlink("..data/tls.crt", dir.path("tls.crt")).unwrap();
        std::os::unix::fs::symlink("..data/sub", dir.path("sub")).unwrap();

        let files = FileWatcher::start(POLL).unwrap();
        let mut w = files.watch_tree(vec![dir.0.clone()], Duration::ZERO);
        let first = baseline(&w).await;
        assert_eq!(
            first.files,
            vec![(dir.path("sub/extra"), sha(b"x 1")), (dir.path("tls.crt"), sha(b"crt 1"))],
            "the kubelet's `..` entries are left out, subdirectories followed, by name"
        );

        std::os::unix::fs::symlink("..v2", dir.path("..data_tmp")).unwrap();
        std::fs::rename(dir.path("..data_tmp"), dir.path("..data")).unwrap();
        let change = next(&mut w).await;
        assert_eq!(states(&change), vec![sha(b"x 1"), sha(b"crt 2")]);

        // A new key is a change; a touch of the hidden directories is not.
        std::fs::write(dir.path("..v2/new"), "n").unwrap();
        quiet(&mut w, Duration::from_millis(200)).await;
        std::os::unix::fs::symlink("..data/new", dir.path("new")).unwrap();
        let change = next(&mut w).await;
        assert_eq!(change.files[0], (dir.path("new"), sha(b"n")));
        std::fs::remove_file(dir.path("new")).unwrap();
        assert_eq!(next(&mut w).await, first_with(&dir, b"crt 2"));

        fn first_with(dir: &TempDir, crt: &[u8]) -> Snapshot {
            Snapshot { files: vec![(dir.path("sub/extra"), sha(b"x 1")), (dir.path("tls.crt"), sha(crt))] }
        }
    }

    #[tokio::test]
    async fn a_tree_group_on_a_missing_path_reports_it_unreadable_then_its_files() {
        let dir = TempDir::new("files-tree-missing");
        let vol = dir.path("vol");
        let files = FileWatcher::start(POLL).unwrap();
        let mut w = files.watch_tree(vec![vol.clone()], Duration::ZERO);
        assert_eq!(
            baseline(&w).await.files,
            vec![(vol.clone(), FileState::Unreadable(io::ErrorKind::NotFound))]
        );
        std::fs::create_dir(&vol).unwrap();
        // An empty directory: no files, which differs from "missing".
        assert_eq!(next(&mut w).await.files, vec![]);
        // Written beside the tree and renamed in, so no poll sees a temporary name.
        std::fs::write(dir.path("a"), b"a").unwrap();
        std::fs::rename(dir.path("a"), vol.join("a")).unwrap();
        assert_eq!(next(&mut w).await.files, vec![(vol.join("a"), sha(b"a"))]);
    }

    #[tokio::test]
    async fn a_deleted_then_recreated_file_is_two_changes() {
        let dir = TempDir::new("files-deleted");
        let f = dir.path("key.pem");
        put(&f, b"key");
        let files = FileWatcher::start(POLL).unwrap();
        let mut w = files.watch(vec![f.clone()], Duration::ZERO);
        baseline(&w).await;

        std::fs::remove_file(&f).unwrap();
        assert_eq!(states(&next(&mut w).await), vec![FileState::Unreadable(io::ErrorKind::NotFound)]);
        put(&f, b"key");
        assert_eq!(states(&next(&mut w).await), vec![sha(b"key")]);
    }

    #[tokio::test]
    async fn settle_joins_two_quick_writes_into_one_change() {
        let dir = TempDir::new("files-settle");
        let (cert, key) = (dir.path("cert.pem"), dir.path("key.pem"));
        put(&cert, b"cert 1");
        put(&key, b"key 1");
        let files = FileWatcher::start(POLL).unwrap();
        let settle = Duration::from_millis(500);
        let mut w = files.watch(vec![cert.clone(), key.clone()], settle);
        let first = baseline(&w).await;

        // The cert first; several polls see it before the key follows, none may report it.
        put(&cert, b"cert 2");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!w.rx.has_changed().unwrap(), "reported before it settled");
        assert_eq!(w.current(), Some(first));
        put(&key, b"key 2");

        let written = Instant::now();
        assert_eq!(states(&next(&mut w).await), vec![sha(b"cert 2"), sha(b"key 2")]);
        assert!(written.elapsed() >= settle - POLL, "reported after {:?}", written.elapsed());
        quiet(&mut w, Duration::from_millis(700)).await;
    }

    #[tokio::test]
    async fn watch_and_unwatch_do_not_wait_for_a_stuck_read() {
        let dir = TempDir::new("files-fifo");
        let fifo = dir.path("hung");
        let status = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(status.success());
        let f = dir.path("config.yaml");
        put(&f, b"a");

        let files = FileWatcher::start(POLL).unwrap();
        // Opening a FIFO for reading blocks until a writer comes: a hung volume.
        let stuck = files.watch(vec![fifo.clone()], Duration::ZERO);
        tokio::time::sleep(Duration::from_millis(100)).await;

        let t = Instant::now();
        let mut other = files.watch(vec![f.clone()], Duration::ZERO);
        drop(stuck);
        assert!(t.elapsed() < Duration::from_millis(50), "watch/unwatch took {:?}", t.elapsed());
        // The premise: the thread really is stuck, so the new group has no baseline yet.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(other.current(), None);

        // Unstick it: the writer's open pairs with the thread's, then EOF.
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
            std::io::Write::write_all(&mut w, b"x").unwrap();
            let _ = done_tx.send(());
        });
        done_rx.recv_timeout(WAIT).expect("the watcher thread was not reading the FIFO");

        // The dropped FIFO group is not read again (it would block the thread for good), and
        // the other group works.
        assert_eq!(states(&baseline(&other).await), vec![sha(b"a")]);
        put(&f, b"b");
        assert_eq!(states(&next(&mut other).await), vec![sha(b"b")]);
    }

    #[tokio::test]
    async fn stop_ends_every_watch() {
        let dir = TempDir::new("files-stop");
        let f = dir.path("f");
        put(&f, b"a");
        let files = FileWatcher::start(POLL).unwrap();
        let mut w = files.watch(vec![f.clone()], Duration::ZERO);
        baseline(&w).await;
        files.stop();
        assert_eq!(tokio::time::timeout(WAIT, w.changed()).await.unwrap(), None);
        // A watch made after the stop does not hang its caller either.
        let mut late = files.watch(vec![f], Duration::ZERO);
        assert_eq!(tokio::time::timeout(WAIT, late.changed()).await.unwrap(), None);
    }
}
