"""Weights: every format round-trips, bad files fail with one line, downloads are atomic."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from deeplab_cli import weights as W
from deeplab_cli.crf.params import CRFParams
from deeplab_cli.errors import DeeplabError
from deeplab_cli.labels import VOC_CLASSES, palette_for
from deeplab_cli.model import build_model
from helpers import Evil, random_state

VOC_FILE = W.REGISTRY["voc12"].filename


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], *, exact=True):
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)


def assert_one_line(exc: pytest.ExceptionInfo, *fragments: str) -> None:
    text = str(exc.value)
    assert "\n" not in text
    for fragment in fragments:
        assert fragment in text, text


@pytest.fixture(scope="session")
def state21() -> dict[str, torch.Tensor]:
    return random_state(21, seed=0)


@pytest.fixture(scope="session")
def files(tmp_path_factory, state21) -> dict[str, Path]:
    """The 21-class weights saved once in each PyTorch serialization and in safetensors."""
    root = tmp_path_factory.mktemp("weights")
    out = {"zip": root / VOC_FILE, "legacy": root / "legacy.pth"}
    torch.save(state21, out["zip"])
    torch.save(state21, out["legacy"], _use_new_zipfile_serialization=False)
    out["safetensors"] = W.convert(out["zip"], root / "voc.safetensors")
    return out


# ------------------------------------------------------------------ formats


def test_zip_pth_round_trip_uses_registry_metadata(files, state21):
    state, meta = W.load_state_dict(files["zip"])
    assert_same_state(state, state21)
    # The file carries the registry's file name and class count: its metadata applies.
    assert meta.name == "voc12" and meta.dataset == W.REGISTRY["voc12"].dataset
    assert meta.classes == list(VOC_CLASSES) and meta.palette == palette_for(21)
    assert meta.crf == CRFParams(pos_w=3, pos_xy_std=1, bi_w=4, bi_xy_std=67, bi_rgb_std=3)
    assert W.detect_format(files["zip"]) == "pytorch-zip"


def test_legacy_serialization_with_old_key_names(tmp_path, files, state21):
    assert W.detect_format(files["legacy"]) == "pytorch-legacy"
    assert_same_state(W.load_state_dict(files["legacy"])[0], state21)

    old = {}
    for key, value in state21.items():
        key = key.replace("base.", "scale.", 1).replace(".aspp.c", ".aspp.stages.c")
        old[key.replace(".shortcut.", ".proj.")] = value
    assert any(".proj." in k for k in old) and any("aspp.stages.c3" in k for k in old)
    path = tmp_path / "old.pth"
    torch.save(old, path, _use_new_zipfile_serialization=False)
    state, meta = W.load_state_dict(path)
    assert_same_state(state, state21)
    assert meta.classes == list(VOC_CLASSES) and meta.name == "old"


def test_wrapped_state_dict_module_prefix_and_missing_counters(tmp_path, state21):
    wrapped = {"state_dict": {"module." + k: v for k, v in state21.items()
                              if not k.endswith("num_batches_tracked")}, "epoch": 3}
    path = tmp_path / "wrapped.pth"
    torch.save(wrapped, path)
    state, _ = W.load_state_dict(path)
    assert len(state) == 632
    assert int(state["base.layer1.conv1.bn.num_batches_tracked"]) == 0
    for key, value in state21.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(state[key], value)


def test_safetensors_carries_metadata(tmp_path, files, state21):
    state, meta = W.load_state_dict(files["safetensors"])
    assert_same_state(state, state21)
    assert meta.name == "voc12" and meta.classes == list(VOC_CLASSES)

    custom = tmp_path / "custom.safetensors"
    names = [f"thing{i}" for i in range(21)]
    W.convert(files["safetensors"], custom, name="mine", dataset="my photos", classes=names,
              aspp="S", crf=CRFParams(bi_w=5, iterations=3))
    state2, meta2 = W.load_state_dict(custom)
    assert_same_state(state2, state21)
    assert (meta2.name, meta2.dataset, meta2.classes, meta2.aspp) == ("mine", "my photos", names, "S")
    assert meta2.crf.bi_w == 5 and meta2.crf.iterations == 3
    assert meta2.palette == palette_for(21)
    assert meta2.mean_bgr == pytest.approx((104.008, 116.669, 122.675))

    model, meta3 = W.load_model(custom)
    assert meta3.aspp == "S" and model.base.aspp.c3.dilation == (12, 12)
    assert not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, state21[key]), key


def test_load_model_outputs_match_the_saved_network(files):
    torch.manual_seed(1)
    source = build_model(21)
    path = files["zip"].parent / "net.safetensors"
    W.save_safetensors(source.state_dict(), W.default_meta(path, 21), path)
    model, meta = W.load_model(str(path), dtype=torch.float32)
    x = torch.randn(1, 3, 33, 25)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)
    assert meta.n_classes == 21
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cpu"}
    assert all(isinstance(p, torch.nn.Parameter) for p in model.parameters())


def test_load_model_builds_no_second_copy_of_the_weights(files, monkeypatch):
    # The network is built on the meta device (no storage, no random init) and takes the loaded
    # tensors themselves, so the weights are never in memory twice.
    import deeplab_cli.model as model_module

    real, devices = model_module.build_model, []

    def spy(*args, **kwargs):
        model = real(*args, **kwargs)
        devices.append(next(model.parameters()).device.type)
        return model

    monkeypatch.setattr(model_module, "build_model", spy)
    W.load_model(files["safetensors"])
    assert devices and set(devices) == {"meta"}  # (the key check builds one too)


def test_info_reports_counts_and_checksum(files):
    facts = W.info(files["zip"])
    assert facts["format"] == "pytorch-zip"
    assert facts["classes"] == 21 and facts["keys"] == 632
    assert facts["parameters"] == 44_048_532
    assert facts["sha256"] == hashlib.sha256(files["zip"].read_bytes()).hexdigest()
    assert facts["size_bytes"] == files["zip"].stat().st_size


def test_convert_is_atomic_and_checks_the_suffix(tmp_path, files):
    with pytest.raises(DeeplabError) as exc:
        W.convert(files["zip"], tmp_path / "out.pth")
    assert_one_line(exc, "out.pth", ".safetensors")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DeeplabError):
        W.convert(bad, tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == [bad]
    with pytest.raises(DeeplabError) as exc:
        W.convert(files["safetensors"], tmp_path / "x.safetensors", classes=["a", "b"])
    assert_one_line(exc, "2 class names", "21 classes")


# ------------------------------------------------------------------ caffemodel


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes | str | int) -> bytes:
    """One protobuf field: an int is a varint, bytes/str are length-delimited."""
    if isinstance(payload, int):
        return _varint(number << 3) + _varint(payload)
    if isinstance(payload, str):
        payload = payload.encode()
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _blob(array: np.ndarray, *, legacy: bool) -> bytes:
    array = np.asarray(array, dtype="<f4")
    if legacy:  # num, channels, height, width, padded on the left with ones
        dims = (1,) * (4 - array.ndim) + array.shape
        head = b"".join(_field(i + 1, d) for i, d in enumerate(dims))
    else:
        head = _field(7, _field(1, b"".join(_varint(d) for d in array.shape)))
    return head + _field(5, array.tobytes())


def _layer(name: str, blobs: list[np.ndarray], *, v1: bool) -> bytes:
    if v1:  # V1LayerParameter: name 4, type 5 (enum), blobs 6; NetParameter field 2
        body = _field(4, name) + _field(5, 4) + b"".join(_field(6, _blob(b, legacy=True)) for b in blobs)
        return _field(2, body)
    body = _field(1, name) + _field(2, "Convolution") + b"".join(
        _field(7, _blob(b, legacy=False)) for b in blobs)
    return _field(100, body)


def _caffe_unit_name(layer: int, block: int) -> str:
    if block == 1:
        return f"{layer}a"
    return f"{layer}{'abc'[block - 1]}" if layer in (2, 5) else f"{layer}b{block - 1}"


def encode_caffemodel(state: dict[str, torch.Tensor], *, v1: bool, factor: float = 999.982) -> bytes:
    """A DeepLab v2 caffemodel holding `state`, written the way Caffe names and stores it."""
    branch = {"shortcut": "1", "reduce": "2a", "conv3x3": "2b", "increase": "2c"}
    parts = [_field(1, "DeepLab-ResNet-101"), _layer("data", [], v1=v1)]
    units = sorted({k.rsplit(".", 2)[0] for k in state if ".conv.weight" in k or ".bn." in k})
    for unit in units:
        if unit == "base.layer1.conv1":
            conv, bn, scale = "conv1", "bn_conv1", "scale_conv1"
        else:
            _, layer, block, part = unit.split(".")
            tag = _caffe_unit_name(int(layer[5:]), int(block[5:])) + "_branch" + branch[part]
            conv, bn, scale = f"res{tag}", f"bn{tag}", f"scale{tag}"
        t = {k: state[f"{unit}.{k}"].numpy() for k in
             ("conv.weight", "bn.running_mean", "bn.running_var", "bn.weight", "bn.bias")}
        parts.append(_layer(conv, [t["conv.weight"]], v1=v1))
        parts.append(_layer(bn, [t["bn.running_mean"] * factor, t["bn.running_var"] * factor,
                                 np.array([factor])], v1=v1))
        parts.append(_layer(scale, [t["bn.weight"], t["bn.bias"]], v1=v1))
        parts.append(_layer(conv + "_relu", [], v1=v1))
    for i in range(4):
        parts.append(_layer(f"fc1_voc12_c{i}", [state[f"base.aspp.c{i}.weight"].numpy(),
                                                state[f"base.aspp.c{i}.bias"].numpy()], v1=v1))
        # The multi-scale branches' copies are skipped; a wrong shape here would show.
        parts.append(_layer(f"fc1_voc12_c{i}_res075", [np.zeros((2, 2))], v1=v1))
    return b"".join(parts)


@pytest.mark.parametrize("v1", [False, True], ids=["LayerParameter", "V1LayerParameter"])
def test_caffemodel_round_trip(tmp_path, state21, v1):
    path = tmp_path / "train_iter_20000.caffemodel"
    path.write_bytes(encode_caffemodel(state21, v1=v1))
    state, meta = W.load_state_dict(path)
    assert W.detect_format(path) == "caffemodel"
    expected = {k: (torch.tensor(0) if k.endswith("num_batches_tracked") else v)
                for k, v in state21.items()}
    assert_same_state(state, expected, exact=False)
    assert meta.classes == list(VOC_CLASSES)
    facts = W.info(path)
    assert facts["keys"] == 528 and facts["parameters"] == 44_048_532


def test_caffemodel_errors(tmp_path, state21):
    data = encode_caffemodel(state21, v1=False)
    truncated = tmp_path / "cut.caffemodel"
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(DeeplabError) as exc:
        W.load_state_dict(truncated)
    assert_one_line(exc, str(truncated), "truncated or corrupt")

    extra = tmp_path / "extra.caffemodel"
    extra.write_bytes(data + _layer("fc8_imagenet", [np.zeros((4, 3))], v1=False))
    with pytest.raises(DeeplabError) as exc:
        W.load_state_dict(extra)
    assert_one_line(exc, "fc8_imagenet", "not part of DeepLab")

    from deeplab_cli.caffe import unit_for_layer

    assert unit_for_layer("res4b22_branch2b") == ("base.layer4.block23.conv3x3.conv", "conv")
    assert unit_for_layer("bn3b1_branch1") == ("base.layer3.block2.shortcut.bn", "bn")
    assert unit_for_layer("scale5c_branch2c") == ("base.layer5.block3.increase.bn", "scale")
    assert unit_for_layer("fc1_voc12_c3") == ("base.aspp.c3", "aspp")
    assert unit_for_layer("pool1") is None


def test_caffemodel_bn_statistics_are_divided_by_the_scale_factor(tmp_path):
    from deeplab_cli.caffe import read_caffemodel

    path = tmp_path / "bn.caffemodel"
    for factor, expected_mean, expected_var in ((4.0, 0.25, 0.5), (0.0, 0.0, 0.0)):
        path.write_bytes(_layer("bn_conv1", [np.ones(3), np.full(3, 2.0), np.array([factor])], v1=True)
                         + _layer("scale_conv1", [np.full(3, 3.0), np.full(3, -1.0)], v1=False))
        state = read_caffemodel(path)
        assert state["base.layer1.conv1.bn.running_mean"].tolist() == [expected_mean] * 3
        assert state["base.layer1.conv1.bn.running_var"].tolist() == [expected_var] * 3
        assert state["base.layer1.conv1.bn.weight"].tolist() == [3.0] * 3
        assert state["base.layer1.conv1.bn.bias"].tolist() == [-1.0] * 3


# ------------------------------------------------------------------ invalid files


def test_malicious_pickles_are_refused_without_running(tmp_path):
    flag = tmp_path / "pwned"

    plain = tmp_path / "evil.pth"
    plain.write_bytes(pickle.dumps(Evil(flag), protocol=2))
    zipped = tmp_path / "evil_zip.pth"
    torch.save({"base.layer1.conv1.conv.weight": torch.zeros(1), "x": Evil(flag)}, zipped)
    for path in (plain, zipped):
        with pytest.raises(DeeplabError) as exc:
            W.load_state_dict(path)
        assert_one_line(exc, str(path), "refused")
    assert not flag.exists()


@pytest.mark.parametrize("kind", ["zip", "legacy", "safetensors"])
def test_truncated_files(tmp_path, files, kind):
    data = files[kind].read_bytes()
    path = tmp_path / ("cut" + files[kind].suffix)
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DeeplabError) as exc:
        W.load_state_dict(path)
    assert_one_line(exc, str(path), "truncated or corrupt")


def test_garbage_and_empty_files(tmp_path):
    garbage = tmp_path / "junk.pth"
    garbage.write_bytes(b"\x00hello, this is not a checkpoint")
    with pytest.raises(DeeplabError) as exc:
        W.load_state_dict(garbage)
    assert_one_line(exc, str(garbage), "unrecognised")
    empty = tmp_path / "empty.safetensors"
    empty.touch()
    with pytest.raises(DeeplabError) as exc:
        W.load_state_dict(empty)
    assert_one_line(exc, "empty")
    not_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_dict)
    with pytest.raises(DeeplabError) as exc:
        W.load_state_dict(not_dict)
    assert_one_line(exc, "does not hold a state dict")


def test_state_dict_validation(state21):
    n = W.check_state_dict(dict(state21))
    assert n == 21

    with pytest.raises(DeeplabError) as exc:
        W.check_state_dict({**state21, "base.layer6.block1.reduce.conv.weight": torch.zeros(1)},
                           source="x.pth")
    assert_one_line(exc, "x.pth", "1 unknown key", "layer6")

    missing = dict(state21)
    del missing["base.layer4.block7.conv3x3.bn.running_var"]
    with pytest.raises(DeeplabError) as exc:
        W.check_state_dict(missing, source="x.pth")
    assert_one_line(exc, "missing key", "block7.conv3x3.bn.running_var")

    wrong = {**state21, "base.layer2.block1.reduce.conv.weight": torch.zeros(64, 64, 3, 3)}
    with pytest.raises(DeeplabError) as exc:
        W.check_state_dict(wrong, source="x.pth")
    assert_one_line(exc, "base.layer2.block1.reduce.conv.weight", "[64, 64, 3, 3]", "[64, 64, 1, 1]")

    mixed = {**state21, "base.aspp.c2.weight": torch.zeros(182, 2048, 3, 3),
             "base.aspp.c2.bias": torch.zeros(182)}
    with pytest.raises(DeeplabError) as exc:
        W.check_state_dict(mixed, source="x.pth")
    assert_one_line(exc, "disagree", "c0.weight: 21", "c2.weight: 182")

    with pytest.raises(DeeplabError) as exc:
        W.check_state_dict({"fc.weight": torch.zeros(3)}, source="x.pth")
    assert_one_line(exc, "no ASPP")

    diverged = dict(state21)
    diverged["base.layer3.block2.conv3x3.conv.weight"] = diverged["base.layer3.block2.conv3x3.conv.weight"].clone()
    diverged["base.layer3.block2.conv3x3.conv.weight"][0, 0, 1, 1] = float("nan")
    with pytest.raises(DeeplabError) as exc:
        W.check_state_dict(diverged, source="x.pth")
    assert_one_line(exc, "x.pth", "base.layer3.block2.conv3x3.conv.weight", "NaN or infinite")

    one_class = {k: (v[:1] if k.startswith("base.aspp.") else v) for k, v in state21.items()}
    with pytest.raises(DeeplabError) as exc:
        W.check_state_dict(one_class, source="x.pth")
    assert_one_line(exc, "x.pth", "1 class", "at least 2")


def test_metadata_class_count_must_match(tmp_path, files):
    from safetensors.torch import load_file, save_file

    meta = W.load_state_dict(files["safetensors"])[1].to_metadata()
    meta["classes"] = '["a", "b", "c"]'
    meta.pop("palette")
    path = tmp_path / "mismatch.safetensors"
    save_file(load_file(files["safetensors"]), str(path), metadata=meta)
    with pytest.raises(DeeplabError) as exc:
        W.load_state_dict(path)
    assert_one_line(exc, str(path), "3 classes", "21")


def test_bare_checkpoint_with_unknown_class_count_gets_generic_names(tmp_path):
    path = tmp_path / "five.safetensors"
    from safetensors.torch import save_file

    save_file(random_state(5, seed=3), str(path))  # no metadata at all
    state, meta = W.load_state_dict(path)
    assert meta.classes == [f"class_{i}" for i in range(5)]
    assert meta.palette == palette_for(5) and meta.aspp == "L" and meta.name == "five"


# ------------------------------------------------------------------ cache and downloads


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPLAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert W.cache_dir() == tmp_path / "home"
    monkeypatch.delenv("DEEPLAB_HOME")
    assert W.cache_dir() == tmp_path / "xdg" / "deeplab"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert W.cache_dir() == tmp_path / "user" / ".cache" / "deeplab"


def test_registry_entries():
    assert W.DEFAULT_WEIGHTS == "voc12"
    assert set(W.REGISTRY) >= {"voc12", "cocostuff164k", "cocostuff10k"}
    voc = W.REGISTRY["voc12"]
    assert voc.url == ("https://github.com/kazuto1011/deeplab-pytorch/releases/download/v1.0/"
                       "deeplabv2_resnet101_msc-vocaug-20000.pth")
    assert voc.miou == (76.65, 77.93) and voc.n_classes == 21
    assert W.REGISTRY["cocostuff164k"].n_classes == 182
    for entry in W.REGISTRY.values():
        meta = entry.meta(source="test")
        assert len(meta.classes) == len(meta.palette) == entry.n_classes
        # The size shown before download is the tensor bytes of such a network.
        with torch.device("meta"):
            state = build_model(entry.n_classes).state_dict()
        float_bytes = sum(v.numel() * 4 for k, v in state.items() if v.is_floating_point())
        assert entry.approx_size == float_bytes


def test_download_success_with_progress(server, files, deeplab_home, capsys):
    server.files[VOC_FILE] = files["zip"]
    path = W.resolve("voc12")
    assert path == deeplab_home / VOC_FILE
    assert path.read_bytes() == files["zip"].read_bytes()
    assert sorted(p.name for p in deeplab_home.iterdir()) == [VOC_FILE]
    assert server.requests == ["/" + VOC_FILE]
    err = capsys.readouterr().err
    assert server.url + VOC_FILE in err

    # Cached now: neither resolve, fetch nor load_model asks the server again.
    assert W.fetch("voc12", progress=True) == path
    model, meta = W.load_model("voc12")
    assert meta.name == "voc12" and model.n_classes == 21
    assert server.requests == ["/" + VOC_FILE]


def test_progress_bar_when_asked(server, files, deeplab_home, capsys):
    server.files[VOC_FILE] = files["zip"]
    W.fetch("voc12", progress=True)
    err = capsys.readouterr().err
    assert "100.0%" in err and "MB" in err


def test_present_file_never_touches_the_network(monkeypatch, deeplab_home):
    # Nothing listens on this port; a request would fail loudly.
    monkeypatch.setenv(W.URL_ENV, "http://127.0.0.1:9/")
    target = deeplab_home / VOC_FILE
    target.write_bytes(b"whatever the user put here")
    assert W.resolve("voc12") == target
    assert W.fetch("voc12") == target


@pytest.mark.parametrize("mode", ["404", "truncate", "corrupt", "offline"])
def test_failed_download_leaves_nothing(server, files, deeplab_home, tmp_path, mode, monkeypatch):
    if mode == "corrupt":
        junk = tmp_path / "junk"
        junk.write_bytes(b"PK\x03\x04" + os.urandom(5000))
        server.files[VOC_FILE] = junk
    else:
        server.files[VOC_FILE] = files["zip"]
        server.mode = mode
    if mode == "offline":
        monkeypatch.setenv(W.URL_ENV, "http://127.0.0.1:9/")
    with pytest.raises(DeeplabError) as exc:
        W.resolve("voc12")
    url = ("http://127.0.0.1:9/" if mode == "offline" else server.url) + VOC_FILE
    assert_one_line(exc, url, str(deeplab_home / VOC_FILE), "by hand")
    reason = {"404": "HTTP 404", "truncate": "transfer truncated", "corrupt": "not valid",
              "offline": "refused"}[mode]
    assert reason in str(exc.value)
    assert list(deeplab_home.iterdir()) == []


def test_download_of_wrong_class_count_is_rejected(server, tmp_path, deeplab_home):
    path = tmp_path / "coco.safetensors"
    from safetensors.torch import save_file

    save_file(random_state(182, seed=4), str(path))
    server.files[W.REGISTRY["voc12"].filename] = path
    with pytest.raises(DeeplabError) as exc:
        W.fetch("voc12")
    assert_one_line(exc, "182 classes, expected 21")
    assert list(deeplab_home.iterdir()) == []


def test_resolve_errors(tmp_path):
    with pytest.raises(DeeplabError) as exc:
        W.resolve(tmp_path / "nope.pth")
    assert_one_line(exc, "nope.pth", "no such file", "voc12")
    with pytest.raises(DeeplabError) as exc:
        W.resolve("cocostuff10k", download=False)
    assert_one_line(exc, "not downloaded", "deeplab weights download cocostuff10k")
    with pytest.raises(DeeplabError) as exc:
        W.fetch("imagenet")
    assert_one_line(exc, "unknown weights", "voc12")
