"""Linear probes on frozen features: what does an AMDIM encoder know about a frame?

    mirage-jax probe --checkpoint RUN [--step N] [--dataset synthetic_aroll/small
                     --data_dir DATA] --out probe.json

The same frames (their `amdim.region`: the whole frame or the mouth box) are described
three ways: the trained encoder's features (EMA weights;
`amdim.probe_features`: the global 1x1 feature r1 and/or the flattened local maps r5, r7),
the same features of the same encoder at random init, and the raw pixels. For each, one
multinomial logistic regression per label (standardised features, L2 penalty, L-BFGS to
convergence) is fit on frames of the train split and scored on every frame of the test
split: other clips and sentences, the same speakers. Labels: the frame's viseme and, from
the speaker id, the speaker and their shirt and hair colours (face.py). For the viseme, a
ceiling: a nearest-neighbour rule on the mouth the renderer drew (its opening, width and
roundness), which is all a single frame can show of the viseme. The L2 weight is chosen per
probe on a fifth of the train clips held out from fitting, so no encoder gets a tuned
advantage.
The trained encoder's lead over each baseline comes with a 95% interval from resampling
the test clips (`clip_bootstrap`): a clip's frames are not independent draws.
With `supervised_steps`, a fourth column bounds the room: the same encoder trained end to
end on the viseme of every frame of the fitting clips (five times the probe's labels), then
frozen and probed like the others. No unsupervised encoder of this shape should read more.
"""

from __future__ import annotations

import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mirage_jax import sharding
from mirage_jax.amdim.augment import WHOLE, resize
from mirage_jax.amdim.model import AMDIM
from mirage_jax.data import face
from mirage_jax.data.visemes import NUM_VISEMES, viseme_track

LABELS = ("viseme", "speaker", "shirt", "hair")


def load_frames(dataset: str, data_dir: str, split: str, stride: int, max_clips: int = 0,
                corpus_seed: int = 0) -> dict:
    """Frames (uint8 [N, H, W, 3]) of a synthetic_aroll split, every `stride`-th frame of each
    clip (the phase varies by clip), with their labels (int arrays [N]) and clip index."""
    import tensorflow_datasets as tfds

    source = tfds.data_source(dataset, data_dir=data_dir)[split]
    n = len(source) if not max_clips else min(max_clips, len(source))
    images, clips, labels = [], [], {k: [] for k in LABELS}
    names = {k: {v: i for i, v in enumerate(d)} for k, d in
             (("shirt", face.CLOTHES), ("hair", face.HAIR))}
    mouths = []
    for i in range(n):
        rec = source[i]
        t = np.arange(i % stride, rec["video"].shape[0], stride)
        spk = face.Speaker.sample(int(rec["speaker_id"]), corpus_seed)
        images.append(rec["video"][t])
        mouths.append(mouth_params(rec)[t])
        clips.append(np.full(len(t), i))
        labels["viseme"].append(np.asarray(rec["viseme"])[t])
        labels["speaker"].append(np.full(len(t), spk.speaker_id))
        labels["shirt"].append(np.full(len(t), names["shirt"][spk.shirt]))
        labels["hair"].append(np.full(len(t), names["hair"][spk.hair]))
    out = {k: np.concatenate(v).astype(np.int32) for k, v in labels.items()}
    return {"images": np.concatenate(images), "clip": np.concatenate(clips), "labels": out,
            "mouth": np.concatenate(mouths)}


def mouth_params(rec: dict) -> np.ndarray:
    """float32 [T, 3]: the (opening, width, roundness) the renderer drew in each frame,
    recomputed from the record's phoneme timings as the corpus made them."""
    from mirage_jax.data.synthetic_aroll import FPS, SAMPLE_RATE

    text = rec["phonemes"]
    events = list(zip((text.decode() if isinstance(text, bytes) else str(text)).split(),
                      np.asarray(rec["phoneme_samples"]).tolist()))
    viseme, mouth = viseme_track(events, len(rec["viseme"]), FPS, SAMPLE_RATE)
    if not np.array_equal(viseme, rec["viseme"]):
        raise ValueError(f"{rec.get('clip_id', '?')}: phoneme timings do not give its visemes")
    return mouth


