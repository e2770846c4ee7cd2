"""
Reading pixels: frame-exact video decoding with OpenCV, images with Pillow (EXIF, odd modes, JPEGs decoded
only as large as needed), and the crop boxes of training and testing. Nothing here knows about datasets;
data.py decides which frames and which boxes.

A box is (y0, x0, h, w) in the original pixels; only that region is resized to the output, which equals
resizing the whole frame and then cropping, up to rounding, for less work.
"""

import logging
import math
import os
import struct

# FFmpeg prints a line per broken packet and OpenCV a warning per unopenable file; data.py reports every
# unreadable file itself, once. Set these variables to override.
os.environ.setdefault('OPENCV_FFMPEG_LOGLEVEL', '-8')  # AV_LOG_QUIET
os.environ.setdefault('OPENCV_LOG_LEVEL', 'ERROR')

import cv2  # noqa: E402  (after the variables above)
import numpy as np  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

log = logging.getLogger(__name__)


class SampleError(Exception):
    """One file cannot be read; the dataset replaces it (train) or flags it (eval)."""


class VideoError(SampleError):
    def __init__(self, msg, num_frames=None):
        super().__init__(msg)
        self.num_frames = num_frames  # set when the video ended early: its true length


# What a broken file can raise while we decode it; bugs of our own (TypeError, ...) surface instead.
READ_ERRORS = (SampleError, OSError, ValueError, SyntaxError, EOFError, struct.error, cv2.error,
               Image.DecompressionBombError)

# -----------------------------------------------------------------------------
# videos


def open_video(path):
    if not os.path.isfile(path):
        raise VideoError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise VideoError(f"{path}: empty file (0 bytes)")
    # one decoder thread: the parallelism comes from DataLoader workers
    cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])
    if not cap.isOpened():
        raise VideoError(f"{path}: FFmpeg cannot open it (corrupt, truncated or not a video)")
    return cap


def header(cap):  # (frame count, fps), as the file states them
    return int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), float(cap.get(cv2.CAP_PROP_FPS))


def video_info(path):
    """(true number of frames, fps): the header when plausible, else counted by decoding. A count too large
    (a truncated file) looks plausible: read_video finds it out (VideoError.num_frames)."""
    cap = open_video(path)
    try:
        n, fps = header(cap)
        fps_ok = math.isfinite(fps) and 0 < fps < 1000  # broken webm headers say 1000
        if n <= 0 or n > 1_000_000 or not fps_ok:
            n = 0
            while cap.grab():
                n += 1
    finally:
        cap.release()
    if n == 0:
        raise VideoError(f"{path}: no decodable frames")
    if not fps_ok:  # datasets ask once per file (they keep the answer)
        log.warning(f"{path}: unusable fps {fps} in the header, assuming 30")
        fps = 30.0
    return n, fps


