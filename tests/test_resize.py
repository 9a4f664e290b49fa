"""harness.resize reproduces OpenCV's INTER_LINEAR resize of 8-bit images bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from harness.resize import opencv_linear_resize


def test_matches_opencv_on_random_shapes_down_and_up():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    for trial in range(120):
        channels = int(rng.choice([1, 3, 4]))
        shape = (int(rng.integers(2, 200)), int(rng.integers(2, 200))) + ((channels,) if channels > 1 else ())
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        width, height = int(rng.integers(1, 260)), int(rng.integers(1, 260))
        if trial % 10 == 0:  # exact halving takes OpenCV's INTER_AREA path
            width, height = max(1, shape[1] // 2), max(1, shape[0] // 2)
        expected = cv2.resize(image, (width, height))
        assert np.array_equal(opencv_linear_resize(image, width, height), expected), (shape, width, height)


def test_hand_computed_2x2_to_1x1_and_identity():
    image = np.array([[[0], [100]], [[200], [40]]], dtype=np.uint8)
    assert opencv_linear_resize(image, 1, 1)[0, 0, 0] == (0 + 100 + 200 + 40 + 2) // 4  # the 2x2 block mean
    assert np.array_equal(opencv_linear_resize(image, 2, 2), image)
    with pytest.raises(TypeError):
        opencv_linear_resize(image.astype(np.float32), 1, 1)
