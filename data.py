"""
Datasets, decoding, sampling and the co-training loader. Read top to bottom: dataset specs (their on-disk
layouts are parsed in layouts.py); frame-exact decoding; temporal sampling and spatial crops; ClipDataset,
one sample -> uint8 (C, T, H, W), or its test views; the multi-dataset schedule and sampler, whose whole
state is one integer, so a resumed run sees exactly the batches an uninterrupted one would; the loaders.
Clips leave the loader as uint8 and are normalised on the GPU (Normalize): 4x less to copy.
"""

import functools
import logging
import math
import os
import struct
import threading
import time
from dataclasses import dataclass, replace
from fractions import Fraction

# FFmpeg prints a line per broken packet and OpenCV a warning per unopenable file; we report every
# unreadable file ourselves, once. Set these variables to override.
os.environ.setdefault('OPENCV_FFMPEG_LOGLEVEL', '-8')  # AV_LOG_QUIET
os.environ.setdefault('OPENCV_LOG_LEVEL', 'ERROR')

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps

from layouts import IMAGE_EXTS, VIDEO_EXTS, DatasetError, Listing, listing

log = logging.getLogger(__name__)
MAX_TRIES = 10  # substitutes tried for an unreadable training sample before giving up


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
# specs


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    kind: str             # 'video' or 'image'
    sampling: str         # 'kinetics' | 'segment' | 'image'
    layout: str = 'custom'  # how it lies on disk: a key of layouts.DESCRIPTIONS
    rate: int = 32        # kinetics style: sampling rate in 30-fps frames (converted by the file's fps)
    flip: bool = True     # is a horizontal flip label-safe?
    test_clips: int = 1   # temporal clips at test
    test_crops: int = 3   # spatial crops at test
    batch_scale: int = 1  # the dataset's batch is batch_size * batch_scale unless set per dataset
    min_area: float = 0.08  # images: RandomResizedCrop's smallest crop, as a fraction of the area


def image_spec(name, layout='custom', **kw):
    """An image is a T = 1 clip, ~1/8 of a clip's cost: a 4x batch; tested on the ImageNet centre crop."""
    return DatasetSpec(name, 'image', 'image', layout, **{'test_crops': 1, 'batch_scale': 4, **kw})


SPECS = {}


def register(*specs):
    SPECS.update({s.name: s for s in specs})


register(DatasetSpec('k400', 'video', 'kinetics', 'kinetics'),
         DatasetSpec('k600', 'video', 'kinetics', 'kinetics'),
         DatasetSpec('k700', 'video', 'kinetics', 'kinetics'),
         DatasetSpec('ssv2', 'video', 'segment', 'ssv2', flip=False),  # "left to right" is a label
         DatasetSpec('mit', 'video', 'kinetics', 'mit', rate=8),  # 3-second clips: 8x8 spans 2.1 s
         image_spec('in1k', 'imagenet'),
         image_spec('in21k', 'in21k'))


def custom_spec(name, paths):
    """Video or image, by the extensions of the listed files. Videos of any length: segment sampling."""
    exts = [os.path.splitext(os.fsdecode(p))[1].lower() for p in paths[:1000]]
    n_video, n_image = sum(e in VIDEO_EXTS for e in exts), sum(e in IMAGE_EXTS for e in exts)
    if n_video == n_image == 0:
        raise DatasetError(f"dataset '{name}': no video ({' '.join(VIDEO_EXTS)}) or image "
                           f"({' '.join(IMAGE_EXTS)}) files among the listed paths")
    return image_spec(name) if n_image > n_video else DatasetSpec(name, 'video', 'segment')


def build_dataset(name, data_dir, split, *, frames=8, img_size=224, train=None, views=None, cache_dir=None):
    """The dataset <data_dir>/<name>, its listing kept in cache_dir (layouts.listing). views: (clips, crops)
    in eval mode instead of the spec's, e.g. (1, 1)."""
    if split not in ('train', 'val'):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if name.startswith('demo_') and name not in SPECS:
        raise DatasetError(f"unknown demo dataset '{name}': import demo to register the demo sets")
    samples = listing(name, data_dir, split, SPECS[name].layout if name in SPECS else 'custom', cache_dir)
    spec = SPECS.get(name) or custom_spec(name, samples.paths)
    spec = replace(spec, test_clips=views[0], test_crops=views[1]) if views else spec
    train = split == 'train' if train is None else train
    return ClipDataset(spec, samples, frames=frames, img_size=img_size, train=train)

# -----------------------------------------------------------------------------
# decoding


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
    if not fps_ok:
        warn_once(path, f"unusable fps {fps} in the header, assuming 30")
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

