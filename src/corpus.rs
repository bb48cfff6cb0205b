//! Reading documents to ingest: BEIR `corpus.jsonl` (`_id`, `title`, `text`), JSON lines with
//! `id`/`text` (and optional `title`), and `.txt` / `.md` files or folders of them.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ragfleet_proto::Document;

/// A record that could not be read.
#[derive(Debug, Clone)]
pub struct Skipped {
    /// File.
    pub path: PathBuf,
    /// 1-based line (0 for a whole file).
    pub line: usize,
    /// Why.
    pub reason: String,
}

/// Documents and skipped records of some paths.
#[derive(Debug, Default)]
pub struct Corpus {
    /// Documents in file order.
    pub docs: Vec<Document>,
    /// Records skipped.
    pub skipped: Vec<Skipped>,
}

fn parse_line(line: &str) -> Result<Document, String> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
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

impl Corpus {
    /// Reads every path; an unreadable path is an error, a bad record is skipped and reported.
    pub fn read(paths: &[PathBuf]) -> Result<Corpus> {
        let mut c = Corpus::default();
        for p in paths {
            c.add_path(p, p)?;
        }
        Ok(c)
    }

    /// Reads JSON lines from a string (the bundled corpus).
    pub fn read_str(text: &str, name: &str) -> Corpus {
        let mut c = Corpus::default();
        c.add_lines(text, Path::new(name));
        c
    }

    fn add_lines(&mut self, text: &str, p: &Path) {
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match parse_line(line) {
                Ok(d) => self.docs.push(d),
                Err(reason) => self.skipped.push(Skipped {
                    path: p.to_path_buf(),
                    line: i + 1,
                    reason,
                }),
            }
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
                let ext = e.extension().and_then(|x| x.to_str()).unwrap_or("");
                if e.is_dir() || matches!(ext, "jsonl" | "txt" | "md") {
                    self.add_path(root, &e)?;
                }
            }
            return Ok(());
        }
        let ext = p.extension().and_then(|x| x.to_str()).unwrap_or("");
        match ext {
            "jsonl" | "json" => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read {}", p.display()))?;
                self.add_lines(&text, p);
            }
            "txt" | "md" => {
                let bytes =
                    std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
                let Ok(text) = String::from_utf8(bytes) else {
                    self.skipped.push(Skipped {
                        path: p.to_path_buf(),
                        line: 0,
                        reason: "not UTF-8 text".into(),
                    });
                    return Ok(());
                };
                if text.trim().is_empty() {
                    self.skipped.push(Skipped {
                        path: p.to_path_buf(),
                        line: 0,
                        reason: "empty file".into(),
                    });
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
                self.docs.push(Document {
                    id: id.display().to_string(),
                    title,
                    text,
                });
            }
            other => bail!(
                "{}: unsupported file type {other:?} (use .jsonl, .txt, .md or a folder)",
                p.display()
            ),
        }
        Ok(())
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
}
