"""Pretrained weights: the registry, the download cache, and reading every supported format.

Formats: PyTorch `.pth` state dicts (zip or legacy serialization, current or pre-2019 key
names; always `torch.load(weights_only=True)`), our `.safetensors` (tensors plus metadata:
classes, palette, dataset, mean, CRF defaults, ASPP variant) and the official Caffe
`.caffemodel`. Every file is checked against the network layout before use.

Importing this module does not import torch, so listing the registry stays instant.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deeplab_cli import labels
from deeplab_cli.crf.params import CRFParams
from deeplab_cli.errors import DeeplabError, first_line
from deeplab_cli.fsutil import atomic_path

if TYPE_CHECKING:
    import torch

    from deeplab_cli.model import MSC

DEFAULT_WEIGHTS = "voc12"
BASE_URL = "https://github.com/kazuto1011/deeplab-pytorch/releases/download/v1.0/"
# Where registry files are fetched from: the release above unless this variable names a
# mirror (any URL folder holding the same file names).
URL_ENV = "DEEPLAB_WEIGHTS_URL"
METADATA_VERSION = "1"

# Channels of all BN layers together (their running mean and var are stored, not learned).
_BN_CHANNELS = 52_672


def _parameter_count(n_classes: int) -> int:
    # Backbone (42,500,160) plus four 3x3 ASPP classifiers with biases.
    return 42_500_160 + 4 * n_classes * (2048 * 9 + 1)


@dataclasses.dataclass
class WeightsMeta:
    """What a set of weights needs besides its tensors to be used and shown."""

    name: str
    dataset: str
    classes: list[str]
    palette: list[tuple[int, int, int]]  # one RGB colour per class
    mean_bgr: tuple[float, float, float]
    crf: CRFParams
    aspp: str = "L"
    source: str = ""

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def to_metadata(self) -> dict[str, str]:
        """String-to-string metadata for a safetensors header."""
        return {
            "deeplab.version": METADATA_VERSION,
            "name": self.name,
            "dataset": self.dataset,
            "classes": json.dumps(list(self.classes)),
            "palette": json.dumps([list(c) for c in self.palette]),
            "mean_bgr": json.dumps(list(self.mean_bgr)),
            "crf": json.dumps(self.crf.to_dict()),
            "aspp": self.aspp,
            "source": self.source,
        }

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], default: "WeightsMeta",
                      *, path: Path) -> "WeightsMeta":
        """Fill `default` with whatever a safetensors header provides; bad JSON is an error."""
        def field(key: str) -> Any:
            try:
                return json.loads(metadata[key])
            except (json.JSONDecodeError, TypeError):
                raise DeeplabError(f"{path}: metadata field {key!r} is not valid JSON") from None
            except RecursionError:  # a header crafted with thousands of nested brackets
                raise DeeplabError(f"{path}: metadata field {key!r} is nested too deeply") from None

        meta = dataclasses.replace(default)
        if "name" in metadata:
            meta.name = metadata["name"]
        if "dataset" in metadata:
            meta.dataset = metadata["dataset"]
        if "classes" in metadata:
            classes = field("classes")
            if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
                raise DeeplabError(f"{path}: metadata 'classes' must be a list of names")
            meta.classes = classes
            if "palette" not in metadata:
                meta.palette = labels.palette_for(len(classes))
        if "palette" in metadata:
            palette = field("palette")
            # Whole numbers only: int() would quietly truncate 1.5, take true for 1 and
            # overflow on 1e400.
            if not (isinstance(palette, list) and all(
                    isinstance(c, list) and len(c) == 3
                    and all(type(v) is int and 0 <= v <= 255 for v in c) for c in palette)):
                raise DeeplabError(f"{path}: metadata 'palette' must be a list of RGB triples "
                                   "of whole numbers 0..255")
            meta.palette = [tuple(c) for c in palette]
        if "mean_bgr" in metadata:
            mean = field("mean_bgr")
            if not (isinstance(mean, list) and len(mean) == 3 and all(
                    type(v) in (int, float) and math.isfinite(v) for v in mean)):
                raise DeeplabError(f"{path}: metadata 'mean_bgr' must be three finite numbers")
            meta.mean_bgr = tuple(float(v) for v in mean)
        if "crf" in metadata:
            meta.crf = CRFParams.from_dict(field("crf"), source=f"{path}: metadata 'crf'")
        if "aspp" in metadata:
            meta.aspp = metadata["aspp"]
        if "source" in metadata:
            meta.source = metadata["source"]
        return meta


@dataclasses.dataclass(frozen=True)
class RegistryEntry:
    """A published set of weights: where it comes from and what it was trained for."""

    name: str
    filename: str
    dataset: str
    label_set: str  # key of labels.LABEL_SETS
    n_classes: int
    miou: tuple[float, float]  # reported val mIoU (%) without / with CRF
    description: str
    license: str
    aspp: str = "L"
    crf: CRFParams = CRFParams()
    sha256: str | None = None  # hex digest of the published file, where one is known

    @property
    def url(self) -> str:
        return mirror_base_url() + self.filename

    @property
    def path(self) -> Path:
        """Where the file lives in the cache (whether or not it is there yet)."""
        return cache_dir() / self.filename

    @property
    def approx_size(self) -> int:
        """Bytes of float32 tensor data; the file is this plus a few kB."""
        return 4 * (_parameter_count(self.n_classes) + 2 * _BN_CHANNELS)

    def meta(self, *, source: str) -> WeightsMeta:
        from deeplab_cli.model import MEAN_BGR

        label_set = labels.LABEL_SETS[self.label_set]
        return WeightsMeta(name=self.name, dataset=self.dataset, classes=list(label_set.classes),
                           palette=label_set.palette, mean_bgr=MEAN_BGR, crf=self.crf,
                           aspp=self.aspp, source=source)


_PROVENANCE = ("released with kazuto1011/deeplab-pytorch v1.0 (MIT License), trained with that "
               "port from the DeepLab v2 COCO-pretrained init; no checksum published; "
               "the dataset's own terms apply")

REGISTRY: dict[str, RegistryEntry] = {
    entry.name: entry for entry in (
        RegistryEntry(
            name="voc12", filename="deeplabv2_resnet101_msc-vocaug-20000.pth",
            dataset="PASCAL VOC 2012 trainaug", label_set="voc", n_classes=21,
            miou=(76.65, 77.93),
            description="DeepLab v2 ResNet-101 MSC, VOC 2012 trainaug, 20k iterations "
                        "(paper: 76.35 / 77.69 mIoU)",
            license=_PROVENANCE,
        ),
        RegistryEntry(
            name="cocostuff164k", filename="deeplabv2_resnet101_msc-cocostuff164k-100000.pth",
            dataset="COCO-Stuff 164k", label_set="cocostuff", n_classes=182,
            miou=(39.1, 39.7),
            description="DeepLab v2 ResNet-101 MSC, COCO-Stuff 164k train2017, 100k iterations",
            license=_PROVENANCE,
        ),
        RegistryEntry(
            name="cocostuff10k", filename="deeplabv2_resnet101_msc-cocostuff10k-20000.pth",
            dataset="COCO-Stuff 10k", label_set="cocostuff", n_classes=182,
            miou=(34.8, 35.6),
            description="DeepLab v2 ResNet-101 MSC, COCO-Stuff 10k train, 20k iterations",
            license=_PROVENANCE,
        ),
    )
}


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """$DEEPLAB_HOME, else $XDG_CACHE_HOME/deeplab, else ~/.cache/deeplab."""
    if os.environ.get("DEEPLAB_HOME"):
        return Path(os.environ["DEEPLAB_HOME"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "deeplab"
    return Path.home() / ".cache" / "deeplab"


def mirror_base_url() -> str:
    """The folder URL registry files are fetched from, ending in '/': $DEEPLAB_WEIGHTS_URL
    (a URL, or a plain local folder path) else the release."""
    base = os.environ.get(URL_ENV) or BASE_URL
    # A scheme has two letters or more; "C:\\mirror" is a Windows path, not a URL.
    if not re.match(r"[A-Za-z][A-Za-z0-9+.-]+:", base):
        return Path(base).expanduser().absolute().as_uri().rstrip("/") + "/"
    return base.rstrip("/") + "/"


def resolve(name_or_path: str | os.PathLike | None, *, download: bool = True) -> Path:
    """The local file for a registry name (downloaded on first use) or an existing path.

    A registry file already in the cache is returned without touching the network.
    """
    name_or_path = DEFAULT_WEIGHTS if name_or_path is None else name_or_path
    if isinstance(name_or_path, str) and name_or_path in REGISTRY:
        entry = REGISTRY[name_or_path]
        if entry.path.is_file():
            return entry.path
        if not download:
            raise DeeplabError(f"weights {entry.name!r} are not downloaded yet "
                               f"(run `deeplab weights download {entry.name}`)")
        return fetch(entry.name)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise DeeplabError(f"{path}: is not a file")
    raise DeeplabError(f"{path}: no such file, and not a registry name "
                       f"(known: {', '.join(REGISTRY)})")


def fetch(name: str, *, progress: bool | None = None) -> Path:
    """Download registry weights into the cache (if absent) and return their path.

    The transfer goes to a hidden temporary file in the cache, which becomes the cache file
    only once complete and loadable; on any failure nothing is left behind and the error
    names the URL and where to put the file by hand. `progress` None: a bar when stderr is
    a terminal.
    """
    entry = REGISTRY.get(name)
    if entry is None:
        raise DeeplabError(f"unknown weights {name!r} (known: {', '.join(REGISTRY)})")
    target = entry.path
    if target.is_file():
        return target
    url = entry.url
    if progress is None:
        progress = sys.stderr.isatty()
    print(f"deeplab: downloading {entry.name} weights from {url}", file=sys.stderr)
    try:
        with atomic_path(target) as tmp:
            _download(url, tmp, progress=progress)
            if entry.sha256 is not None and sha256sum(tmp) != entry.sha256.lower():
                raise _DownloadError(f"sha256 mismatch (expected {entry.sha256.lower()})")
            try:
                state, _ = _read(tmp, fmt_hint=Path(entry.filename).suffix)
                n_classes = check_state_dict(state, source=str(tmp))
            except DeeplabError as exc:
                if _looks_like_html(tmp):
                    raise _DownloadError("the server sent a web page, not weights (a login "
                                         "page or a proxy in the way?)") from None
                raise _DownloadError(f"the file is not valid ({str(exc).split(': ', 1)[-1]})") from None
            if n_classes != entry.n_classes:
                raise _DownloadError(f"the file has {n_classes} classes, expected {entry.n_classes}")
    except _DownloadError as exc:
        raise DeeplabError(f"cannot download {entry.name} from {url}: {exc}; "
                           f"download it by hand and save it as {target}") from None
    except OSError as exc:  # the cache folder cannot be made or written, or the rename failed
        raise DeeplabError(f"cannot save {entry.name} weights in the cache folder {target.parent} "
                           f"({exc.strerror or exc}); set DEEPLAB_HOME to a writable folder") from None
    return target


def _looks_like_html(path: Path) -> bool:
    """Whether a downloaded file is a web page (no weights format starts with '<')."""
    with open(path, "rb") as fh:
        head = fh.read(512).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head[:1] == b"<"


class _DownloadError(Exception):
    """A failed transfer; `fetch` turns it into the user-facing one-line message."""


def _download(url: str, dest: Path, *, progress: bool) -> None:
    import http.client
    import urllib.error
    import urllib.request

    from deeplab_cli import __version__

    received, expected = 0, None
    try:
        request = urllib.request.Request(url, headers={"User-Agent": f"deeplab-cli/{__version__}"})
    except ValueError as exc:  # no scheme, a broken IPv6 host
        raise _DownloadError(f"not a usable URL ({first_line(exc)}); check {URL_ENV}") from None
    try:
        with urllib.request.urlopen(request, timeout=60) as response, open(dest, "wb") as out:
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            bar = _ProgressBar(expected) if progress else None
            while chunk := response.read(1 << 20):
                out.write(chunk)
                received += len(chunk)
                if bar:
                    bar.update(received)
            if bar:
                bar.close(received)
    except urllib.error.HTTPError as exc:  # the reason of a redirect loop spans three lines
        raise _DownloadError(f"HTTP {exc.code} {first_line(str(exc.reason))}") from None
    except urllib.error.URLError as exc:
        raise _DownloadError(first_line(str(exc.reason))) from None
    except ValueError as exc:  # a redirect to a URL urllib cannot parse
        raise _DownloadError(f"not a usable URL ({first_line(exc)})") from None
    except http.client.IncompleteRead as exc:
        raise _DownloadError(f"transfer truncated after {len(exc.partial) + received} bytes") from None
    except (OSError, http.client.HTTPException) as exc:  # resets, timeouts, disk full
        raise _DownloadError(f"transfer failed ({exc.__class__.__name__}: {exc})") from None
    if expected is not None and received != expected:
        raise _DownloadError(f"transfer truncated: got {received} of {expected} bytes")
    if received == 0:
        raise _DownloadError("the server sent an empty file")


class _ProgressBar:
    """A one-line progress bar on stderr, redrawn at most ten times a second."""

    def __init__(self, total: int | None) -> None:
        self.total = total
        self.start = self.last = time.monotonic()

    def update(self, done: int, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < 0.1:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-6) / 1e6
        if self.total:
            frac = min(done / self.total, 1.0)
            filled = int(30 * frac)
            text = (f"\r  [{'#' * filled}{'.' * (30 - filled)}] {100 * frac:5.1f}% "
                    f"{done / 1e6:7.1f}/{self.total / 1e6:.1f} MB {rate:6.1f} MB/s")
        else:
            text = f"\r  {done / 1e6:7.1f} MB {rate:6.1f} MB/s"
        sys.stderr.write(text)
        sys.stderr.flush()

    def close(self, done: int) -> None:
        self.update(done, force=True)
        sys.stderr.write("\n")
        sys.stderr.flush()


# --------------------------------------------------------------------------- formats


def detect_format(path: Path, *, hint: str = "") -> str:
    """'safetensors', 'pytorch-zip', 'pytorch-legacy' or 'caffemodel', from the file's bytes
    (the suffix, or `hint`, only decides for a caffemodel, which has no magic number)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise DeeplabError(f"{path}: cannot read ({exc.strerror})") from None
    if not head:
        raise DeeplabError(f"{path}: empty file")
    if len(head) >= 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "pytorch-zip"
    if head[0] == 0x80:  # pickle protocol 2+ opcode: torch's legacy serialization
        return "pytorch-legacy"
    suffix = (hint or path.suffix).lower()
    # A NetParameter starts with its name (field 1), old layers (2) or layers (100).
    if suffix == ".caffemodel" or head[:1] in (b"\x0a", b"\x12") or head[:2] == b"\xa2\x06":
        return "caffemodel"
    if suffix == ".safetensors":
        raise DeeplabError(f"{path}: not a readable safetensors file (truncated or corrupt header)")
    raise DeeplabError(f"{path}: unrecognised weights format "
                       "(expected a .pth state dict, .safetensors or .caffemodel)")


