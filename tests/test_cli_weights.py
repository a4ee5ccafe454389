"""`deeplab weights list | download | info | convert` through click's CliRunner."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
from click.testing import CliRunner

from deeplab_cli import weights as W
from deeplab_cli.cli import cli
from helpers import Server, random_state

VOC_FILE = W.REGISTRY["voc12"].filename


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random 21-class checkpoint under a neutral name (no registry metadata)."""
    path = tmp_path_factory.mktemp("cli") / "mine.pth"
    torch.save(random_state(21, seed=11), path)
    return path


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_help_lists_the_subcommands():
    result = run("weights", "--help")
    assert result.exit_code == 0
    for name in ("list", "download", "info", "convert"):
        assert name in result.output


def test_list_table_and_json(deeplab_home):
    result = run("weights", "list")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:4] == ["NAME", "DATASET", "CLASSES", "SIZE"]
    voc = next(line for line in lines if line.startswith("voc12"))
    assert "voc12 *" in voc and " 21 " in voc and "~177 MB" in voc and voc.endswith("no")
    assert any(line.startswith("cocostuff164k") and " 182 " in line for line in lines)
    assert str(deeplab_home) in result.output

    (deeplab_home / VOC_FILE).write_bytes(b"x" * 2_000_000)
    rows = json.loads(run("weights", "list", "--json").output)
    assert [r["name"] for r in rows][:3] == ["voc12", "cocostuff164k", "cocostuff10k"]
    voc = rows[0]
    assert voc["cached"] is True and voc["size_bytes"] == 2_000_000 and voc["default"] is True
    assert voc["miou"] == {"no_crf": 76.65, "crf": 77.93}
    assert rows[1]["cached"] is False and rows[1]["classes"] == 182
    assert "2 MB" in run("weights", "list").output


def test_list_verify_hashes_the_cached_files(monkeypatch, deeplab_home):
    import dataclasses

    good, bad = b"tiny fake checkpoint", b"tiny fake checkpoint, damaged"
    (deeplab_home / VOC_FILE).write_bytes(good)
    coco = W.REGISTRY["cocostuff164k"]
    (deeplab_home / coco.filename).write_bytes(bad)
    digest = hashlib.sha256(good).hexdigest()
    monkeypatch.setitem(W.REGISTRY, "voc12", dataclasses.replace(W.REGISTRY["voc12"], sha256=digest))
    monkeypatch.setitem(W.REGISTRY, "cocostuff164k", dataclasses.replace(coco, sha256=digest.upper()))
    # Without --verify nothing is read and nothing changes: a damaged file is "cached".
    plain = run("weights", "list")
    assert plain.exit_code == 0 and "VERIFY" not in plain.output and "corrupt" not in plain.output

    result = run("weights", "list", "--verify")
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[0].split()[-2:] == ["CACHED", "VERIFY"]
    cells = {line.split()[0]: re.split(r"\s{2,}", line)[-2:] for line in lines[1:4]}
    assert cells["voc12"] == ["yes", "ok (sha256)"]
    assert cells["cocostuff164k"] == ["yes", "corrupt (sha256 mismatch)"]
    assert cells["cocostuff10k"] == ["no", "-"]
    assert result.stderr == (f"deeplab: cocostuff164k: {deeplab_home / coco.filename} is corrupt "
                             "(sha256 mismatch); delete it and run `deeplab weights download "
                             "cocostuff164k`\n")
    rows = {r["name"]: r for r in json.loads(run("weights", "list", "--json", "--verify").stdout)}
    assert [rows[n]["verify"] for n in ("voc12", "cocostuff164k", "cocostuff10k")] == [
        "ok", "corrupt (sha256 mismatch)", None]
    assert W.verify_cached("cocostuff10k") == "missing"


def test_list_verify_loads_files_whose_hash_is_unknown(monkeypatch, checkpoint, deeplab_home):
    # The registry knows no hash for the published files: --verify then reads each cached
    # file as weights, so a truncated download or a 21-class file under a 182-class name is
    # "corrupt" while a good one is "ok (loads; no hash known)".
    import shutil

    shutil.copy(checkpoint, deeplab_home / VOC_FILE)  # 21 classes, as voc12 has
    coco = W.REGISTRY["cocostuff164k"]
    shutil.copy(checkpoint, deeplab_home / coco.filename)  # 21 classes where 182 are expected
    ten = W.REGISTRY["cocostuff10k"]
    (deeplab_home / ten.filename).write_bytes(checkpoint.read_bytes()[:100_000])  # truncated
    assert all(W.REGISTRY[n].sha256 is None for n in ("voc12", "cocostuff164k", "cocostuff10k"))
    result = run("weights", "list", "--verify")
    assert result.exit_code == 1
    cells = {line.split()[0]: re.split(r"\s{2,}", line)[-1] for line in result.stdout.splitlines()[1:4]}
    assert cells["voc12"] == "ok (loads; no hash known)"
    assert cells["cocostuff164k"] == "corrupt (21 classes, expected 182)"
    assert cells["cocostuff10k"].startswith("corrupt (")
    errors = result.stderr.splitlines()
    assert len(errors) == 2 and all("delete it and run `deeplab weights download" in e for e in errors)
    assert W.verify_cached("voc12") == "loads"


