"""Weights and library entry points under hostile input: bad metadata, odd archives, broken
mirrors and caches, devices and dtypes. Each bad input is one line naming the file and the
reason, and leaves nothing behind."""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from deeplab_cli import weights as W
from deeplab_cli.cli import cli
from deeplab_cli.crf.params import CRFParams
from deeplab_cli.errors import DeeplabError
from deeplab_cli.labels import palette_for
from deeplab_cli.model import build_model
from helpers import Evil, assert_one_line_error, random_state

VOC_FILE = W.REGISTRY["voc12"].filename


def one_line(exc: pytest.ExceptionInfo, *fragments: str) -> None:
    text = str(exc.value)
    assert "\n" not in text, text
    for fragment in fragments:
        assert fragment in text, text


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def state3() -> dict[str, torch.Tensor]:
    return random_state(3, seed=5)


@pytest.fixture(scope="module")
def pth3(tmp_path_factory, state3) -> Path:
    """A bare 3-class checkpoint under a neutral name."""
    path = tmp_path_factory.mktemp("audit") / "three.pth"
    torch.save(state3, path)
    return path


# ------------------------------------------------------------------ safetensors metadata


def _meta(**metadata: str) -> W.WeightsMeta:
    default = W.default_meta(Path("x.safetensors"), 3)
    return W.WeightsMeta.from_metadata(metadata, default, path=Path("x.safetensors"))


@pytest.mark.parametrize("palette", [
    "[[1.5, 2, 3], [4, 5, 6], [7, 8, 9]]",        # int() would truncate it
    "[[true, 2, 3], [4, 5, 6], [7, 8, 9]]",       # int() would take it for 1
    '[["1", "2", "3"], [4, 5, 6], [7, 8, 9]]',    # strings
    "[[1e400, 2, 3], [4, 5, 6], [7, 8, 9]]",      # infinity: int() overflowed (traceback)
    "[[Infinity, 2, 3], [4, 5, 6], [7, 8, 9]]",
    "[[256, 0, 0], [4, 5, 6], [7, 8, 9]]",
    '"abc"',
])
def test_palette_must_be_whole_numbers(palette):
    with pytest.raises(DeeplabError) as exc:
        _meta(palette=palette)
    one_line(exc, "x.safetensors", "'palette'", "whole numbers 0..255")


@pytest.mark.parametrize("mean", ['["a", 1, 2]', "[null, 1, 2]", "[NaN, 1, 2]", "[1, 2]",
                                  "[true, 1, 2]"])
def test_mean_must_be_three_finite_numbers(mean):
    with pytest.raises(DeeplabError) as exc:
        _meta(mean_bgr=mean)
    one_line(exc, "x.safetensors", "'mean_bgr'", "three finite numbers")


def test_deeply_nested_metadata_json_is_one_line():
    # json.loads raised RecursionError (a traceback) on a crafted header.
    with pytest.raises(DeeplabError) as exc:
        _meta(classes="[" * 100_000 + "]" * 100_000)
    one_line(exc, "x.safetensors", "'classes'", "nested too deeply")


def test_good_metadata_still_reads():
    meta = _meta(classes='["a", "b", "c"]', palette="[[0, 0, 0], [255, 1, 2], [3, 4, 5]]",
                 mean_bgr="[1, 2.5, 3]")
    assert meta.classes == ["a", "b", "c"]
    assert meta.palette == [(0, 0, 0), (255, 1, 2), (3, 4, 5)]
    assert meta.mean_bgr == (1.0, 2.5, 3.0)


def test_bad_metadata_through_the_cli(tmp_path, state3):
    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    save_file(state3, str(path), metadata={"mean_bgr": "[null, 1, 2]"})
    result = run("weights", "info", str(path), "--json")
    assert_one_line_error(result, str(path), "'mean_bgr'")
    assert result.stdout == ""


# ------------------------------------------------------------------ .pth oddities