# -----------------------------------------------------------------------------
# temporal sampling


def kinetics_indices(num_video_frames, frames, rate, fps, clip_idx=0, num_clips=1, rng=None):
    """`frames` frames, `rate` frames apart at 30 fps: frame i of a clip is floor(start + i*rate*fps/30),
    clamped to [0, n-1]. start lies in [0, n - span], span = frames*rate*fps/30: in train an integer
    drawn uniformly; at test clip k of N sits in the middle of the k-th of N equal parts of that range,
    start = floor((n - span) * (k + 0.5) / N)."""
    n = num_video_frames
    room = max(n - frames * rate * fps / 30.0, 0.0)
    if rng is not None:
        start = int(rng.integers(0, math.floor(room) + 1))
    else:
        start = math.floor(room * (clip_idx + 0.5) / num_clips)
    # multiply before dividing: the exact cases (30 fps; 25 fps at rate 32) have no float error
    idx = np.floor(start + np.arange(frames) * rate * fps / 30.0).astype(np.int64)
    return np.clip(idx, 0, n - 1)


def segment_indices(num_video_frames, frames, rng=None, clip_idx=0, num_clips=1):
    """SSv2 style: `frames` equal segments of [0, n), one frame from each: floor((k + u) * n / frames),
    u uniform in [0, 1) per segment in train, (clip + 0.5) / num_clips at test (the middle for one)."""
    n = num_video_frames
    u = rng.random(frames) if rng is not None else np.full(frames, (clip_idx + 0.5) / num_clips)
    idx = np.floor((np.arange(frames) + u) * n / frames).astype(np.int64)
    return np.clip(idx, 0, n - 1)

# -----------------------------------------------------------------------------
# spatial crops. A box is (y0, x0, h, w) in the original pixels; only that region is resized to the
# output, which equals resizing the whole frame and then cropping, up to rounding, for less work.


def image_crops(path, boxes_for, out):
    """uint8 (len(boxes), out, out, 3): the boxes boxes_for(H, W) of an image of displayed size H x W,
    each resized to out x out. A JPEG is decoded only as large as the boxes need."""
    with Image.open(path) as im:
        if im.format == 'JPEG':  # size and EXIF come before the pixels: boxes first, then decode
            W, H = im.size
            if im.getexif().get(0x0112) in (5, 6, 7, 8):  # orientation turned by 90 degrees
                H, W = W, H
            boxes = boxes_for(H, W)
            img = np.asarray(rgb_image(im, reduce=min(min(b[2], b[3]) for b in boxes) / out))
        else:  # other formats may keep EXIF after the pixels
            img = np.asarray(rgb_image(im))
            H, W = img.shape[:2]
            boxes = boxes_for(H, W)
    sy, sx = img.shape[0] / H, img.shape[1] / W  # decoded size over full size
    scaled = [(y0 * sy, x0 * sx, bh * sy, bw * sx) for y0, x0, bh, bw in boxes]
    return np.concatenate([crop_resize(img[None], box, out) for box in scaled])


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


class Normalize:
    """uint8 (..., C, T, H, W) -> float32 (x/255 - mean) / std, with mean and std kept on the device."""

    def __init__(self, mean, std, device):
        def column(v):  # "0.45,0.45,0.45" or a sequence -> (C, 1, 1, 1)
            values = [float(s) for s in (v.split(',') if isinstance(v, str) else v)]
            return torch.tensor(values, device=device).reshape(-1, 1, 1, 1)
        self.mean, self.std = column(mean), column(std)

    def __call__(self, x):
        assert x.shape[-4] == 3, f"expected (..., C=3, T, H, W), got {tuple(x.shape)}"
        return (x.float() / 255.0 - self.mean) / self.std

# -----------------------------------------------------------------------------
# the dataset

_WARNED = set()  # paths this process has warned about


def warn_once(path, err):
    if path not in _WARNED:  # per process: each DataLoader worker warns once per path
        _WARNED.add(path)
        log.warning(f"unreadable sample {path}: {err}")


