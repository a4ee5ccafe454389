"""Reading the official DeepLab v2 ResNet-101 `.caffemodel` without Caffe or protoc.

A caffemodel is one protobuf `NetParameter` message. Only the few fields that hold weights
are decoded (REFERENCE §1); everything else is skipped by its wire type:

    NetParameter:      layer = 100 (LayerParameter), layers = 2 (V1LayerParameter, old files)
    LayerParameter:    name = 1, blobs = 7
    V1LayerParameter:  name = 4, blobs = 6
    BlobProto:         num, channels, height, width = 1..4 (legacy shape), data = 5 (float),
                       shape = 7 (BlobShape: dim = 1, int64), double_data = 8
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from deeplab_cli.errors import DeeplabError
from deeplab_cli.fsutil import read_input

if TYPE_CHECKING:
    import torch

# Protobuf wire types.
VARINT, FIXED64, BYTES, FIXED32 = 0, 1, 2, 5

NET_LAYER, NET_V1_LAYERS = 100, 2
LAYER_NAME, LAYER_BLOBS = 1, 7
V1_NAME, V1_BLOBS = 4, 6
BLOB_LEGACY_DIMS = (1, 2, 3, 4)  # num, channels, height, width
BLOB_DATA, BLOB_SHAPE, BLOB_DOUBLE_DATA = 5, 7, 8
SHAPE_DIM = 1


class ProtobufError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise ProtobufError("message ends inside a varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ProtobufError("varint longer than 10 bytes")


def iter_fields(buf: memoryview, start: int = 0, end: int | None = None
                ) -> Iterator[tuple[int, int, int | memoryview]]:
    """Yield (field number, wire type, value) of one message; BYTES values are views."""
    end = len(buf) if end is None else end
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == VARINT:
            value, pos = _varint(buf, pos, end)
        elif wire == FIXED64:
            value, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wire == FIXED32:
            value, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        elif wire == BYTES:
            length, pos = _varint(buf, pos, end)
            value, pos = buf[pos:pos + length], pos + length
        else:  # groups (3, 4) never occur in caffe.proto
            raise ProtobufError(f"unsupported wire type {wire} for field {field}")
        if pos > end:
            raise ProtobufError(f"field {field} runs past the end of its message")
        if field == 0:
            raise ProtobufError("field number 0")
        yield field, wire, value


def _packed_varints(view: memoryview) -> list[int]:
    values, pos = [], 0
    while pos < len(view):
        value, pos = _varint(view, pos, len(view))
        values.append(value)
    return values


def parse_blob(view: memoryview) -> np.ndarray:
    """A BlobProto as a float32 array in its declared shape."""
    shape: list[int] = []
    legacy = [0, 0, 0, 0]
    chunks: list[np.ndarray] = []
    for field, wire, value in iter_fields(view):
        if field == BLOB_SHAPE and wire == BYTES:
            for f, w, v in iter_fields(value):
                if f == SHAPE_DIM:
                    shape.extend(_packed_varints(v) if w == BYTES else [v])
        elif field in BLOB_LEGACY_DIMS and wire == VARINT:
            legacy[field - 1] = value
        elif field == BLOB_DATA:
            if wire == BYTES:  # packed
                chunks.append(np.frombuffer(value, dtype="<f4"))
            elif wire == FIXED32:  # unpacked, one float per field
                chunks.append(np.array([value], dtype="<u4").view("<f4"))
        elif field == BLOB_DOUBLE_DATA:
            if wire == BYTES:
                chunks.append(np.frombuffer(value, dtype="<f8").astype("<f4"))
            elif wire == FIXED64:
                chunks.append(np.array([value], dtype="<u8").view("<f8").astype("<f4"))
    data = np.concatenate(chunks) if chunks else np.zeros(0, dtype="<f4")
    if not shape and any(legacy):
        shape = legacy
    if shape and int(np.prod(shape)) != data.size:
        raise ProtobufError(f"blob of shape {shape} holds {data.size} values")
    return data.astype(np.float32).reshape(shape or data.shape)


def iter_layers(data: bytes) -> Iterator[tuple[str, list[np.ndarray]]]:
    """(name, blobs) for every layer of a NetParameter, new (field 100) or V1 (field 2)."""
    buf = memoryview(data)
    for field, wire, value in iter_fields(buf):
        if wire != BYTES or field not in (NET_LAYER, NET_V1_LAYERS):
            continue
        name_field, blobs_field = ((LAYER_NAME, LAYER_BLOBS) if field == NET_LAYER
                                   else (V1_NAME, V1_BLOBS))
        name, blobs = "", []
        for f, w, v in iter_fields(value):
            if f == name_field and w == BYTES:
                name = bytes(v).decode("utf-8", errors="replace")
            elif f == blobs_field and w == BYTES:
                blobs.append(parse_blob(v))
        yield name, blobs


# res{stage}{block}_branch{part}, bn{...}, scale{...}: Caffe ResNet naming.
_RES_NAME = re.compile(r"^(res|bn|scale)([2-5])([a-z])(\d*)_branch(1|2a|2b|2c)$")
_BRANCH = {"1": "shortcut", "2a": "reduce", "2b": "conv3x3", "2c": "increase"}
_ASPP_NAME = re.compile(r"^fc1_(?:\w+_)?c(\d+)$")
_SCALED_COPY = re.compile(r"_res(075|05)$")


def unit_for_layer(name: str) -> tuple[str, str] | None:
    """Map a Caffe layer name to (our unit prefix, kind); kind is conv, bn, scale or aspp.

    None for layers without a counterpart. Stage S of Caffe's ResNet is our layerS
    (layer1 is the stem); blocks a, b, c are 1, 2, 3 and bK is K + 1.
    """
    if name == "conv1":
        return "base.layer1.conv1.conv", "conv"
    if name == "bn_conv1":
        return "base.layer1.conv1.bn", "bn"
    if name == "scale_conv1":
        return "base.layer1.conv1.bn", "scale"
    match = _RES_NAME.match(name)
    if match:
        kind, stage, letter, number, branch = match.groups()
        if number and letter != "b":
            return None
        block = int(number) + 1 if number else ord(letter) - ord("a") + 1
        unit = f"base.layer{stage}.block{block}.{_BRANCH[branch]}"
        return (unit + ".conv", "conv") if kind == "res" else (unit + ".bn", kind)
    match = _ASPP_NAME.match(name)
    if match:
        return f"base.aspp.c{match.group(1)}", "aspp"
    return None


def read_caffemodel(path: str | Path) -> dict[str, "torch.Tensor"]:
    """The weights of a DeepLab v2 ResNet-101 caffemodel under our state-dict names.

    BN statistics are divided by Caffe's stored scale factor; `num_batches_tracked` is
    not part of the result. Raises DeeplabError for a malformed file or a layer with
    weights that has no counterpart in the network.
    """
    import torch

    path = Path(path)
    data = read_input(path, expected="a .caffemodel file")
    arrays: dict[str, np.ndarray] = {}
    try:
        for name, blobs in iter_layers(data):
            if not blobs or _SCALED_COPY.search(name):
                continue  # layers without weights, and the MSC branches' shared copies
            target = unit_for_layer(name)
            if target is None:
                raise DeeplabError(
                    f"{path}: layer {name!r} has weights but is not part of DeepLab v2 ResNet-101")
            unit, kind = target
            _check_blob_count(path, name, kind, blobs)
            if kind == "conv":
                arrays[f"{unit}.weight"] = blobs[0]
            elif kind == "aspp":
                arrays[f"{unit}.weight"] = blobs[0]
                arrays[f"{unit}.bias"] = blobs[1].reshape(-1)
            elif kind == "bn":
                # Caffe stores running sums and a scale factor; 0 means "no statistics".
                factor = float(blobs[2].reshape(-1)[0]) if blobs[2].size else 0.0
                inv = 0.0 if factor == 0 else 1.0 / factor
                arrays[f"{unit}.running_mean"] = blobs[0].reshape(-1) * inv
                arrays[f"{unit}.running_var"] = blobs[1].reshape(-1) * inv
            else:  # scale: the BN's affine part
                arrays[f"{unit}.weight"] = blobs[0].reshape(-1)
                arrays[f"{unit}.bias"] = blobs[1].reshape(-1)
    except ValueError as exc:  # ProtobufError, or numpy refusing a ragged float array
        raise DeeplabError(f"{path}: not a readable caffemodel (truncated or corrupt: {exc})") from None
    if not arrays:
        raise DeeplabError(f"{path}: no DeepLab layers with weights found in this caffemodel")
    return {key: torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
            for key, value in arrays.items()}


_BLOBS_NEEDED = {"conv": 1, "aspp": 2, "bn": 3, "scale": 2}


def _check_blob_count(path: Path, name: str, kind: str, blobs: list[np.ndarray]) -> None:
    needed = _BLOBS_NEEDED[kind]
    if len(blobs) < needed:
        raise DeeplabError(f"{path}: layer {name!r} has {len(blobs)} blob(s), expected {needed}")