def test_zip_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "photos.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("hello.txt", "hi")
    with pytest.raises(DeeplabError) as exc:
        W.load_state_dict(path)
    # It used to be "truncated or corrupt: [enforce fail at inline_container.cc:180] ".
    one_line(exc, str(path), "zip archive, but not a PyTorch checkpoint")
    assert "inline_container" not in str(exc.value)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script/save: still how such files are made
def test_torchscript_archive_is_named(tmp_path):
    path = tmp_path / "scripted.pth"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(DeeplabError) as exc:
        W.load_state_dict(path)
    one_line(exc, str(path), "TorchScript archive", "state_dict()")


def test_refusals_name_what_was_refused_and_run_nothing(tmp_path):
    flag = tmp_path / "pwned"

    legacy = tmp_path / "evil_legacy.pth"
    torch.save({"a": Evil(flag)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(DeeplabError) as exc:
        W.load_state_dict(legacy)
    one_line(exc, str(legacy), "refused", "system", "weights_only")

    # A training checkpoint with a NumPy scalar: refused, and the message says which global.
    with_numpy = tmp_path / "numpy.pth"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "best": np.float64(0.5)}, with_numpy)
    with pytest.raises(DeeplabError) as exc:
        W.load_state_dict(with_numpy)
    one_line(exc, str(with_numpy), "refused", "numpy")
    assert not flag.exists()


def test_corrupt_pickle_is_not_called_code(tmp_path):
    path = tmp_path / "garbage.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", b"garbage")
        archive.writestr("archive/version", "3\n")
    with pytest.raises(DeeplabError) as exc:
        W.load_state_dict(path)
    one_line(exc, str(path), "corrupt, or not a state dict")
    assert "holds code" not in str(exc.value)


def test_wrapper_prefixes_are_stripped(state3):
    for prefix in ("model.", "net.module.", "module.model."):
        state = W.normalize_keys({prefix + k: v for k, v in state3.items()})
        assert state.keys() == state3.keys()
        assert W.check_state_dict(state) == 3
    # Old names under a wrapper too.
    old = {"model.scale." + k[len("base."):]: v for k, v in state3.items()}
    assert W.normalize_keys(old).keys() == state3.keys()
    # No common prefix: nothing is stripped, and the error points at the classifier's keys.
    mixed = {"model." + k: v for k, v in state3.items()}
    mixed["criterion.weight"] = torch.ones(3)
    with pytest.raises(DeeplabError) as exc:
        W.check_state_dict(W.normalize_keys(mixed), source="lightning.ckpt")
    one_line(exc, "lightning.ckpt", "base.model.base.aspp.c0.weight", "prefix")


def test_training_checkpoint_with_prefix_loads(tmp_path, state3):
    path = tmp_path / "epoch=3.ckpt"
    torch.save({"state_dict": {"model." + k: v.half() for k, v in state3.items()},
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1}]}], "epoch": 3},
               path)
    model, meta = W.load_model(path)
    assert meta.n_classes == 3 and next(model.parameters()).dtype == torch.float32
    torch.testing.assert_close(model.state_dict()["base.aspp.c1.weight"],
                               state3["base.aspp.c1.weight"].half().float())


# ------------------------------------------------------------------ downloads and cache


