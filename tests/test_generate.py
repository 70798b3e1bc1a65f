"""Generation: speech in, mp4 with sound out; windows, determinism, and clear errors."""

import av
import numpy as np
import pytest

from mirage_jax import cli, generate, media


@pytest.fixture(scope="module")
def gen(tiny_dit_run):
    return generate.Generator(tiny_dit_run)


def tone_file(path, seconds=0.5, amp=0.3, rate=22050, channels=2):
    t = np.arange(int(seconds * rate)) / rate
    x = (amp * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    with av.open(str(path), "w") as c:
        s = c.add_stream("pcm_s16le", rate=rate)
        s.layout = "stereo" if channels == 2 else "mono"
        frame = av.AudioFrame.from_ndarray(
            (np.stack([x] * channels) * 32767).astype(np.int16).reshape(1, -1),
            format="s16", layout=s.layout)
        frame.sample_rate = rate
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return path


def test_text_to_mp4_with_sound(tiny_dit_run, tmp_path):
    out = tmp_path / "hello.mp4"
    rc = cli.main(["generate", "--checkpoint", str(tiny_dit_run), "--text",
                   "Hello there, my friend.", "--steps", "3", "--out", str(out)])
    assert rc == 0
    wave = generate.speech(text="Hello there, my friend.")
    with av.open(str(out)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert v.codec_context.name == "h264" and v.codec_context.pix_fmt == "yuv420p"
        assert v.average_rate == 25 and a.codec_context.name == "aac"
        n = sum(1 for _ in c.decode(v))
    assert abs(n - len(wave) / 640) <= 1  # as long as the speech, within a frame
    assert n > 4 * 4  # several windows of the tiny model's 4 frames
    heard = media.load_audio(out)
    assert abs(len(heard) - len(wave)) < 0.05 * 16000


def test_windows_carry_over_and_seed_is_deterministic(gen, tmp_path):
    wave = generate.speech(tone_file(tmp_path / "a.wav", seconds=0.9))
    s = generate.Settings(steps=2, seed=3)
    a, b = gen(wave, "a man", None, s, False), gen(wave, "a man", None, s, False)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (round(len(wave) / 640), 16, 16, 3) and a.dtype == np.uint8
    c = gen(wave, "a man", None, generate.Settings(steps=2, seed=4), False)
    assert not np.array_equal(a, c)
    # Window starts: 0, 3, 6, ... (4 frames, 1 carried); with no overlap frames differ there.
    assert gen.audio_start(3) == 3 and gen.units_for(23) == 23


def test_reference_image_and_its_errors(gen, tmp_path):
    from PIL import Image

    img = tmp_path / "ref.png"
    Image.fromarray(np.full((40, 30, 3), 200, np.uint8)).save(img)
    ref = generate.reference_image(img, 16, 16)
    assert ref.shape == (16, 16, 3) and ref.dtype == np.uint8
    bad = tmp_path / "ref.txt"
    bad.write_text("not an image")
    with pytest.raises(generate.GenerationError, match="ref.txt: not an image file"):
        generate.reference_image(bad, 16, 16)


CASES = {"missing": "in.wav", "empty": "in.wav", "silent": "in.wav: the audio is silent",
         "not_audio": "in.wav", "no_checkpoint": "nothing_here",
         "ref_not_image": "ref.png: not an image file"}


@pytest.mark.parametrize("case", CASES)
def test_bad_inputs_are_named_and_write_nothing(case, tiny_dit_run, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    audio = tmp_path / "in.wav"
    checkpoint, extra = tiny_dit_run, []
    tone_file(audio, amp=0.0 if case == "silent" else 0.3)
    if case == "missing":
        audio.unlink()
    elif case == "empty":
        audio.write_bytes(b"")
    elif case == "not_audio":
        audio.write_text("hello")
    elif case == "no_checkpoint":
        checkpoint = tmp_path / "nothing_here"
    elif case == "ref_not_image":
        (tmp_path / "ref.png").write_text("a text file named like an image")
        extra = ["--ref", str(tmp_path / "ref.png")]
    rc = cli.main(["generate", "--checkpoint", str(checkpoint), "--audio", str(audio),
                   "--steps", "1", "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert CASES[case] in err


def test_batch_list_generates_every_file_like_one_at_a_time(tiny_dit_run, gen, tmp_path):
    tone_file(tmp_path / "a.wav", seconds=0.7)
    jobs = tmp_path / "jobs.txt"
    jobs.write_text(
        f"# out<TAB>speech<TAB>prompt\n"
        f"{tmp_path / 'one.mp4'}\t{tmp_path / 'a.wav'}\ta woman\n"
        f"{tmp_path / 'two.mp4'}\ttext:Good morning to you all.\n"
        f"{tmp_path / 'three.mp4'}\ttext:Yes.\ta man\n")
    rc = cli.main(["generate", "--checkpoint", str(tiny_dit_run), "--batch", str(jobs),
                   "--steps", "2", "--seed", "5"])
    assert rc == 0
    for name, speech in [("one", generate.speech(tmp_path / "a.wav")),
                         ("two", generate.speech(text="Good morning to you all.")),
                         ("three", generate.speech(text="Yes."))]:
        frames = media.read_video(tmp_path / f"{name}.mp4")[0]
        assert abs(len(frames) - len(speech) / 640) <= 1, name
    # The first item of a batch sees the same noise as when it is generated alone.
    wave = generate.speech(tmp_path / "a.wav")
    s = generate.Settings(steps=2, seed=5)
    alone = gen(wave, "a woman", None, s, False)
    batched = gen.many([wave, generate.speech(text="Yes.")], ["a woman", "a man"], [None, None],
                       s, False)[0]
    np.testing.assert_array_equal(alone, batched)


def test_generator_from_exported_weights(tiny_dit_run, gen, tmp_path):
    path = tmp_path / "dit_export"
    assert cli.main(["export", "--checkpoint", str(tiny_dit_run), "--out", str(path)]) == 0
    wave = generate.speech(text="Hi.")
    s = generate.Settings(steps=2)
    np.testing.assert_array_equal(generate.Generator(path)(wave, "", None, s, False),
                                  gen(wave, "", None, s, False))
