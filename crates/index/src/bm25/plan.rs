//! One search's plan over its sources: the terms weightiest first, each source seeded with its
//! weightiest term's rows, then searched document at a time by block-max MaxScore.
use super::*;

/// The longest list of a source's weightiest term that [`Plan::seed`] scores whole.
/// Rows a window of [`Plan::windows`] spans.
pub(super) const WINDOW: u32 = 4096;
/// Essential cursors from which a source is searched a window at a time ([`Plan::windows`]);
/// fewer go pivot by pivot ([`Plan::daat`]).
pub(super) const WINDOWED_FROM: usize = 4;
/// About how many postings read in order cost what one lookup does: a non-essential cursor is
/// walked through a window ([`Plan::windows`]) when its postings there are at most the lookups
/// the window before asked of it, over this.
pub(super) const LOOKUP_COST: usize = 8;
/// The most query terms (those with postings) for which a weightiest term's short list is
/// scored whole: with more, every row of it has more lists to be looked up in and the other
/// terms' bounds together keep most rows from being pruned before they are; the windows of
/// [`Plan::windows`] skip them by blocks instead.
pub(super) const WHOLE_SEED_TERMS: usize = 3;
pub(super) const WHOLE_SEED: usize = 1 << 14;

/// What every source of one search shares: the query's terms with a document frequency (in
/// the order their scores are summed: highest idf first), their idf and the average length.
pub(super) struct Plan {
    /// (index into `Source::lists`, idf).
    pub(super) terms: Vec<(usize, f32)>,
    pub(super) avg: f32,
    /// The longest weightiest list scored whole in the seeding ([`WHOLE_SEED`] for a query of
    /// at most [`WHOLE_SEED_TERMS`] terms, else none), the essential cursors from which a
    /// source is searched a window at a time, and the rows a window spans (a multiple of 64).
    pub(super) whole_seed: usize,
    pub(super) windowed_from: usize,
    pub(super) window: u32,
}

