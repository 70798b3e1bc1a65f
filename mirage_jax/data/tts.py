"""espeak-ng text-to-speech through ctypes, with phoneme timings.

Why espeak-ng: it runs offline from the `espeakng-loader` wheel and reports when each
phoneme starts in the audio, which is the ground truth the synthetic A-roll corpus needs
for lip sync. espeak keeps global state, so the library is initialised once per process
(worker processes each initialise their own copy); calls are serialised with a lock.
"""
from __future__ import annotations

import ctypes
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

# Named voices: (espeak voice variant, words per minute, base pitch 0-100, pitch range 0-100).
VOICES: dict[str, tuple[str, int, int, int]] = {
    "en-us": ("en-us", 165, 50, 50),
    "man": ("en-us+m3", 160, 40, 45),
    "deep": ("en-us+m1", 150, 30, 40),
    "woman": ("en-us+f2", 170, 60, 55),
    "bright": ("en-us+f4", 180, 70, 60),
    "uk": ("en-gb-x-rp+m2", 165, 45, 50),
    "fast": ("en-us+m5", 200, 50, 60),
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


def _init():
    if "lib" in _state:
        return _state["lib"]
    import espeakng_loader

    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                 ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    data = espeakng_loader.get_data_path().encode()
    rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data,
                                 _INITIALIZE_PHONEME_EVENTS | _INITIALIZE_DONT_EXIT)
    if rate <= 0:
        raise RuntimeError(f"espeak_Initialize failed (data path {data.decode()})")
    cb = _CALLBACK(_on_synth)
    lib.espeak_SetSynthCallback(cb)
    _state.update(lib=lib, native_rate=rate, callback=cb, voice=None)
    return lib


def native_sample_rate() -> int:
    _init()
    return _state["native_rate"]


def speak(text: str, voice: str = "en-us", rate: int | None = None, pitch: int | None = None,
          sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, list[tuple[str, int]]]:
    """Synthesise `text`; returns (float32 mono audio at `sample_rate`, [(phoneme, start)]).

    `voice` is a name from VOICES or any espeak voice string ("en-us+f3"); `rate` (words
    per minute) and `pitch` (0-100) override the voice's defaults. Event positions are in
    samples of the returned audio and are non-decreasing. Pause phonemes ("_", "_:") are kept.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"speak(): text must be a non-empty string, got {text!r}")
    name, wpm, base_pitch, pitch_range = VOICES.get(voice, (voice, 165, 50, 50))
    wpm = wpm if rate is None else int(rate)
    base_pitch = base_pitch if pitch is None else int(pitch)
    if not 80 <= wpm <= 450:
        raise ValueError(f"speak(): rate must be in [80, 450] words/min, got {wpm}")
    if not 0 <= base_pitch <= 100:
        raise ValueError(f"speak(): pitch must be in [0, 100], got {base_pitch}")
    with _lock:
        lib = _init()
        if _state["voice"] != name:
            if lib.espeak_SetVoiceByName(name.encode()) != 0:
                raise ValueError(f"speak(): unknown espeak voice {voice!r} ({name!r})")
            _state["voice"] = name
        lib.espeak_SetParameter(_RATE, wpm, 0)
        lib.espeak_SetParameter(_PITCH, base_pitch, 0)
        lib.espeak_SetParameter(_RANGE, pitch_range, 0)
        _state["chunks"], _state["events"] = [], []
        buf = ctypes.create_string_buffer(text.encode("utf-8"))
        err = lib.espeak_Synth(buf, len(buf), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        chunks, events = _state.pop("chunks"), _state.pop("events")
    if err != 0:
        raise RuntimeError(f"espeak_Synth failed with error {err} for text {text!r}")
    native = _state["native_rate"]
    pcm = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
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
