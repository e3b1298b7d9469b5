"""The crawl against its latency floor and against img2dataset 1.47.0, and the choice of the default --workers.

One local server (bench.crawl's, in its own process) serves N photo-like JPEGs of about 500x700 px with a fixed
added latency. In one run, alternating, each repeat times three commands end to end, start-up included:

- `python -m crawl LIST OUT --workers W` (a fresh OUT each time);
- img2dataset with W threads in one process, writing files without resizing or re-encoding (`--resize_mode no
  --skip_reencode True`: it still decodes each image), from its own venv (`make install-bench` makes
  .venv-img2dataset: it pins other pandas and OpenCV versions than this project);
Each command's start-up comes from the same run: the crawl's is its wall time less the `seconds` its crawl.json
reports (the download phase: workers, storing, the final manifest), so it is the interpreter, the imports, the list
validation and list.csv; img2dataset's is its wall time less count / rate of its own "total" line (it imports
pyarrow, albumentations..., and starts a worker process).

The latency floor is N x latency / W: what W connections cannot beat however little CPU they use. Reported per
repeat and as medians: (crawl - start-up) / floor (target <= 1.3) and img2dataset / crawl (target >= 1.8), the
latter also with each command's start-up taken off (img2dataset's is long: it imports pyarrow, albumentations...).

`--sweep` instead measures images per second of the crawl (in-process) against slower hosts (100-300 ms) for several
worker counts: the measurements behind the default --workers.

    python -m bench.crawl_peer                       # 1200 photos, 50 ms, 32 workers, 3 repeats
    python -m bench.crawl_peer --sweep               # 600 photos at 100/200/300 ms, 16..256 workers
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bench.crawl import REPO, ImageServer
from common.synthetic import jpeg_bytes, photo, photo_sizes, with_jpeg_comment
from crawl import manifest as mf
from crawl.crawler import CrawlConfig, crawl

IMG2DATASET = REPO / ".venv-img2dataset" / "bin" / "img2dataset"
TARGET_FLOOR_RATIO = 1.3
TARGET_PEER_SPEEDUP = 1.8


@dataclass(frozen=True, kw_only=True)
class PeerBenchConfig:
    """The comparison's settings: list size, added latency (s), workers for both, repeats, img2dataset's path."""

    images: int = 1200
    latency: float = 0.05
    workers: int = 32
    repeats: int = 3
    img2dataset: Path = IMG2DATASET
    seed: int = 0


def make_photos(n: int, distinct: int = 16, seed: int = 0) -> list[bytes]:
    """n unique JPEGs of photo-like pictures of about 500x700 px (quality 85, ~120 KB); `distinct` pictures, each
    served file made unique by a comment segment holding its index."""
    sizes = photo_sizes(min(n, distinct), 700, 500, seed=seed)
    bases = [jpeg_bytes(photo(h, w, seed=(seed, k), noise=15.0), quality=85) for k, (h, w) in enumerate(sizes)]
    return [with_jpeg_comment(bases[k % len(bases)], f"bench photo {k}".encode()) for k in range(n)]


def _serve(work: Path, images: list[bytes]) -> list[str]:
    served = work / "served"
    served.mkdir(exist_ok=True)
    names = [f"p{k:05d}.jpg" for k in range(len(images))]
    for name, data in zip(names, images, strict=True):
        (served / name).write_bytes(data)
    return names


def _timed(command: list[str], **kwargs) -> tuple[float, str]:
    """Wall seconds of a command, and its standard output."""
    start = time.perf_counter()
    done = subprocess.run(command, check=True, capture_output=True, text=True, **kwargs)
    return time.perf_counter() - start, done.stdout


_PEER_TOTAL = re.compile(r"^total\b.*images per sec: ([0-9.]+) - count: (\d+)", re.MULTILINE)


def _peer_download_seconds(stdout: str) -> float:
    """img2dataset's download phase, from its last "total - ... images per sec: R - count: N" line."""
    found = _PEER_TOTAL.findall(stdout)
    if not found:
        raise RuntimeError(f"no 'total' line in img2dataset's output:\n{stdout[-2000:]}")
    rate, count = found[-1]
    return int(count) / float(rate)


def _crawl_command(list_path: Path, out_dir: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "crawl", str(list_path), str(out_dir), "--workers", str(workers), "--retries", "0"]