impl Plan {
    pub(super) fn new(sources: &[Source<'_>]) -> Option<Plan> {
        let n: u64 = sources.iter().map(|s| s.rows).sum();
        if n == 0 {
            return None;
        }
        let total: u64 = sources.iter().map(|s| s.total_len).sum();
        let avg = (total as f32 / n as f32).max(1e-6);
        let width = sources.first().map_or(0, |s| s.lists.len());
        let mut terms: Vec<(usize, f32, u64)> = (0..width)
            .filter_map(|t| {
                let df: u64 = sources
                    .iter()
                    .filter_map(|s| s.lists[t].as_ref())
                    .map(|l| l.df as u64)
                    .sum();
                let (n, df) = (n as f32, df as f32);
                (df > 0.0).then(|| (t, (1.0 + (n - df + 0.5) / (df + 0.5)).ln(), df as u64))
            })
            .collect();
        terms.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.2.cmp(&b.2)).then(a.0.cmp(&b.0)));
        (!terms.is_empty()).then(|| Plan {
            whole_seed: if terms.len() <= WHOLE_SEED_TERMS {
                WHOLE_SEED
            } else {
                0
            },
            terms: terms.into_iter().map(|(t, idf, _)| (t, idf)).collect(),
            avg,
            windowed_from: WINDOWED_FROM,
            window: WINDOW,
        })
    }

    /// The most a term of `idf` adds at frequency `tf` in a chunk of `len` terms or more, a
    /// hair above, so that rounding in another order of summation cannot cross it.
    pub(super) fn bound(&self, idf: f32, tf: u32, len: u32) -> f32 {
        term_score(idf, tf as f32, len as f32, self.avg) * (1.0 + 1e-5)
    }

    /// What the posting `c` is at (in row `row`) adds to the row's score, at the row's own length.
    fn posting_score(&self, src: &Source<'_>, c: &Cursor<'_>, row: u32) -> f32 {
        term_score(c.idf, c.tf() as f32, src.len(row) as f32, self.avg)
    }

    /// A row's score in `src` from each term's frequency there, summed in the plan's order.
    pub(super) fn score(&self, src: &Source<'_>, row: u32, tf: impl Fn(usize) -> u32) -> f32 {
        let len = src.len(row) as f32;
        self.terms
            .iter()
            .enumerate()
            .map(|(pos, &(_, idf))| match tf(pos) {
                0 => 0.0,
                f => term_score(idf, f as f32, len, self.avg),
            })
            .sum()
    }

    /// Offers rows of the source's weightiest terms before the document-at-a-time pass, so
    /// that it starts with a threshold. When the weightiest term's list holds at most
    /// `whole_seed` postings, every chunk in it is scored ([`Plan::whole`]) and the term is
    /// done in this source (its rows are in `seen`); so is the next weightiest term's while
    /// its list is that short too and the terms not yet done can together still lift a chunk
    /// past the k-th best. The pass then goes on without the terms done: a chunk it can still
    /// find lacks them, so its score is bounded by the other terms alone, and when they cannot
    /// reach the k-th best together the source is done. When the weightiest list is longer,
    /// its first k chunks are offered (scored by lookups) and no term is done. The terms done.
    pub(super) fn seed(
        &self,
        s: usize,
        src: &Source<'_>,
        best: &mut TopK,
        seen: &mut Vec<u64>,
    ) -> Vec<usize> {
        let whole_seed = self.whole_seed;
        let lists: Vec<Option<TermList<'_>>> =
            self.terms.iter().map(|&(t, _)| src.lists[t]).collect();
        // (bound, position), weightiest first
        let mut order: Vec<(f32, usize)> = lists
            .iter()
            .enumerate()
            .filter_map(|(pos, l)| {
                let l = l.as_ref()?;
                let (tf, len) = l.bound();
                Some((self.bound(self.terms[pos].1, tf, len), pos))
            })
            .collect();
        order.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let Some(&(_, first)) = order.first() else {
            return Vec::new();
        };
        let list = lists[first].expect("a list");
        if list.pairs.len() > whole_seed {
            // its rows of high frequency first, when the list has them apart
            let mut offered = 0;
            let top = list.hi.and_then(|h| h.tiers().last());
            for &[row, tf] in top.map_or(list.pairs, |t| t.pairs) {
                if offered == best.k {
                    break;
                }
                if tf == 0 {
                    continue;
                }
                let r = Ranked {
                    score: self.score(src, row, |p| lists[p].map_or(0, |l| l.tf_at(row))),
                    key: key(s, row),
                };
                offered += 1;
                seen.push(r.key);
                if best.accepts(&r) && (src.live)(row) {
                    best.offer(r);
                }
            }
            return Vec::new();
        }
        let mut done = Vec::new();
        let mut left: f32 = order.iter().map(|o| o.0).sum();
        for &(bound, pos) in &order {
            let list = lists[pos].expect("a list");
            if list.pairs.len() > whole_seed || best.kth().is_some_and(|t| left <= t) {
                break;
            }
            self.whole(s, src, best, seen, &lists, pos, &done);
            done.push(pos);
            left -= bound;
        }
        done
    }

    /// Scores every chunk of the term at `pos` in this source that holds none of the terms
    /// `done` (those were scored whole before), the other terms looked up weightiest first
    /// while the chunk can still make the top k; each goes into `seen`.
    #[allow(clippy::too_many_arguments)]
    fn whole(
        &self,
        s: usize,
        src: &Source<'_>,
        best: &mut TopK,
        seen: &mut Vec<u64>,
        lists: &[Option<TermList<'_>>],
        pos: usize,
        done: &[usize],
    ) {
        let cursors = |keep: &dyn Fn(usize) -> bool| -> Vec<Cursor<'_>> {
            lists
                .iter()
                .enumerate()
                .filter(|&(p, _)| keep(p))
                .filter_map(|(p, l)| {
                    let list = l.filter(|l| !l.pairs.is_empty())?;
                    Some(Cursor::new(list, self.terms[p].1, p, self))
                })
                .collect()
        };
        let mut before = cursors(&|p| done.contains(&p));
        // the other terms, each looked up in its whole list (one seek finds a row at any
        // frequency: a split list's tiers serve the bounds of the document-at-a-time pass,
        // and seeking a row in each of them cost up to four seeks a term), highest bound first
        let mut others: Vec<Cursor<'_>> = cursors(&|p| p != pos && !done.contains(&p));
        others.sort_by(|a, b| b.bound.total_cmp(&a.bound).then(a.pos.cmp(&b.pos)));
        let rest: f32 = others.iter().map(|c| c.bound).sum();
        let list = lists[pos].expect("a list");
        let idf = self.terms[pos].1;
        let mut contrib = vec![0u32; self.terms.len()];
        'rows: for &[row, tf] in list.pairs {
            if tf == 0 || before.iter_mut().any(|c| c.seek(row)) {
                continue;
            }
            seen.push(key(s, row));
            // bounded by the list's shortest length (a row's own length is a read at a random
            // place), then the other terms looked up weightiest first while the row can still
            // make it
            let threshold = best.kth();
            let mut most = self.bound(idf, tf, list.min_len) + rest;
            if threshold.is_some_and(|t| most <= t) {
                continue;
            }
            contrib.iter_mut().for_each(|c| *c = 0);
            contrib[pos] = tf;
            for c in &mut others {
                most -= c.bound;
                if c.seek(row) {
                    contrib[c.pos] = c.tf();
                    c.block_bound(self);
                    most += c.row_bound();
                }
                if threshold.is_some_and(|t| most <= t) {
                    continue 'rows;
                }
            }
            let r = Ranked {
                score: self.score(src, row, |p| contrib[p]),
                key: key(s, row),
            };
            if best.accepts(&r) && (src.live)(row) {
                best.offer(r);
            }
        }
    }

    /// Block-max MaxScore over one source, document at a time. Terms go in order of their
    /// bounds here; those whose bounds together cannot lift a row past the k-th best so far are
    /// non-essential: rows come only from the other terms' postings, and the non-essential
    /// ones are looked up only while the row can still make the top k. Before a row is scored,
    /// the essential terms' block summaries bound every row up to the nearest block end: when
    /// that cannot reach the k-th best, the whole window is skipped. `done`: the terms the
    /// seeding scored whole in this source, left out.
    pub(super) fn daat(
        &self,
        s: usize,
        src: &Source<'_>,
        best: &mut TopK,
        seen: &[u64],
        done: &[usize],
    ) {
        // a split list: the rest of it, and its tiers of higher frequencies
        let mut cur: Vec<Cursor<'_>> = Vec::with_capacity(self.terms.len() * 4);
        for (pos, &(t, idf)) in self.terms.iter().enumerate() {
            let Some(list) = src.lists[t].filter(|l| !l.pairs.is_empty() && !done.contains(&pos))
            else {
                continue;
            };
            let cap = list.hi.map_or(u32::MAX, |h| h.cut());
            cur.push(Cursor::capped(list, idf, pos, self, cap));
            if let Some(h) = list.hi {
                cur.extend(h.tiers().map(|l| Cursor::new(l, idf, pos, self)));
            }
        }
        cur.iter_mut().for_each(Cursor::skip_dead);
        cur.sort_by(|a, b| a.bound.total_cmp(&b.bound).then(a.pos.cmp(&b.pos)));
        // below[i]: the sum of the bounds of cursors 0..i
        let mut below = vec![0.0f32; cur.len() + 1];
        let mut most = vec![0.0f32; self.terms.len()];
        bound_sums(&cur, |_| true, &mut below, &mut most);
        let raise = |essential: &mut usize, t: f32| {
            while *essential < below.len() - 1 && below[*essential + 1] <= t {
                *essential += 1;
            }
        };
        // cursors 0..essential are non-essential
        let mut essential = 0;
        if let Some(t) = best.kth() {
            raise(&mut essential, t);
        }
        if cur.len() - essential >= self.windowed_from {
            self.windows(s, src, best, seen, cur, &below, essential, done);
            return;
        }
        let mut contrib = vec![0u32; self.terms.len()];
        while essential < cur.len() {
            let Some(pivot) = cur[essential..].iter().filter_map(Cursor::row).min() else {
                break;
            };
            if let Some(t) = best.kth() {
                let mut window = below[essential];
                let mut upto = u32::MAX;
                for c in cur[essential..].iter_mut().filter(|c| c.row().is_some()) {
                    window += c.block_bound(self);
                    upto = upto.min(c.block()[0]);
                }
                if window <= t {
                    if upto == u32::MAX {
                        break;
                    }
                    for c in &mut cur[essential..] {
                        c.seek(upto + 1);
                    }
                    continue;
                }
            }
            let threshold = best.kth();
            // the essential terms' frequencies here, bounded by their blocks' shortest lengths
            // first: when even that cannot lift the row past the k-th best, its length (a read
            // at a random place) is not needed
            if let Some(t) = threshold {
                let mut most = below[essential];
                for c in &mut cur[essential..] {
                    if c.row() == Some(pivot) {
                        c.block_bound(self);
                        most += c.row_bound();
                    }
                }
                if most <= t {
                    for c in &mut cur[essential..] {
                        if c.row() == Some(pivot) {
                            c.advance();
                        }
                    }
                    continue;
                }
            }
            let len = src.len(pivot);
            contrib.iter_mut().for_each(|c| *c = 0);
            let mut partial = 0.0f32;
            for c in &mut cur[essential..] {
                if c.row() == Some(pivot) {
                    contrib[c.pos] = c.tf();
                    partial += term_score(c.idf, c.tf() as f32, len as f32, self.avg);
                    c.advance();
                }
            }
            let mut alive = true;
            for i in (0..essential).rev() {
                if threshold.is_some_and(|t| partial + below[i + 1] <= t) {
                    alive = false;
                    break;
                }
                // a term found already is not looked up again (its tiers and the rest of its
                // list hold disjoint rows); its tiers are looked up before the rest (their
                // bounds are higher), each only while the row can still make it
                let c = &mut cur[i];
                if contrib[c.pos] != 0 {
                    continue;
                }
                if c.seek(pivot) {
                    contrib[c.pos] = c.tf();
                    partial += term_score(c.idf, c.tf() as f32, len as f32, self.avg);
                }
            }
            if !alive {
                continue;
            }
            let r = Ranked {
                score: self.score(src, pivot, |p| contrib[p]),
                key: key(s, pivot),
            };
            // liveness (a lookup by document id) only for rows that would enter
            if best.accepts(&r) && seen.binary_search(&r.key).is_err() && (src.live)(pivot) {
                best.offer(r);
                if let Some(t) = best.kth() {
                    raise(&mut essential, t);
                }
            }
        }
    }

    /// Block-max MaxScore over one source a window of rows at a time, for many essential
    /// cursors (long queries, split lists): a window whose essential blocks together cannot
    /// reach the k-th best is skipped; otherwise the essential cursors' postings in it are
    /// summed into an array, term at a time (a posting costs an addition, not a comparison
    /// with every other cursor as in [`Plan::daat`]'s pivots), and only the rows whose sum
    /// with the non-essential bounds can still make the top k have the non-essential terms
    /// looked up, and are scored exactly. `cur`, `below` and `essential` as in [`Plan::daat`].
    #[allow(clippy::too_many_arguments)]
    fn windows(
        &self,
        s: usize,
        src: &Source<'_>,
        best: &mut TopK,
        seen: &[u64],
        mut cur: Vec<Cursor<'_>>,
        below: &[f32],
        mut essential: usize,
        done: &[usize],
    ) {
        // every term's whole list, for the exact frequencies of the rows that make it
        let mut whole: Vec<Option<Cursor<'_>>> = self
            .terms
            .iter()
            .enumerate()
            .map(|(pos, &(t, idf))| {
                let list = src.lists[t].filter(|l| !l.pairs.is_empty() && !done.contains(&pos))?;
                Some(Cursor::new(list, idf, pos, self))
            })
            .collect();
        let mut walked = vec![false; cur.len()];
        let mut asked = vec![0usize; cur.len()];
        let mut rest = vec![0.0f32; cur.len() + 1];
        let mut most = vec![0.0f32; self.terms.len()];
        let mut sum = vec![0.0f32; self.window as usize];
        let mut hit = vec![0u64; self.window.div_ceil(64) as usize];
        let mut contrib = vec![0u32; self.terms.len()];
        while essential < cur.len() {
            let Some(start) = cur[essential..].iter().filter_map(Cursor::row).min() else {
                break;
            };
            // (past the last row there can be: the window holds every row left)
            let end = start as u64 + self.window as u64;
            if let Some(t) = best.kth() {
                let window: f32 = below[essential]
                    + cur[essential..]
                        .iter()
                        .map(|c| c.bound_before(self, end))
                        .sum::<f32>();
                if window <= t {
                    let Ok(end) = u32::try_from(end) else {
                        break;
                    };
                    for c in &mut cur[essential..] {
                        c.seek(end);
                    }
                    continue;
                }
            }
            // the essential postings in the window, summed row by row (in another order than
            // the plan's: a hair above, as the bounds, before a row is let go)
            for c in &mut cur[essential..] {
                while let Some(row) = c.row().filter(|&r| (r as u64) < end) {
                    let at = (row - start) as usize;
                    sum[at] += self.posting_score(src, c, row);
                    hit[at / 64] |= 1 << (at % 64);
                    c.advance();
                }
            }
            // a non-essential cursor with few postings in the window against the rows that
            // asked for it in the window before (those whose sums could still make the top k
            // when their turn came) is walked through it rather than looked up row by row (a
            // posting read in order costs a fraction of a lookup): its postings at rows hit are
            // added to their sums. `rest[i]`: the bounds of the non-essential cursors 0..i
            // still to be looked up (a term counted once, as in `below`). The cursors essential
            // at the window's start were summed whole: a threshold raised within it leaves
            // them out.
            let ess0 = essential;
            for i in 0..ess0 {
                let c = &mut cur[i];
                walked[i] = c.few_before(end, std::mem::take(&mut asked[i]) / LOOKUP_COST);
                if walked[i] {
                    c.seek(start);
                    while let Some(row) = c.row().filter(|&r| (r as u64) < end) {
                        let at = (row - start) as usize;
                        if hit[at / 64] & (1 << (at % 64)) != 0 {
                            sum[at] += self.posting_score(src, c, row);
                        }
                        c.advance();
                    }
                }
            }
            bound_sums(&cur, |i| !walked[i], &mut rest[..=ess0], &mut most);
            for (w, bits) in hit.iter_mut().enumerate() {
                while *bits != 0 {
                    let at = w * 64 + bits.trailing_zeros() as usize;
                    *bits &= *bits - 1;
                    let row = start + at as u32;
                    let mut partial = std::mem::take(&mut sum[at]) * (1.0 + 1e-5);
                    let threshold = best.kth();
                    // the other non-essential terms looked up weightiest first while the row
                    // can still make it (a term's cursors hold disjoint rows: one finds it at
                    // most)
                    let mut alive = true;
                    for i in (0..ess0).rev() {
                        if threshold.is_some_and(|t| partial + rest[i + 1] <= t) {
                            alive = false;
                            break;
                        }
                        asked[i] += 1;
                        if walked[i] {
                            continue;
                        }
                        let c = &mut cur[i];
                        if c.seek(row) {
                            partial += self.posting_score(src, c, row);
                        }
                    }
                    if !alive || threshold.is_some_and(|t| partial <= t) {
                        continue;
                    }
                    for (pos, c) in whole.iter_mut().enumerate() {
                        contrib[pos] = c
                            .as_mut()
                            .map_or(0, |c| if c.seek(row) { c.tf() } else { 0 });
                    }
                    let r = Ranked {
                        score: self.score(src, row, |p| contrib[p]),
                        key: key(s, row),
                    };
                    if best.accepts(&r) && seen.binary_search(&r.key).is_err() && (src.live)(row) {
                        best.offer(r);
                        if let Some(t) = best.kth() {
                            while essential < below.len() - 1 && below[essential + 1] <= t {
                                essential += 1;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `sums[i]`: the bounds of the cursors 0..i that `counted` takes, summed, for `i` up to
/// `sums.len() - 1` (a term's cursors hold disjoint rows: it counts once, at its highest bound
/// so far); `most`: scratch, a slot a term.
fn bound_sums(
    cur: &[Cursor<'_>],
    counted: impl Fn(usize) -> bool,
    sums: &mut [f32],
    most: &mut [f32],
) {
    most.iter_mut().for_each(|m| *m = 0.0);
    sums[0] = 0.0;
    for i in 0..sums.len() - 1 {
        let c = &cur[i];
        sums[i + 1] = sums[i];
        if counted(i) {
            sums[i + 1] += (c.bound - most[c.pos]).max(0.0);
            most[c.pos] = most[c.pos].max(c.bound);
        }
    }
}
