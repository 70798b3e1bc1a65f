"""The demo's ground truth and its mouth-sync figure (the full demo is `make demo`)."""

import numpy as np

from mirage_jax import demo


def test_ground_truth_render_and_mouth_sync():
    truth = demo.render_speech("Bob met Pam by the map.", speaker_id=3)
    n = len(truth["video"])
    assert truth["video"].shape == (n, 64, 64, 3) and len(truth["audio"]) == n * 640
    assert truth["mouth_open"].shape == (n,) and truth["mouth_open"].max() > 0.3
    # The measure sees the drawn mouth: high on the render, ~0 on frames that do not move.
    assert demo.mouth_sync(truth["video"], truth["mouth_open"], 3) > 0.8
    still = np.repeat(truth["video"][:1], n, axis=0)
    assert demo.mouth_sync(still, truth["mouth_open"], 3) == 0.0
    shuffled = truth["video"][np.random.default_rng(0).permutation(n)]
    assert demo.mouth_sync(shuffled, truth["mouth_open"], 3) < 0.5
    img = demo.strip([truth["video"], truth["video"][::-1]], every=2, count=4)
    assert img.shape == (128, 256, 3)
