"""Lattice geometry shared by the CPU and CUDA CRF: constants and the size limits."""

from __future__ import annotations

import types

import numpy as np
import pytest

from deeplab_cli.crf import check_size, dense_crf
from deeplab_cli.crf import geometry
from deeplab_cli.crf.cpu import build_lattice
from deeplab_cli.crf.params import CRFParams
from deeplab_cli.errors import DeeplabError

DEEPLAB = CRFParams()


def test_scale_factors_and_alpha_are_pydensecrf_constants():
    np.testing.assert_allclose(geometry.scale_factors(2), [np.sqrt(2 / 3) * 3 / np.sqrt(2), np.sqrt(2 / 3) * 3 / np.sqrt(6)],
                               rtol=1e-6)
    assert geometry.scale_factors(5).dtype == np.float32 and geometry.scale_factors(5).shape == (5,)
    assert geometry.alpha(2) == np.float32(0.8)
    assert geometry.alpha(5) == np.float32(1.0) / np.float32(1.03125)


def test_check_size_bounds():
    check_size(375, 500, 21)
    check_size(3000, 4000, 21)  # 12 MP with the DeepLab parameters fits int16 keys
    check_size(3000, 4000, 182)
    with pytest.raises(DeeplabError, match="int32"):
        check_size(20000, 20000, 21, CRFParams(pos_xy_std=3, bi_xy_std=80))  # 400 MP: 9N corners (both lattices) overflow int32
    with pytest.raises(DeeplabError, match="int16.*pos_xy_std"):
        check_size(3000, 4000, 21, CRFParams(pos_xy_std=0.2))
    with pytest.raises(DeeplabError, match="int16.*bi_xy_std and bi_rgb_std"):
        check_size(100, 100, 21, CRFParams(bi_rgb_std=0.01))
    with pytest.raises(DeeplabError, match="empty image"):
        check_size(0, 10, 21)


def test_a_batch_counts_all_its_corners():
    big = CRFParams(pos_xy_std=3, bi_xy_std=80)
    geometry.check_size(12000, 12000, big)  # 144 MP alone: 864 M corners
    with pytest.raises(DeeplabError, match=r"^CRF: 3 images of 12000x12000 are 432 MP, .*fewer or smaller images$"):
        geometry.check_size(12000, 12000, big, n_images=3)


def test_key_bounds_hold_on_the_actual_lattice():
    """The bounds cover the real lattice of the extreme features (corners of the image, pure
    colours), blur neighbours (one step further) included, and are not loose by much."""
    height, width = 427, 640
    params = CRFParams(pos_xy_std=3, bi_xy_std=3, bi_rgb_std=3)
    ys, xs = np.meshgrid([0, height - 1], [0, width - 1], indexing="ij")
    colours = np.array(np.meshgrid(*[[0, 255]] * 3)).reshape(3, -1).T
    for spec in geometry.kernel_specs(params):
        std = np.float32(spec.stds[0])
        pos = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float32) / std
        if spec.d == 2:
            extreme = pos
        else:
            rgb = colours.astype(np.float32) / np.float32(spec.stds[2])
            # every corner of the RGB cube at every corner of the image
            extreme = np.concatenate([np.repeat(pos, len(rgb), 0), np.tile(rgb, (len(pos), 1))], 1)
        keys = build_lattice(extreme.astype(np.float32)).keys
        bounds = np.array(geometry.key_bounds(spec, height, width))  # (d, 2)
        assert (keys.min(0) - 1 - spec.d >= bounds[:, 0]).all() and (keys.max(0) + 1 + spec.d <= bounds[:, 1]).all()
        assert (bounds[:, 1] - keys.max(0) <= 4 * (spec.d + 1) + 2).all()


def test_cpu_and_gpu_refuse_the_same_sizes_with_the_same_message():
    # The CUDA path checks its whole batch before touching the device (a bare backend is enough).
    from deeplab_cli.crf.cuda import CudaCRF

    image = np.zeros((10, 10, 3), np.uint8)
    probs = np.full((2, 10, 10), 0.5, np.float32)
    params = CRFParams(bi_rgb_std=0.001)
    with pytest.raises(DeeplabError) as on_cpu:
        dense_crf(image, probs, params)
    with pytest.raises(DeeplabError) as on_gpu:
        CudaCRF([image], [probs], params, backend=types.SimpleNamespace(xp=np))
    assert "int16" in str(on_cpu.value) and str(on_cpu.value) == str(on_gpu.value)
