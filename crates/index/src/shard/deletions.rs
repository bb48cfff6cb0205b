//! The deletion records' files: a base (`deletions-<n>.bin`, every record) and a chain of
//! deltas (`deletions-<n>.delta`, the records changed since the file before), so that a seal or
//! a merge's commit writes (and fsyncs, under the shard's write lock) what changed since the
//! last manifest, not every record of the shard. The manifest names the chain's last file; a
//! delta names its base and the deltas before it. A new base is written once the changes since
//! the base reach half its records (or [`BASE_AT_LEAST`]), and the deltas are folded into one
//! once there are [`MAX_DELTAS`] of them, so the bytes written stay in proportion to the
//! changes and an open reads at most a base and [`MAX_DELTAS`] deltas.
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Deletions;
use crate::files::{read_checked, write_checked};
use crate::IndexError;

/// Deltas after a base before they are folded into one.
pub(super) const MAX_DELTAS: usize = 16;
/// Changes since the base below which a delta is written whatever the base's size.
pub(super) const BASE_AT_LEAST: usize = 1024;

/// A delta file: the records of these documents as they are now (`None`: no record).
#[derive(Debug, Serialize, Deserialize)]
struct Delta {
    /// The base file (0: none).
    base: u64,
    /// The deltas between the base and this one, oldest first.
    earlier: Vec<u64>,
    /// (document, tombstone, deletion version).
    changes: Vec<(String, Option<u64>, Option<u64>)>,
}

/// What a shard knows of its deletion records' files, and what changed since.
#[derive(Debug, Default)]
pub(super) struct DeletionLog {
    /// The base file (0: none) and the deltas after it, as the last manifest named them.
    base: u64,
    deltas: Vec<u64>,
    /// Records in the base.
    base_records: usize,
    /// Documents whose records changed since the base, and since the last file written.
    since_base: HashSet<String>,
    since_write: HashSet<String>,
    /// Write a new base at the next manifest (the changes were too many to list, or the
    /// records came from a manifest of an earlier format).
    rebase: bool,
    /// The highest file number used: files are numbered on from it (taken under a shared
    /// borrow when the records are written ahead of a commit, see [`DeletionLog::write`]).
    last_number: std::sync::atomic::AtomicU64,
    /// Bumped by every change to the records: a file written ahead is still what a commit
    /// would write when this has not moved since.
    changes: u64,
}

/// What [`DeletionLog::write`] wrote: the new chain, applied with [`DeletionLog::written`]
/// once the manifest naming it is durable.
#[derive(Debug)]
pub(super) struct Written {
    base: u64,
    deltas: Vec<u64>,
    base_records: usize,
    /// The files the new chain no longer needs (removed after the manifest).
    superseded: Vec<PathBuf>,
    /// The file written (removed if the manifest is not).
    new_file: Option<PathBuf>,
    rebased: bool,
}

impl Written {
    /// The file the manifest names (0: none).
    pub(super) fn head(&self) -> u64 {
        self.deltas.last().copied().unwrap_or(self.base)
    }

    /// Whether the new chain leaves no file to remove.
    pub(super) fn superseded_none(&self) -> bool {
        self.superseded.is_empty()
    }

    /// Removes the file written, when the manifest naming it could not be.
    pub(super) fn abandon(self) {
        if let Some(p) = self.new_file {
            let _ = std::fs::remove_file(p);
        }
    }
}

pub(super) fn base_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("deletions-{n}.bin"))
}

pub(super) fn delta_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("deletions-{n}.delta"))
}

