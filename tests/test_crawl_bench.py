"""bench.crawl on a tiny setting: every served JPEG is unique and stored unchanged, and the table prints the figures."""

from __future__ import annotations

import hashlib
import statistics

import pytest

from bench.crawl import TARGET_RATE_NO_LATENCY, TARGET_SPEEDUP_AT_LATENCY, CrawlBenchConfig, make_jpegs, run


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


def test_reported_figures_are_quotients_of_the_measured_counts_and_seconds(capsys):
    config = CrawlBenchConfig(images=6, latencies=(0.02, 0.0), workers=3, baseline_limit=4, repeats=3, distinct=2)
    results = run(config)
    out = capsys.readouterr().out
    assert [r["latency_ms"] for r in results] == [20.0, 0.0]
    for r in results:
        runs = r["crawler_runs_seconds"]
        assert len(runs) == 3 and r["crawler_seconds"] == pytest.approx(statistics.median(runs), abs=1e-3)
        crawler_rate = r["images"] / r["crawler_seconds"]
        sequential_rate = r["sequential_images"] / r["sequential_seconds"]
        # Each figure is rounded once, from the measured seconds; the reported seconds are those rounded to 1 ms,
        # so a quotient recomputed from them may be off by the relative error that 0.5 ms rounding makes.
        crawler_slack = crawler_rate * 0.0005 / (r["crawler_seconds"] - 0.0005)
        sequential_slack = sequential_rate * 0.0005 / (r["sequential_seconds"] - 0.0005)
        assert r["crawler_images_per_second"] == pytest.approx(crawler_rate, abs=0.05 + crawler_slack)
        assert r["sequential_images_per_second"] == pytest.approx(sequential_rate, abs=0.05 + sequential_slack)
        speedup = crawler_rate / sequential_rate
        speedup_slack = speedup * (crawler_slack / crawler_rate + sequential_slack / sequential_rate)
        assert r["speedup"] == pytest.approx(speedup, abs=0.05 + speedup_slack)
        assert r["stored"] == r["stored_unchanged"] == 6 and r["failed"] == 0
    # The server sleeps 20 ms before each answer, so 4 sequential downloads cannot take less than 80 ms.
    assert results[0]["sequential_seconds"] >= 4 * 0.02
    slow, fast = results
    speed_verdict = "met" if slow["speedup"] >= TARGET_SPEEDUP_AT_LATENCY else "NOT met"
    assert f"target at 20 ms: >= 20x sequential: {speed_verdict} ({slow['speedup']:.1f}x)" in out
    rate_verdict = "met" if fast["crawler_images_per_second"] >= TARGET_RATE_NO_LATENCY else "NOT met"
    assert f"target at 0 ms: >= 150 images/s stored unchanged: {rate_verdict} (" in out