def nearest_neighbour(train_x, train_y, test_x, test_y) -> np.ndarray:
    """bool [N_test]: whether the nearest train point's label is right (squared L2)."""
    d = (np.square(test_x).sum(1)[:, None] - 2 * test_x @ train_x.T
         + np.square(train_x).sum(1)[None])
    return train_y[np.argmin(d, axis=1)] == test_y


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _encode(graphdef, params, images, maps: tuple, region: tuple):
    return _maps(nnx.merge(graphdef, params), images, maps, region)


def _maps(encoder: AMDIM, images, maps: tuple, region: tuple):
    """[N, D]: the encoder's `maps` of uint8 frames' `region`, flattened and concatenated."""
    r = encoder.encode(resize(images.astype(jnp.float32) / 127.5 - 1.0, encoder.size, region))
    return jnp.concatenate([r[k].reshape(len(images), -1) for k in maps], axis=1)


def encoder_features(model: AMDIM, images: np.ndarray, maps=("r1",), region=WHOLE,
                     batch: int = 256) -> np.ndarray:
    """The encoder's `maps` (r1 [N, 8 * ndf], r5, r7 flattened), concatenated, of uint8
    frames' `region` resized to the encoder's size (one compiled shape: the last batch is
    padded)."""
    if not maps or set(maps) - {"r1", "r5", "r7"}:
        raise ValueError(f"probe features must be among r1, r5, r7; got {maps}")
    graphdef, params = nnx.split(model, nnx.Param)
    out = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        pad = np.zeros((batch - len(x), *x.shape[1:]), x.dtype)
        out.append(np.asarray(_encode(graphdef, params, np.concatenate([x, pad]), tuple(maps),
                                      tuple(region)))[:len(x)])
    return np.concatenate(out)


def supervised_encoder(cfg, images: np.ndarray, labels: np.ndarray, n_classes: int,
                        region=WHOLE, maps=("r5",), steps: int = 2000, batch: int = 64,
                        seed: int = 0) -> tuple:
    """The reference for what labels make of this encoder: AMDIM(cfg)'s encoder with a linear
    head on its `maps`, trained with cross-entropy (Adam 1e-3, `batch` frames drawn with
    replacement) on uint8 `images` [N, H, W, 3] and int `labels` [N]. Returns (the encoder,
    the loss of every step)."""
    rngs = nnx.Rngs(params=seed)
    encoder = AMDIM(cfg, rngs)
    dim = jax.eval_shape(lambda x: _maps(encoder, x, maps, region), images[:1]).shape[1]
    model = nnx.Dict(encoder=encoder, head=nnx.Linear(dim, n_classes, rngs=rngs))
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, y):
        def loss(m):
            logits = m["head"](_maps(m["encoder"], x, maps, region))
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        value, grads = nnx.value_and_grad(loss)(model)
        opt.update(model, grads)
        return value

    pick = np.random.default_rng(seed).integers(0, len(images), (steps, batch))
    losses = [float(step(model, opt, jnp.asarray(images[i]), jnp.asarray(labels[i])))
              for i in pick]
    return encoder, losses


def pixel_features(images: np.ndarray, region=WHOLE) -> np.ndarray:
    """The `region`'s pixels at the frames' own resolution, flattened, in [-1, 1]."""
    h, w = images.shape[1:3]
    y0, y1, x0, x1 = (int(round(f * n)) for f, n in zip(region, (h, h, w, w)))
    crop = images[:, y0:y1, x0:x1]
    return crop.reshape(len(images), -1).astype(np.float32) / 127.5 - 1.0


MAX_CLASSES = 16  # every probe pads its classes to this: one compiled fit per feature size


FIT_TOL = 1e-3  # the fit stops when the gradient's norm is below this,
FIT_MAX_STEPS = 5000  # or after this many L-BFGS steps


@jax.jit
def _fit(x, y, valid, l2, init):
    """Multinomial logistic regression: mean cross-entropy + l2 |W|^2, L-BFGS from `init`
    until the gradient's norm is below FIT_TOL; logits of classes outside `valid` are
    masked. Returns (params, (final loss, steps, gradient norm)).

    To convergence, because an early stop measures the features' conditioning, not what
    they hold: with 100 steps the random encoder's r5 features (correlated, ill-conditioned)
    stopped at 0.786 on the viseme and the trained ones at 0.828; converged both read ~0.85
    (README)."""

    def loss(p):
        logits = jnp.where(valid, x @ p["w"] + p["b"], -1e9)
        ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))
        return ce + l2 * jnp.sum(jnp.square(p["w"]))

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry):
        p, state = carry
        value, grad = value_and_grad(p, state=state)
        updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss)
        return optax.apply_updates(p, updates), state

    get, norm = optax.tree_utils.tree_get, optax.tree_utils.tree_norm

    def going(carry):
        count = get(carry[1], "count")
        return (count == 0) | ((count < FIT_MAX_STEPS) & (norm(get(carry[1], "grad")) >= FIT_TOL))

    p, state = jax.lax.while_loop(going, step, (init, opt.init(init)))
    return p, (get(state, "value"), get(state, "count"), norm(get(state, "grad")))


