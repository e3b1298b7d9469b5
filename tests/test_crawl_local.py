"""Local image files as a crawl source: --root paths, a folder of class sub-folders, and the same result as HTTP."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pandas as pd
import pytest

from crawl import crawler
from crawl import local as local_module
from crawl import manifest as mf
from crawl.__main__ import main as crawl_main
from crawl.crawler import CrawlConfig, CrawlInterrupted, _Crawl, crawl, thread_count
from crawl.listfile import ListItem
from tests import crawl_samples as samples
from tests.http_server import static

JPEG = samples.jpeg(75, 50, seed=3)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def config(list_path: Path, out_dir: Path, **overrides) -> CrawlConfig:
    settings = dict(workers=4, timeout=2.0, retries=0, progress="off")
    settings.update(overrides)
    return CrawlConfig(list_path=list_path, out_dir=out_dir, **settings)


def write_list(path: Path, rows: list[tuple[str, str]]) -> Path:
    pd.DataFrame(rows, columns=["id", "url"]).to_csv(path, index=False)
    return path


def tables(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    manifest = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False).set_index("id")
    failed = pd.read_csv(out / "failed.csv", dtype=str, keep_default_na=False).set_index("id")
    return manifest, failed


def test_root_reads_relative_and_absolute_paths_and_stores_jpegs_as_hard_links(tmp_path, http_server):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    (root / "a.jpg").write_bytes(JPEG)
    (root / "sub" / "b.png").write_bytes(samples.rgba_png())
    (root / "c.jpg").write_bytes(samples.jpeg(seed=4))
    web = http_server.route("/w.jpg", static(samples.jpeg(seed=5)))
    rows = [("a", "a.jpg"), ("b", "./sub/b.png"), ("c", str(root / "c.jpg")), ("w", web)]
    out = tmp_path / "out"
    summary = crawl(config(write_list(tmp_path / "list.csv", rows), out, root=root))

    assert (summary["stored"], summary["failed"], summary["converted"]) == (4, 0, 1)
    assert summary["settings"]["root"] == str(root)
    manifest, failed = tables(out)
    assert failed.empty and list(manifest.index) == ["a", "b", "c", "w"]
    assert list(manifest["url"]) == ["a.jpg", "./sub/b.png", str(root / "c.jpg"), web]
    for item_id, name in (("a", "a.jpg"), ("c", "c.jpg")):
        stored = out / manifest.loc[item_id, "path"]
        assert stored.read_bytes() == (root / name).read_bytes()
        assert manifest.loc[item_id, "sha256"] == sha((root / name).read_bytes())
        assert os.path.samefile(stored, root / name)  # a hard link: no second copy of the bytes
    converted = out / manifest.loc["b", "path"]
    assert converted.suffix == ".png" and converted.stat().st_ino != (root / "sub" / "b.png").stat().st_ino
    assert (manifest.loc["b", "width"], manifest.loc["b", "height"]) == ("75", "50")
    assert http_server.hits("/w.jpg") == 1  # http(s) rows of a --root list are still downloaded


def test_a_jpeg_is_copied_when_it_cannot_be_hard_linked(tmp_path, monkeypatch):
    root = tmp_path / "photos"
    root.mkdir()
    (root / "a.jpg").write_bytes(JPEG)

    def cross_device(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(local_module.os, "link", cross_device)
    out = tmp_path / "out"
    crawl(config(write_list(tmp_path / "list.csv", [("a", "a.jpg")]), out, root=root))
    manifest, _ = tables(out)
    stored = out / manifest.loc["a", "path"]
    assert stored.read_bytes() == JPEG and not os.path.samefile(stored, root / "a.jpg")


def test_paths_that_leave_the_root_or_are_not_files_are_bad_path(tmp_path):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    (root / "ok.jpg").write_bytes(JPEG)
    (tmp_path / "secret.jpg").write_bytes(samples.jpeg(seed=9))
    os.symlink(tmp_path / "secret.jpg", root / "link-out.jpg")
    os.symlink(root / "ok.jpg", root / "sub" / "link-in.jpg")
    os.symlink(tmp_path, root / "sub" / "dir-out")
    os.mkfifo(root / "pipe.jpg")
    rows = [
        ("dots", "../secret.jpg"),
        ("deep_dots", "sub/../../secret.jpg"),
        ("abs_out", str(tmp_path / "secret.jpg")),
        ("link_out", "link-out.jpg"),
        ("dir_link_out", "sub/dir-out/secret.jpg"),
        ("missing", "nope.jpg"),
        ("folder", "sub"),
        ("fifo", "pipe.jpg"),
        ("empty_path_dots", ".."),
        ("ftp", "ftp://example.com/a.jpg"),
        ("link_in", "sub/link-in.jpg"),
        ("ok", "sub/../ok.jpg"),
    ]
    out = tmp_path / "out"
    summary = crawl(config(write_list(tmp_path / "list.csv", rows), out, root=root))
    manifest, failed = tables(out)
    assert list(manifest.index) == ["link_in", "ok"]
    assert manifest.loc["link_in", "sha256"] == manifest.loc["ok", "sha256"] == sha(JPEG)
    reasons = failed["reason"].to_dict()
    assert reasons == {
        **{k: "bad_path" for k, _ in rows[:9]},
        "ftp": "bad_scheme",
    }
    details = failed["detail"].to_dict()
    for item_id in ("dots", "deep_dots", "abs_out", "link_out", "dir_link_out", "empty_path_dots"):
        assert "resolves outside --root" in details[item_id], item_id
    assert details["missing"] == "'nope.jpg': no such file under --root"
    assert details["folder"] == "'sub': not a regular file" and details["fifo"] == "'pipe.jpg': not a regular file"
    assert set(failed["attempts"]) == {"1"}
    assert summary["failed_by_reason"] == {"bad_path": 9, "bad_scheme": 1}


def test_without_root_a_path_is_bad_scheme_as_before(tmp_path):
    (tmp_path / "a.jpg").write_bytes(JPEG)
    out = tmp_path / "out"
    crawl(config(write_list(tmp_path / "list.csv", [("a", "a.jpg"), ("b", str(tmp_path / "a.jpg"))]), out))
    _, failed = tables(out)
    assert failed["reason"].to_dict() == {"a": "bad_scheme", "b": "bad_scheme"}
    assert not list((out / "images").iterdir())


def test_local_files_and_the_same_files_over_http_give_the_same_manifest_hashes(tmp_path, http_server):
    """Every format, converted or kept, and every rejection: the same bytes, sizes and reasons both ways."""
    root = tmp_path / "photos"
    root.mkdir()
    cases = {name: factory() for name, (factory, *_rest) in samples.FORMATS.items()}
    cases.update(big=samples.jpeg(300, 200, seed=8), truncated=samples.truncated_jpeg(), html=samples.HTML,
                 corrupt=samples.corrupt_png(), bomb=samples.bomb_png(side=3000))
    local_rows, http_rows = [], []
    for name, data in cases.items():
        (root / f"{name}.img").write_bytes(data)
        local_rows.append((name, f"{name}.img"))
        http_rows.append((name, http_server.route(f"/{name}.img", static(data, content_type="image/x"))))
    settings = dict(max_side=120, max_pixels=1_000_000)
    by_file = crawl(config(write_list(tmp_path / "local.csv", local_rows), tmp_path / "local", root=root, **settings))
    by_http = crawl(config(write_list(tmp_path / "http.csv", http_rows), tmp_path / "http", **settings))

    local_manifest, local_failed = tables(tmp_path / "local")
    http_manifest, http_failed = tables(tmp_path / "http")
    columns = ["sha256", "width", "height"]
    assert local_manifest[columns].equals(http_manifest[columns])
    assert len(local_manifest) == len(samples.FORMATS) + 1
    assert (local_manifest.loc["big", "width"], local_manifest.loc["big", "height"]) == ("120", "80")
    assert local_failed["reason"].to_dict() == http_failed["reason"].to_dict() == {
        "truncated": "truncated", "html": "not_image", "corrupt": "corrupt", "bomb": "too_many_pixels",
    }
    assert by_file["converted"] == by_http["converted"] == 11
    for name, (_factory, _type, _size, unchanged) in samples.FORMATS.items():
        if unchanged:
            assert local_manifest.loc[name, "sha256"] == sha(cases[name])


def test_a_local_crawl_resumes_and_replaces_damaged_or_missing_files(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    images = {f"p{k}": samples.jpeg(seed=20 + k) for k in range(5)}
    for item_id, data in images.items():
        (root / f"{item_id}.jpg").write_bytes(data)
    (root / "later.png").write_bytes(samples.gray_png())
    list_path = write_list(tmp_path / "list.csv", [(i, f"{i}.jpg") for i in images] + [("later", "later.gif")])
    out = tmp_path / "out"
    first = crawl(config(list_path, out, root=root))
    assert (first["stored"], first["failed_by_reason"]) == (5, {"bad_path": 1})
    reference = (out / "manifest.csv").read_bytes()

    second = crawl(config(list_path, out, root=root))
    assert (second["downloaded"], second["already_stored"]) == (0, 5)
    assert (out / "manifest.csv").read_bytes() == reference and not (out / mf.JOURNAL_FILE).exists()

    manifest, _ = tables(out)
    (out / manifest.loc["p1", "path"]).unlink()
    damaged = out / manifest.loc["p2", "path"]
    damaged.unlink()  # a hard link: replace the stored file, never write through it into the source
    damaged.write_bytes(images["p2"][:-10] + b"0123456789")
    os.rename(root / "later.png", root / "later.gif")
    third = crawl(config(list_path, out, root=root))
    assert (third["downloaded"], third["already_stored"], third["failed"]) == (3, 3, 0)
    final, failed = tables(out)
    assert failed.empty and list(final.index) == [*images, "later"]
    assert final.drop(index="later").equals(manifest)
    assert (root / "p2.jpg").read_bytes() == images["p2"]


def make_folder(root: Path) -> dict[str, bytes]:
    """Two classes (created out of order), a stray top-level file, a nested folder, hidden files, an empty class."""
    files = {
        "shirt/b.jpg": samples.jpeg(seed=31),
        "shirt/a.png": samples.rgba_png(),
        "dress/x.jpg": samples.jpeg(seed=32),
        "dress/notes.txt": b"not an image\n",
        "dress/old/y.jpg": samples.jpeg(seed=33),
        "README.md": b"# my photos\n",
        "dress/.hidden.jpg": samples.jpeg(seed=34),
        ".cache/z.jpg": samples.jpeg(seed=35),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "coat").mkdir()
    return files


def test_a_folder_of_class_sub_folders_is_a_labelled_list(tmp_path, capsys):
    root = tmp_path / "photos"
    files = make_folder(root)
    out = tmp_path / "out"
    assert crawl_main([str(root), str(out), "--workers", "2"]) == 0
    assert "crawl completed: stored 3 of 6" in capsys.readouterr().out

    assert (out / "classes.txt").read_text() == "coat\ndress\nshirt\n"
    assert (out / "list.csv").read_text() == (
        "id,url,coat,dress,shirt\n"
        "README.md,README.md,0,0,0\n"
        "dress/notes.txt,dress/notes.txt,0,1,0\n"
        "dress/old/y.jpg,dress/old/y.jpg,0,0,0\n"
        "dress/x.jpg,dress/x.jpg,0,1,0\n"
        "shirt/a.png,shirt/a.png,0,0,1\n"
        "shirt/b.jpg,shirt/b.jpg,0,0,1\n"
    )
    data = mf.read_data_dir(out)
    assert list(data.manifest["id"]) == ["dress/x.jpg", "shirt/a.png", "shirt/b.jpg"]
    assert data.labels().tolist() == [[0, 1, 0], [0, 0, 1], [0, 0, 1]]
    stored = data.manifest.set_index("id")
    assert stored.loc["shirt/b.jpg", "sha256"] == sha(files["shirt/b.jpg"])
    assert os.path.samefile(out / stored.loc["dress/x.jpg", "path"], root / "dress/x.jpg")
    failed = data.failed.set_index("id")
    assert failed["reason"].to_dict() == {
        "README.md": "stray_file", "dress/notes.txt": "not_image", "dress/old/y.jpg": "stray_file",
    }
    assert failed.loc["README.md", "detail"] == "a file directly in the folder, not in a class sub-folder"
    assert failed.loc["dress/old/y.jpg", "detail"] == (
        "in a folder below the class folder 'dress' (only its own files are read)"
    )

    # Re-running reads nothing again and leaves the same tables.
    before = {name: (out / name).read_bytes() for name in ("list.csv", "manifest.csv", "failed.csv")}
    summary = crawl(config(root, out))
    assert (summary["downloaded"], summary["already_stored"], summary["format"]) == (0, 3, "folders")
    assert {name: (out / name).read_bytes() for name in before} == before


def test_a_folder_crawl_refuses_what_it_cannot_use(tmp_path, capsys):
    root = tmp_path / "photos"
    root.mkdir()
    (root / "loose.jpg").write_bytes(JPEG)
    assert crawl_main([str(root), str(tmp_path / "out")]) == 2
    assert f"{root}: no class sub-folders (expected one sub-folder of images per class)" in capsys.readouterr().err
    (root / "shirt").mkdir()
    for argv, message in (
        ([str(root), str(root / "shirt" / "out")], "is inside the image folder"),
        ([str(root), str(tmp_path / "out"), "--root", str(root)], "--root is not used"),
        ([str(root), str(tmp_path / "out"), "--classes", str(root / "loose.jpg")], "no --classes"),
        ([str(tmp_path / "list.csv"), str(tmp_path / "out"), "--root", str(tmp_path / "nowhere")], "not a directory"),
    ):
        assert crawl_main(argv) == 2
        assert message in capsys.readouterr().err
    os.symlink(tmp_path, root / "elsewhere")
    summary = crawl(config(root, tmp_path / "out"))
    assert summary["failed_by_reason"] == {"stray_file": 2}
    failed = pd.read_csv(tmp_path / "out" / "failed.csv", dtype=str).set_index("id")
    assert failed.loc["elsewhere", "detail"] == "a link to a folder that is not directly in the folder (not followed)"


@pytest.mark.parametrize("name", ["shirt/../../x.jpg", "a\0b"])
def test_resolve_refuses_escapes_and_nul(tmp_path, name):
    from crawl.fetch import FetchFailed

    with pytest.raises(FetchFailed) as failure:
        local_module.LocalSource(tmp_path, 1000).read(name)
    assert failure.value.reason == "bad_path"


@pytest.mark.parametrize("moment", ["before_recording", "after_recording"])
def test_a_ctrl_c_while_results_are_being_recorded_loses_and_doubles_none(tmp_path, monkeypatch, moment):
    """A Ctrl-C that lands while the main thread records a batch of results: the one being recorded and the rest of
    the batch are recorded on the way out (before the fix they were dropped), none twice."""
    root = tmp_path / "photos"
    root.mkdir()
    for k in range(12):
        (root / f"p{k}.jpg").write_bytes(samples.jpeg(seed=40 + k))
    list_path = write_list(tmp_path / "list.csv", [(f"p{k}", f"p{k}.jpg") for k in range(12)])
    original = _Crawl._record
    entered: list[str] = []

    def record_then_interrupt(self, result):
        entered.append(result.item.id)
        if len(entered) == 3 and moment == "before_recording":
            raise KeyboardInterrupt
        original(self, result)
        if len(entered) == 3 and moment == "after_recording":
            raise KeyboardInterrupt

    monkeypatch.setattr(_Crawl, "_record", record_then_interrupt)
    out = tmp_path / "out"
    with pytest.raises(CrawlInterrupted) as interrupted:
        crawl(config(list_path, out, root=root, workers=1))
    stored = mf.read_stored_rows(out)
    assert set(entered) <= set(stored) and entered[2] in stored
    summary = interrupted.value.summary
    assert summary["status"] == "interrupted" and summary["stored"] == len(stored)


def test_a_list_of_local_files_only_gets_two_threads_per_cpu(monkeypatch):
    """Local reads never wait on a network: more threads than 2 per CPU only compete for the interpreter lock.
    A list with any http(s) row, or a crawl without --root, keeps --workers."""
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    local = [ListItem(id=f"p{k}", url=f"p{k}.jpg", labels=(), line=k + 1) for k in range(100)]
    mixed = [*local, ListItem(id="w", url="https://example.com/w.jpg", labels=(), line=101)]
    assert thread_count(128, local, local=True) == 6
    assert thread_count(4, local, local=True) == 4
    assert thread_count(128, mixed, local=True) == 101
    assert thread_count(128, local, local=False) == 100
    assert thread_count(128, [], local=True) == 1


def test_workers_that_outrun_the_main_thread_wait_for_it(tmp_path, monkeypatch):
    """With room for only 2 waiting results, 4 workers over 30 local files finish the crawl, every file stored."""
    monkeypatch.setattr(crawler, "_RESULTS_WAITING", 2)
    root = tmp_path / "photos"
    root.mkdir()
    for k in range(30):
        (root / f"p{k}.jpg").write_bytes(samples.jpeg(seed=60 + k))
    out = tmp_path / "out"
    list_path = write_list(tmp_path / "list.csv", [(f"p{k}", f"p{k}.jpg") for k in range(30)])
    summary = crawl(config(list_path, out, root=root, workers=4))
    manifest, failed = tables(out)
    assert summary["stored"] == 30 and failed.empty and list(manifest.index) == [f"p{k}" for k in range(30)]
