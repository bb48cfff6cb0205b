#!/usr/bin/env python3
"""Builds examples/corpus/rust-book.jsonl: sections of The Rust Programming Language
(MIT OR Apache-2.0), from the HTML of the toolchain's rust-docs component.

Usage: python3 examples/corpus/make_rust_book.py [BOOK_HTML_DIR] > examples/corpus/rust-book.jsonl
"""
import html, json, os, re, subprocess, sys

CHAPTERS = ["ch04-01-what-is-ownership", "ch04-02-references-and-borrowing", "ch04-03-slices",
            "ch09-02-recoverable-errors-with-result", "ch09-01-unrecoverable-errors-with-panic",
            "ch10-02-traits", "ch10-03-lifetime-syntax", "ch15-01-box", "ch15-04-rc",
            "ch16-01-threads", "ch16-02-message-passing", "ch16-03-shared-state",
            "ch18-02-trait-objects", "ch08-01-vectors", "ch08-03-hash-maps", "ch06-02-match"]
MAX_CHARS = 1400

def text_of(fragment):
    fragment = re.sub(r"<pre.*?</pre>", " ", fragment, flags=re.S)  # code blocks out: prose only
    fragment = re.sub(r"<[^>]+>", " ", fragment)
    return re.sub(r"\s+", " ", html.unescape(fragment)).strip()

def main():
    book = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        subprocess.check_output(["rustc", "--print", "sysroot"], text=True).strip(), "share/doc/rust/html/book")
    for ch in CHAPTERS:
        page = open(os.path.join(book, ch + ".html"), encoding="utf-8").read()
        main_html = page.split("<main>", 1)[-1].split("</main>", 1)[0]
        m = re.search(r"<h[12] id.*?</h[12]>", main_html, re.S); title = text_of(m.group(0)) if m else ch
        parts = re.split(r"(<h[23].*?</h[23]>)", main_html, flags=re.S)
        sections = [(title, parts[0])]
        for i in range(1, len(parts) - 1, 2):
            sections.append((text_of(parts[i]), parts[i + 1]))
        for n, (head, body) in enumerate(sections):
            body = text_of(body)
            if len(body) < 250:
                continue
            if len(body) > MAX_CHARS:
                body = body[:MAX_CHARS].rsplit(". ", 1)[0] + "."
            print(json.dumps({"id": f"{ch}#{n}", "title": head or title, "text": body}, ensure_ascii=False))

main()