def read_video(path, indices):
    """uint8 (len(indices), H, W, 3) RGB: exactly the frames at those 0-based decode-order indices.

    Never seeks (frame seeks are exact only at keyframes on some codecs): decodes from the start,
    grab() for frames we skip (no colour conversion), retrieve() for the ones we keep.
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if indices.size == 0 or indices.min() < 0:
        raise ValueError(f"need non-negative frame indices, got {indices}")
    wanted, last, kept = set(indices.tolist()), int(indices.max()), {}
    cap = open_video(path)
    try:
        for i in range(last + 1):
            if not cap.grab():
                raise VideoError(f"{path}: frame {last} requested but the video ends after {i} frames",
                                 num_frames=i)
            if i in wanted:
                ok, frame = cap.retrieve()
                if not ok or frame is None:
                    raise VideoError(f"{path}: frame {i} could not be converted")
                kept[i] = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    finally:
        cap.release()
    return np.stack([kept[i] for i in indices.tolist()])  # (T, H, W, 3)

# -----------------------------------------------------------------------------
# images


def load_image(path, reduce=1.0):
    """uint8 (H, W, 3) RGB, EXIF orientation applied; see rgb_image."""
    with Image.open(path) as im:
        return np.asarray(rgb_image(im, reduce))


def rgb_image(im, reduce=1.0):
    """An opened Pillow image, decoded, in mode RGB. reduce > 1: a JPEG may come back up to that many times
    smaller per side (decoded at 1/2, 1/4 or 1/8 scale, skipping most of the work). Transparency is
    composited on white, as a browser shows it; truncated files raise rather than fill with grey."""
    if reduce >= 2:
        im.draft(None, (math.ceil(im.width / reduce), math.ceil(im.height / reduce)))  # JPEG only
    im.load()
    ImageOps.exif_transpose(im, in_place=True)
    if im.mode == 'RGB':
        return im
    if im.mode.startswith('I') or im.mode == 'F':
        a = np.asarray(im, dtype=np.float32) / (257.0 if im.mode != 'F' else 1.0)
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).convert('RGB')
    if im.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or 'transparency' in im.info:
        rgba = np.asarray(im.convert('RGBA'), dtype=np.float32)
        alpha = rgba[..., 3:] / 255.0
        return Image.fromarray(np.rint(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8))
    return im.convert('RGB')


def image_size(im):
    """(H, W) of an opened image as displayed, EXIF orientation applied. A JPEG keeps its EXIF before the
    pixels, so nothing is decoded yet; other formats may keep it after them and are decoded first."""
    if im.format != 'JPEG':
        im.load()
    W, H = im.size
    return (W, H) if im.getexif().get(0x0112) in (5, 6, 7, 8) else (H, W)  # turned by 90 degrees


def image_crops(im, boxes, out):
    """uint8 (len(boxes), out, out, 3): the boxes (in displayed pixels) of an opened image, each resized
    to out x out. A JPEG is decoded only as large as the smallest box needs."""
    H, W = image_size(im)
    img = np.asarray(rgb_image(im, reduce=min(min(b[2], b[3]) for b in boxes) / out))
    sy, sx = img.shape[0] / H, img.shape[1] / W  # decoded size over displayed size
    scaled = [(y0 * sy, x0 * sx, bh * sy, bw * sx) for y0, x0, bh, bw in boxes]
    return np.concatenate([crop_resize(img[None], box, out) for box in scaled])

# -----------------------------------------------------------------------------
# crops


def crop_resize(frames, box, out):
    """(T, H, W, 3) uint8 -> (T, out, out, 3): the box, rounded to whole pixels, resized."""
    H, W = frames.shape[1:3]
    bh, bw = max(1, min(H, round(box[2]))), max(1, min(W, round(box[3])))
    y0, x0 = min(max(0, round(box[0])), H - bh), min(max(0, round(box[1])), W - bw)
    # bilinear aliases when shrinking by more than 2x (1080p sources); area averaging does not
    interp = cv2.INTER_AREA if min(bh, bw) > 2 * out else cv2.INTER_LINEAR
    return np.stack([cv2.resize(f[y0:y0 + bh, x0:x0 + bw], (out, out), interpolation=interp) for f in frames])


def train_video_box(h, w, img_size, rng):
    """Short side scaled to a random integer in [img*256/224, img*320/224], random img x img crop."""
    short = int(rng.integers(round(img_size * 256 / 224), round(img_size * 320 / 224) + 1))
    side = img_size * min(h, w) / short  # the crop's side in original pixels
    return rng.uniform(0, h - side), rng.uniform(0, w - side), side, side


def random_resized_box(h, w, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop: area fraction in `scale`, log-uniform aspect ratio, 10 tries, then a centre
    crop with the aspect ratio clamped into `ratio`."""
    for _ in range(10):
        area = h * w * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        bw, bh = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < bw <= w and 0 < bh <= h:
            return int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1)), bh, bw
    if w / h < ratio[0]:
        bw, bh = w, round(w / ratio[0])
    elif w / h > ratio[1]:
        bw, bh = round(h * ratio[1]), h
    else:
        bw, bh = w, h
    return (h - bh) // 2, (w - bw) // 2, bh, bw


def eval_video_boxes(h, w, crops):
    """Short side -> img, then `crops` squares along the long side (left/centre/right, or top/centre/
    bottom for portrait); one crop is the centre one."""
    side = min(h, w)
    offsets = [(max(h, w) - side) / 2] if crops == 1 else np.linspace(0, max(h, w) - side, crops)
    return [(o, 0, side, side) if h > w else (0, o, side, side) for o in offsets]


def eval_image_box(h, w, img_size):
    """ImageNet convention: short side to img*256/224, centre img x img crop."""
    side = img_size * min(h, w) / round(img_size * 256 / 224)
    return (h - side) / 2, (w - side) / 2, side, side


def hflip(frames):
    """(T, H, W, 3) mirrored left to right."""
    return np.ascontiguousarray(frames[:, :, ::-1])