def _read(path: Path, *, fmt_hint: str = "") -> tuple[dict[str, "torch.Tensor"], dict[str, str] | None]:
    """Raw tensors under current key names and the safetensors metadata (None elsewhere)."""
    fmt = detect_format(path, hint=fmt_hint)
    if fmt == "safetensors":
        return _read_safetensors(path)
    if fmt == "caffemodel":
        from deeplab_cli.caffe import read_caffemodel

        return read_caffemodel(path), None
    return normalize_keys(_read_pth(path), source=str(path)), None


def _read_pth(path: Path) -> dict[str, "torch.Tensor"]:
    import pickle
    import warnings

    import torch

    problem = _zip_problem(path)
    if problem:
        raise DeeplabError(f"{path}: {problem}")
    try:
        with warnings.catch_warnings():
            # Old files trip a harmless "pickle protocol" notice.
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        # torch's message is a long multi-line explanation; keep what it refused.
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:
            raise DeeplabError(f"{path}: refused to load: the pickle holds {found[1]}, not only "
                               "tensors (code is never run: weights_only=True)") from None
        found = re.search(r"Unsupported operand (\d+)", text)
        if found:
            raise DeeplabError(f"{path}: refused to load: the pickle uses instruction {found[1]}, "
                               "which a plain state dict never does (corrupt, or not a state "
                               "dict; code is never run: weights_only=True)") from None
        if "weights_only" in text or "Weights only" in text:
            raise DeeplabError(f"{path}: refused to load: the pickle holds code or objects other "
                               "than tensors (code is never run: weights_only=True)") from None
        raise DeeplabError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt: "
                           f"{first_line(exc)})") from None
    except Exception as exc:  # zip errors, EOFError, RuntimeError from torch's readers
        raise DeeplabError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt: "
                           f"{first_line(exc)})") from None
    return _unwrap(obj, path)