def probe(train_x, train_y, test_x, test_y, n_classes: int, is_val,
          l2s=(1e-4, 1e-3, 1e-2)) -> dict:
    """Fits on the train frames outside `is_val` for each L2 weight, keeps the weight with
    the best accuracy on the `is_val` frames, and scores it on the test frames.

    Features are standardised. With more dimensions than fitting frames (pixels), the fit
    runs in the span of the fitting frames' features (an orthonormal basis from their SVD):
    with an L2 penalty the optimal weights lie in that span, so this is exact, and cheap."""
    if n_classes > MAX_CLASSES:
        raise ValueError(f"{n_classes} classes > MAX_CLASSES={MAX_CLASSES}")
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    xf, xv, xt = ((x - mu) / sd for x in (train_x[~is_val], train_x[is_val], test_x))
    if xf.shape[1] > xf.shape[0]:
        basis = np.linalg.svd(xf, full_matrices=False)[2].T  # [D, n_fit]
        xf, xv, xt = xf @ basis, xv @ basis, xt @ basis
    xf, xv, xt = map(jnp.asarray, (xf, xv, xt))
    p, row = select_l2(xf, train_y[~is_val], xv, train_y[is_val], n_classes, l2s)
    correct = hits(p, xt, test_y, n_classes)
    return {**row, "test": float(correct.mean()), "correct": correct}


def hits(p, x, y, n_classes: int) -> np.ndarray:
    """bool [N]: whether the fitted regression `p` gets each row of `x` right."""
    valid = jnp.arange(MAX_CLASSES) < n_classes
    return np.asarray(jnp.argmax(jnp.where(valid, x @ p["w"] + p["b"], -jnp.inf), -1) == y)


def select_l2(xf, yf, xv, yv, n_classes: int, l2s) -> tuple:
    """Fits (xf, yf) for each L2 weight and keeps the fit most accurate on (xv, yv), the first
    on ties. Returns (params, {l2, val, fit, loss, steps, grad_norm})."""
    valid = jnp.arange(MAX_CLASSES) < n_classes
    init = {"w": jnp.zeros((xf.shape[1], MAX_CLASSES)), "b": jnp.zeros((MAX_CLASSES,))}
    best = None
    for l2 in l2s:
        p, (final_loss, steps, grad_norm) = _fit(jnp.asarray(xf), jnp.asarray(yf), valid, l2,
                                                 init)
        row = {"l2": l2, "val": float(hits(p, xv, yv, n_classes).mean()),
               "fit": float(hits(p, xf, yf, n_classes).mean()), "loss": float(final_loss),
               "steps": int(steps), "grad_norm": float(grad_norm)}
        if best is None or row["val"] > best[1]["val"]:
            best = (p, row)
    return best


def clip_bootstrap(correct_a, correct_b, clip, n: int = 10_000, seed: int = 0) -> list:
    """95% interval of accuracy(a) - accuracy(b) on the same test frames, resampling whole
    clips with replacement (paired: both probes see the same resampled clips)."""
    ids = np.unique(clip, return_inverse=True)[1]
    a, b, count = (np.bincount(ids, w) for w in (correct_a.astype(float),
                                                 correct_b.astype(float), None))
    pick = np.random.default_rng(seed).integers(0, len(count), (n, len(count)))
    diff = (a[pick].sum(1) - b[pick].sum(1)) / count[pick].sum(1)
    return [float(v) for v in np.percentile(diff, [2.5, 97.5])]


