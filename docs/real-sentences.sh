#!/usr/bin/env bash
# A million real English sentences for `ragfleet bench shard --vectors/--texts` (session 51):
# the text of Debian's dictionaries and manuals (GCIDE, WordNet, FOLDOC, the Jargon File,
# fortunes, the Linux kernel's, Python's, Perl's, PostgreSQL's, Git's, glibc's, OpenSSL's,
# SQLite's, Node's, Erlang's, GTK's, Ruby's, Bash's, binutils' and Emacs' documentation, man
# pages), split into sentences of 6-60 words, mostly ASCII letters, code-like ones dropped,
# each kept once (case-insensitive), shuffled with a fixed seed (a few lines keep markup the
# filters miss, e.g. HTML inside a text file or a man page's escapes). Needs apt (Debian 12) and
# python3; writes DIR/lines.txt (1,001,000 lines: the first million the shard's rows, the last
# 1,000 the queries) and DIR/sentences.txt (all of them).
#
#   bash docs/real-sentences.sh /tmp/realtext
#   ragfleet embed --input /tmp/realtext/lines.txt --fvecs /tmp/realtext/real1m.fvecs
#   ragfleet bench shard --sizes 10000,100000,1000000 --queries 1000 \
#       --vectors /tmp/realtext/real1m.fvecs --texts /tmp/realtext/lines.txt
set -euo pipefail
dir=${1:?usage: real-sentences.sh DIR}
mkdir -p "$dir/debs" "$dir/root"
cd "$dir/debs"
debs=(dict-gcide dict-wn dict-foldoc dict-jargon fortunes manpages manpages-dev
    linux-doc-6.1 python3.11-doc perl-doc postgresql-doc-15 git-doc glibc-doc
    debian-reference-en emacs-common libssl-doc sqlite3-doc nodejs-doc erlang-doc
    libgtk-3-doc bash-doc binutils-doc ruby3.1-doc)
# package lists older than a security update name a version the mirror no longer has (404):
# refreshed once, then asked again (session 52 met it with linux-doc-6.1)
apt-get download -qq "${debs[@]}" || { apt-get update -qq && apt-get download -qq "${debs[@]}"; }
for f in *.deb; do dpkg-deb -x "$f" ../root; done
cd "$dir"
python3 - "$dir" <<'PY'
import gzip, html, os, random, re, sys

out_dir = sys.argv[1]
root = os.path.join(out_dir, "root")
ws = re.compile(r"\s+")
split = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
code = ("::", "==", "{", "}", "->", "();", "/*", "$ ", "#include")


def documents():
    for dirpath, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            p = os.path.join(dirpath, f)
            if "/translations/" in p or p.endswith((".el", ".el.gz")):
                continue
            try:
                if f.endswith(".dict.dz"):
                    yield "dict", gzip.open(p, "rt", errors="ignore").read()
                elif f.endswith(".gz"):
                    kind = "man" if "/man/" in p else "text"
                    yield kind, gzip.open(p, "rt", errors="ignore").read()
                elif f.endswith(".html"):
                    yield "html", open(p, errors="ignore").read()
                elif f.endswith((".txt", ".pod", ".rst")):
                    yield "text", open(p, errors="ignore").read()
                elif "/fortunes/" in p and "." not in f:
                    yield "text", open(p, errors="ignore").read().replace("\n%\n", "\n\n")
            except OSError:
                continue


def paragraphs(kind, t):
    if kind == "html":
        t = re.sub(r"(?s)<(script|style|pre)[^>]*>.*?</\1>", " ", t)
        t = html.unescape(re.sub(r"<[^>]+>", " ", t))
    elif kind == "man":
        t = "\n".join(
            l for l in t.split("\n")
            if not l.startswith((".", "'")) or l.startswith((".B ", ".I "))
        )
        t = re.sub(r"\\f[BIRP]|\\\(..|\\[-&e]", " ", t)
        t = re.sub(r"^\.[BI] ", "", t, flags=re.M)
    elif kind == "dict":
        t = re.sub(r"[{}\[\]]", " ", t)
    for para in re.split(r"\n\s*\n", t):
        yield ws.sub(" ", para).strip()


seen, kept = set(), []
for kind, t in documents():
    for para in paragraphs(kind, t):
        for s in split.split(para):
            s = s.strip()
            if not 6 <= len(s.split()) <= 60 or not s[:1].isalpha():
                continue
            if sum(c.isalpha() for c in s) < 0.7 * len(s.replace(" ", "")):
                continue
            if sum(ord(c) > 127 for c in s) > 0.05 * len(s) or any(x in s for x in code):
                continue
            if s.lower() not in seen:
                seen.add(s.lower())
                kept.append(s)
with open(os.path.join(out_dir, "sentences.txt"), "w") as f:
    f.write("\n".join(kept) + "\n")
random.Random(51).shuffle(kept)
with open(os.path.join(out_dir, "lines.txt"), "w") as f:
    f.write("\n".join(kept[:1_001_000]) + "\n")
print(f"{len(kept)} sentences; {min(len(kept), 1_001_000)} in lines.txt")
PY