def _zip_problem(path: Path) -> str | None:
    """Why a zip file is not a PyTorch checkpoint torch can read as a state dict, or None
    (also when it is not a readable zip: torch's own error then says so)."""
    import zipfile

    try:
        with open(path, "rb") as fh:
            if fh.read(4) != b"PK\x03\x04":  # a legacy pickle's tensor bytes may look like a zip's end
                return None
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None
    if any(name.endswith("/constants.pkl") for name in names):
        return ("a TorchScript archive (torch.jit.save), not a state dict; save its "
                "state_dict() with torch.save instead")
    if not any(name.count("/") == 1 and name.endswith("/data.pkl") for name in names):
        return "a zip archive, but not a PyTorch checkpoint (no data.pkl inside)"
    return None


def _unwrap(obj: Any, path: Path) -> dict[str, "torch.Tensor"]:
    import torch

    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise DeeplabError(f"{path}: does not hold a state dict (a mapping of names to tensors)")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise DeeplabError(f"{path}: entry {bad[0]!r} of the state dict is not a tensor")
    return dict(obj)


def normalize_keys(state: dict[str, "torch.Tensor"], *, source: str = "weights"
                   ) -> dict[str, "torch.Tensor"]:
    """Rename pre-2019 and wrapped keys to the current `base.*` names.

    Handles a `module.` prefix (DataParallel), any other prefix that every key has before
    `base.` or `scale.` (a training wrapper's attribute: `model.`, `net.module.`),
    `scale.` -> `base.`, `aspp.stages.cN` -> `aspp.cN`, `proj` -> `shortcut`, and a bare
    network state dict without `base.`.
    """
    wrapper = _wrapper_prefix(list(state))
    out: dict[str, Any] = {}
    for key, value in state.items():
        new = key[len(wrapper):]
        if new.startswith("module."):
            new = new[len("module."):]
        if new.startswith("scale."):
            new = "base." + new[len("scale."):]
        elif not new.startswith("base."):
            new = "base." + new
        new = new.replace(".aspp.stages.c", ".aspp.c").replace(".proj.", ".shortcut.")
        if new in out:
            raise DeeplabError(f"{source}: keys {key!r} and another both map to {new!r}")
        out[new] = value
    return out


