//! Which records every sink has delivered, and the checkpoint that follows.
//!
//! Each sink reports how far it has got, in reading order: every record before record `idx`
//! of chunk `seq` is delivered. The checkpoint moves to where the slowest sink is, inside a
//! chunk too (each record knows where it ends in its file), so a stop in the middle of a
//! 10,000-line chunk repeats nothing a sink had taken.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use super::record::Chunk;
use super::tail::Progress;

pub struct Acks {
    state: Mutex<State>,
    progress: Arc<Mutex<Progress>>,
}

struct Registered {
    chunk: Arc<Chunk>,
    /// Where the chunk takes each file once all of it is delivered (skipped bytes included).
    ends: Vec<(u64, u64)>,
}

struct SinkPos {
    seq: u64,
    idx: usize,
    /// Chunks this sink will never see (dropped for it, `when_full: drop_newest`).
    skipped: BTreeSet<u64>,
}

struct State {
    /// `seq` of `chunks[0]`.
    front: u64,
    chunks: VecDeque<Registered>,
    sinks: Vec<SinkPos>,
    /// Records of `chunks[0]` already applied to the checkpoint.
    applied: usize,
}

impl Acks {
    pub fn new(progress: Arc<Mutex<Progress>>, sinks: usize) -> Arc<Acks> {
        let sinks = (0..sinks).map(|_| SinkPos { seq: 1, idx: 0, skipped: BTreeSet::new() }).collect();
        Arc::new(Acks {
            state: Mutex::new(State { front: 1, chunks: VecDeque::new(), sinks, applied: 0 }),
            progress,
        })
    }

    /// A chunk about to be handed to the sinks, numbered in order from 1.
    pub fn register(&self, chunk: Arc<Chunk>, ends: Vec<(u64, u64)>) {
        let mut s = self.lock();
        debug_assert_eq!(chunk.seq, s.front + s.chunks.len() as u64);
        s.chunks.push_back(Registered { chunk, ends });
        self.settle(&mut s);
    }

    /// Sink `sink` has delivered every record before `idx` in chunk `seq`, and every chunk
    /// before that one.
    pub fn reached(&self, sink: usize, seq: u64, idx: usize) {
        let mut s = self.lock();
        if let Some(p) = s.sinks.get_mut(sink)
            && (seq, idx) > (p.seq, p.idx)
        {
            (p.seq, p.idx) = (seq, idx);
        }
        self.settle(&mut s);
    }

    /// Sink `sink` will never get chunk `seq`.
    pub fn skip(&self, sink: usize, seq: u64) {
        let mut s = self.lock();
        if let Some(p) = s.sinks.get_mut(sink) {
            p.skipped.insert(seq);
        }
        self.settle(&mut s);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves the checkpoint to the slowest sink's position.
    fn settle(&self, s: &mut State) {
        let State { front, chunks, sinks, applied } = s;
        let len_of = |seq: u64| {
            seq.checked_sub(*front).and_then(|i| chunks.get(i as usize)).map(|r| r.chunk.entries.len())
        };
        let mut lowest = (u64::MAX, 0usize);
        for p in sinks.iter_mut() {
            // A sink at the end of a chunk, or at one it will never get, is at the next one.
            while let Some(len) = len_of(p.seq) {
                if p.idx >= len || p.skipped.contains(&p.seq) {
                    p.skipped.remove(&p.seq);
                    (p.seq, p.idx) = (p.seq + 1, 0);
                } else {
                    break;
                }
            }
            lowest = lowest.min((p.seq, p.idx));
        }
        let mut progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(r) = chunks.front() {
            if lowest.0 > *front {
                progress.delivered(&r.ends);
                chunks.pop_front();
                *front += 1;
                *applied = 0;
            } else {
                if lowest.0 == *front && lowest.1 > *applied {
                    // Part of the front chunk: each file to the end of its last record sent.
                    let mut ends: HashMap<u64, u64> = HashMap::new();
                    for e in &r.chunk.entries[*applied..lowest.1] {
                        let end = ends.entry(e.file.id).or_default();
                        *end = (*end).max(e.end);
                    }
                    progress.delivered(&ends.into_iter().collect::<Vec<_>>());
                    *applied = lowest.1;
                }
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logship::checkpoint::Mark;
    use crate::logship::record::{Entry, FileInfo, SourceInfo};

    fn chunk(seq: u64, ends: &[u64]) -> Arc<Chunk> {
        let file = Arc::new(FileInfo { id: 1, path: "/l/a.log".into(), key: "k".into() });
        let source = Arc::new(SourceInfo { name: "app".into(), fields: vec![], json: false });
        let entries = ends
            .iter()
            .map(|&end| Entry {
                range: 0..0,
                file: file.clone(),
                source: source.clone(),
                offset: end - 10,
                end,
                time_ns: 0,
                truncated: false,
                json_object: false,
                severity: None,
                clashes: 0,
            })
            .collect();
        Arc::new(Chunk { seq, text: vec![], entries, ends: vec![] })
    }

    fn offset(p: &Arc<Mutex<Progress>>) -> u64 {
        p.lock().unwrap().marks[&1].offset
    }

    #[test]
    fn the_checkpoint_follows_the_slowest_sink_inside_a_chunk_too() {
        let progress = Arc::new(Mutex::new(Progress::default()));
        let mark = Mark {
            source: "app".into(),
            path: "/l/a.log".into(),
            dev: 1,
            ino: 1,
            fp: 0,
            fp_len: 1,
            offset: 0,
            size: 0,
        };
        progress.lock().unwrap().marks.insert(1, mark);
        let acks = Acks::new(progress.clone(), 2);
        acks.register(chunk(1, &[10, 20, 30]), vec![(1, 35)]);
        acks.register(chunk(2, &[45, 55]), vec![(1, 55)]);
        acks.reached(0, 2, 1); // sink 0: all of chunk 1 and one record of chunk 2
        assert_eq!(offset(&progress), 0, "sink 1 has nothing yet");
        acks.reached(1, 1, 2);
        assert_eq!(offset(&progress), 20, "two records of chunk 1");
        acks.skip(1, 2); // chunk 2 dropped for sink 1 before it finished chunk 1
        acks.reached(1, 2, 0);
        assert_eq!(offset(&progress), 45, "chunk 1 whole (with its skipped tail), one record of chunk 2");
        acks.reached(0, 3, 0);
        assert_eq!(offset(&progress), 55);
    }
}
