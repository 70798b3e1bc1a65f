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


def test_closure_contrast_sees_lips_shut_on_bilabials():
    """Positive on the render (dark open vowels, shut p/b/m), 0 on a still face, and small
    when every p/b/m frame shows an open mouth."""
    truth = demo.render_speech("Bob met Pam by the map.", speaker_id=3)
    n = len(truth["video"])
    assert demo.closure_contrast(truth["video"], truth["viseme"], 3) > 1.0
    still = np.repeat(truth["video"][:1], n, axis=0)
    assert demo.closure_contrast(still, truth["viseme"], 3) == 0.0
    open_when_closed = truth["video"].copy()
    closed = truth["viseme"] == demo.visemes.VISEME_NAMES.index("closed")
    opened = truth["viseme"] == demo.visemes.VISEME_NAMES.index("open")
    open_when_closed[closed] = truth["video"][opened][0]  # an open mouth on every p/b/m frame
    assert demo.closure_contrast(open_when_closed, truth["viseme"], 3) < 0.5