fn corrupt(path: &Path, reason: impl ToString) -> IndexError {
    IndexError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn read_required(path: &Path) -> Result<Vec<u8>, IndexError> {
    read_checked(path)?
        .ok_or_else(|| corrupt(path, "the deletion records the manifest names are missing"))
}

impl DeletionLog {
    /// Reads the records of the chain whose last file is `head` (0: none).
    pub(super) fn open(dir: &Path, head: u64) -> Result<(DeletionLog, Deletions), IndexError> {
        if head == 0 {
            return Ok((DeletionLog::default(), Deletions::default()));
        }
        let head_delta = delta_path(dir, head);
        let (base, deltas) = if head_delta.exists() {
            let d: Delta = postcard::from_bytes(&read_required(&head_delta)?)
                .map_err(|e| corrupt(&head_delta, e))?;
            let mut chain = d.earlier.clone();
            chain.push(head);
            (d.base, chain)
        } else {
            (head, Vec::new())
        };
        let mut records = if base == 0 {
            Deletions::default()
        } else {
            let p = base_path(dir, base);
            postcard::from_bytes(&read_required(&p)?).map_err(|e| corrupt(&p, e))?
        };
        let base_records = records.len();
        let mut since_base = HashSet::new();
        for &n in &deltas {
            let p = delta_path(dir, n);
            let d: Delta = postcard::from_bytes(&read_required(&p)?).map_err(|e| corrupt(&p, e))?;
            if d.base != base {
                return Err(corrupt(
                    &p,
                    format!("a delta of base {} in a chain of base {base}", d.base),
                ));
            }
            for (doc, tombstone, deleted) in d.changes {
                records.set_tombstone(&doc, tombstone);
                records.set_deleted(&doc, deleted);
                since_base.insert(doc);
            }
        }
        let log = DeletionLog {
            base,
            deltas,
            base_records,
            since_base,
            last_number: head.into(),
            ..Default::default()
        };
        Ok((log, records))
    }

    /// Records that did not come from this chain (a manifest of an earlier format): written
    /// as a base at the next manifest.
    pub(super) fn rebase_at_next_write(&mut self) {
        self.changes += 1;
        self.rebase = true;
        self.since_base.clear();
        self.since_write.clear();
    }

    /// The records of `doc` changed.
    pub(super) fn touched(&mut self, doc: &str) {
        self.changes += 1;
        if self.rebase {
            return;
        }
        if !self.since_write.contains(doc) {
            self.since_write.insert(doc.to_string());
        }
        if !self.since_base.contains(doc) {
            self.since_base.insert(doc.to_string());
            if self.since_base.len() >= self.rebase_from() {
                self.rebase_at_next_write();
            }
        }
    }

    /// The records of `n` documents changed: listed one by one when they are few next to the
    /// base, otherwise the next write is a new base (listing hundreds of thousands of removed
    /// tombstones would cost more under the write lock than the base).
    pub(super) fn touched_many<'a>(&mut self, n: usize, docs: impl Iterator<Item = &'a str>) {
        self.changes += 1;
        if self.rebase || self.since_base.len() + n >= self.rebase_from() {
            self.rebase_at_next_write();
            return;
        }
        docs.for_each(|d| self.touched(d));
    }

    /// The next file number, with no file of either kind left under it (a crash's leftovers
    /// of a folder whose manifest could not be read are not removed at open).
    fn number(&self, dir: &Path) -> u64 {
        let n = self
            .last_number
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let _ = std::fs::remove_file(base_path(dir, n));
        let _ = std::fs::remove_file(delta_path(dir, n));
        n
    }

    fn rebase_from(&self) -> usize {
        (self.base_records / 2).max(BASE_AT_LEAST)
    }

    /// Writes what changed since the last write (a delta, the deltas folded into one, or a new
    /// base), or nothing when nothing changed. The chain takes effect with
    /// [`DeletionLog::written`] once the manifest naming [`Written::head`] is durable.
    pub(super) fn write(&self, dir: &Path, records: &Deletions) -> Result<Written, IndexError> {
        if !self.rebase && self.since_write.is_empty() {
            return Ok(Written {
                base: self.base,
                deltas: self.deltas.clone(),
                base_records: self.base_records,
                superseded: Vec::new(),
                new_file: None,
                rebased: false,
            });
        }
        let empty = records.is_empty();
        if self.rebase || (self.base == 0 && self.deltas.is_empty() && empty) {
            // every record, as the base of a new chain
            let mut superseded: Vec<PathBuf> =
                self.deltas.iter().map(|&n| delta_path(dir, n)).collect();
            if self.base != 0 {
                superseded.push(base_path(dir, self.base));
            }
            if empty {
                return Ok(Written {
                    base: 0,
                    deltas: Vec::new(),
                    base_records: 0,
                    superseded,
                    new_file: None,
                    rebased: true,
                });
            }
            let next = self.number(dir);
            let path = base_path(dir, next);
            let bytes = encode(records)?;
            write_checked(&path, &bytes)?;
            return Ok(Written {
                base: next,
                deltas: Vec::new(),
                base_records: records.len(),
                superseded,
                new_file: Some(path),
                rebased: true,
            });
        }
        // a delta: of what changed since the last file, or (the chain at its length) of
        // everything since the base, replacing the deltas
        let fold = self.deltas.len() >= MAX_DELTAS;
        let docs = if fold {
            &self.since_base
        } else {
            &self.since_write
        };
        let mut changes: Vec<(String, Option<u64>, Option<u64>)> = docs
            .iter()
            .map(|d| (d.clone(), records.tombstone(d), records.deleted(d)))
            .collect();
        changes.sort_unstable();
        let earlier = if fold {
            Vec::new()
        } else {
            self.deltas.clone()
        };
        let delta = Delta {
            base: self.base,
            earlier: earlier.clone(),
            changes,
        };
        let next = self.number(dir);
        let path = delta_path(dir, next);
        write_checked(&path, &encode(&delta)?)?;
        let mut deltas = earlier;
        deltas.push(next);
        let superseded = if fold {
            self.deltas.iter().map(|&n| delta_path(dir, n)).collect()
        } else {
            Vec::new()
        };
        Ok(Written {
            base: self.base,
            deltas,
            base_records: self.base_records,
            superseded,
            new_file: Some(path),
            rebased: false,
        })
    }

    /// The manifest naming `w`'s chain is durable: it is the chain now, and the files it no
    /// longer needs are removed.
    pub(super) fn written(&mut self, w: Written) {
        for p in &w.superseded {
            let _ = std::fs::remove_file(p);
        }
        if w.new_file.is_none() && !w.rebased {
            return;
        }
        self.base = w.base;
        self.deltas = w.deltas;
        self.base_records = w.base_records;
        self.since_write.clear();
        if w.rebased {
            self.since_base.clear();
            self.rebase = false;
        }
    }

    /// The file the last manifest named (0: none).
    pub(super) fn head(&self) -> u64 {
        self.deltas.last().copied().unwrap_or(self.base)
    }

    /// Changes to the records so far (see [`DeletionLog::write`]).
    pub(super) fn changes(&self) -> u64 {
        self.changes
    }

    /// Whether the next manifest has records to write.
    pub(super) fn pending(&self) -> bool {
        self.rebase || !self.since_write.is_empty()
    }

    /// The files of the chain (to keep at open).
    pub(super) fn files(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .deltas
            .iter()
            .map(|n| format!("deletions-{n}.delta"))
            .collect();
        if self.base != 0 {
            out.push(format!("deletions-{}.bin", self.base));
        }
        out
    }
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, IndexError> {
    postcard::to_stdvec(v).map_err(|e| IndexError::BadInput(e.to_string()))
}