class ClipDataset(torch.utils.data.Dataset):
    """Train mode: key (index, sample_seed) -> {'x': uint8 (C, T, H, W), 'y', 'failed': [paths replaced]};
    every random draw comes from sample_seed, so a key always gives the same bytes.
    Eval mode: key index -> {'x': uint8 (V, C, T, H, W), 'y', 'ok', 'index'}, V = clips x crops views,
    clip-major; an unreadable sample is not replaced: x is zeros and ok is False."""

    def __init__(self, spec, samples: Listing, *, frames=8, img_size=224, train=True):
        self.spec, self.samples, self.train = spec, samples, train
        self.classes, self.problems = samples.classes, samples.problems
        self.frames = frames if spec.kind == 'video' else 1
        self.img_size = img_size
        # images have no temporal clips: their views are the spatial crops
        self.num_views = 1 if train else spec.test_crops * (spec.test_clips if spec.kind == 'video' else 1)
        self.lengths = {}  # path -> (true frame count, fps), filled in each worker as it reads

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        if self.train:
            if not isinstance(key, tuple):
                raise TypeError(f"{self.spec.name} is in train mode: index it with (index, sample_seed)")
            return self.train_item(int(key[0]), int(key[1]))
        return self.eval_item(int(key))

    def train_item(self, index, seed):
        rng = np.random.default_rng(seed)
        failed, err = [], None
        for _ in range(MAX_TRIES):
            path, label = self.samples.path(index), int(self.samples.labels[index])
            # separate streams for time and space: a re-sample after a lying header (new temporal
            # indices) gives the same bytes as a read with the true length cached
            t_seed, s_seed = rng.integers(0, 2**63, size=2)
            try:
                x = self.load_train(path, int(t_seed), np.random.default_rng(s_seed))
                x = torch.from_numpy(x).permute(3, 0, 1, 2).contiguous()  # (T, H, W, C) -> (C, T, H, W)
                return {'x': x, 'y': label, 'failed': failed}
            except READ_ERRORS as e:  # never stop training: take another sample of this dataset
                warn_once(path, e)
                failed.append(path)
                err, index = e, int(rng.integers(len(self.samples)))
        raise DatasetError(f"no readable sample in {self.spec.name} after {MAX_TRIES} tries (last error: "
                           f"{err}); check the files, the codecs OpenCV's FFmpeg supports, and disk access. "
                           f"Failed: {failed}")

    def load_train(self, path, t_seed, rng):
        """-> (T, img, img, 3) uint8."""
        if self.spec.kind == 'image':
            box = lambda h, w: [random_resized_box(h, w, rng, (self.spec.min_area, 1.0))]  # noqa: E731
            x = image_crops(path, box, self.img_size)
        else:
            # a fresh stream per attempt: a retry with the true length draws what a cached read draws
            def make_indices(n, fps):
                return [self.indices(n, fps, np.random.default_rng(t_seed))]
            clip = self.read_clips(path, make_indices)[0]
            box = train_video_box(clip.shape[1], clip.shape[2], self.img_size, rng)
            x = crop_resize(clip, box, self.img_size)
        flip = rng.random() < 0.5  # drawn always, so the stream does not depend on spec.flip
        return np.stack([cv2.flip(f, 1) for f in x]) if self.spec.flip and flip else x

    def eval_item(self, index):
        path = self.samples.path(index)
        try:
            x, ok = self.views(path), True
        except READ_ERRORS as e:
            warn_once(path, e)
            s = self.img_size
            x, ok = torch.zeros(self.num_views, 3, self.frames, s, s, dtype=torch.uint8), False
        return {'x': x, 'y': int(self.samples.labels[index]), 'ok': ok, 'index': index}

    def views(self, path):
        """uint8 (V, C, T, H, W): the test views of one file, clip-major; raises if it cannot be read.
        Images: one crop is the ImageNet centre crop; several follow the video rule with T = 1."""
        s, crops = self.img_size, self.spec.test_crops
        if self.spec.kind == 'image':
            def boxes(h, w):
                return [eval_image_box(h, w, s)] if crops == 1 else eval_video_boxes(h, w, crops)
            views = image_crops(path, boxes, s)[:, None]  # (V, T = 1, s, s, 3)
        else:
            n_clips = self.spec.test_clips
            clips = self.read_clips(path, lambda n, fps: [self.indices(n, fps, None, c, n_clips)
                                                          for c in range(n_clips)])
            views = [crop_resize(c, box, s) for c in clips for box in eval_video_boxes(*c.shape[1:3], crops)]
        return torch.from_numpy(np.stack(views)).permute(0, 4, 1, 2, 3).contiguous()  # (V, C, T, H, W)

    def indices(self, n, fps, rng, clip_idx=0, num_clips=1):
        if self.spec.sampling == 'segment':
            return segment_indices(n, self.frames, rng, clip_idx, num_clips)
        return kinetics_indices(n, self.frames, self.spec.rate, fps, clip_idx, num_clips, rng)

    def read_clips(self, path, make_indices):
        """make_indices(n, fps) -> index arrays, all read in one decode. A header that claims more frames
        than the file has is found out by the read that runs off the end: it tells the true length."""
        if path not in self.lengths:
            self.lengths[path] = video_info(path)
        for attempt in range(2):
            n, fps = self.lengths[path]
            clips = make_indices(n, fps)
            try:
                frames = read_video(path, np.concatenate(clips))  # (sum T, H, W, 3)
                return np.split(frames, np.cumsum([len(c) for c in clips])[:-1])
            except VideoError as e:
                if attempt or not e.num_frames:
                    raise
                self.lengths[path] = (e.num_frames, fps)