def run(checkpoint: str, dataset: str | None = None, data_dir: str | None = None,
        train_stride: int = 5, test_stride: int = 1, max_clips: int = 0, seed: int = 0,
        log=print, step: int | None = None, supervised_steps: int = 0) -> dict:
    """The probe table for a trained AMDIM run: {labels: {encoder: accuracy}} and details."""
    from mirage_jax.train.checkpoint import load_run

    t0 = time.perf_counter()
    trained = load_run(checkpoint, sharding.data_mesh(jax.devices()[:1]), "ema", step)
    cfg = trained["cfg"]
    if cfg.task != "amdim":
        raise ValueError(f"{trained['where']} is a '{cfg.task}' checkpoint, not AMDIM")
    dataset, data_dir = dataset or cfg.data.dataset, data_dir or cfg.data.data_dir
    train = load_frames(dataset, data_dir, "train", train_stride, max_clips)
    test = load_frames(dataset, data_dir, "test", test_stride, max_clips)
    is_val = train["clip"] % 5 == 4  # whole clips: neighbouring frames never straddle
    encoders = {"amdim": nnx.merge(trained["graphdef"], trained["params"]),
                "random_init": AMDIM(cfg, nnx.Rngs(params=seed + 1))}
    maps = tuple(m.strip() for m in cfg.amdim.probe_features.split(","))
    region = tuple(cfg.amdim.region)
    supervised = {}
    if supervised_steps:
        every = load_frames(dataset, data_dir, "train", 1, max_clips)
        fit = every["clip"] % 5 != 4  # the probe's fitting clips, every frame
        encoders["supervised"], losses = supervised_encoder(
            cfg, every["images"][fit], every["labels"]["viseme"][fit], NUM_VISEMES, region,
            maps, supervised_steps, seed=seed + 2)
        tenth = max(1, supervised_steps // 10)
        supervised = {"frames": int(fit.sum()), "steps": supervised_steps,
                      "loss_first_tenth": float(np.mean(losses[:tenth])),
                      "loss_last_tenth": float(np.mean(losses[-tenth:]))}
        log(f"supervised reference: {supervised}")
    feats = {k: tuple(encoder_features(m, s["images"], maps, region) for s in (train, test))
             for k, m in encoders.items()}
    feats["pixels"] = tuple(pixel_features(s["images"], region) for s in (train, test))
    log(f"features of {len(train['images'])} + {len(test['images'])} frames: "
        f"{time.perf_counter() - t0:.0f}s")
    classes = {"viseme": NUM_VISEMES, "speaker": int(train["labels"]["speaker"].max()) + 1,
               "shirt": len(face.CLOTHES), "hair": len(face.HAIR)}
    table, details, lead = {}, {}, {}
    for label in LABELS:
        ytr, yte = train["labels"][label], test["labels"][label]
        n = max(classes[label], int(max(ytr.max(), yte.max())) + 1)
        table[label] = {"chance": float(np.bincount(yte).max() / len(yte))}
        correct = {}
        for name, (ftr, fte) in feats.items():
            row = probe(ftr, ytr, fte, yte, n, is_val)
            table[label][name], correct[name] = row["test"], row.pop("correct")
            details[f"{label}/{name}"] = row
            log(f"{label:8s} {name:12s} test {row['test']:.3f} (val {row['val']:.3f}, "
                f"fit {row['fit']:.3f}, l2 {row['l2']:g}, {row['steps']} steps)")
        if label == "viseme":  # what a frame's mouth tells at best: the drawn mouth itself
            table[label]["mouth_params_1nn"] = float(nearest_neighbour(
                train["mouth"], ytr, test["mouth"], yte).mean())
            log(f"{label:8s} {'ceiling':12s} test {table[label]['mouth_params_1nn']:.3f} "
                "(1-NN on the drawn mouth's opening, width, roundness)")
        lead[label] = {base: {"lead": table[label]["amdim"] - table[label][base],
                              "ci95": clip_bootstrap(correct["amdim"], correct[base],
                                                     test["clip"])}
                       for base in ("random_init", "pixels")}
        log(f"{label:8s} amdim's lead (95% over test clips): " + ", ".join(
            f"{b} {v['lead']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]"
            for b, v in lead[label].items()))
    return {
        "checkpoint": str(checkpoint), "step": trained["step"], "dataset": dataset,
        "encoder_features": list(maps), "region": list(region),
        "train_frames": len(ytr), "test_frames": len(yte),
        "feature_dims": {k: int(v[0].shape[1]) for k, v in feats.items()},
        "accuracy": table, "lead": lead, "details": details, "supervised": supervised,
        "seconds": time.perf_counter() - t0,
    }


def write(result: dict, out) -> None:
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
