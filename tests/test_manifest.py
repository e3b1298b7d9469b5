"""crawl.manifest writes the DATA_DIR tables byte for byte in their documented layout and reads back what it wrote."""

from __future__ import annotations

import json

from crawl import manifest as mf

CLASSES = ["sport", "lady"]
STORED = [
    mf.ManifestRow(id="a", path="images/a.jpg", url="http://h/a.jpg", sha256="0" * 64, width=75, height=50,
                   labels=(1, 0)),
    mf.ManifestRow(id='b,"2"', path="images/b.png", url="http://h/b?x=1,2", sha256="f" * 64, width=8, height=9,
                   labels=(0, 1)),
]
FAILED = [mf.FailedRow(id="c", url="http://h/c.jpg", reason="http_404", detail="Not Found, twice", attempts=1)]
ENTRIES = [mf.ListRow(id=r.id, url=r.url, labels=r.labels) for r in STORED] + [
    mf.ListRow(id="c", url="http://h/c.jpg", labels=(1, 1))
]


def test_tables_are_written_in_the_documented_layout(tmp_path):
    mf.write_data_dir(tmp_path, classes=CLASSES, entries=ENTRIES, stored=STORED, failed=FAILED, summary={"stored": 2})
    assert (tmp_path / "manifest.csv").read_bytes() == (
        b"id,path,url,sha256,width,height,sport,lady\n"
        b"a,images/a.jpg,http://h/a.jpg," + b"0" * 64 + b",75,50,1,0\n"
        b'"b,""2""",images/b.png,"http://h/b?x=1,2",' + b"f" * 64 + b",8,9,0,1\n"
    )
    assert (tmp_path / "list.csv").read_bytes() == (
        b'id,url,sport,lady\na,http://h/a.jpg,1,0\n"b,""2""","http://h/b?x=1,2",0,1\nc,http://h/c.jpg,1,1\n'
    )
    assert (tmp_path / "failed.csv").read_bytes() == (
        b'id,url,reason,detail,attempts\nc,http://h/c.jpg,http_404,"Not Found, twice",1\n'
    )
    assert (tmp_path / "classes.txt").read_text() == "sport\nlady\n"
    assert json.loads((tmp_path / "crawl.json").read_text()) == {"stored": 2}


def test_empty_tables_keep_their_header(tmp_path):
    mf.write_data_dir(tmp_path, classes=[], entries=[], stored=[])
    assert (tmp_path / "manifest.csv").read_text() == "id,path,url,sha256,width,height\n"
    assert (tmp_path / "failed.csv").read_text() == "id,url,reason,detail,attempts\n"
    assert (tmp_path / "list.csv").read_text() == "id,url\n"


def test_what_is_written_reads_back(tmp_path):
    mf.write_data_dir(tmp_path, classes=CLASSES, entries=ENTRIES, stored=STORED, failed=FAILED)
    data = mf.read_data_dir(tmp_path)
    assert data.classes == CLASSES
    assert data.manifest["id"].tolist() == ["a", 'b,"2"'] and data.manifest["width"].tolist() == [75, 8]
    assert data.labels().tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert data.missing_ids == ["c"] and data.failed["detail"].tolist() == ["Not Found, twice"]
    assert mf.read_stored_rows(tmp_path) == {r.id: mf.ManifestRow(**{**r.__dict__, "labels": ()}) for r in STORED}


def test_an_unlabelled_list_removes_a_stale_classes_file(tmp_path):
    mf.write_list(tmp_path, ENTRIES, CLASSES)
    assert (tmp_path / "classes.txt").exists()
    mf.write_list(tmp_path, [mf.ListRow(id="t", url="http://h/t.jpg")], [])
    assert not (tmp_path / "classes.txt").exists()
    assert (tmp_path / "list.csv").read_text() == "id,url\nt,http://h/t.jpg\n"


def test_an_unusable_manifest_or_summary_reads_as_nothing(tmp_path):
    assert mf.read_stored_rows(tmp_path) == {} and mf.read_summary(tmp_path) is None
    (tmp_path / "manifest.csv").write_text("id,path\na,images/a.jpg\n")  # columns missing
    assert mf.read_stored_rows(tmp_path) == {}
    (tmp_path / "manifest.csv").write_text("id,path,url,sha256,width,height\na,images/a.jpg,u,s,wide,1\n")
    assert mf.read_stored_rows(tmp_path) == {}
    (tmp_path / "crawl.json").write_text('{"settings": ')
    assert mf.read_summary(tmp_path) is None
    (tmp_path / "crawl.json").write_text("[1, 2]")
    assert mf.read_summary(tmp_path) is None


def test_image_paths_are_relative_posix_under_images():
    assert mf.image_path("a-1f", ".png") == "images/a-1f.png"


def test_the_journal_appends_rows_skips_a_cut_line_and_goes_once_the_manifest_is_written(tmp_path):
    mf.write_manifest(tmp_path, STORED[:1], CLASSES)
    journal = mf.ManifestJournal(tmp_path)
    moved = mf.ManifestRow(id="a", path="images/a2.jpg", url="http://h/a2.jpg", sha256="1" * 64, width=3, height=4)
    assert journal.append([moved]) == 1 and journal.append([]) == 0
    journal.close()
    with open(tmp_path / mf.JOURNAL_FILE, "ab") as handle:
        handle.write(b'["cut", "images/cu')  # a kill in the middle of an append
    journal = mf.ManifestJournal(tmp_path)
    journal.append([STORED[1]])
    journal.close()
    lines = (tmp_path / mf.JOURNAL_FILE).read_text().splitlines()
    assert json.loads(lines[0]) == {"format": "crawl manifest journal", "version": 1, "columns": mf.MANIFEST_COLUMNS}
    assert lines[1:] == [
        '["a", "images/a2.jpg", "http://h/a2.jpg", "' + "1" * 64 + '", 3, 4]',
        '["cut", "images/cu',
        '["b,\\"2\\"", "images/b.png", "http://h/b?x=1,2", "' + "f" * 64 + '", 8, 9]',
    ]
    unlabelled = mf.ManifestRow(**{**STORED[1].__dict__, "labels": ()})
    assert mf.read_journal(tmp_path) == [moved, unlabelled]
    assert mf.read_stored_rows(tmp_path) == {"a": moved, 'b,"2"': unlabelled}  # the journal is newer
    mf.write_manifest(tmp_path, STORED, CLASSES)
    assert not (tmp_path / mf.JOURNAL_FILE).exists()
    assert mf.read_stored_rows(tmp_path) == {r.id: mf.ManifestRow(**{**r.__dict__, "labels": ()}) for r in STORED}
