"""Input lists: format detection, class naming, and validation errors reported as FILE:LINE (exit status 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from crawl.__main__ import main
from crawl.listfile import ListError, parse_list

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def errors_of(path, classes=None) -> list[str]:
    with pytest.raises(ListError) as info:
        parse_list(path, classes)
    return info.value.errors


def test_jd_labelled_list_with_classes_file(tmp_path):
    path = write(tmp_path, "train.csv", "a,http://h/a.jpg,1,0,1\nb,http://h/b.jpg,0,0,0\n")
    classes = write(tmp_path, "classes.txt", "sport\ncasual\nlady\n")
    parsed = parse_list(path, classes)
    assert parsed.format == "jd"
    assert parsed.classes == ["sport", "casual", "lady"]
    assert [(i.id, i.url, i.labels, i.line) for i in parsed.items] == [
        ("a", "http://h/a.jpg", (1, 0, 1), 1),
        ("b", "http://h/b.jpg", (0, 0, 0), 2),
    ]


def test_jd_list_without_classes_gets_numbered_classes(tmp_path):
    parsed = parse_list(write(tmp_path, "l.csv", "a,http://h/a.jpg,0,1\n"))
    assert parsed.classes == ["class_1", "class_2"]
    assert parsed.items[0].labels == (0, 1)


def test_jd_test_list_without_flags_is_unlabelled(tmp_path):
    parsed = parse_list(write(tmp_path, "test.csv", "t1,http://h/1.jpg\nt2,http://h/2.jpg\n"))
    assert parsed.classes == [] and not parsed.labelled
    assert [i.id for i in parsed.items] == ["t1", "t2"] and parsed.items[1].labels == ()


def test_headered_csv_with_labels_column(tmp_path):
    path = write(
        tmp_path,
        "l.csv",
        "id,url,labels\nx,http://h/x.jpg,lady|sport\ny,http://h/y.jpg,casual sport\nz,http://h/z.jpg,\n",
    )
    parsed = parse_list(path)
    assert parsed.format == "header"
    assert parsed.classes == ["casual", "lady", "sport"]  # sorted names seen
    assert [i.labels for i in parsed.items] == [(0, 1, 1), (1, 0, 1), (0, 0, 0)]


def test_headered_labels_column_uses_classes_file_order_and_rejects_unknown_names(tmp_path):
    classes = write(tmp_path, "c.txt", "sport\nlady\n")
    ok = write(tmp_path, "ok.csv", "url,id,labels\nhttp://h/x.jpg,x,lady\n")
    assert parse_list(ok, classes).items[0].labels == (0, 1)
    bad = write(tmp_path, "bad.csv", "url,id,labels\nhttp://h/x.jpg,x,lady\nhttp://h/y.jpg,y,punk\n")
    assert errors_of(bad, classes) == [f"{bad}:3: unknown class(es) punk (not in {classes})"]


def test_headered_tsv_with_flag_columns_and_ids_from_urls(tmp_path):
    path = write(tmp_path, "l.tsv", "url\tsport\tlady\nhttp://h/1.jpg\t1\t0\nhttp://h/2.jpg\t0\t1\n")
    parsed = parse_list(path)
    assert parsed.delimiter == "\t"
    assert parsed.classes == ["sport", "lady"]
    assert [(i.id, i.labels) for i in parsed.items] == [("http://h/1.jpg", (1, 0)), ("http://h/2.jpg", (0, 1))]


def test_headered_flag_columns_reordered_by_classes_file(tmp_path):
    path = write(tmp_path, "l.csv", "id,url,lady,sport\na,http://h/a.jpg,1,0\n")
    parsed = parse_list(path, write(tmp_path, "c.txt", "sport\nlady\n"))
    assert parsed.classes == ["sport", "lady"] and parsed.items[0].labels == (0, 1)


def test_identical_repeat_is_ignored(tmp_path):
    parsed = parse_list(write(tmp_path, "l.csv", "a,http://h/a.jpg,1\nb,http://h/b.jpg,0\na,http://h/a.jpg,1\n"))
    assert [i.id for i in parsed.items] == ["a", "b"]


def test_every_error_is_reported_with_its_line(tmp_path):
    # Line 2 is blank and must still count.
    text = (
        "a,http://h/a.jpg,1,0\n"
        "\n"
        "b,http://h/b.jpg,1\n"  # 3: wrong field count
        "c,http://h/c.jpg,2,0\n"  # 4: flag other than 0/1
        "d,,0,0\n"  # 5: empty url
        "a,http://h/other.jpg,1,0\n"  # 6: id repeats with a different url
        "a,http://h/a.jpg,0,0\n"  # 7: id repeats with different labels
        ",http://h/e.jpg,0,0\n"  # 8: empty id
    )
    path = write(tmp_path, "bad.csv", text)
    assert errors_of(path) == [
        f"{path}:3: expected 4 fields (id,url,flags), found 3",
        f"{path}:4: flag for 'class_1' is '2', expected 0 or 1",
        f"{path}:5: empty url",
        f"{path}:6: id 'a' repeats line 1 with a different url",
        f"{path}:7: id 'a' repeats line 1 with different labels",
        f"{path}:8: empty id",
    ]


def test_classes_file_must_match_the_number_of_flags(tmp_path):
    path = write(tmp_path, "l.csv", "a,http://h/a.jpg,1,0\n")
    classes = write(tmp_path, "c.txt", "one\ntwo\nthree\n")
    assert errors_of(path, classes) == [f"{path}:1: 2 flag column(s) but {classes} names 3 class(es)"]


def test_classes_file_with_a_repeated_name(tmp_path):
    classes = write(tmp_path, "c.txt", "one\ntwo\none\n")
    errors = errors_of(write(tmp_path, "l.csv", "a,u,1,0,1\n"), classes)
    assert errors == [f"{classes}:3: class 'one' repeats (first on line 1)"]


def test_headered_list_errors(tmp_path):
    path = write(tmp_path, "l.csv", "id,url,sport\na,http://h/a.jpg,yes\nb,http://h/b.jpg\n")
    assert errors_of(path) == [
        f"{path}:2: flag for 'sport' is 'yes', expected 0 or 1",
        f"{path}:3: expected 3 fields like the header, found 2",
    ]


def test_empty_id_and_url_are_reported_alike_in_both_formats(tmp_path):
    rows = [",http://h/a.jpg", "b,", ","]  # lines 1-3 (JD) or 2-4 (after the header): empty id, empty url, both
    jd = write(tmp_path, "jd.csv", "".join(f"{r},0\n" for r in rows))
    headered = write(tmp_path, "h.csv", "id,url,sport\n" + "".join(f"{r},0\n" for r in rows))
    for path, first in ((jd, 1), (headered, 2)):
        assert errors_of(path) == [
            f"{path}:{first}: empty id",
            f"{path}:{first + 1}: empty url",
            f"{path}:{first + 2}: empty id",
            f"{path}:{first + 2}: empty url",
        ]


def test_headered_list_without_id_column_checks_the_url_only(tmp_path):
    path = write(tmp_path, "l.csv", "url,sport\nhttp://h/a.jpg,1\n,0\n")
    assert errors_of(path) == [f"{path}:3: empty url"]


def test_empty_list(tmp_path):
    path = write(tmp_path, "empty.csv", "\n\n")
    assert errors_of(path) == [f"{path}: the list is empty"]


def test_cli_exits_2_with_file_line_and_downloads_nothing(tmp_path, http_server, capsys):
    url = http_server.route("/a.jpg", lambda handler, hit: None)
    path = write(tmp_path, "bad.csv", f"a,{url},1\nb,{url},x\n")
    out_dir = tmp_path / "out"
    assert main([str(path), str(out_dir)]) == 2
    assert f"{path}:2: flag for 'class_1' is 'x', expected 0 or 1" in capsys.readouterr().err
    assert http_server.hits("/a.jpg") == 0
    assert not out_dir.exists()


def test_the_crawl_stage_never_imports_tensorflow():
    code = "import sys, crawl.__main__, crawl.crawler; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cli_rejects_bad_settings_with_status_2(tmp_path, capsys):
    path = write(tmp_path, "l.csv", "a,http://127.0.0.1:9/a.jpg\n")
    assert main([str(path), str(tmp_path / "out"), "--workers", "0"]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main([str(path)])  # OUT_DIR missing: argparse usage error
    assert info.value.code == 2
