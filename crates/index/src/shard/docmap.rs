//! The live documents by id, compact: their states in a dense array of fixed pages, found
//! through a table of 4-byte positions.
//!
//! A `HashMap<Box<str>, DocState>` keeps each entry (56 bytes) in its table's buckets, and the
//! table holds between 7/16 and 7/8 of its buckets full, so at a million documents (past
//! 917,504 it doubles to 2^21 buckets) it took 120 MB: half of the index's own memory a chunk.
//! Here the table's buckets are positions (5 bytes with the control byte), and the entries sit
//! once each, in pages that never move: 66 MB at a million. An entry keeps its id's hash, so
//! the table grows or is copied at a new size without hashing any id; a removal moves the last
//! entry into the hole, so the array stays dense and iterates in its order.
use std::hash::BuildHasher;

use super::room::spread;
use super::DocState;

/// Entries a page: a page is allocated whole and never moves, so the array grows without
/// copying (a `Vec` doubling under the exclusive borrow would copy 56 MB at a million).
const PAGE_BITS: u32 = 12;
const PAGE: usize = 1 << PAGE_BITS;

struct Doc {
    id: Box<str>,
    state: DocState,
}

/// A table of the map's positions at a new size, made beside the searches (see
/// [`super::room`]) and swapped in by [`DocMap::install_table`].
pub(super) struct DocTable(hashbrown::HashTable<u32>);

impl DocTable {
    /// How many documents the map held when the table was made.
    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    #[cfg(test)]
    pub(super) fn capacity(&self) -> usize {
        self.0.capacity()
    }
}

/// The live documents' states by id (see the module's comment). The table holds one position
/// a document: its length is the map's.
#[derive(Default)]
pub(super) struct DocMap {
    hasher: std::hash::RandomState,
    table: hashbrown::HashTable<u32>,
    pages: Vec<Vec<Doc>>,
}

impl std::fmt::Debug for DocMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DocMap({} documents)", self.len())
    }
}

/// The page and the place in it of position `at`.
fn place(at: u32) -> (usize, usize) {
    ((at >> PAGE_BITS) as usize, at as usize & (PAGE - 1))
}

fn doc(pages: &[Vec<Doc>], at: u32) -> &Doc {
    let (page, i) = place(at);
    &pages[page][i]
}

/// The table's hash of the entry at a position, from the hash it keeps (no id is hashed).
fn rehash(pages: &[Vec<Doc>]) -> impl Fn(&u32) -> u64 + '_ {
    move |&at| spread(doc(pages, at).state.hash)
}

/// Whether the entry at a position is `id` (of hash `h`).
fn is<'a>(pages: &'a [Vec<Doc>], h: u32, id: &'a str) -> impl Fn(&u32) -> bool + 'a {
    move |&at| {
        let d = doc(pages, at);
        d.state.hash == h && *d.id == *id
    }
}

impl DocMap {
    pub(super) fn len(&self) -> usize {
        self.table.len()
    }

    /// Documents the table holds without growing.
    pub(super) fn capacity(&self) -> usize {
        self.table.capacity()
    }

    pub(super) fn clear(&mut self) {
        self.table.clear();
        self.pages.clear();
    }

    fn hash(&self, id: &str) -> u32 {
        self.hasher.hash_one(id) as u32
    }

    fn doc_mut(&mut self, at: u32) -> &mut Doc {
        let (page, i) = place(at);
        &mut self.pages[page][i]
    }

    fn find(&self, id: &str) -> Option<u32> {
        let h = self.hash(id);
        self.table.find(spread(h), is(&self.pages, h, id)).copied()
    }

    pub(super) fn get(&self, id: &str) -> Option<&DocState> {
        self.find(id).map(|at| &doc(&self.pages, at).state)
    }

    pub(super) fn contains_key(&self, id: &str) -> bool {
        self.find(id).is_some()
    }

    /// The state of `id`, made by `new` if it has none.
    pub(super) fn get_or_insert_with(
        &mut self,
        id: &str,
        new: impl FnOnce() -> DocState,
    ) -> &mut DocState {
        let at = match self.find(id) {
            Some(at) => at,
            None => {
                let h = self.hash(id);
                let at = u32::try_from(self.len()).expect("a shard holds under 2^32 documents");
                if self.pages.last().is_none_or(|p| p.len() == PAGE) {
                    self.pages.push(Vec::with_capacity(PAGE));
                }
                let mut state = new();
                state.hash = h;
                self.pages.last_mut().expect("a page").push(Doc {
                    id: id.into(),
                    state,
                });
                self.table.insert_unique(spread(h), at, rehash(&self.pages));
                at
            }
        };
        &mut self.doc_mut(at).state
    }

    /// Removes `id`, moving the last entry into its place.
    pub(super) fn remove(&mut self, id: &str) -> Option<DocState> {
        let h = self.hash(id);
        let (at, _) = self
            .table
            .find_entry(spread(h), is(&self.pages, h, id))
            .ok()?
            .remove();
        // the table holds one position fewer: the last one's
        let last = self.len() as u32;
        let page = self.pages.last_mut().expect("a page");
        let moved = page.pop().expect("the last entry");
        if page.is_empty() {
            self.pages.pop();
        }
        if at == last {
            return Some(moved.state);
        }
        // the last entry fills the hole: its position in the table follows it
        let slot = self
            .table
            .find_mut(spread(moved.state.hash), |&i| i == last)
            .expect("the last entry is in the table");
        *slot = at;
        Some(std::mem::replace(self.doc_mut(at), moved).state)
    }