def _img2dataset_command(url_file: Path, out_dir: Path, config: PeerBenchConfig) -> list[str]:
    return [
        str(config.img2dataset), "--url_list", str(url_file), "--input_format", "txt", "--output_folder", str(out_dir),
        "--output_format", "files", "--thread_count", str(config.workers), "--processes_count", "1",
        "--resize_mode", "no", "--skip_reencode", "True", "--timeout", "10", "--retries", "0",
        "--enable_wandb", "False", "--number_sample_per_shard", str(config.images),
    ]


def compare(config: PeerBenchConfig) -> dict:
    """Time the crawl, img2dataset and the crawl's start-up, alternating, `repeats` times; returns the figures."""
    if not Path(config.img2dataset).exists():
        raise FileNotFoundError(f"{config.img2dataset}: img2dataset is not installed (run `make install-bench`)")
    images = make_photos(config.images, seed=config.seed)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    # Without network, albumentations' update check (imported by img2dataset) waits for its timeout: turn it off.
    peer_env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    with tempfile.TemporaryDirectory(prefix="bench-crawl-peer-") as tmp:
        work = Path(tmp)
        names = _serve(work, images)
        server = ImageServer(work / "served", config.latency)
        try:
            urls = [server.url(name) for name in names]
            list_path, url_file = work / "list.csv", work / "urls.txt"
            pd.DataFrame({"id": [n[:-4] for n in names], "url": urls}).to_csv(list_path, index=False)
            url_file.write_text("".join(f"{u}\n" for u in urls))
            runs = []
            for repeat in range(config.repeats):
                out, peer_out = work / f"crawl{repeat}", work / f"peer{repeat}"
                crawl_seconds, _ = _timed(_crawl_command(list_path, out, config.workers), cwd=REPO, env=env)
                startup = crawl_seconds - mf.read_summary(out)["seconds"]
                peer_seconds, peer_stdout = _timed(
                    _img2dataset_command(url_file, peer_out, config), cwd=work, env=peer_env
                )
                peer_startup = peer_seconds - _peer_download_seconds(peer_stdout)
                runs.append(
                    {
                        "crawl_seconds": round(crawl_seconds, 3),
                        "img2dataset_seconds": round(peer_seconds, 3),
                        "startup_seconds": round(startup, 3),
                        "img2dataset_startup_seconds": round(peer_startup, 3),
                        "stored": len(list((out / "images").glob("*.jpg"))),
                        "img2dataset_stored": len(list(peer_out.rglob("*.jpg"))),
                    }
                )
                for folder in (out, peer_out):
                    shutil.rmtree(folder, ignore_errors=True)
        finally:
            server.close()
    floor = config.images * config.latency / config.workers
    for run in runs:
        run["floor_ratio"] = round((run["crawl_seconds"] - run["startup_seconds"]) / floor, 3)
        run["img2dataset_speedup"] = round(run["img2dataset_seconds"] / run["crawl_seconds"], 3)
        run["img2dataset_speedup_without_startup"] = round(
            (run["img2dataset_seconds"] - run["img2dataset_startup_seconds"])
            / (run["crawl_seconds"] - run["startup_seconds"]),
            3,
        )
    return {
        "images": config.images,
        "latency_ms": config.latency * 1000,
        "workers": config.workers,
        "floor_seconds": round(floor, 3),
        "mean_kb": round(sum(map(len, images)) / len(images) / 1000, 1),
        "runs": runs,
        "floor_ratio": statistics.median(r["floor_ratio"] for r in runs),
        "img2dataset_speedup": statistics.median(r["img2dataset_speedup"] for r in runs),
        "img2dataset_speedup_without_startup": statistics.median(
            r["img2dataset_speedup_without_startup"] for r in runs
        ),
    }


