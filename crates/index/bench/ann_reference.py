"""Reference HNSW libraries for `ragfleet bench index --reference PYTHON`.

Reads the vectors, queries and exact top-k that the bench wrote, builds hnswlib and faiss HNSW
indexes with the same graph degree, construction beam and thread count, sweeps the search beam
and prints one JSON object per line: {"lib", "ef", "recall", "qps"} and {"lib", "build_s"}.
Searches run on one thread, like ragfleet's side of the bench.

Needs numpy, hnswlib and faiss-cpu (pip install numpy hnswlib faiss-cpu).
"""
import argparse
import json
import sys
import time

import numpy as np


def load(d, name, dtype, cols):
    a = np.fromfile(f"{d}/{name}", dtype=dtype)
    return a.reshape(-1, cols)


def recall(found, truth):
    k = truth.shape[1]
    hit = sum(len(set(f[:k].tolist()) & set(t.tolist())) for f, t in zip(found, truth))
    return hit / truth.size


def emit(obj):
    print(json.dumps(obj), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--dim", type=int, required=True)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--m", type=int, default=32)
    p.add_argument("--efc", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ef", default="10,16,32,64,128,256")
    p.add_argument("--libs", default="hnswlib,faiss")
    a = p.parse_args()
    xb = load(a.dir, "vectors.f32", np.float32, a.dim)
    xq = load(a.dir, "queries.f32", np.float32, a.dim)
    truth = load(a.dir, "truth.u32", np.uint32, a.k).astype(np.int64)
    efs = [int(x) for x in a.ef.split(",")]
    libs = a.libs.split(",")

    if "hnswlib" in libs:
        import hnswlib

        ix = hnswlib.Index(space="ip", dim=a.dim)
        t = time.perf_counter()
        ix.init_index(max_elements=len(xb), M=a.m, ef_construction=a.efc, random_seed=1)
        ix.add_items(xb, np.arange(len(xb)), num_threads=a.threads)
        emit({"lib": "hnswlib", "build_s": time.perf_counter() - t})
        ix.set_num_threads(1)
        for ef in efs:
            ix.set_ef(max(ef, a.k))
            t = time.perf_counter()
            labels, _ = ix.knn_query(xq, k=a.k, num_threads=1)
            dt = time.perf_counter() - t
            emit({"lib": "hnswlib", "ef": ef, "recall": recall(labels, truth), "qps": len(xq) / dt})
        del ix

    if "faiss" in libs:
        import faiss

        faiss.omp_set_num_threads(a.threads)
        ix = faiss.IndexHNSWFlat(a.dim, a.m, faiss.METRIC_INNER_PRODUCT)
        ix.hnsw.efConstruction = a.efc
        t = time.perf_counter()
        ix.add(xb)
        emit({"lib": "faiss", "build_s": time.perf_counter() - t})
        faiss.omp_set_num_threads(1)
        for ef in efs:
            ix.hnsw.efSearch = max(ef, a.k)
            t = time.perf_counter()
            _, labels = ix.search(xq, a.k)
            dt = time.perf_counter() - t
            emit({"lib": "faiss", "ef": ef, "recall": recall(labels, truth), "qps": len(xq) / dt})


if __name__ == "__main__":
    sys.exit(main())
