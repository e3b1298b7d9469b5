"""How the crawl's costs grow with the list: validation time and memory, crawl memory, checkpoint cost, at 10k-1M rows.

For each size N a JD list of N rows with 13 flag columns is written. Then, each in a fresh child process (so its
peak memory is its own, read from getrusage):

- validation: `parse_list` and the file-name stems, what `crawl` does before anything is fetched (target for 1M rows:
  under 60 s and under 2 GB peak);
- a crawl of the same ids from local files (`--root`: 1,000 small JPEGs, every id a row of its own and a file of its
  own in images/, hard-linked), with a checkpoint every second: wall time, peak memory, the CPU time of each
  checkpoint (thread time: the wall time of the main thread also counts its waits for the GIL behind 32 workers)
  and how many rows it appended, and the final compaction (manifest.csv written once from everything);
- for comparison, what one checkpoint cost before the journal: rewriting the whole manifest.csv of N rows (CPU).

    python -m bench.crawl_scale                      # 10k, 100k and 1M rows (the 1M crawl takes a while)
    python -m bench.crawl_scale --rows 10000 100000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.crawl import REPO
from common.synthetic import jpeg_bytes, photo

SOURCES = 1000  # distinct source files of the local crawl (each is hard-linked N / SOURCES times)
TARGET_VALIDATE_SECONDS = 60.0
TARGET_VALIDATE_MB = 2048.0

# Runs in the child: validation only.
_VALIDATE = """
import json, resource, sys, time
from pathlib import Path
start = time.perf_counter()
from crawl.crawler import _stems
from crawl.listfile import parse_list
path = Path(sys.argv[1])
parsed = parse_list(path)
stems = _stems(parsed, path)
print(json.dumps({"rows": len(parsed.items), "seconds": time.perf_counter() - start,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

# Runs in the child: the crawl, with its checkpoints and its compaction timed.
_CRAWL = """
import json, resource, sys, tempfile, time
from pathlib import Path
from crawl import crawler, manifest as mf
checkpoints, compactions = [], []
checkpoint, write_manifest = crawler._Crawl._checkpoint, crawler._Crawl._write_manifest
def timed_checkpoint(self):
    rows, start, cpu = len(self.unjournaled), time.perf_counter(), time.thread_time()
    checkpoint(self)
    checkpoints.append((time.thread_time() - cpu, rows, time.perf_counter() - start))
def timed_write_manifest(self):
    cpu = time.thread_time()
    write_manifest(self)
    compactions.append(time.thread_time() - cpu)
crawler._Crawl._checkpoint, crawler._Crawl._write_manifest = timed_checkpoint, timed_write_manifest
start = time.perf_counter()
summary = crawler.crawl(crawler.CrawlConfig(list_path=Path(sys.argv[1]), out_dir=Path(sys.argv[2]),
                                            root=Path(sys.argv[3]), checkpoint_every=1.0, progress="off"))
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
rows = [r for r in mf.read_stored_rows(sys.argv[2]).values()]
with tempfile.TemporaryDirectory() as tmp:
    cpu = time.thread_time()
    mf.write_manifest(tmp, rows, [])
    rewrite = time.thread_time() - cpu
busy = [c for c in checkpoints if c[1]]
print(json.dumps({"stored": summary["stored"], "seconds": seconds, "peak_mb": peak,
                  "checkpoints": len(checkpoints),
                  "checkpoint_ms_mean": 1000 * sum(c[0] for c in busy) / max(len(busy), 1),
                  "checkpoint_ms_max": 1000 * max((c[0] for c in checkpoints), default=0.0),
                  "checkpoint_wall_ms_max": 1000 * max((c[2] for c in checkpoints), default=0.0),
                  "rows_per_checkpoint": sum(c[1] for c in busy) / max(len(busy), 1),
                  "compaction_seconds": sum(compactions), "full_rewrite_seconds": rewrite}))
"""


def write_list(path: Path, rows: int, sources: int = SOURCES) -> None:
    """A headerless JD list: id, a path under the root (one of `sources` files), 13 flags (a pattern of the id)."""
    with open(path, "w", encoding="utf-8") as handle:
        for k in range(rows):
            flags = ",".join("1" if (k >> j) & 1 else "0" for j in range(13))
            handle.write(f"{k:08d},src/{k % sources:04d}.jpg,{flags}\n")


def write_sources(root: Path, sources: int = SOURCES) -> None:
    """`sources` distinct small JPEGs (48x32 photo-like pictures) under root/src."""
    (root / "src").mkdir(parents=True, exist_ok=True)
    for k in range(sources):
        (root / "src" / f"{k:04d}.jpg").write_bytes(jpeg_bytes(photo(32, 48, seed=k), quality=85))


def _child(code: str, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(rows: int, work: Path, crawl: bool = True) -> dict:
    """Validation (and, with `crawl`, the local crawl) of an N-row list, each in its own child process."""
    list_path = work / f"list-{rows}.csv"
    write_list(list_path, rows)
    result = {"rows": rows, "validate": _child(_VALIDATE, str(list_path))}
    if crawl:
        out = work / f"out-{rows}"
        result["crawl"] = _child(_CRAWL, str(list_path), str(out), str(work / "root"))
        subprocess.run(["rm", "-rf", str(out)], check=True)
    list_path.unlink()
    return result


def print_table(results: list[dict]) -> None:
    print(f"crawl cost against list length, {os.cpu_count()} CPU(s); local files, a checkpoint every second")
    header = (
        f"{'rows':>9} {'validate s':>11} {'peak MB':>8} {'crawl s':>8} {'peak MB':>8} {'checkpoints':>12} "
        f"{'rows/ckpt':>10} {'cpu ms/ckpt':>12} {'max ms':>7} {'compaction s':>13} {'full rewrite s':>15}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        v, c = r["validate"], r.get("crawl")
        line = f"{r['rows']:>9} {v['seconds']:>11.1f} {v['peak_mb']:>8.0f}"
        if c:
            line += (
                f" {c['seconds']:>8.1f} {c['peak_mb']:>8.0f} {c['checkpoints']:>12} {c['rows_per_checkpoint']:>10.0f}"
                f" {c['checkpoint_ms_mean']:>12.1f} {c['checkpoint_ms_max']:>7.1f} {c['compaction_seconds']:>13.2f}"
                f" {c['full_rewrite_seconds']:>15.2f}"
            )
        print(line)
    largest = max(results, key=lambda r: r["rows"])["validate"]
    ok = largest["seconds"] < TARGET_VALIDATE_SECONDS and largest["peak_mb"] < TARGET_VALIDATE_MB
    print(f"validation of {max(r['rows'] for r in results)} rows: {largest['seconds']:.1f} s, "
          f"{largest['peak_mb']:.0f} MB peak; target < 60 s and < 2 GB: {'met' if ok else 'NOT met'}")


def main(argv: list[str] | None = None) -> list[dict]:
    """CLI entry: measure each --rows size, print the table, return the figures."""
    parser = argparse.ArgumentParser(prog="python -m bench.crawl_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="list sizes")
    parser.add_argument("--no-crawl", action="store_true", help="measure validation only")
    parser.add_argument("--work", type=Path, help="folder for the lists and DATA_DIRs (a temporary one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-crawl-scale-", dir=args.work) as tmp:
        work = Path(tmp)
        write_sources(work / "root")
        results = []
        for rows in args.rows:
            results.append(measure(rows, work, crawl=not args.no_crawl))
            print(json.dumps(results[-1]), flush=True)
    print_table(results)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
