//! Reading documents to ingest: BEIR `corpus.jsonl` (`_id`, `title`, `text`), JSON lines with
//! `id`/`text` (and optional `title`), `.json` arrays of such objects, and `.txt` / `.md` files
//! or folders of them.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ragfleet_proto::Document;

/// A record that could not be read, or a file that was not read.
#[derive(Debug, Clone)]
pub struct Skipped {
    /// File.
    pub path: PathBuf,
    /// 1-based line (0 for a whole file).
    pub line: usize,
    /// Why.
    pub reason: String,
}

/// Documents, and the records and files not ingested, of some paths.
#[derive(Debug, Default)]
pub struct Corpus {
    /// Documents in file order; an id given twice keeps the last copy (at the first's place).
    pub docs: Vec<Document>,
    /// Records that could not be read.
    pub skipped: Vec<Skipped>,
    /// Records replaced by a later record with the same id (last wins).
    pub replaced: Vec<Skipped>,
    /// Files in a folder that were not read (unsupported type, a link leading out of the
    /// folder); reported, not counted as failures.
    pub ignored: Vec<Skipped>,
    /// Where each id was read (index into `docs`, file, line), to report duplicates.
    seen: HashMap<String, (usize, PathBuf, usize)>,
    /// Follow symbolic links that lead out of a folder being read.
    follow_links: bool,
}

/// Extensions read from folders.
const EXTENSIONS: [&str; 4] = ["jsonl", "json", "txt", "md"];

fn parse_value(v: serde_json::Value) -> Result<Document, String> {
    let obj = v.as_object().ok_or("not a JSON object")?;
    let id = match obj.get("_id").or_else(|| obj.get("id")) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Number(n)) => n.to_string(),
        Some(_) => return Err("id is not a string or number".into()),
        None => return Err("no `_id` or `id` field".into()),
    };
    if id.trim().is_empty() {
        return Err("empty id".into());
    }
    let text = match obj.get("text") {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(_) => return Err("`text` is not a string".into()),
        None => return Err("no `text` field".into()),
    };
    let title = obj
        .get("title")
        .and_then(|t| t.as_str())
        .unwrap_or("")
        .to_string();
    if text.trim().is_empty() && title.trim().is_empty() {
        return Err("empty text".into());
    }
    Ok(Document { id, title, text })
}

fn parse_line(line: &str) -> Result<Document, String> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    parse_value(v)
}

impl Corpus {
    /// Reads every path; an unreadable path is an error, a bad record is skipped and reported.
    /// Symbolic links inside folders are followed only when they stay inside the folder,
    /// unless `follow_links`.
    #[cfg(test)]
    pub fn read(paths: &[PathBuf]) -> Result<Corpus> {
        Self::read_with(paths, false)
    }

    /// [`Corpus::read`], choosing whether links that leave a folder are followed.
    pub fn read_with(paths: &[PathBuf], follow_links: bool) -> Result<Corpus> {
        let mut c = Corpus {
            follow_links,
            ..Corpus::default()
        };
        for p in paths {
            c.add_path(p, p)?;
        }
        Ok(c)
    }

    /// Reads JSON lines from a string (the bundled corpus).
    pub fn read_str(text: &str, name: &str) -> Corpus {
        let mut c = Corpus::default();
        c.add_lines(text.as_bytes(), Path::new(name));
        c
    }

    fn skip(&mut self, p: &Path, line: usize, reason: impl Into<String>) {
        self.skipped.push(Skipped {
            path: p.to_path_buf(),
            line,
            reason: reason.into(),
        });
    }

    /// Adds a document; an id read before is replaced (last wins) and the earlier record is
    /// reported skipped, naming the record that replaced it.
    fn add_doc(&mut self, d: Document, p: &Path, line: usize) {
        let at = |p: &Path, l: usize| {
            if l == 0 {
                p.display().to_string()
            } else {
                format!("{}:{l}", p.display())
            }
        };
        if let Some((i, old_path, old_line)) = self.seen.get(&d.id).cloned() {
            let reason = format!(
                "duplicate id {:?}: replaced by the later record at {}",
                d.id,
                at(p, line)
            );
            self.replaced.push(Skipped {
                path: old_path,
                line: old_line,
                reason,
            });
            self.seen.insert(d.id.clone(), (i, p.to_path_buf(), line));
            self.docs[i] = d;
        } else {
            self.seen
                .insert(d.id.clone(), (self.docs.len(), p.to_path_buf(), line));
            self.docs.push(d);
        }
    }

