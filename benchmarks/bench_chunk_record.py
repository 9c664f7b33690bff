"""What the chunk record (SHA-256 of the file + one manifest update) costs the writer: prints a table, writes JSON.

Writes the same ~2M-row routes table (E=256, top-8, float16 weights, from ``tracekit.synth``: skewed, compressible
like real traces) with ``write_chunk`` as ``tracekit collect`` does, interleaved: with the record (hash + manifest
update) and without (hash stubbed, no manifest). Also times ``file_sha256`` alone on the written chunk.

    python benchmarks/bench_chunk_record.py [--rows 2000000] [--repeats 6] [--out benchmarks/out/bench_chunk_record.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

import tracekit.store as store
from tracekit.synth import generate_run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/bench_chunk_record.json"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "src"
        generate_run(src, num_experts=256, top_k=8, moe_layers=range(3, 61), requests=max(1, a.rows // 58 // 400),
                     prompt_tokens=(300, 500), decode_tokens=(0, 1), weights=True, seed=0)
        table = pa.concat_tables([pq.read_table(f) for f in sorted((src / "routes").glob("*.parquet"))])
    table = table.slice(0, a.rows)
    real_sha = store.file_sha256
    times = {"with": [], "without": []}
    size = hash_s = 0.0
    for i in range(a.repeats * 2):
        mode = ("with", "without")[(i + i // 2) % 2]  # ABBA order: drift on a shared machine hits both alike
        store.file_sha256 = real_sha if mode == "with" else (lambda p: "")
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            if mode == "with":
                store.write_manifest(d, {"run_id": "bench", "status": "running", "chunks": {}})
            t0 = time.perf_counter()
            out = store.write_chunk(d, table, chunk=0, requests=range(10))
            times[mode].append(time.perf_counter() - t0)
            if mode == "with":
                size = out.stat().st_size
                t1 = time.perf_counter()
                real_sha(out)
                hash_s = time.perf_counter() - t1
    store.file_sha256 = real_sha
    w, wo = statistics.median(times["with"]), statistics.median(times["without"])
    result = {"rows": table.num_rows, "chunk_bytes": size, "bytes_per_row": size / table.num_rows,
              "median_s_with_record": w, "median_s_without": wo, "rows_per_s_with_record": table.num_rows / w,
              "rows_per_s_without": table.num_rows / wo, "overhead_pct": 100 * (w - wo) / wo,
              "sha256_alone_s": hash_s, "sha256_share_of_write_pct": 100 * hash_s / w, "repeats": a.repeats}
    print(f"{'':<28}{'with record':>14}{'without':>14}")
    print(f"{'median write s':<28}{w:>14.3f}{wo:>14.3f}")
    print(f"{'rows/s':<28}{table.num_rows / w:>14,.0f}{table.num_rows / wo:>14,.0f}")
    print(f"chunk {size / 1e6:.1f} MB ({size / table.num_rows:.2f} B/row); sha256 alone {hash_s:.3f} s "
          f"= {result['sha256_share_of_write_pct']:.1f}% of the write; end-to-end overhead {result['overhead_pct']:+.1f}%")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