def test_a_download_with_a_known_hash_must_match_it(monkeypatch, checkpoint, deeplab_home, server):
    import dataclasses

    server.files[VOC_FILE] = checkpoint
    entry = W.REGISTRY["voc12"]
    monkeypatch.setitem(W.REGISTRY, "voc12", dataclasses.replace(entry, sha256="0" * 64))
    result = run("weights", "download", "voc12", "--no-progress")
    assert result.exit_code == 1
    assert "sha256 mismatch (expected " + "0" * 64 + ")" in result.stderr
    assert list(deeplab_home.iterdir()) == []
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    monkeypatch.setitem(W.REGISTRY, "voc12", dataclasses.replace(entry, sha256=digest))
    assert run("weights", "download", "voc12", "--no-progress").exit_code == 0
    assert W.verify_cached("voc12") == "ok"


def test_download_prints_the_path_and_errors_are_one_line(monkeypatch, checkpoint, deeplab_home):
    server = Server()
    try:
        monkeypatch.setenv(W.URL_ENV, server.url)
        server.files[VOC_FILE] = checkpoint
        result = run("weights", "download", "voc12", "--no-progress")
        assert result.exit_code == 0, result.output
        assert result.stdout.strip() == str(deeplab_home / VOC_FILE)
        assert (deeplab_home / VOC_FILE).read_bytes() == checkpoint.read_bytes()

        server.mode = "404"
        result = run("weights", "download", "cocostuff10k")
        assert result.exit_code == 1
        error = result.stderr.strip().splitlines()[-1]
        assert error.startswith("Error: cannot download cocostuff10k from " + server.url)
        assert "HTTP 404" in error and str(deeplab_home) in error
        assert sorted(p.name for p in deeplab_home.iterdir()) == [VOC_FILE]

        result = run("weights", "download", "nosuch")
        assert result.exit_code == 1 and "unknown weights 'nosuch'" in result.stderr
    finally:
        server.close()


def test_info_text_and_json(checkpoint):
    result = run("weights", "info", str(checkpoint))
    assert result.exit_code == 0, result.output
    text = result.output
    assert "pytorch-zip" in text and "44,048,532" in text
    assert "21 (background, aeroplane" in text
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert digest in text
    facts = json.loads(run("weights", "info", str(checkpoint), "--json").output)
    assert facts["keys"] == 632 and facts["parameters"] == 44_048_532 and facts["sha256"] == digest


def test_info_errors(tmp_path):
    result = run("weights", "info", str(tmp_path / "missing.pth"))
    assert result.exit_code == 1 and "no such file" in result.stderr
    result = run("weights", "info", "cocostuff164k")
    assert result.exit_code == 1 and "not downloaded" in result.stderr
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"PK\x03\x04garbage")
    result = run("weights", "info", str(junk))
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and str(junk) in result.stderr


def test_convert_with_labels_and_dataset(tmp_path, checkpoint):
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"part {i}" for i in range(21)) + "\n")
    dst = tmp_path / "out.safetensors"
    result = run("weights", "convert", str(checkpoint), str(dst), "--labels", str(labels),
                 "--dataset", "parts", "--aspp", "S", "--name", "parts21")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(dst)
    _, meta = W.load_state_dict(dst)
    assert meta.classes == [f"part {i}" for i in range(21)]
    assert (meta.dataset, meta.aspp, meta.name) == ("parts", "S", "parts21")
    facts = json.loads(run("weights", "info", str(dst), "--json").output)
    assert facts["format"] == "safetensors" and facts["dataset"] == "parts"

    # Without options the registry's label set for 21 classes is carried over.
    dst2 = tmp_path / "voc.safetensors"
    assert run("weights", "convert", str(checkpoint), str(dst2)).exit_code == 0
    assert W.load_state_dict(dst2)[1].classes[15] == "person"


def test_convert_errors_leave_nothing(tmp_path, checkpoint):
    result = run("weights", "convert", str(checkpoint), str(tmp_path / "out.pth"))
    assert result.exit_code == 1 and ".safetensors" in result.stderr
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")
    result = run("weights", "convert", str(checkpoint), str(tmp_path / "o.safetensors"),
                 "--labels", str(labels))
    assert result.exit_code == 1 and "2 class names" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.txt"]


@pytest.mark.parametrize("content, reason", [(None, "no such file"), (b"\xff\xfeclass\n", "not a UTF-8 text file (byte 0xff at offset 0)")])
def test_convert_unreadable_labels_is_one_line(tmp_path, checkpoint, content, reason):
    labels = tmp_path / "labels.txt"
    if content is not None:
        labels.write_bytes(content)
    result = run("weights", "convert", str(checkpoint), str(tmp_path / "o.safetensors"),
                 "--labels", str(labels))
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--labels {labels}: {reason}" in lines[0], result.stderr
    assert not (tmp_path / "o.safetensors").exists()
