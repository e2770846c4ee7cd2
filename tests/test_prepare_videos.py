"""tools/prepare_videos.py on a small dataset folder of real H.264 / VP9 files written with FFmpeg."""

import os
import subprocess
import sys

import numpy as np
import pytest

import video

imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
av = pytest.importorskip("av")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "prepare_videos.py")
GOP, SHORT = 8, 64


def encode(path, size, frames, codec_args, fps=25):
    """A moving test pattern with a sine tone, encoded by FFmpeg: a real file with B-frames and audio."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-y",
                    "-f", "lavfi", "-i", f"testsrc2=s={size}:r={fps}", "-f", "lavfi", "-i", "sine",
                    "-frames:v", str(frames), "-shortest", "-pix_fmt", "yuv420p", *codec_args, str(path)],
                   check=True)
    return str(path)


def run(*argv):
    return subprocess.run([sys.executable, SCRIPT, *map(str, argv)], capture_output=True, text=True,
                          timeout=120)


def probe(path):
    """(width, height, fps, frame numbers of the keyframes, number of frames, audio streams)."""
    with av.open(path) as c:
        s = c.streams.video[0]
        keys = [p.is_keyframe for p in c.demux(s) if p.size]
        return s.width, s.height, s.average_rate, list(np.flatnonzero(keys)), len(keys), len(c.streams.audio)


def pyav_frames(path):
    with av.open(path) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    src, dst = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("out") / "k400"
    videos = {  # relative path -> source (width, height)
        "train/abc_000001_000011.mp4": encode(src / "train/abc_000001_000011.mp4", "160x120", 37,
                                              ["-c:v", "libx264", "-g", "250", "-c:a", "aac"]),
        "videos/portrait.mkv": encode(src / "videos/portrait.mkv", "96x128", 20, ["-c:v", "libx264"]),
        "20bn/1234.webm": encode(src / "20bn/1234.webm", "80x60", 20,  # short side 60 < 64: kept
                                 ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8",
                                  "-c:a", "libopus"]),
    }
    (src / "annotations").mkdir()
    (src / "annotations/train.csv").write_text("label,youtube_id,time_start,time_end,split\n"
                                               "x,abc,1,11,train\n")
    result = run(src, dst, "--short_side", SHORT, "--gop", GOP, "--jobs", 2)
    assert result.returncode == 0, result.stderr
    return src, dst, videos, result


@pytest.mark.parametrize("rel, size", [("train/abc_000001_000011.mp4", (86, 64)),
                                       ("videos/portrait.mkv", (64, 86)), ("20bn/1234.webm", (80, 60))])
def test_video_resized_with_exact_keyframes(prepared, rel, size):
    src, dst, _, _ = prepared
    w, h, fps, keys, n, audio = probe(str(dst / rel))
    sw, sh, sfps, _, sn, _ = probe(str(src / rel))
    assert (w, h) == size  # short side as asked (never upscaled), aspect kept, even sides
    assert (n, fps) == (sn, sfps)
    assert keys == list(range(0, n, GOP))
    assert audio == 0


def test_same_names_and_annotations_copied(prepared):
    src, dst, videos, _ = prepared
    files = sorted(os.path.relpath(os.path.join(d, f), dst) for d, _, fs in os.walk(dst) for f in fs)
    assert files == sorted([*videos, "annotations/train.csv"])
    assert (dst / "annotations/train.csv").read_bytes() == (src / "annotations/train.csv").read_bytes()


@pytest.mark.parametrize("backend", ["pyav", "opencv"])
@pytest.mark.parametrize("rel", ["train/abc_000001_000011.mp4", "20bn/1234.webm"])
def test_read_video_matches_pyav(prepared, rel, backend, monkeypatch):
    """Both readers, every frame and windows in any order: a decode from the start, as PyAV gives it."""
    monkeypatch.setattr(video, "BACKEND", backend)
    path = str(prepared[1] / rel)
    ref = pyav_frames(path)
    assert video.video_info(path)[0] == len(ref)
    np.testing.assert_array_equal(video.read_video(path, np.arange(len(ref))), ref)
    idx = np.random.default_rng(0).integers(0, len(ref), 24)
    np.testing.assert_array_equal(video.read_video(path, idx), ref[idx])


def test_second_run_skips_existing(prepared):
    src, dst, videos, _ = prepared
    result = run(src, dst, "--short_side", SHORT, "--gop", GOP)
    assert result.returncode == 0, result.stderr
    assert f"0 files written, {len(videos) + 1} skipped" in result.stdout


def test_paused_video_keeps_every_frame(tmp_path):
    """A 1-second pause after frame 10: a constant rate would fill it with copies, so timestamps are kept."""
    src = encode(tmp_path / "src/paused.mp4", "64x48", 30,
                 ["-vf", "setpts='(N/25+gte(N,10))/TB'", "-fps_mode", "passthrough", "-c:v", "libx264"])
    assert run(tmp_path / "src", tmp_path / "out", "--gop", 4).returncode == 0
    _, _, _, keys, n, _ = probe(str(tmp_path / "out/paused.mp4"))
    assert n == probe(src)[4] == 30 and keys == list(range(0, 30, 4))


def test_failures_listed_and_exit_1(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src/broken.mp4").write_bytes(b"not a video" * 100)
    (tmp_path / "src/labels.txt").write_text("a\n")
    result = run(tmp_path / "src", tmp_path / "out")
    assert result.returncode == 1
    failed = [ln for ln in result.stdout.splitlines() if ln.startswith("FAILED")]
    assert len(failed) == 1 and failed[0].startswith("FAILED broken.mp4: ")
    assert (tmp_path / "out/labels.txt").exists() and not (tmp_path / "out/broken.mp4").exists()
    assert os.listdir(tmp_path / "out") == ["labels.txt"]  # no partial output left behind


def test_missing_folder_one_line(tmp_path):
    result = run(tmp_path / "nope", tmp_path / "out")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "no folder" in result.stderr
    assert "Traceback" not in result.stderr