    /// Every (id, state), in the array's order (the same while the map does not change).
    pub(super) fn iter(&self) -> impl Iterator<Item = (&str, &DocState)> {
        self.pages.iter().flatten().map(|d| (&*d.id, &d.state))
    }

    pub(super) fn keys(&self) -> impl Iterator<Item = &str> {
        self.iter().map(|(d, _)| d)
    }

    #[cfg(test)]
    pub(super) fn values(&self) -> impl Iterator<Item = &DocState> {
        self.iter().map(|(_, s)| s)
    }

    /// A table of the current documents with room for `capacity` (no id is hashed: each
    /// entry keeps its hash), to swap in with [`DocMap::install_table`].
    pub(super) fn table_with(&self, capacity: usize) -> DocTable {
        let mut table = hashbrown::HashTable::with_capacity(capacity.max(self.len()));
        for (at, d) in self.pages.iter().flatten().enumerate() {
            table.insert_unique(spread(d.state.hash), at as u32, rehash(&self.pages));
        }
        DocTable(table)
    }

    /// Swaps in `table` if it holds what the map holds (the same length: nothing else writes
    /// between the halves); gives back the table replaced (or `table`, unused).
    pub(super) fn install_table(&mut self, mut table: DocTable) -> DocTable {
        if table.len() == self.len() {
            std::mem::swap(&mut self.table, &mut table.0);
        }
        table
    }

    /// Shrinks the table to room for `capacity` documents (at least those it holds).
    pub(super) fn shrink_to(&mut self, capacity: usize) {
        let capacity = capacity.max(self.len());
        self.table.shrink_to(capacity, rehash(&self.pages));
    }
}

impl std::ops::Index<&str> for DocMap {
    type Output = DocState;

    fn index(&self, id: &str) -> &DocState {
        self.get(id).expect("a live document")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn state(seq: u64) -> DocState {
        DocState {
            seq,
            version: seq * 10,
            ..DocState::default()
        }
    }

    /// The map against a `HashMap` through inserts, updates and removals in a mixed order,
    /// across page boundaries and table growth.
    #[test]
    fn holds_what_a_hash_map_holds_through_inserts_and_removals() {
        let mut m = DocMap::default();
        let mut want: HashMap<String, u64> = HashMap::new();
        let n = 3 * PAGE as u64 + 17;
        let mut x = 12345u64;
        for step in 0..40_000u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let id = format!("doc-{}", (x >> 33) % n);
            match (x >> 20) % 5 {
                0 | 1 => {
                    assert_eq!(
                        m.remove(&id).map(|s| s.seq),
                        want.remove(&id),
                        "removing {id} at step {step}"
                    );
                }
                _ => {
                    m.get_or_insert_with(&id, || state(0)).seq = step;
                    want.insert(id, step);
                }
            }
            assert_eq!(m.len(), want.len());
        }
        assert!(m.len() > PAGE, "spans pages: {}", m.len());
        for i in 0..n {
            let id = format!("doc-{i}");
            assert_eq!(m.get(&id).map(|s| s.seq), want.get(&id).copied(), "{id}");
            assert_eq!(m.contains_key(&id), want.contains_key(&id));
        }
        let mut got: Vec<(String, u64)> = m.iter().map(|(d, s)| (d.to_string(), s.seq)).collect();
        got.sort();
        let mut all: Vec<(String, u64)> = want.into_iter().collect();
        all.sort();
        assert_eq!(got, all, "iterates every entry once");
        // emptied, every page goes
        for (d, _) in all {
            assert!(m.remove(&d).is_some());
        }
        assert_eq!((m.len(), m.pages.len(), m.iter().count()), (0, 0, 0));
        assert!(m.get("doc-1").is_none());
    }

    #[test]
    fn a_table_made_at_a_new_size_finds_every_document_and_is_used_only_if_nothing_changed() {
        let mut m = DocMap::default();
        for i in 0..10_000 {
            m.get_or_insert_with(&format!("d{i}"), || state(i));
        }
        let room = m.capacity() - m.len();
        let grown = m.table_with(m.len() + room + 1);
        assert!(grown.capacity() > m.capacity());
        let kept = m.install_table(grown);
        assert!(kept.capacity() < m.capacity(), "swapped in");
        for i in 0..10_000 {
            assert_eq!(m[&format!("d{i}")].seq, i);
        }
        // a table of a map that changed since is handed back unused
        let stale = m.table_with(m.capacity() * 2);
        m.remove("d7");
        let cap = m.capacity();
        let back = m.install_table(stale);
        assert_eq!(m.capacity(), cap, "kept its own table");
        assert!(back.capacity() > cap);
        assert!(m.get("d7").is_none() && m.get("d8").is_some());
        for i in 0..9_000 {
            m.remove(&format!("d{i}"));
        }
        m.shrink_to(m.len() + m.len() / 4);
        assert!(m.capacity() < 2_000, "shrunk to {}", m.capacity());
        for i in 9_000..10_000 {
            assert_eq!(m[&format!("d{i}")].version, i * 10);
        }
    }

    #[test]
    fn an_entry_is_as_small_as_the_hash_map_bucket_it_replaces() {
        assert_eq!(std::mem::size_of::<Doc>(), 56);
    }
}
