"""espeak-ng text-to-speech through ctypes, with phoneme timings.

Why espeak-ng: it runs offline from the `espeakng-loader` wheel and reports when each
phoneme starts in the audio, which is the ground truth the synthetic A-roll corpus needs
for lip sync. espeak keeps global state, so the library is initialised once per process
(worker processes each initialise their own copy); calls are serialised with a lock.

Reproducibility: espeak's pitch "flutter" runs off a static counter that carries over
from call to call, so the same text came out tens of samples longer or shorter each time
(and a dataset build depended on which worker made which clip). The named VOICES use
private copies of espeak's voice variants with `flutter 0`, in a per-process data folder
of symlinks to the wheel's data, so lengths and phoneme timings are exact. Other static
state (glottal phase, echo) still makes the waveform's fine detail depend on earlier calls.
"""
from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import tempfile
import threading

import numpy as np

SAMPLE_RATE = 16000

# espeak_lib.h constants.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS = 0x0001
_INITIALIZE_DONT_EXIT = 0x8000
_EVENT_LIST_TERMINATED = 0
_EVENT_PHONEME = 7
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE, _VOLUME, _PITCH, _RANGE = 1, 2, 3, 4

# Named voices: (language, espeak variant, words per minute, base pitch, pitch range).
VOICES: dict[str, tuple[str, str | None, int, int, int]] = {
    "en-us": ("en-us", None, 165, 50, 50),
    "man": ("en-us", "m3", 160, 40, 45),
    "deep": ("en-us", "m1", 150, 30, 40),
    "woman": ("en-us", "f2", 170, 60, 55),
    "bright": ("en-us", "f4", 180, 70, 60),
    "uk": ("en-gb-x-rp", "m2", 165, 45, 50),
    "fast": ("en-us", "m5", 200, 50, 60),
}


class _Event(ctypes.Structure):
    class _Id(ctypes.Union):
        _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p),
                    ("string", ctypes.c_char * 8)]

    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint),
                ("text_position", ctypes.c_int), ("length", ctypes.c_int),
                ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", _Id)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.POINTER(_Event))

_lock = threading.Lock()
_state: dict = {}  # lib, native_rate, callback (kept alive), buffers of the current call


def _on_synth(wav, n, events):
    """Synth callback: append samples and phoneme events of one chunk."""
    if wav and n > 0:
        _state["chunks"].append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
    i = 0
    while events[i].type != _EVENT_LIST_TERMINATED:
        ev = events[i]
        if ev.type == _EVENT_PHONEME:
            name = ev.id.string.decode("ascii", "replace")
            _state["events"].append((name, int(ev.sample)))
        i += 1
    return 0


def _private_data_dir(src: str) -> str:
    """espeak data = symlinks to `src` plus flutter-free copies of the VOICES' variants."""
    dst = tempfile.mkdtemp(prefix="mirage_espeak_")
    atexit.register(shutil.rmtree, dst, True)
    for name in os.listdir(src):
        if name != "voices":
            os.symlink(os.path.join(src, name), os.path.join(dst, name))
    for sub in os.listdir(os.path.join(src, "voices")):
        if sub != "!v":
            os.makedirs(os.path.join(dst, "voices"), exist_ok=True)
            os.symlink(os.path.join(src, "voices", sub), os.path.join(dst, "voices", sub))
    variants, mine = os.path.join(src, "voices", "!v"), os.path.join(dst, "voices", "!v")
    os.makedirs(mine)
    for name in os.listdir(variants):
        os.symlink(os.path.join(variants, name), os.path.join(mine, name))
    for _, variant, *_ in VOICES.values():
        base = "language variant\nname flat\n"
        if variant:
            with open(os.path.join(variants, variant), encoding="utf-8") as f:
                base = f.read()
        with open(os.path.join(mine, f"mirage_{variant or 'flat'}"), "w", encoding="utf-8") as f:
            f.write(base + "\nflutter 0\n")
    return dst