    fn add_lines(&mut self, bytes: &[u8], p: &Path) {
        for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
            let Ok(line) = std::str::from_utf8(raw) else {
                self.skip(p, i + 1, "not UTF-8");
                continue;
            };
            if line.trim().is_empty() {
                continue;
            }
            match parse_line(line) {
                Ok(d) => self.add_doc(d, p, i + 1),
                Err(reason) => self.skip(p, i + 1, reason),
            }
        }
    }

    /// A `.json` file: an array of documents, one document, or JSON lines.
    fn add_json(&mut self, bytes: &[u8], p: &Path) {
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace()).copied();
        if first != Some(b'[') {
            // one object, or JSON lines (a single object on one line reads the same)
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes) {
                match parse_value(v) {
                    Ok(d) => self.add_doc(d, p, 0),
                    Err(reason) => self.skip(p, 0, reason),
                }
                return;
            }
            return self.add_lines(bytes, p);
        }
        match serde_json::from_slice::<Vec<serde_json::Value>>(bytes) {
            Ok(items) => {
                for (i, v) in items.into_iter().enumerate() {
                    match parse_value(v) {
                        Ok(d) => self.add_doc(d, p, 0),
                        Err(reason) => self.skip(p, 0, format!("element {i}: {reason}")),
                    }
                }
            }
            Err(e) => self.skip(p, e.line(), format!("not a JSON array of documents: {e}")),
        }
    }

    fn add_path(&mut self, root: &Path, p: &Path) -> Result<()> {
        let meta = std::fs::metadata(p).with_context(|| format!("cannot read {}", p.display()))?;
        if meta.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("cannot read folder {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            entries.sort();
            for e in entries {
                if let Some(why) = self.refuse_link(root, &e) {
                    self.ignored.push(Skipped {
                        path: e,
                        line: 0,
                        reason: why,
                    });
                    continue;
                }
                let ext = e.extension().and_then(|x| x.to_str()).unwrap_or("");
                if e.is_dir() || EXTENSIONS.contains(&ext) {
                    self.add_path(root, &e)?;
                } else {
                    self.ignored.push(Skipped {
                        path: e,
                        line: 0,
                        reason: "not read: unsupported file type (.jsonl, .json, .txt, .md)".into(),
                    });
                }
            }
            return Ok(());
        }
        let ext = p.extension().and_then(|x| x.to_str()).unwrap_or("");
        match ext {
            "jsonl" | "json" => {
                let bytes =
                    std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
                if ext == "json" {
                    self.add_json(&bytes, p);
                } else {
                    self.add_lines(&bytes, p);
                }
            }
            "txt" | "md" => {
                let bytes =
                    std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
                let Ok(text) = String::from_utf8(bytes) else {
                    self.skip(p, 0, "not UTF-8 text");
                    return Ok(());
                };
                if text.trim().is_empty() {
                    self.skip(p, 0, "empty file");
                    return Ok(());
                }
                let id = p
                    .strip_prefix(root)
                    .ok()
                    .filter(|r| !r.as_os_str().is_empty())
                    .unwrap_or(p);
                let title = text
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim_start_matches('#')
                    .trim()
                    .to_string();
                let d = Document {
                    id: id.display().to_string(),
                    title,
                    text,
                };
                self.add_doc(d, p, 0);
            }
            other => bail!(
                "{}: unsupported file type {other:?} (use .jsonl, .json, .txt, .md or a folder)",
                p.display()
            ),
        }
        Ok(())
    }

    /// Why a folder entry that is a symbolic link is not followed: it leads out of the folder
    /// being read (unless links are followed), or nowhere.
    fn refuse_link(&self, root: &Path, entry: &Path) -> Option<String> {
        let meta = std::fs::symlink_metadata(entry).ok()?;
        if !meta.file_type().is_symlink() || self.follow_links {
            return None;
        }
        let (Ok(target), Ok(root)) = (entry.canonicalize(), root.canonicalize()) else {
            return Some("not read: a symbolic link that leads nowhere".into());
        };
        if target.starts_with(&root) {
            None
        } else {
            Some(format!(
                "not read: a symbolic link to {}, outside the folder (--follow-links reads it)",
                target.display()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_beir_and_plain_jsonl_reporting_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.jsonl");
        std::fs::write(
            &p,
            "{\"_id\": \"a\", \"title\": \"T\", \"text\": \"x\"}\n{\"id\": 7, \"text\": \"y\"}\nnot json\n{\"id\": \"z\"}\n\n{\"id\":\"e\",\"text\":\"  \"}\n",
        )
        .unwrap();
        let c = Corpus::read(&[p.clone()]).unwrap();
        assert_eq!(
            c.docs.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
            vec!["a", "7"]
        );
        assert_eq!(c.docs[0].title, "T");
        assert_eq!(
            c.skipped.iter().map(|s| s.line).collect::<Vec<_>>(),
            vec![3, 4, 6]
        );
        assert!(Corpus::read(&[dir.path().join("missing.jsonl")]).is_err());
    }

    #[test]
    fn reads_folders_of_text_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/a.md"), "# Title\nbody").unwrap();
        std::fs::write(dir.path().join("b.txt"), "plain").unwrap();
        std::fs::write(dir.path().join("ignored.bin"), [0u8, 1]).unwrap();
        let c = Corpus::read(&[dir.path().to_path_buf()]).unwrap();
        let ids: Vec<&str> = c.docs.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, vec!["b.txt", "sub/a.md"]);
        assert_eq!(c.docs[1].title, "Title");
    }

    #[test]
    fn a_duplicate_id_keeps_the_last_copy_and_reports_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.jsonl");
        std::fs::write(
            &p,
            "{\"id\": \"a\", \"text\": \"first\"}\n{\"id\": \"b\", \"text\": \"b\"}\n{\"id\": \"a\", \"text\": \"second\"}\n",
        )
        .unwrap();
        let c = Corpus::read(&[p]).unwrap();
        let docs: Vec<(&str, &str)> = c
            .docs
            .iter()
            .map(|d| (d.id.as_str(), d.text.as_str()))
            .collect();
        assert_eq!(docs, vec![("a", "second"), ("b", "b")]);
        assert!(c.skipped.is_empty());
        assert_eq!(c.replaced.len(), 1);
        assert_eq!(c.replaced[0].line, 1);
        assert!(c.replaced[0]
            .reason
            .contains("replaced by the later record"));
        assert!(
            c.replaced[0].reason.contains(":3"),
            "{}",
            c.replaced[0].reason
        );
    }

    #[test]
    fn a_non_utf8_line_is_skipped_with_its_number_and_the_rest_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.jsonl");
        let mut bytes = b"{\"id\": \"a\", \"text\": \"ok\"}\n".to_vec();
        bytes.extend_from_slice(b"{\"id\": \"b\", \"text\": \"\xff\xfe\"}\n");
        bytes.extend_from_slice(b"{\"id\": \"c\", \"text\": \"ok too\"}\n");
        std::fs::write(&p, bytes).unwrap();
        let c = Corpus::read(&[p]).unwrap();
        let ids: Vec<&str> = c.docs.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, vec!["a", "c"]);
        assert_eq!(c.skipped.len(), 1);
        assert_eq!(c.skipped[0].line, 2);
        assert!(c.skipped[0].reason.contains("UTF-8"));
    }

    #[test]
    fn folders_read_json_and_do_not_follow_links_out_of_the_folder() {
        let outside = tempfile::tempdir().unwrap();
        let secret = outside.path().join("secret.txt");
        std::fs::write(&secret, "a file outside the folder").unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("docs.json"),
            "[{\"id\": \"j1\", \"text\": \"one\"}, {\"id\": \"j2\", \"text\": \"two\"}, {\"text\": \"no id\"}]",
        )
        .unwrap();
        std::fs::write(dir.path().join("inside.txt"), "inside").unwrap();
        std::os::unix::fs::symlink(&secret, dir.path().join("link.txt")).unwrap();
        std::os::unix::fs::symlink(
            dir.path().join("inside.txt"),
            dir.path().join("inner-link.txt"),
        )
        .unwrap();
        std::fs::write(dir.path().join("notes.bin"), [0u8, 1, 2]).unwrap();
        let c = Corpus::read(&[dir.path().to_path_buf()]).unwrap();
        let ids: Vec<&str> = c.docs.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, vec!["j1", "j2", "inner-link.txt", "inside.txt"]);
        assert_eq!(c.skipped.len(), 1, "{:?}", c.skipped);
        assert!(c.skipped[0].reason.contains("element 2"));
        let ignored: Vec<String> = c
            .ignored
            .iter()
            .map(|s| s.path.file_name().unwrap().to_string_lossy().to_string())
            .collect();
        assert_eq!(ignored, vec!["link.txt", "notes.bin"]);
        assert!(c.ignored[0].reason.contains("outside the folder"));
        // asked to, it follows the link
        let c = Corpus::read_with(&[dir.path().to_path_buf()], true).unwrap();
        assert!(c.docs.iter().any(|d| d.text == "a file outside the folder"));
    }
}
