"""bench.crawl on a tiny setting: every served JPEG is unique and stored unchanged, and the table prints the figures."""

from __future__ import annotations

import hashlib

from bench.crawl import CrawlBenchConfig, make_jpegs, run


def test_served_jpegs_are_unique_and_photo_sized():
    images = make_jpegs(12, distinct=3, seed=1)
    assert len({hashlib.sha256(data).digest() for data in images}) == 12
    assert all(data.startswith(b"\xff\xd8\xff\xfe") for data in images)  # the comment comes first
    assert 50_000 < sum(map(len, images)) / len(images) < 200_000
    assert images == make_jpegs(12, distinct=3, seed=1)


def test_tiny_run_stores_every_image_unchanged_and_prints_it(capsys):
    config = CrawlBenchConfig(images=12, latencies=(0.0,), workers=4, baseline_limit=5, repeats=1, distinct=3)
    [result] = run(config)
    assert result["images"] == result["stored"] == result["stored_unchanged"] == 12
    assert result["failed"] == 0 and result["sequential_images"] == 5
    assert len(result["crawler_runs_seconds"]) == 1
    row = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("0ms")]
    assert len(row) == 1
    assert row[0].split()[:3] == ["0ms", "12", f"{result['crawler_images_per_second']:.1f}"]
    assert "12/12" in row[0] and f"{result['sequential_images_per_second']:.1f} (5)" in row[0]