def _init():
    if "lib" in _state:
        return _state["lib"]
    import espeakng_loader

    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                 ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    data = _private_data_dir(espeakng_loader.get_data_path()).encode()
    rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data,
                                 _INITIALIZE_PHONEME_EVENTS | _INITIALIZE_DONT_EXIT)
    if rate <= 0:
        raise RuntimeError(f"espeak_Initialize failed (data path {data.decode()})")
    cb = _CALLBACK(_on_synth)
    lib.espeak_SetSynthCallback(cb)
    _state.update(lib=lib, native_rate=rate, callback=cb, voice=None)
    _synth(lib, "a", "en-us+mirage_flat", 165, 50, 50, 0)  # the first call differs: warm up
    return lib


def _synth(lib, text, name, wpm, pitch, pitch_range, seed):
    """One synchronous synthesis at espeak's native rate: (int16 samples, events)."""
    if _state["voice"] != name:
        if lib.espeak_SetVoiceByName(name.encode()) != 0:
            raise ValueError(f"speak(): unknown espeak voice {name!r}")
        _state["voice"] = name
    lib.espeak_SetParameter(_RATE, wpm, 0)
    lib.espeak_SetParameter(_PITCH, pitch, 0)
    lib.espeak_SetParameter(_RANGE, pitch_range, 0)
    lib.espeak_ng_SetRandSeed(ctypes.c_long(int(seed)))
    _state["chunks"], _state["events"] = [], []
    buf = ctypes.create_string_buffer(text.encode("utf-8"))
    err = lib.espeak_Synth(buf, len(buf), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
    chunks, events = _state.pop("chunks"), _state.pop("events")
    if err != 0:
        raise RuntimeError(f"espeak_Synth failed with error {err} for text {text!r}")
    return (np.concatenate(chunks) if chunks else np.zeros(0, np.int16)), events


def native_sample_rate() -> int:
    """espeak's own output rate (22050 Hz); initialises espeak in this process."""
    with _lock:
        _init()
    return _state["native_rate"]


def speak(text: str, voice: str = "en-us", rate: int | None = None, pitch: int | None = None,
          sample_rate: int = SAMPLE_RATE, seed: int = 0) -> tuple[np.ndarray, list[tuple[str, int]]]:
    """Synthesise `text`; returns (float32 mono audio at `sample_rate`, [(phoneme, start)]).

    `voice` is a name from VOICES or any espeak voice string ("en-us+f3"; these keep
    espeak's call-to-call pitch flutter); `rate` (words per minute) and `pitch` (0-100)
    override the voice's defaults. Event positions are in samples of the returned audio and
    are non-decreasing; pause phonemes ("_", "_:") are kept. With a named voice the same
    arguments give the same length and timings whatever ran before (the waveform's phase
    may differ); `seed` reseeds espeak's noise generator on every call.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"speak(): text must be a non-empty string, got {text!r}")
    if voice in VOICES:
        lang, variant, wpm, base_pitch, pitch_range = VOICES[voice]
        name = f"{lang}+mirage_{variant or 'flat'}"
    else:
        name, wpm, base_pitch, pitch_range = voice, 165, 50, 50
    wpm = wpm if rate is None else int(rate)
    base_pitch = base_pitch if pitch is None else int(pitch)
    if not 80 <= wpm <= 450:
        raise ValueError(f"speak(): rate must be in [80, 450] words/min, got {wpm}")
    if not 0 <= base_pitch <= 100:
        raise ValueError(f"speak(): pitch must be in [0, 100], got {base_pitch}")
    with _lock:
        pcm, events = _synth(_init(), text, name, wpm, base_pitch, pitch_range, seed)
    native = _state["native_rate"]
    audio = pcm.astype(np.float32) / 32768.0
    if sample_rate != native and audio.size:
        import soxr  # librosa's resampling backend

        audio = soxr.resample(audio, native, sample_rate).astype(np.float32)
    scale = sample_rate / native
    n = audio.shape[0]
    out, last = [], 0
    for ph, pos in events:
        pos = min(max(int(round(pos * scale)), last), n)
        out.append((ph, pos))
        last = pos
    return audio, out
