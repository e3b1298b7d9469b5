"""Benchmark the crawl stage: images per second of `crawl` against a sequential urllib loop, on one local server.

A separate process serves N JPEGs of about 100 KB from memory with a configurable added latency per request (a
threaded server, so the latency overlaps across connections like real hosts). For each latency the same list is
downloaded by `crawl.crawler.crawl` (thread pool, pooled keep-alive connections, validation, hashing, atomic
writes, manifest; the median of a few runs into fresh directories) and once by the simplest baseline, a
sequential `urllib.request.urlopen` loop that writes each body to a file. The crawler's stored files are checked
to be the served bytes, unchanged.

    python -m bench.crawl                      # 1000 images at 50 ms and at 0 ms added latency, then
                                               # bench.crawl_peer: the latency floor and img2dataset
    python -m bench.crawl --images 200 --latency 0.05 --baseline-limit 100
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from common.synthetic import jpeg_bytes, photo, with_jpeg_comment
from crawl import manifest as mf
from crawl.crawler import CrawlConfig, crawl

REPO = Path(__file__).resolve().parents[1]
TARGET_SPEEDUP_AT_LATENCY = 20.0  # at 50 ms and 1,000 images
TARGET_RATE_NO_LATENCY = 150.0  # images per second, on 2 cores


@dataclass(frozen=True, kw_only=True)
class CrawlBenchConfig:
    """What to measure: list size, latencies (seconds), crawler workers, and how much of the list the slow
    sequential baseline downloads (None: all of it)."""

    images: int = 1000
    latencies: tuple[float, ...] = (0.05, 0.0)
    workers: int = 32
    baseline_limit: int | None = None
    repeats: int = 3  # crawler runs per latency (fresh output each time); the median is reported
    distinct: int = 16  # distinct pictures; every served file is still unique (a comment segment holds its index)
    seed: int = 0


def make_jpegs(n: int, distinct: int = 16, seed: int = 0) -> list[bytes]:
    """n unique baseline JPEGs of about 100 KB (640x480 synthetic photos, quality 85).

    Only `distinct` pictures are drawn; each served file still differs, by a comment segment holding its index
    (after the start marker: still a plain baseline JPEG, which the crawler stores byte for byte).
    """
    bases = [jpeg_bytes(photo(480, 640, seed=(seed, k), noise=15.0), quality=85) for k in range(min(n, distinct))]
    return [with_jpeg_comment(bases[k % len(bases)], f"bench image {k}".encode()) for k in range(n)]


def serve_forever(root: str, latency: float) -> None:
    """Server process: answer GET /<name> from memory after `latency` seconds (keep-alive, HTTP/1.1).

    Prints the port on stdout once listening.
    """
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    files = {f"/{p.name}": p.read_bytes() for p in Path(root).iterdir()}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # the name http.server calls
            body = files.get(self.path)
            if latency:
                time.sleep(latency)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 1024  # the default 5 would make concurrent connects wait for SYN retransmits

    server = Server(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


class ImageServer:
    """The benchmark's server in its own process (so it does not share the crawler's interpreter lock)."""

    def __init__(self, root: Path, latency: float):
        code = "import sys; from bench.crawl import serve_forever; serve_forever(sys.argv[1], float(sys.argv[2]))"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        self.process = subprocess.Popen(
            [sys.executable, "-c", code, str(root), str(latency)], stdout=subprocess.PIPE, text=True, env=env
        )
        line = self.process.stdout.readline()
        if not line.strip().isdigit():
            self.process.kill()
            raise RuntimeError("benchmark server did not start")
        self.port = int(line)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def sequential_urllib(urls: list[str], out_dir: Path) -> float:
    """The baseline: one urlopen per image, one after the other, each body written to a file. Returns seconds."""
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for k, url in enumerate(urls):
        with urllib.request.urlopen(url, timeout=30) as response:
            data = response.read()
        with open(out_dir / f"{k}.jpg", "wb") as handle:
            handle.write(data)
    return time.perf_counter() - start


def run_once(work: Path, names: list[str], served: dict[str, bytes], latency: float, config: CrawlBenchConfig) -> dict:
    """Crawler and sequential loop on the same list at one latency."""
    server = ImageServer(work / "served", latency)
    try:
        tag = f"{int(latency * 1000)}ms"
        urls = [server.url(name) for name in names]
        list_path = work / f"list-{tag}.csv"
        pd.DataFrame({"id": [n.rsplit(".", 1)[0] for n in names], "url": urls}).to_csv(list_path, index=False)
        runs = []
        for repeat in range(config.repeats):
            out_dir = work / f"crawl-{tag}-{repeat}"
            start = time.perf_counter()
            summary = crawl(
                CrawlConfig(list_path=list_path, out_dir=out_dir, workers=config.workers, progress="off")
            )
            runs.append(time.perf_counter() - start)
        crawl_seconds = statistics.median(runs)
        expected = {n.rsplit(".", 1)[0]: hashlib.sha256(served[n]).hexdigest() for n in names}
        unchanged = sum(
            row.sha256 == expected[row.id]
            and hashlib.sha256((out_dir / row.path).read_bytes()).hexdigest() == expected[row.id]
            for row in mf.read_stored_rows(out_dir).values()
        )
        baseline_urls = urls[: config.baseline_limit] if config.baseline_limit else urls
        sequential_seconds = sequential_urllib(baseline_urls, work / f"sequential-{tag}")
    finally:
        server.close()
    crawler_rate = len(names) / crawl_seconds
    sequential_rate = len(baseline_urls) / sequential_seconds
    return {
        "latency_ms": latency * 1000,
        "images": len(names),
        "crawler_seconds": round(crawl_seconds, 3),
        "crawler_runs_seconds": [round(r, 3) for r in runs],
        "crawler_images_per_second": round(crawler_rate, 1),
        "sequential_images": len(baseline_urls),
        "sequential_seconds": round(sequential_seconds, 3),
        "sequential_images_per_second": round(sequential_rate, 1),
        "speedup": round(crawler_rate / sequential_rate, 1),
        "stored": summary["stored"],
        "stored_unchanged": unchanged,
        "failed": summary["failed"],
    }


def print_table(results: list[dict], mean_kb: float, workers: int) -> None:
    print(
        f"crawl benchmark: {os.cpu_count()} CPU(s), {workers} workers, JPEGs of {mean_kb:.0f} KB on average, "
        f"crawler rate = median of {len(results[0]['crawler_runs_seconds'])} runs"
    )
    header = (
        f"{'latency':>8} {'images':>7} {'crawler img/s':>14} {'sequential img/s':>17} {'speedup':>8} {'unchanged':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        sequential = f"{r['sequential_images_per_second']:.1f}"
        if r["sequential_images"] != r["images"]:
            sequential += f" ({r['sequential_images']})"
        print(
            f"{r['latency_ms']:>6.0f}ms {r['images']:>7} {r['crawler_images_per_second']:>14.1f} {sequential:>17} "
            f"{r['speedup']:>7.1f}x {r['stored_unchanged']:>5}/{r['images']:<4}"
        )
    for r in results:
        if r["latency_ms"] > 0:
            ok = r["speedup"] >= TARGET_SPEEDUP_AT_LATENCY
            print(f"target at {r['latency_ms']:.0f} ms: >= {TARGET_SPEEDUP_AT_LATENCY:.0f}x sequential: "
                  f"{'met' if ok else 'NOT met'} ({r['speedup']:.1f}x)")
        else:
            ok = r["crawler_images_per_second"] >= TARGET_RATE_NO_LATENCY and r["stored_unchanged"] == r["images"]
            print(f"target at 0 ms: >= {TARGET_RATE_NO_LATENCY:.0f} images/s stored unchanged: "
                  f"{'met' if ok else 'NOT met'} ({r['crawler_images_per_second']:.1f} img/s, "
                  f"{r['stored_unchanged']}/{r['images']} unchanged)")


def run(config: CrawlBenchConfig) -> list[dict]:
    """Measure every latency of `config`; returns one dict of figures per latency."""
    images = make_jpegs(config.images, config.distinct, config.seed)
    with tempfile.TemporaryDirectory(prefix="bench-crawl-") as tmp:
        work = Path(tmp)
        served_dir = work / "served"
        served_dir.mkdir()
        names = [f"img{k:05d}.jpg" for k in range(len(images))]
        served = dict(zip(names, images, strict=True))
        for name, data in served.items():
            (served_dir / name).write_bytes(data)
        results = [run_once(work, names, served, latency, config) for latency in config.latencies]
    print_table(results, sum(map(len, images)) / len(images) / 1000, config.workers)
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    """CLI entry (also called by `python -m bench`): parse flags, run, print the table, return the figures."""
    parser = argparse.ArgumentParser(prog="python -m bench.crawl", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="images in the list (1000)")
    parser.add_argument(
        "--latency", type=float, action="append", help="added server latency in seconds; repeatable (0.05 and 0)"
    )
    parser.add_argument("--workers", type=int, default=32, help="crawler workers (32)")
    parser.add_argument("--repeats", type=int, default=3, help="crawler runs per latency; the median counts (3)")
    parser.add_argument(
        "--baseline-limit", type=int, help="download only the first N images in the sequential loop (all)"
    )
    parser.add_argument(
        "--no-peer", dest="peer", action="store_false", help="skip the floor and img2dataset comparison"
    )
    args = parser.parse_args(argv)
    config = CrawlBenchConfig(
        images=args.images,
        latencies=tuple(args.latency) if args.latency else CrawlBenchConfig.latencies,
        workers=args.workers,
        baseline_limit=args.baseline_limit,
        repeats=args.repeats,
    )
    results = run(config)
    if args.peer:
        # The same figures as `python -m bench.crawl_peer`: the latency floor and img2dataset, in this run.
        from bench import crawl_peer

        if crawl_peer.IMG2DATASET.exists():
            print()
            crawl_peer.print_comparison(crawl_peer.compare(crawl_peer.PeerBenchConfig(workers=args.workers)))
        else:
            print(f"\n{crawl_peer.IMG2DATASET} not found: run `make install-bench` to compare with img2dataset")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
