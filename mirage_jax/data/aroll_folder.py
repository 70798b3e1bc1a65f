"""TFDS builder `aroll_folder`: a folder of real A-roll footage -> fixed-length clips.

Every example follows the project's common clip schema (25 fps video, 16 kHz mono
audio, exactly 640 samples per frame), so synthetic and real data share one
pipeline. Written as ArrayRecord without TensorFlow; read with

    tfds.data_source("aroll_folder/s64_t50", data_dir=...)

A bad file (corrupt, truncated, no sound) is skipped, counted and named in
`skipped.json` next to the dataset; it never stops preparation, because one
broken upload in ten thousand should not cost a day of preprocessing.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import json
import logging
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from mirage_jax.media import FPS, SAMPLE_RATE, MediaError, read_video

log = logging.getLogger(__name__)

SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".webm")
SUMMARY_FILE = "skipped.json"


@dataclasses.dataclass
class ArollFolderConfig(tfds.core.BuilderConfig):
    """size: square side in pixels; clip_frames: frames per clip (50 = 2 s);
    cut_threshold: mean |frame difference| (0..255) above which a scene cut is declared."""

    size: int = 64
    clip_frames: int = 50
    cut_threshold: float = 30.0


def config_for(size: int = 64, clip_frames: int = 50, cut_threshold: float = 30.0) -> ArollFolderConfig:
    """The config is named after its shape so different preparations sit side by side."""
    name = f"s{size}_t{clip_frames}"
    if cut_threshold != 30.0:
        name += f"_c{cut_threshold:g}"
    return ArollFolderConfig(name=name, size=size, clip_frames=clip_frames, cut_threshold=cut_threshold,
                             description=f"{size}x{size} px, {clip_frames} frames at {FPS} fps")


def scene_cuts(frames: np.ndarray, threshold: float) -> np.ndarray:
    """Indices t where frame t starts a new shot (mean abs difference to t-1 > threshold)."""
    if len(frames) < 2:
        return np.zeros(0, int)
    f = frames.astype(np.int16)
    diff = np.abs(f[1:] - f[:-1]).mean(axis=(1, 2, 3))
    return np.nonzero(diff > threshold)[0] + 1


def split_clips(n_frames: int, cuts, clip_frames: int):
    """Start indices of consecutive non-overlapping clips that never span a cut,
    plus the number of shots too short to hold one clip."""
    bounds = [0, *[int(c) for c in cuts], n_frames]
    starts, short = [], 0
    for a, b in zip(bounds[:-1], bounds[1:]):
        k = (b - a) // clip_frames
        short += k == 0
        starts += [a + i * clip_frames for i in range(k)]
    return starts, short


def _find_videos(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTS)


def _clip_prefixes(root: Path, files: list[Path]) -> dict[Path, str]:
    """Clip ids are `<path without extension>_<index>` (just the stem for top-level files);
    the extension is kept only where two files would otherwise collide."""
    rel = {p: p.relative_to(root).with_suffix("").as_posix() for p in files}
    counts = collections.Counter(rel.values())
    return {p: (r if counts[r] == 1 else p.relative_to(root).as_posix()) for p, r in rel.items()}


def _decode(path: Path, size: int):
    """-> (frames, audio) or the reason the file is unusable."""
    try:
        frames, audio = read_video(path, fps=FPS, size=size, sample_rate=SAMPLE_RATE)
    except MediaError as e:
        return str(e)
    except Exception as e:  # an unexpected decoder failure must not stop preparation
        return f"{path}: unexpected {type(e).__name__}: {e}"
    if audio is None:
        return f"{path}: no audio stream"
    return frames, audio


def _decode_many(paths, size: int, workers: int):
    """Decode in a thread pool (PyAV releases the GIL), in order, at most 2*workers in flight."""
    with cf.ThreadPoolExecutor(workers) as ex:
        pending = collections.deque()
        for p in paths:
            pending.append((p, ex.submit(_decode, p, size)))
            if len(pending) >= 2 * workers:
                q, fut = pending.popleft()
                yield q, fut.result()
        while pending:
            q, fut = pending.popleft()
            yield q, fut.result()


class ArollFolder(tfds.core.GeneratorBasedBuilder):
    """Real talking-head footage from a manual folder, cut into fixed-length clips."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [config_for(64, 50)]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Put your video files (.mp4 .mov .mkv .webm, searched recursively) in the manual
    directory. A caption can sit next to a video as a `.txt` file with the same name
    (`talk.mp4` + `talk.txt`). Files must have a sound track; those without one, or
    that cannot be decoded, are skipped and listed in `skipped.json`.
    """

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # TFDS 4.9.10's default needs the `importlib_resources` backport (declared only
        # for Python < 3.9); the answer is simply this file.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        t, s = self.builder_config.clip_frames, self.builder_config.size
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "video": tfds.features.Tensor(shape=(t, s, s, 3), dtype=np.uint8, encoding="zlib"),
                "audio": tfds.features.Tensor(shape=(t * SAMPLES_PER_FRAME,), dtype=np.float32),
                "caption": tfds.features.Text(),
                "clip_id": tfds.features.Text(),
            }),
        )

    def _split_generators(self, dl_manager):
        root = Path(dl_manager.manual_dir)
        files = _find_videos(root) if root.is_dir() else []
        if not files:
            raise FileNotFoundError(f"no video files ({', '.join(VIDEO_EXTS)}) under {root}")
        return {"train": self._generate_examples(root, files)}

    def _generate_examples(self, root: Path, files: list[Path]):
        cfg = self.builder_config
        t = cfg.clip_frames
        summary = {"files": len(files), "files_used": 0, "clips": 0, "scene_cuts": 0,
                   "short_dropped": 0, "seconds_used": 0.0, "skipped": []}
        self._summary = summary
        prefixes = _clip_prefixes(root, files)
        for path, res in _decode_many(files, cfg.size, workers=min(8, os.cpu_count() or 1)):
            if isinstance(res, str):
                log.warning("aroll_folder: skipping %s", res)
                summary["skipped"].append({"file": str(path.relative_to(root)), "reason": res})
                continue
            frames, audio = res
            need = len(frames) * SAMPLES_PER_FRAME
            audio = np.pad(audio[:need], (0, max(0, need - len(audio))))  # clock is the video
            cuts = scene_cuts(frames, cfg.cut_threshold)
            starts, short = split_clips(len(frames), cuts, t)
            summary["scene_cuts"] += len(cuts)
            summary["short_dropped"] += short
            summary["files_used"] += bool(starts)
            cap = path.with_suffix(".txt")
            caption = cap.read_text(encoding="utf-8", errors="replace").strip() if cap.is_file() else ""
            for i, s in enumerate(starts):
                clip_id = f"{prefixes[path]}_{i:04d}"
                summary["clips"] += 1
                summary["seconds_used"] += t / FPS
                yield clip_id, {
                    "video": frames[s : s + t],
                    "audio": audio[s * SAMPLES_PER_FRAME : (s + t) * SAMPLES_PER_FRAME],
                    "caption": caption,
                    "clip_id": clip_id,
                }
        log.info("aroll_folder summary: %s", {k: v for k, v in summary.items() if k != "skipped"})
        names = ", ".join(s["file"] for s in summary["skipped"])
        if summary["skipped"]:
            log.warning("aroll_folder skipped %d file(s): %s", len(summary["skipped"]), names)
        if not summary["clips"]:  # TFDS would only say "No examples were yielded"
            raise ValueError(f"aroll_folder: no {t}-frame clip in {len(files)} file(s) under {root} "
                             f"({summary['short_dropped']} shot(s) too short; skipped: {names or 'none'})")

    def _download_and_prepare(self, dl_manager, download_config=None):
        super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
        # self.data_dir is the temporary dir here; TFDS renames it when all is written.
        summary = getattr(self, "_summary", None)
        if summary is not None:
            (Path(self.data_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))


def prepare(manual_dir, data_dir, size: int = 64, clip_frames: int = 50,
            cut_threshold: float = 30.0) -> dict:
    """Build `aroll_folder/s{size}_t{clip_frames}` as ArrayRecord; return the summary
    (clips, files, scene cuts, skipped files with reasons, ...). Idempotent: an
    existing preparation is reused and its stored summary returned."""
    config = config_for(size, clip_frames, cut_threshold)
    if config.name in ArollFolder.builder_configs:  # TFDS refuses a custom twin of a listed config
        config = config.name
    builder = ArollFolder(data_dir=str(data_dir), file_format="array_record", config=config)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    f = Path(builder.data_dir) / SUMMARY_FILE
    summary = json.loads(f.read_text()) if f.is_file() else {}
    summary.update(name=f"aroll_folder/{builder.builder_config.name}", data_dir=builder.data_dir,
                   examples=builder.info.splits["train"].num_examples)
    return summary
