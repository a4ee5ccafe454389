"""The package's shared pieces: CLI group, CRF parameters, atomic writes, device choice."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from deeplab_cli import __version__
from deeplab_cli.cli import COMMANDS, cli
from deeplab_cli.crf.params import CRFParams
from deeplab_cli.device import resolve_device
from deeplab_cli.errors import DeeplabError, plural
from deeplab_cli.fsutil import atomic_open, atomic_path


def test_help_lists_every_command_without_heavy_imports():
    code = (
        "import sys; from deeplab_cli.cli import main; sys.argv=['deeplab','--help'];\n"
        "try: main()\n"
        "except SystemExit: pass\n"
        "heavy = sorted(m for m in ('torch', 'cupy', 'cv2', 'numpy') if m in sys.modules)\n"
        "print('HEAVY=' + ','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name in COMMANDS:
        assert name in out
    assert "HEAVY=\n" in out or out.rstrip().endswith("HEAVY=")


def test_version_via_python_m():
    out = subprocess.run([sys.executable, "-m", "deeplab_cli", "--version"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"deeplab, version {__version__}"


@pytest.mark.parametrize("user,expected", [
    ({}, "GOMP_SPINCOUNT=1000"),                                # nothing said: a short spin
    ({"GOMP_SPINCOUNT": "5"}, "GOMP_SPINCOUNT=5"),              # the user's own value wins
    ({"OMP_WAIT_POLICY": "ACTIVE"}, "GOMP_SPINCOUNT=None"),     # so does a wait policy
])
def test_the_command_shortens_openmp_spinning_unless_told(user, expected):
    # Set before torch loads: the value the OpenMP runtime of a `deeplab` process starts with.
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    code = ("import os, sys; import deeplab_cli.cli; assert 'torch' not in sys.modules;"
            "print('GOMP_SPINCOUNT=' + str(os.environ.get('GOMP_SPINCOUNT')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**env, **user}).stdout
    assert out.strip() == expected


def test_every_registered_command_imports():
    for name in COMMANDS:
        assert cli.get_command(None, name) is not None, name
    assert cli.get_command(None, "nope") is None


def test_crf_params_validation():
    with pytest.raises(DeeplabError, match="bi_rgb_std"):
        CRFParams(bi_rgb_std=0)
    with pytest.raises(DeeplabError, match="pos_xy_std"):
        CRFParams(pos_xy_std=-1)
    with pytest.raises(DeeplabError, match="iterations"):
        CRFParams(iterations=-2)
    with pytest.raises(DeeplabError, match="normalization"):
        CRFParams(normalization="before")
    with pytest.raises(DeeplabError, match="bi_w"):
        CRFParams(bi_w=float("nan"))


def test_crf_params_replace_and_scale():
    p = CRFParams().replace(bi_w=5.0, iterations=None)
    assert p.bi_w == 5.0 and p.iterations == 10
    s = p.scaled(2.0)
    assert (s.pos_xy_std, s.bi_xy_std, s.bi_rgb_std, s.bi_w) == (2.0, 134.0, 3.0, 5.0)


def test_crf_preset_round_trip(tmp_path):
    params = CRFParams(bi_w=5, bi_xy_std=50, bi_rgb_std=4, normalization="after")
    preset = tmp_path / "preset.json"
    preset.write_text(json.dumps({"crf": params.to_dict(), "score": 0.7, "metric": "miou"}))
    assert CRFParams.from_json_file(preset) == params
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"bi_w": 6}))
    assert CRFParams.from_json_file(flat) == CRFParams(bi_w=6)
    notepad = tmp_path / "notepad.json"  # saved by Windows Notepad: a UTF-8 byte-order mark first
    notepad.write_bytes(b"\xef\xbb\xbf" + json.dumps({"bi_w": 7}).encode())
    assert CRFParams.from_json_file(notepad) == CRFParams(bi_w=7)


@pytest.mark.parametrize("text, reason", [
    ("{", "not a JSON CRF preset"),
    ("[1, 2]", "must be a JSON object"),
    ('{"bi_w": 4, "sigma": 3}', "unknown CRF parameter"),
    ('{"bi_w": "heavy"}', "could not convert"),
    ('{"iterations": 1' + "0" * 5000 + "}", r"not a JSON CRF preset \(a number with more than"),
])
def test_crf_preset_errors_name_the_file(tmp_path, text, reason):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DeeplabError, match=reason) as info:
        CRFParams.from_json_file(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_crf_params_too_large_for_a_float_name_the_field():
    from fractions import Fraction

    for name in ("pos_w", "bi_w", "pos_xy_std", "bi_xy_std", "bi_rgb_std"):
        for huge in (10**400, -(10**400), Fraction(10**400, 3)):
            with pytest.raises(DeeplabError, match=f"^CRF parameter {name} is too large") as info:
                CRFParams(**{name: huge})
            assert len(str(info.value)) < 150
    # An integer whose decimal form Python refuses to write (over 4300 digits).
    with pytest.raises(DeeplabError, match="^CRF iterations must be at most 1000") as info:
        CRFParams(iterations=10**5000)
    assert len(str(info.value)) < 150
    with pytest.raises(DeeplabError, match="^weights.json: CRF iterations must be at most 1000"):
        CRFParams.from_dict({"iterations": 10**5000}, source="weights.json")


def test_crf_params_messages_quote_odd_keys_and_sources_on_one_line(tmp_path):
    with pytest.raises(DeeplabError) as info:
        CRFParams.from_dict({"a\nb": 1, 7: 2, "bi_w": 1})
    assert str(info.value) == "CRF parameters: unknown CRF parameter(s) 'a\\nb', 7"
    with pytest.raises(DeeplabError) as info:
        CRFParams.from_dict({"bi_w": "x"}, source="line\nbreak.json")
    assert "\n" not in str(info.value) and str(info.value).startswith("line\\nbreak.json: bi_w")
    odd = tmp_path / "two\nlines.json"
    odd.write_text('{"bi_w": true}')
    with pytest.raises(DeeplabError, match="could not convert") as info:
        CRFParams.from_json_file(odd)
    assert "\n" not in str(info.value) and "two\\nlines.json" in str(info.value)


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with atomic_open(target, "w") as fh:
        fh.write("first")
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError):
        with atomic_open(target, "w") as fh:
            fh.write("half")
            raise RuntimeError("killed")
    assert target.read_text() == "first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]
    with atomic_path(tmp_path / "x.bin") as tmp:
        assert tmp.name.startswith(".x.bin.") and tmp.name.endswith(".part")
        tmp.write_bytes(b"1")
    assert (tmp_path / "x.bin").read_bytes() == b"1"


def test_device_resolution_on_this_machine():
    import torch

    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(DeeplabError, match="expected auto, cpu, cuda"):
        resolve_device("tpu")
    with pytest.raises(DeeplabError, match="cuda:N"):
        resolve_device("cuda:x")
    # torch takes 'cpu:N' as the CPU (its tensors land on 'cpu'); so does deeplab.
    for spec in (torch.device("cpu", 0), torch.device("cpu:1"), "cpu:0", " CPU:3 "):
        assert resolve_device(spec) == torch.device("cpu")
    for spec in ("cpu:", "cpu:x", "cpu:-1", "cpu:0:0", "cpu0"):
        with pytest.raises(DeeplabError, match=f"^--device {re.escape(spec)}: expected"):
            resolve_device(spec)
    if not torch.cuda.is_available():
        assert resolve_device("auto", quiet=True).type == "cpu"
        with pytest.raises(DeeplabError, match="CUDA is not available"):
            resolve_device("cuda")


def test_user_errors_are_one_line_through_the_group(tmp_path):
    # A DeeplabError raised inside any command comes out as "Error: ..." and exit 1.
    import click

    from deeplab_cli.cli import LazyGroup

    @click.group(cls=LazyGroup)
    def group():
        pass

    @click.command()
    @click.argument("name")
    def boom(name):
        raise DeeplabError(f"{name}: not an image")

    group.get_command = lambda ctx, name: boom if name == "boom" else None
    result = CliRunner().invoke(group, ["boom", "x.png"])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: x.png: not an image"
    # A newline, an escape code or an undecodable byte in a file name stays on the one line.
    result = CliRunner().invoke(group, ["boom", "a\nb\x1b[2J\udcff.png"])
    assert result.exit_code == 1
    assert result.output == "Error: a\\nb\\x1b[2J\\xff.png: not an image\n"


@pytest.mark.parametrize("args,message", [
    (["segment", "--alpha", "2", "x.jpg"], "Error: Invalid value for '--alpha': 2.0 is not in the range 0<=x<=1."),
    (["crf", "--iter", "3"], "Error: No such option '--iter'. Did you mean '--iters'?"),
    (["nosuch"], "Error: No such command 'nosuch'."),
])
def test_clicks_own_checks_are_one_line_and_status_1(args, message):
    # Options click checks itself (ranges, names) fail like the tool's own checks: one line.
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and result.output == message + "\n"


def test_ctrl_c_exits_with_status_130():
    import click

    from deeplab_cli.cli import LazyGroup

    @click.group(cls=LazyGroup)
    def group():
        pass

    @click.command()
    def slow():
        raise KeyboardInterrupt

    group.get_command = lambda ctx, name: slow if name == "slow" else None
    result = CliRunner().invoke(group, ["slow"])
    assert result.exit_code == 130
    assert result.output.strip() == "deeplab: interrupted"


def test_closed_standard_streams_get_dev_null(tmp_path):
    # `2>&-`: notes for stderr (here the CPU fallback's) must not land in the PNG on stdout.
    import numpy as np
    from PIL import Image

    Image.fromarray(np.zeros((6, 7, 3), np.uint8)).save(tmp_path / "a.png")
    probs = np.full((2, 6, 7), 0.5, np.float32)
    np.save(tmp_path / "p.npy", probs)
    script = 'exec "$@" 2>&-'
    proc = subprocess.run(["sh", "-c", script, "sh", sys.executable, "-m", "deeplab_cli", "crf", tmp_path / "a.png",
                           tmp_path / "p.npy", "-o", "-", "--device", "auto", "--iters", "1"],
                          capture_output=True, timeout=300)
    assert proc.returncode == 0
    assert proc.stdout.startswith(b"\x89PNG\r\n\x1a\n")
    # `>&-`: nowhere to write the PNG; one line, no traceback.
    proc = subprocess.run(["sh", "-c", 'exec "$@" >&-', "sh", sys.executable, "-m", "deeplab_cli", "crf",
                           tmp_path / "a.png", tmp_path / "p.npy", "-o", "-", "--device", "cpu"],
                          capture_output=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.decode().strip() == "Error: -o -: stdout is closed"


def test_counts_name_their_noun_in_the_plural_unless_one():
    assert [plural(n, "image") for n in (0, 1, 2)] == ["0 images", "1 image", "2 images"]
    assert [plural(n, "class") for n in (1, 21)] == ["1 class", "21 classes"]
    assert plural(1, "CRF setting") == "1 CRF setting" and plural(4, "CRF setting") == "4 CRF settings"