def load_test_views(path, spec_name, *, frames=8, img_size=224, views=None):
    """uint8 (V, C, T, H, W): the test views of one file, sampled as dataset `spec_name` samples (a
    custom name: video or image by the file's extension)."""
    spec = SPECS.get(spec_name) or custom_spec(spec_name, [path])
    spec = replace(spec, test_clips=views[0], test_crops=views[1]) if views else spec
    empty = Listing.from_pairs('', [], [])
    return ClipDataset(spec, empty, frames=frames, img_size=img_size, train=False).views(str(path))

# -----------------------------------------------------------------------------
# co-training schedule and loaders


@functools.lru_cache(maxsize=16)
def interleave(weights):
    """One period of the smooth weighted round-robin, and prefix counts per dataset: every period
    dataset d gets exactly w_d steps, spread as evenly as possible."""
    fracs = [Fraction(w).limit_denominator(1000) for w in weights]
    if not fracs or min(fracs) <= 0:
        raise ValueError(f"dataset weights must be positive, got {list(weights)}")
    lcm = math.lcm(*(f.denominator for f in fracs))
    ints = [int(f * lcm) for f in fracs]
    ints = [i // math.gcd(*ints) for i in ints]
    if sum(ints) > 100_000:  # awkward ratios: approximate to 1/10000 rather than a huge period
        ints = [max(1, round(10_000 * w / sum(weights))) for w in weights]
    period, D = sum(ints), len(ints)
    order, current = np.empty(period, dtype=np.int64), np.zeros(D, dtype=np.int64)
    for s in range(period):
        current += ints
        d = int(np.argmax(current))  # ties -> lowest index, so equal weights give 0, 1, ..., D-1
        current[d] -= period
        order[s] = d
    prefix = np.zeros((period + 1, D), dtype=np.int64)  # prefix[s, d]: steps < s of the period given to d
    prefix[1:] = np.cumsum(np.eye(D, dtype=np.int64)[order], axis=0)
    return order, prefix


def schedule(step, weights):
    """The dataset that trains at optimizer step `step`: round robin (step % D) for equal weights, else
    the smooth weighted round-robin (step frequencies proportional to the weights). No RNG."""
    order, _ = interleave(tuple(float(w) for w in weights))
    return int(order[step % len(order)])


def steps_before(step, d, weights):
    """How many optimizer steps < `step` train dataset d."""
    order, prefix = interleave(tuple(float(w) for w in weights))
    full, rest = divmod(step, len(order))
    return int(full * prefix[-1, d] + prefix[rest, d])


class MultiDatasetBatchSampler:
    """Yields forever, for micro-batch m = start_micro, start_micro + 1, ...: batch_sizes[d] keys
    (d, index, sample_seed) of dataset d = schedule(m // grad_accum).

    Dataset d has its own endless stream: epoch e is a permutation seeded by (seed, d, e), the same on
    all ranks; rank r reads perm[r::world][:len // world] (equal shards, like DistributedSampler with
    drop_last), batch after batch, into the next epoch without a seam. Where d's stream stands at
    micro-batch m is a function of m alone, so m is the whole state of the sampler.
    """

    def __init__(self, lengths, batch_sizes, weights=None, grad_accum=1, rank=0, world=1, seed=0,
                 start_micro=0):
        assert len(lengths) == len(batch_sizes) == len(weights or lengths)
        assert 0 <= rank < world and grad_accum >= 1
        self.shard_len = [n // world for n in lengths]
        if min(self.shard_len) == 0:
            raise DatasetError(f"a dataset has fewer samples ({min(lengths)}) than there are ranks ({world})")
        self.lengths, self.batch_sizes = list(lengths), list(batch_sizes)
        self.weights = [1.0] * len(lengths) if weights is None else [float(w) for w in weights]
        self.grad_accum, self.rank, self.world, self.seed = grad_accum, rank, world, seed
        self.start_micro = start_micro
        self.shards = {}  # d -> (epoch, this rank's shard of that epoch's permutation)

    def micro_batches_before(self, m, d):
        """Micro-batches < m that dataset d receives (all micro-batches of a step share a dataset)."""
        step, sub = divmod(m, self.grad_accum)
        before = steps_before(step, d, self.weights) * self.grad_accum
        return before + (sub if schedule(step, self.weights) == d else 0)

    def batch(self, m):
        d = schedule(m // self.grad_accum, self.weights)
        start = self.micro_batches_before(m, d) * self.batch_sizes[d]  # position in d's stream
        return [self.key(d, p) for p in range(start, start + self.batch_sizes[d])]

    def key(self, d, p):
        epoch, j = divmod(p, self.shard_len[d])
        if self.shards.get(d, (None,))[0] != epoch:
            perm = np.random.default_rng([self.seed, d, epoch]).permutation(self.lengths[d])
            self.shards[d] = (epoch, perm[self.rank::self.world][:self.shard_len[d]])
        # position j of rank r's shard is position j*world + r of the epoch's permutation
        ss = np.random.SeedSequence([self.seed, d, epoch, j * self.world + self.rank])
        return d, int(self.shards[d][1][j]), int(ss.generate_state(1, np.uint64)[0] >> 1)

    def __iter__(self):
        m = self.start_micro
        while True:
            yield self.batch(m)
            m += 1


class MultiDataset(torch.utils.data.Dataset):
    """Key (d, index, sample_seed) -> datasets[d][(index, sample_seed)], with 'dataset': d added."""

    def __init__(self, datasets):
        self.datasets = list(datasets)

    def __getitem__(self, key):
        d, index, seed = key
        return {**self.datasets[d][(index, seed)], 'dataset': d}


def collate_train(batch):
    return {'x': torch.stack([b['x'] for b in batch]),  # (B, C, T, H, W) uint8
            'y': torch.tensor([b['y'] for b in batch], dtype=torch.long),
            'dataset': batch[0]['dataset'],
            'failed': [p for b in batch for p in b['failed']]}


def worker_init(_, owner=None):
    cv2.setNumThreads(1)  # one decoder thread per worker: the workers are the parallelism
    torch.set_num_threads(1)
    if owner is not None:
        threading.Thread(target=exit_with, args=(owner,), daemon=True).start()


def exit_with(pid):
    """End this worker once process `pid`, which it loads for, has ended (also by SIGKILL). A forkserver
    worker is a child of the fork server, so DataLoader's own check on its parent never fires."""
    while True:
        time.sleep(1)
        try:
            os.kill(pid, 0)
        except OSError:  # no such process (or, after pid reuse, someone else's)
            os._exit(0)


def loader_kwargs(workers, pin_memory, prefetch):
    kw = dict(num_workers=workers, pin_memory=pin_memory,
              worker_init_fn=functools.partial(worker_init, owner=os.getpid()))
    if workers > 0:
        # Workers start from a clean forkserver process, not a fork of this one: a fork inherits OpenCV's
        # thread pool (a worker forked while it was busy hangs in cv2) and, under DDP, the process group's
        # sockets (a worker outliving a killed rank holds them, and an elastic restart hangs on it).
        kw.update(persistent_workers=True, prefetch_factor=prefetch, multiprocessing_context="forkserver")
    return kw


def build_train_loader(datasets, batch_sizes, *, weights=None, grad_accum=1, rank=0, world=1, seed=0,
                       workers=4, start_micro=0, pin_memory=False):
    """An endless loader of {'x': (B, C, T, H, W) uint8, 'y': (B,), 'dataset': int, 'failed': [paths]}.
    To resume, pass start_micro = the number of micro-batches already consumed."""
    assert all(d.train for d in datasets), "build_train_loader needs datasets built with train=True"
    sampler = MultiDatasetBatchSampler([len(d) for d in datasets], batch_sizes, weights, grad_accum, rank,
                                       world, seed, start_micro)
    return torch.utils.data.DataLoader(MultiDataset(datasets), batch_sampler=sampler,
                                       collate_fn=collate_train, **loader_kwargs(workers, pin_memory, 4))


def build_eval_loader(dataset, *, batch_size, rank=0, world=1, workers=4, pin_memory=False):
    """Rank r evaluates samples r, r + world, ...: no padding, every sample counted once over the ranks.
    Batches: {'x': (B, V, C, T, H, W) uint8, 'y': (B,), 'ok': (B,) bool, 'index': (B,)}."""
    assert not dataset.train, "build_eval_loader needs a dataset built with train=False"
    mine = range(rank, len(dataset), world)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=mine,
                                       **loader_kwargs(workers, pin_memory, prefetch=2))
