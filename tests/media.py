"""Small real media files for the data tests, written with OpenCV and Pillow into a test's tmp_path."""

import csv
import json
import os

import cv2
import numpy as np
from PIL import Image

FOURCC = {'.mp4': 'mp4v', '.webm': 'VP90', '.avi': 'MJPG'}


def noise_frames(n, h=48, w=64, seed=0):
    """Every frame different from its neighbours, so an off-by-one in decoding shows."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def band_frames(n, h=48, w=64, colours=((255, 0, 0), (0, 255, 0), (0, 0, 255))):
    """Constant RGB frames split into bands along the long side (left->right, or top->bottom if portrait)."""
    f = np.zeros((h, w, 3), np.uint8)
    long = max(h, w)
    for k, c in enumerate(colours):
        sl = slice(k * long // len(colours), (k + 1) * long // len(colours))
        if w >= h:
            f[:, sl] = c
        else:
            f[sl, :] = c
    return np.repeat(f[None], n, axis=0)


def write_video(path, frames, fps=12):
    """frames: RGB (T, H, W, 3)."""
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    vw = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*FOURCC[os.path.splitext(path)[1]]), fps,
                         (frames.shape[2], frames.shape[1]))
    assert vw.isOpened(), path
    for f in frames:
        vw.write(np.ascontiguousarray(f[..., ::-1]))
    vw.release()
    return path


def decode_all(path):
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    out = []
    while True:
        ok, f = cap.read()
        if not ok:
            return np.stack(out)[..., ::-1]  # BGR -> RGB
        out.append(f)


def write_image(path, shape=(40, 60), seed=0):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)).save(str(path))
    return str(path)


def tiny_video(path, n=6):
    return write_video(path, noise_frames(n, 24, 32))


def write_kinetics_csv(path, rows, is_cc=True):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, 'w', newline='') as f:
        w = csv.writer(f, quoting=csv.QUOTE_MINIMAL)
        w.writerow(['label', 'youtube_id', 'time_start', 'time_end', 'split'] + (['is_cc'] if is_cc else []))
        for r in rows:
            w.writerow(r)


def make_ssv2(root, train, val, frames=None, labels=None):
    """train / val: {id: template}."""
    os.makedirs(root, exist_ok=True)
    templates = sorted(set(train.values()) | set(val.values()))
    labels = labels or {t.replace('[', '').replace(']', ''): str(i) for i, t in enumerate(templates)}
    (root / 'something-something-v2-labels.json').write_text(json.dumps(labels))
    for split, items in [('train', train), ('validation', val)]:
        entries = [{'id': i, 'label': t.replace('[something]', 'a cup').lower(), 'template': t,
                    'placeholders': ['a cup']} for i, t in items.items()]
        (root / f'something-something-v2-{split}.json').write_text(json.dumps(entries))
        for i in items:
            write_video(root / '20bn-something-something-v2' / f'{i}.webm',
                        noise_frames(6, 24, 32) if frames is None else frames)
    return labels


def ffmpeg_video(path, *args, source="testsrc2=s=64x48:r=25:d=6,noise=alls=30:allf=t+u", inputs=None):
    """A video written by FFmpeg (imageio-ffmpeg's binary) from a moving test pattern with grain, or from
    `inputs`: the encoder options and containers that fast readers get wrong."""
    import subprocess

    import imageio_ffmpeg

    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-y",
           *(inputs or ["-f", "lavfi", "-i", source]), *args, str(path)]
    subprocess.run(cmd, check=True)
    return str(path)


def image_set_with_a_stall(root, n=12, classes=2):
    """A custom image set listed in train.csv and val.csv: n PNG files, then stall.png, a FIFO: a read of it
    never returns (opening it waits for a writer), as on a stalled network mount. -> the FIFO's path."""
    lines = [f"{i}.png {i % classes}" for i in range(n)]
    for i in range(n):
        write_image(os.path.join(root, f"{i}.png"), (24, 24), seed=i)
    fifo = os.path.join(str(root), "stall.png")
    os.mkfifo(fifo)
    with open(os.path.join(root, "train.csv"), "w") as f:
        f.write("\n".join(lines + ["stall.png 0"]) + "\n")
    with open(os.path.join(root, "val.csv"), "w") as f:
        f.write("\n".join(lines[:4]) + "\n")
    return fifo
