//! Chunking: token windows with overlap, cut at sentence boundaries. The same code serves bulk
//! and incremental ingest; chunk ids derive from the document id (`{doc_id}#{n}`).

/// A chunk of a document.
#[derive(Debug, Clone, PartialEq)]
pub struct TextChunk {
    /// `{doc_id}#{n}`.
    pub chunk_id: String,
    /// The text.
    pub text: String,
    /// Its length in tokens.
    pub tokens: usize,
}

/// Splits `text` into sentences (keeping their punctuation).
pub fn sentences(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let end_here = match c {
            b'\n' => true,
            b'.' | b'!' | b'?' => i + 1 >= bytes.len() || bytes[i + 1].is_ascii_whitespace(),
            _ => false,
        };
        if end_here {
            let s = text[start..=i].trim();
            if !s.is_empty() {
                out.push(s);
            }
            start = i + 1;
        }
        i += 1;
    }
    let s = text[start..].trim();
    if !s.is_empty() {
        out.push(s);
    }
    out
}

/// Chunks a document. `count` gives the token length of a piece of text (the embedder's
/// tokenizer in production).
pub fn chunk_document(
    doc_id: &str,
    text: &str,
    count: &dyn Fn(&str) -> usize,
    chunk_tokens: usize,
    overlap: usize,
) -> Vec<TextChunk> {
    let chunk_tokens = chunk_tokens.max(8);
    // sentences, with over-long ones split on whitespace into window-sized pieces
    let mut pieces: Vec<(String, usize)> = Vec::new();
    for s in sentences(text) {
        let n = count(s);
        if n <= chunk_tokens {
            pieces.push((s.to_string(), n));
            continue;
        }
        let mut cur = String::new();
        let mut cur_n = 0;
        for w in s.split_whitespace() {
            let wn = count(w).max(1);
            if cur_n + wn > chunk_tokens && !cur.is_empty() {
                pieces.push((std::mem::take(&mut cur), cur_n));
                cur_n = 0;
            }
            if !cur.is_empty() {
                cur.push(' ');
            }
            cur.push_str(w);
            cur_n += wn;
        }
        if !cur.is_empty() {
            pieces.push((cur, cur_n));
        }
    }
    let mut chunks = Vec::new();
    let mut i = 0;
    while i < pieces.len() {
        let mut j = i;
        let mut n = 0;
        while j < pieces.len() && (j == i || n + pieces[j].1 <= chunk_tokens) {
            n += pieces[j].1;
            j += 1;
        }
        let text = pieces[i..j]
            .iter()
            .map(|p| p.0.as_str())
            .collect::<Vec<_>>()
            .join(" ");
        chunks.push(TextChunk {
            chunk_id: format!("{doc_id}#{}", chunks.len()),
            text,
            tokens: n,
        });
        if j >= pieces.len() {
            break;
        }
        // step back over trailing pieces that fit in the overlap, but always advance
        let mut back = j;
        let mut o = 0;
        while back > i + 1 && o + pieces[back - 1].1 <= overlap {
            o += pieces[back - 1].1;
            back -= 1;
        }
        i = back;
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> usize {
        s.split_whitespace().count()
    }

    #[test]
    fn short_text_is_one_chunk() {
        let c = chunk_document("d", "Hello world. Second sentence!", &words, 50, 5);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].chunk_id, "d#0");
        assert_eq!(c[0].text, "Hello world. Second sentence!");
    }

    #[test]
    fn long_text_is_windowed_at_sentences_with_overlap() {
        let text: String = (0..40)
            .map(|i| format!("Sentence number {i} has six words. "))
            .collect();
        let c = chunk_document("doc", &text, &words, 30, 6);
        assert!(c.len() > 5);
        for ch in &c {
            assert!(ch.tokens <= 30, "{}", ch.tokens);
            assert!(ch.text.ends_with('.'), "cut inside a sentence: {}", ch.text);
        }
        // consecutive chunks overlap by one sentence
        let last_of_first = sentences(&c[0].text).last().unwrap().to_string();
        assert!(c[1].text.starts_with(&last_of_first));
        // every sentence is somewhere
        for i in 0..40 {
            assert!(c.iter().any(|ch| ch.text.contains(&format!("number {i} "))));
        }
    }

    #[test]
    fn a_huge_sentence_is_split() {
        let text = "word ".repeat(1000);
        let c = chunk_document("x", &text, &words, 100, 10);
        assert_eq!(c.len(), 10);
        assert!(c.iter().all(|ch| ch.tokens <= 100));
    }

    #[test]
    fn empty_text_has_no_chunks() {
        assert!(chunk_document("x", "  \n ", &words, 100, 10).is_empty());
    }
}