def _wrapper_prefix(keys: list[str]) -> str:
    """The dotted prefix that every key has right before `base.` or `scale.`, or ''."""
    if not keys:
        return ""
    found = re.search(r"(?:^|\.)(?:base|scale)\.", keys[0])
    if found is None or found.start() == 0:
        return ""
    prefix = keys[0][:found.start() + 1]
    if all(key.startswith((prefix + "base.", prefix + "scale.")) for key in keys):
        return prefix
    return ""


def _read_safetensors(path: Path) -> tuple[dict[str, "torch.Tensor"], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DeeplabError(f"{path}: not a readable safetensors file (truncated or corrupt: "
                           f"{first_line(exc)})") from None
    return normalize_keys(tensors, source=str(path)), metadata


def expected_shapes(n_classes: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the state dict of `build_model(n_classes)` (built without memory)."""
    import torch

    from deeplab_cli.model import build_model

    with torch.device("meta"):
        model = build_model(n_classes)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _list(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_state_dict(state: dict[str, "torch.Tensor"], *, source: str = "weights") -> int:
    """Check keys and shapes against the network; return the class count.

    Fills in a missing `num_batches_tracked` (it is never used). Raises a one-line
    DeeplabError naming `source` for unknown or missing keys, wrong shapes, values that are
    not finite, fewer than 2 classes, and ASPP branches that disagree on the number of classes.
    """
    import torch

    counts = {}
    for key in (f"base.aspp.c{i}.{part}" for i in range(4) for part in ("weight", "bias")):
        tensor = state.get(key)
        if tensor is not None and tensor.ndim >= 1:
            counts[key] = int(tensor.shape[0])
    if not counts:
        elsewhere = next((k for k in state if re.search(r"aspp\.(stages\.)?c0\.weight$", k)), None)
        if elsewhere:  # e.g. a wrapper's keys mixed with others (a loss's weights)
            raise DeeplabError(f"{source}: no ASPP classifier at base.aspp.c0..c3, but one at "
                               f"{elsewhere!r}: the keys have a prefix not shared by all of them")
        raise DeeplabError(f"{source}: no ASPP classifier (base.aspp.c0..c3) found; "
                           "not DeepLab v2 weights")
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{k.removeprefix('base.aspp.')}: {v}" for k, v in counts.items())
        raise DeeplabError(f"{source}: the ASPP classifiers disagree on the class count ({detail})")
    n_classes = next(iter(counts.values()))
    expected = expected_shapes(n_classes)
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise DeeplabError(f"{source}: {len(unknown)} unknown key(s): {_list(unknown)}")
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise DeeplabError(f"{source}: {len(missing)} missing key(s): {_list(missing)}")
    for key, shape in expected.items():
        if key.endswith("num_batches_tracked"):
            if key not in state:
                state[key] = torch.tensor(0, dtype=torch.long)
            continue
        tensor = state[key]
        if tuple(tensor.shape) != shape:
            raise DeeplabError(f"{source}: {key} has shape {list(tensor.shape)}, "
                               f"expected {list(shape)}")
        if not tensor.is_floating_point():
            raise DeeplabError(f"{source}: {key} has dtype {tensor.dtype}, expected floats")
        if not bool(torch.isfinite(tensor).all()):  # a diverged or damaged training run
            raise DeeplabError(f"{source}: {key} holds NaN or infinite values")
    if n_classes < 2:
        raise DeeplabError(f"{source}: {n_classes} class; segmentation needs at least 2")
    return n_classes


def default_meta(path: Path, n_classes: int) -> WeightsMeta:
    """Metadata for a file without any: the registry entry of the same file name and class
    count, else the known label set with that many classes, else generic names."""
    from deeplab_cli.model import MEAN_BGR

    for entry in REGISTRY.values():
        if entry.filename == path.name and entry.n_classes == n_classes:
            return entry.meta(source=str(path))
    label_set = labels.for_class_count(n_classes)
    return WeightsMeta(name=path.stem, dataset=label_set.name, classes=list(label_set.classes),
                       palette=label_set.palette, mean_bgr=MEAN_BGR, crf=CRFParams(),
                       source=str(path))


def load_state_dict(path: str | os.PathLike) -> tuple[dict[str, "torch.Tensor"], WeightsMeta]:
    """Read weights in any supported format: (state dict with current keys, metadata).

    The state dict is checked against the network layout; metadata is the file's own
    (safetensors) or inferred from the class count.
    """
    path = Path(path)
    state, metadata = _read(path)
    return state, _checked_meta(path, state, metadata)


def _checked_meta(path: Path, state: dict[str, "torch.Tensor"],
                  metadata: dict[str, str] | None) -> WeightsMeta:
    n_classes = check_state_dict(state, source=str(path))
    meta = default_meta(path, n_classes)
    if metadata:
        meta = WeightsMeta.from_metadata(metadata, meta, path=path)
    if meta.n_classes != n_classes:
        raise DeeplabError(f"{path}: metadata names {meta.n_classes} classes but the weights "
                           f"have {n_classes}")
    if len(meta.palette) != n_classes:
        raise DeeplabError(f"{path}: metadata palette has {len(meta.palette)} colours for "
                           f"{n_classes} classes")
    if meta.aspp not in ("L", "S"):
        raise DeeplabError(f"{path}: metadata 'aspp' must be L or S, got {meta.aspp!r}")
    return meta


@contextlib.contextmanager
def _cache_hint(path: Path):
    """Add how to recover to errors about a registry file in the cache."""
    try:
        yield
    except DeeplabError as exc:
        if any(path == entry.path for entry in REGISTRY.values()):
            raise DeeplabError(f"{exc}; delete the cached file to download it again") from None
        raise


def load_model(name_or_path: str | os.PathLike | None = None, *, device="cpu",
               dtype=None) -> tuple["MSC", WeightsMeta]:
    """The network with weights loaded, in eval mode on `device`, and its metadata.

    `name_or_path` is a registry name (downloaded on first use), a file, or None for the
    default weights. `device`: 'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device of type
    cpu or cuda (`deeplab_cli.device.resolve_device`; checked first: a one-line
    DeeplabError when unusable). `dtype` defaults to float32.
    """
    import torch

    from deeplab_cli.device import resolve_device
    from deeplab_cli.model import build_model

    # Checked before anything is read or downloaded: a bad device string or a missing GPU
    # is a one-line error, not torch's exception after loading 170 MB.
    device = resolve_device(device)
    dtype = torch.float32 if dtype is None else dtype
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise DeeplabError(f"dtype {dtype!r}: expected a floating-point torch dtype "
                           "(torch.float32, torch.float16, torch.bfloat16)")
    path = resolve(name_or_path)
    with _cache_hint(path):
        state, meta = load_state_dict(path)
        name = DEFAULT_WEIGHTS if name_or_path is None else name_or_path
        entry = REGISTRY.get(name) if isinstance(name, str) else None
        if entry is not None and path == entry.path and meta.n_classes != entry.n_classes:
            raise DeeplabError(f"{path}: has {meta.n_classes} classes, but {entry.name} "
                               f"weights have {entry.n_classes}")
    # Built on the meta device (no memory, no random init) and given the loaded tensors
    # themselves: the weights are in memory once, not twice.
    with torch.device("meta"):
        model = build_model(meta.n_classes, aspp=meta.aspp)
    model.load_state_dict(state, strict=True, assign=True)
    model.to(device=device, dtype=dtype)
    return model.eval(), meta


def save_safetensors(state: dict[str, "torch.Tensor"], meta: WeightsMeta,
                     dst: str | os.PathLike) -> Path:
    """Write `state` and `meta` to a safetensors file, atomically."""
    from safetensors.torch import save_file

    dst = Path(dst)
    tensors = {key: value.detach().contiguous() for key, value in state.items()}
    try:
        with atomic_path(dst) as tmp:
            save_file(tensors, str(tmp), metadata=meta.to_metadata())
    except (FileExistsError, NotADirectoryError):  # from making the folders above it
        raise DeeplabError(f"{dst}: cannot write (a folder on its path is a file)") from None
    except OSError as exc:
        raise DeeplabError(f"{dst}: cannot write ({exc.strerror or exc})") from None
    return dst


class ClassCountError(DeeplabError):
    """`convert` was given more or fewer class names than the weights have classes."""


# Metadata fields `convert` may change (every WeightsMeta field).
CONVERT_FIELDS = tuple(f.name for f in dataclasses.fields(WeightsMeta))


def convert(src: str | os.PathLike, dst: str | os.PathLike, **changes: Any) -> Path:
    """Convert weights (any format, or a registry name) to `.safetensors` with metadata.

    `changes` overrides metadata fields (name, dataset, classes, palette, mean_bgr, crf,
    aspp, source); None values are ignored. Giving `classes` without `palette` picks a
    generic palette. `crf` may be a CRFParams or a dict of its fields. The new metadata is
    checked exactly as loading the output will check it, before anything is written, so
    a file `convert` writes always loads.

    Raises:
        TypeError: a keyword that is not a metadata field (checked before anything is read).
        ClassCountError: `classes` has more or fewer names than the weights have classes.
        DeeplabError: any other bad value (one line naming the field), an unreadable `src`,
            a `dst` not ending in .safetensors or not writable. Nothing is written.
    """
    unknown = sorted(set(changes) - set(CONVERT_FIELDS))
    if unknown:
        raise TypeError(f"convert() got an unexpected keyword argument {unknown[0]!r} "
                        f"(metadata fields: {', '.join(CONVERT_FIELDS)})")
    dst = Path(dst)
    if dst.suffix.lower() != ".safetensors":
        raise DeeplabError(f"{dst}: the output must end in .safetensors")
    changes = {k: v for k, v in changes.items() if v is not None}
    for key in ("name", "dataset", "aspp", "source"):
        if key in changes and not isinstance(changes[key], str):
            raise DeeplabError(f"{key} {changes[key]!r}: expected a string")
    if changes.get("aspp", "L") not in ("L", "S"):
        raise DeeplabError(f"aspp must be L or S, got {changes['aspp']!r}")
    if "crf" in changes:
        crf = changes["crf"]
        if isinstance(crf, Mapping):
            changes["crf"] = CRFParams.from_dict(crf, source="crf")
        elif not isinstance(crf, CRFParams):
            raise DeeplabError(f"crf: expected CRFParams or a dict of its fields, got {type(crf).__name__}")
    if "classes" in changes:
        classes = changes["classes"]
        if isinstance(classes, (str, bytes)) or not all(isinstance(c, str) for c in classes):
            raise DeeplabError("classes: expected a list of class names (strings)")
        changes["classes"] = list(classes)
    if "palette" in changes:
        changes["palette"] = _palette_change(changes["palette"])
    if "mean_bgr" in changes:
        changes["mean_bgr"] = _mean_change(changes["mean_bgr"])
    state, meta = load_state_dict(resolve(src))
    if "classes" in changes:
        if len(changes["classes"]) != meta.n_classes:
            raise ClassCountError(f"{len(changes['classes'])} class names given but {src} has "
                                  f"{meta.n_classes} classes")
        changes.setdefault("palette", labels.palette_for(meta.n_classes))
    meta = dataclasses.replace(meta, **changes)
    if not meta.source:
        meta.source = str(src)
    # The checks loading will apply (palette length, class count, value ranges), on the
    # header exactly as it will be written.
    meta = _checked_meta(dst, state, meta.to_metadata())
    return save_safetensors(state, meta, dst)


def _palette_change(palette: Any) -> list[tuple[int, int, int]]:
    """`convert`'s palette as RGB tuples of Python ints 0..255 (not floats, bools, strings)."""
    import numbers

    try:
        colours = [tuple(c) for c in palette]
    except TypeError:
        colours = None
    if colours is None or isinstance(palette, (str, bytes)) or not all(
            len(c) == 3 and all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                and 0 <= v <= 255 for v in c) for c in colours):
        raise DeeplabError("palette: expected RGB triples of whole numbers 0..255, one per class")
    return [tuple(int(v) for v in c) for c in colours]


def _mean_change(mean: Any) -> tuple[float, float, float]:
    """`convert`'s mean_bgr as three finite floats."""
    import numbers

    try:
        values = list(mean)
    except TypeError:
        values = None
    if values is None or len(values) != 3 or not all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise DeeplabError(f"mean_bgr {mean!r}: expected three finite numbers (B, G, R)")
    return tuple(float(v) for v in values)


def sha256sum(path: Path) -> str:
    """The file's sha256 as hex, read in 1 MiB pieces (weights are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify_cached(name: str) -> str:
    """Check the cached file of registry weights `name`: 'ok' (its sha256 is the registry's),
    'loads' (the registry knows no hash, as for the published files today, but the file
    reads as weights with the expected class count), 'corrupt (<reason>)', 'missing' (not
    cached) or 'unreadable (<reason>)'. Reads the whole file either way."""
    entry = REGISTRY.get(name)
    if entry is None:
        raise DeeplabError(f"unknown weights {name!r} (known: {', '.join(REGISTRY)})")
    if not entry.path.is_file():
        return "missing"
    try:
        if entry.sha256 is not None:
            return "ok" if sha256sum(entry.path) == entry.sha256.lower() else "corrupt (sha256 mismatch)"
        state, _ = _read(entry.path, fmt_hint=Path(entry.filename).suffix)
        n_classes = check_state_dict(state, source=str(entry.path))
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    except DeeplabError as exc:
        return f"corrupt ({str(exc).split(': ', 1)[-1]})"
    if n_classes != entry.n_classes:
        return f"corrupt ({n_classes} classes, expected {entry.n_classes})"
    return "loads"


def info(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """Facts about a weights file (or a cached registry file): format, class count and
    names, number of keys, parameter count, size, sha256 and metadata."""
    path = resolve(name_or_path, download=False)
    with _cache_hint(path):
        fmt = detect_format(path)
        state, metadata = _read(path)
        n_keys = len(state)  # as stored, before a missing num_batches_tracked is filled in
        meta = _checked_meta(path, state, metadata)
    stats = ("running_mean", "running_var", "num_batches_tracked")
    return {
        "path": str(path),
        "format": fmt,
        "name": meta.name,
        "dataset": meta.dataset,
        "classes": meta.n_classes,
        "class_names": list(meta.classes),
        "aspp": meta.aspp,
        "keys": n_keys,
        "parameters": sum(v.numel() for k, v in state.items() if not k.endswith(stats)),
        "size_bytes": path.stat().st_size,
        "sha256": sha256sum(path),
        "crf": meta.crf.to_dict(),
        "source": meta.source,
    }