@pytest.fixture(scope="module")
def pth21(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mirror") / VOC_FILE
    torch.save(random_state(21, seed=6), path)
    return path


def test_html_page_with_status_200(server, tmp_path, deeplab_home):
    page = tmp_path / "portal.html"
    page.write_bytes(b"\n<!DOCTYPE html><html><body>Please sign in</body></html>")
    server.files[VOC_FILE] = page
    result = run("weights", "download", "voc12")
    assert_one_line_error(result, server.url + VOC_FILE, "web page", "by hand")
    assert list(deeplab_home.iterdir()) == []


def test_redirect_loop_is_one_readable_line(server, deeplab_home):
    server.mode = "loop"
    with pytest.raises(DeeplabError) as exc:
        W.fetch("voc12")
    # The reason urllib gives spans three lines; only the first is kept.
    one_line(exc, "HTTP 302", "infinite loop", str(deeplab_home / VOC_FILE))
    assert "\\n" not in str(exc.value) and "last 30x" not in str(exc.value)
    assert list(deeplab_home.iterdir()) == []


@pytest.mark.parametrize("style", ["path", "relative", "file-url"])
def test_mirror_as_a_local_folder(monkeypatch, pth21, deeplab_home, style):
    folder = pth21.parent
    if style == "relative":
        monkeypatch.chdir(folder.parent)
    base = {"path": str(folder), "relative": folder.name, "file-url": folder.as_uri()}[style]
    monkeypatch.setenv(W.URL_ENV, base)  # no trailing slash
    assert W.REGISTRY["voc12"].url == folder.as_uri() + "/" + VOC_FILE
    path = W.fetch("voc12", progress=False)
    assert path == deeplab_home / VOC_FILE and path.read_bytes() == pth21.read_bytes()


def test_mirror_folder_without_the_file(monkeypatch, tmp_path, deeplab_home):
    monkeypatch.setenv(W.URL_ENV, str(tmp_path / "empty-mirror"))
    result = run("weights", "download", "cocostuff10k")
    assert_one_line_error(result, (tmp_path / "empty-mirror").as_uri(), "No such file", "by hand")
    assert list(deeplab_home.iterdir()) == []


def test_unusable_mirror_url_is_one_line(monkeypatch, deeplab_home):
    monkeypatch.setenv(W.URL_ENV, "http://[::1")
    result = run("weights", "download", "voc12")
    assert_one_line_error(result, "not a usable URL", W.URL_ENV)
    assert list(deeplab_home.iterdir()) == []


def test_cache_folder_that_cannot_be_made(monkeypatch, tmp_path, server, pth21):
    server.files[VOC_FILE] = pth21
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("DEEPLAB_HOME", str(blocker / "cache"))
    result = run("weights", "download", "voc12")
    assert_one_line_error(result, "cannot save voc12", str(blocker / "cache"), "DEEPLAB_HOME")
    assert blocker.read_text() == "not a folder"


def test_cached_file_of_another_class_count(deeplab_home, pth3):
    (deeplab_home / VOC_FILE).write_bytes(pth3.read_bytes())
    with pytest.raises(DeeplabError) as exc:
        W.load_model("voc12")
    one_line(exc, str(deeplab_home / VOC_FILE), "3 classes", "voc12", "21",
             "delete the cached file")
    # The same file under its own name is fine: only the registry name promises 21 classes.
    assert W.load_model(pth3)[1].n_classes == 3


def test_info_on_a_corrupt_cached_file_says_how_to_recover(deeplab_home):
    (deeplab_home / VOC_FILE).write_bytes(b"PK\x03\x04 cut short")
    result = run("weights", "info", "voc12")
    assert_one_line_error(result, str(deeplab_home / VOC_FILE), "delete the cached file")


# ------------------------------------------------------------------ convert


def test_convert_labels_with_bom_crlf_and_blank_lines(tmp_path, pth3):
    labels = tmp_path / "classes.txt"
    labels.write_bytes(b"\xef\xbb\xbfsky\r\n\r\n  \r\nroad \r\ncar")
    dst = tmp_path / "out.safetensors"
    result = run("weights", "convert", str(pth3), str(dst), "--labels", str(labels))
    assert result.exit_code == 0, result.output
    assert W.load_state_dict(dst)[1].classes == ["sky", "road", "car"]


def test_convert_label_count_names_the_labels_file(tmp_path, pth3):
    labels = tmp_path / "classes.txt"
    labels.write_text("a\nb\n")
    dst = tmp_path / "out.safetensors"
    result = run("weights", "convert", str(pth3), str(dst), "--labels", str(labels))
    assert_one_line_error(result, f"--labels {labels}", "2 class names", "3 classes")
    assert not dst.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["classes.txt"]


def test_convert_under_a_file_is_one_line(tmp_path, pth3):
    blocker = tmp_path / "notes"
    blocker.write_text("x")
    result = run("weights", "convert", str(pth3), str(blocker / "out.safetensors"))
    assert_one_line_error(result, "out.safetensors", "a folder on its path is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


def test_convert_onto_itself_rewrites_the_metadata(tmp_path, pth3, state3):
    path = tmp_path / "self.safetensors"
    W.convert(pth3, path)
    assert run("weights", "convert", str(path), str(path), "--name", "renamed").exit_code == 0
    state, meta = W.load_state_dict(path)
    assert meta.name == "renamed"
    assert all(torch.equal(state[k], v) for k, v in state3.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["self.safetensors"]


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("changes, fragments", [
    # Loading checks these: convert used to write files that then failed to load.
    ({"palette": [(1, 2, 3)]}, ["c.safetensors", "palette has 1 colours for 3 classes"]),
    ({"palette": [(1, 2, 300)] * 3}, ["palette: expected RGB triples of whole numbers 0..255"]),
    ({"palette": [(1, 2, 3.5)] * 3}, ["palette: expected RGB triples"]),
    ({"palette": [(1, 2)] * 3}, ["palette: expected RGB triples"]),
    ({"classes": ["a", "b", "c"], "palette": [(0, 0, 0)] * 2}, ["palette has 2 colours for 3 classes"]),
    ({"classes": "abc"}, ["classes: expected a list of class names"]),
    ({"classes": ["a", 2, "c"]}, ["classes: expected a list of class names"]),
    ({"mean_bgr": (1.0, float("nan"), 3.0)}, ["mean_bgr", "three finite numbers"]),
    ({"mean_bgr": (1.0, 2.0)}, ["mean_bgr", "three finite numbers"]),
    ({"crf": {"iters": 2}}, ["crf: unknown CRF parameter"]),
    ({"crf": {"iterations": -1}}, ["crf", "iterations"]),
    ({"crf": 5}, ["crf: expected CRFParams or a dict"]),
    ({"aspp": "M"}, ["aspp must be L or S"]),
    ({"name": 7}, ["name 7: expected a string"]),
])
def test_convert_checks_the_new_metadata_before_writing(tmp_path, pth3, changes, fragments):
    dst = tmp_path / "c.safetensors"
    with pytest.raises(DeeplabError) as exc:
        W.convert(pth3, dst, **changes)
    one_line(exc, *fragments)
    assert files_in(tmp_path) == []


def test_convert_takes_crf_as_a_dict_or_crf_params(tmp_path, pth3):
    """crf={"iterations": 2} used to fail with AttributeError ('dict' has no 'to_dict')."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    W.convert(pth3, a, crf={"iterations": 2, "bi_w": 5})
    W.convert(pth3, b, crf=CRFParams(iterations=3), palette=[(1, 2, 3), (4, 5, 6), (7, 8, 9)],
              mean_bgr=np.array([1, 2, 3]))
    assert W.load_state_dict(a)[1].crf == CRFParams(iterations=2, bi_w=5)
    meta = W.load_state_dict(b)[1]
    assert meta.crf == CRFParams(iterations=3)
    assert meta.palette == [(1, 2, 3), (4, 5, 6), (7, 8, 9)]
    assert meta.mean_bgr == (1.0, 2.0, 3.0)


def test_convert_refuses_an_unknown_keyword_before_reading_anything(tmp_path):
    """foo=1 used to reach WeightsMeta's constructor after the weights were read."""
    missing = tmp_path / "never-read.pth"  # a read would fail with "no such file"
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'foo' \(metadata fields: name,"):
        W.convert(missing, tmp_path / "c.safetensors", name="x", foo=1)
    assert files_in(tmp_path) == []


def test_weights_with_another_mean_pixel_give_other_probabilities(tmp_path, state3):
    """The mean pixel a .safetensors carries used to be ignored: weights identical but for
    mean_bgr gave the same probabilities. Each must equal the network run by hand on the
    image minus its own mean."""
    from deeplab_cli.pipeline import Segmenter

    torch.manual_seed(3)
    state = {k: v.clone() for k, v in state3.items()}
    # Calm statistics, so the logits (and the mean's effect) stay in softmax's soft range.
    for key, value in state.items():
        if key.endswith("running_var"):
            value.fill_(1.0)
        elif key.endswith("bn.weight"):
            value.fill_(0.3)
    base = W.default_meta(Path("three.pth"), 3)
    rgb = np.random.default_rng(8).integers(0, 256, (9, 12, 3), dtype=np.uint8)
    probs = {}
    for mean in [(104.008, 116.669, 122.675), (0.0, 0.0, 0.0)]:
        path = tmp_path / f"mean{int(mean[0])}.safetensors"
        W.save_safetensors(state, dataclasses.replace(base, mean_bgr=mean), path)
        seg = Segmenter.from_weights(path, device="cpu", crf=None, max_size=0)
        assert seg.meta.mean_bgr == mean
        probs[mean] = seg.probs(rgb)
        model = build_model(3)
        model.load_state_dict(state)
        x = torch.from_numpy(rgb[..., ::-1].copy()).permute(2, 0, 1)[None].float()  # (1, 3, H, W) BGR
        x = x - torch.tensor(mean).view(1, 3, 1, 1)
        with torch.no_grad():
            logits = torch.nn.functional.interpolate(model(x), size=(9, 12), mode="bilinear",
                                                     align_corners=False)
        expected = torch.softmax(logits, dim=1)[0]
        torch.testing.assert_close(probs[mean], expected, atol=2e-5, rtol=1e-4)
    first, second = probs.values()
    assert (first - second).abs().max() > 1e-3


# ------------------------------------------------------------------ library entry points


def test_load_model_checks_device_and_dtype_before_reading(tmp_path):
    missing = tmp_path / "never-read.pth"  # a read would fail with "no such file"
    with pytest.raises(DeeplabError) as exc:
        W.load_model(missing, device="gpu")
    one_line(exc, "--device gpu: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        with pytest.raises(DeeplabError) as exc:
            W.load_model(missing, device="cuda")
        one_line(exc, "cuda", "not available")
    for dtype in (torch.int8, "float16"):
        with pytest.raises(DeeplabError) as exc:
            W.load_model(missing, dtype=dtype)
        one_line(exc, "dtype", "floating-point")


def test_load_model_device_strings(pth3):
    model, _ = W.load_model(pth3, device="CPU")
    assert next(model.parameters()).device.type == "cpu"
    model, _ = W.load_model(pth3, device=torch.device("cpu"), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_segmenter_runs_a_half_precision_model_and_leaves_it_alone():
    from deeplab_cli.pipeline import Segmenter

    torch.manual_seed(3)
    model = build_model(3).bfloat16()  # (float16 convolutions are slow on the CPU)
    meta = W.default_meta(Path("half.pth"), 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rgb = np.random.default_rng(0).integers(0, 256, (23, 19, 3), dtype=np.uint8)
    # It failed with "Input type (float) and bias type (c10::BFloat16) should be the same".
    labels = Segmenter(model, meta, device="cpu", crf=None, msc=False).segment(rgb).labels
    assert labels.shape == (23, 19) and labels.max() < 3
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_from_weights_name_path_and_missing(tmp_path, pth3, deeplab_home):
    from deeplab_cli.pipeline import Segmenter

    seg = Segmenter.from_weights(str(pth3), device="cpu", crf=None)
    assert seg.n_classes == 3 and seg.meta.palette == palette_for(3) and seg.crf is None
    with pytest.raises(DeeplabError) as exc:
        Segmenter.from_weights("voc13", device="cpu")
    one_line(exc, "voc13", "not a registry name", "voc12")
    with pytest.raises(DeeplabError) as exc:
        Segmenter.from_weights(pth3, device="tpu")
    one_line(exc, "tpu")


def test_info_json_is_valid_and_complete(pth3, state3):
    result = run("weights", "info", str(pth3), "--json")
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert facts["classes"] == 3 and facts["class_names"] == ["class_0", "class_1", "class_2"]
    assert facts["format"] == "pytorch-zip" and facts["keys"] == len(state3)