def print_comparison(result: dict) -> None:
    print(
        f"crawl vs img2dataset 1.47.0: {result['images']} photos of {result['mean_kb']:.0f} KB, "
        f"{result['latency_ms']:.0f} ms added latency, {result['workers']} workers/threads, {os.cpu_count()} CPU(s); "
        f"floor = {result['images']} x {result['latency_ms']:.0f} ms / {result['workers']} "
        f"= {result['floor_seconds']} s"
    )
    header = (
        f"{'run':>4} {'crawl s':>8} {'start-up':>9} {'img2dataset s':>14} {'start-up':>9} "
        f"{'(crawl-start)/floor':>20} {'img2dataset/crawl':>18} {'without start-ups':>18} {'stored':>13}"
    )
    print(header)
    print("-" * len(header))
    for k, r in enumerate(result["runs"], start=1):
        print(
            f"{k:>4} {r['crawl_seconds']:>8.2f} {r['startup_seconds']:>9.2f} {r['img2dataset_seconds']:>14.2f} "
            f"{r['img2dataset_startup_seconds']:>9.2f} {r['floor_ratio']:>19.2f}x {r['img2dataset_speedup']:>17.2f}x "
            f"{r['img2dataset_speedup_without_startup']:>17.2f}x "
            f"{r['stored']:>6}/{r['img2dataset_stored']:<6}"
        )
    ratio, speedup = result["floor_ratio"], result["img2dataset_speedup_without_startup"]
    print(f"median (crawl - start-up) / floor: {ratio:.2f}x, target <= {TARGET_FLOOR_RATIO}: "
          f"{'met' if ratio <= TARGET_FLOOR_RATIO else 'NOT met'}")
    print(f"median img2dataset / crawl, start-ups taken off: {speedup:.2f}x (end to end "
          f"{result['img2dataset_speedup']:.2f}x), target >= {TARGET_PEER_SPEEDUP}: "
          f"{'met' if speedup >= TARGET_PEER_SPEEDUP else 'NOT met'}")


def sweep(images: int, latencies: tuple[float, ...], workers: tuple[int, ...], seed: int = 0) -> list[dict]:
    """Images per second of the crawl (in-process, fresh folders) for each latency and worker count."""
    photos = make_photos(images, seed=seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-crawl-sweep-") as tmp:
        work = Path(tmp)
        names = _serve(work, photos)
        for latency in latencies:
            server = ImageServer(work / "served", latency)
            try:
                list_path = work / "list.csv"
                pd.DataFrame({"id": [n[:-4] for n in names], "url": [server.url(n) for n in names]}).to_csv(
                    list_path, index=False
                )
                for count in workers:
                    out = work / f"out-{latency}-{count}"
                    start = time.perf_counter()
                    summary = crawl(CrawlConfig(list_path=list_path, out_dir=out, workers=count, progress="off"))
                    seconds = time.perf_counter() - start
                    rows.append(
                        {
                            "latency_ms": latency * 1000,
                            "workers": count,
                            "seconds": round(seconds, 3),
                            "images_per_second": round(images / seconds, 1),
                            "floor_images_per_second": round(count / latency, 1),
                            "stored": summary["stored"],
                        }
                    )
                    shutil.rmtree(out, ignore_errors=True)
            finally:
                server.close()
    return rows


def print_sweep(rows: list[dict]) -> None:
    print(f"crawl images/s against slow hosts, {os.cpu_count()} CPU(s) (floor = workers / latency)")
    header = f"{'latency':>8} {'workers':>8} {'img/s':>8} {'floor img/s':>12} {'of floor':>9} {'stored':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        share = r["images_per_second"] / r["floor_images_per_second"]
        print(
            f"{r['latency_ms']:>6.0f}ms {r['workers']:>8} {r['images_per_second']:>8.1f} "
            f"{r['floor_images_per_second']:>12.1f} {share:>8.0%} {r['stored']:>7}"
        )


def main(argv: list[str] | None = None) -> dict | list[dict]:
    """CLI entry: the comparison (default) or the worker sweep (--sweep); prints the table, returns the figures."""
    parser = argparse.ArgumentParser(prog="python -m bench.crawl_peer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, help="photos in the list (1200; 600 with --sweep)")
    parser.add_argument("--latency", type=float, default=0.05, help="added latency in seconds (0.05)")
    parser.add_argument("--workers", type=int, default=32, help="crawl workers and img2dataset threads (32)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats (3)")
    parser.add_argument("--img2dataset", type=Path, default=IMG2DATASET, help=f"the executable ({IMG2DATASET})")
    parser.add_argument("--sweep", action="store_true", help="images/s at 100-300 ms for 16..256 workers instead")
    args = parser.parse_args(argv)
    if args.sweep:
        rows = sweep(args.images or 600, (0.1, 0.2, 0.3), (16, 32, 64, 128, 256))
        print_sweep(rows)
        return rows
    config = PeerBenchConfig(
        images=args.images or 1200,
        latency=args.latency,
        workers=args.workers,
        repeats=args.repeats,
        img2dataset=args.img2dataset,
    )
    result = compare(config)
    print_comparison(result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
