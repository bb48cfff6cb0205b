"""Reference implementations for `ragfleet bench {embed,rerank,generate,ingest} --reference PYTHON`.

Runs the original PyTorch implementations (sentence-transformers / transformers, CPU, f32) on
the inputs and thread count the Rust side used, and prints one JSON object per line.
Needs: pip install sentence-transformers gguf accelerate (torch comes with sentence-transformers).
"""
import argparse
import json
import os
import sys
import time


def emit(obj):
    print(json.dumps(obj), flush=True)


def rate(fn, items, secs):
    fn()  # warm-up
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < secs or n < 2:
        fn()
        n += 1
    return n * items / (time.perf_counter() - t)


def embed(a):
    from sentence_transformers import SentenceTransformer

    m = SentenceTransformer(a.model, device="cpu")
    m.max_seq_length = 256
    for name, text in (("short", a.short), ("256-tok", a.long)):
        for b in [int(x) for x in a.batches.split(",")]:
            if name == "256-tok" and b == 256:
                continue
            texts = [text] * b
            r = rate(lambda: m.encode(texts, batch_size=b, convert_to_numpy=True), b, a.secs)
            emit({"input": name, "batch": b, "rate": r})


def encode(a):
    """Encodes every text of a JSON list once (after a warm-up batch): `bench ingest`'s
    reference, the same chunks the ingest embedded."""
    from sentence_transformers import SentenceTransformer

    m = SentenceTransformer(a.model, device="cpu")
    m.max_seq_length = 256
    texts = json.load(open(a.texts))
    m.encode(texts[: a.batch], batch_size=a.batch, convert_to_numpy=True)
    t = time.perf_counter()
    m.encode(texts, batch_size=a.batch, convert_to_numpy=True)
    secs = time.perf_counter() - t
    emit({"texts": len(texts), "seconds": secs, "rate": len(texts) / secs})


def make_cross_encoder(a):
    """A MiniLM-sized BertForSequenceClassification (the MiniLM encoder, a seeded head)."""
    import shutil

    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    m = BertForSequenceClassification.from_pretrained(a.model, num_labels=1)
    m.save_pretrained(a.out, safe_serialization=True)
    for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.exists(os.path.join(a.model, f)):
            shutil.copy(os.path.join(a.model, f), a.out)
    emit({"made": a.out})


def rerank(a):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model)
    m = AutoModelForSequenceClassification.from_pretrained(a.model).eval()
    passages = [a.long] * a.batch
    queries = [a.short] * a.batch

    def run():
        x = tok(queries, passages, truncation="only_second", max_length=256,
                padding=True, return_tensors="pt")
        with torch.no_grad():
            m(**x).logits

    emit({"batch": a.batch, "rate": rate(run, a.batch, a.secs)})


def generate(a):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = os.path.split(a.gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    prompts = a.prompts.split("\n")
    for streams in (1, 4):
        ps = prompts[:streams]
        chats = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                         add_generation_prompt=True) for p in ps]
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        x = tok(chats, return_tensors="pt", padding=True)
        with torch.no_grad():
            t = time.perf_counter()
            m.generate(**x, max_new_tokens=1, do_sample=False)
            ttft = time.perf_counter() - t
            t = time.perf_counter()
            out = m.generate(**x, max_new_tokens=a.tokens, do_sample=False)
            dt = time.perf_counter() - t
        new = out[:, x["input_ids"].shape[1]:]
        eos = tok.eos_token_id
        n = 0
        for row in new.tolist():
            n += next((i for i, t in enumerate(row) if t == eos), len(row))
        emit({"streams": streams, "ttft": ttft, "rate": n / dt})
    if a.long:
        x = tok(a.long, return_tensors="pt", add_special_tokens=False)
        best = float("inf")
        with torch.no_grad():
            for _ in range(3):
                t = time.perf_counter()
                m(**x)
                best = min(best, time.perf_counter() - t)
        emit({"prefill_tokens": x["input_ids"].shape[1], "prefill_s": best})


def main():
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["embed", "encode", "make-cross-encoder", "rerank", "generate"])
    p.add_argument("--model")
    p.add_argument("--out")
    p.add_argument("--gguf")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--secs", type=float, default=2.0)
    p.add_argument("--batches", default="1,8,64,256")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--short", default="")
    p.add_argument("--long", default="")
    p.add_argument("--prompts", default="")
    p.add_argument("--texts", default="")
    a = p.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    {"embed": embed, "encode": encode, "make-cross-encoder": make_cross_encoder, "rerank": rerank,
     "generate": generate}[a.what](a)


if __name__ == "__main__":
    sys.exit(main())
