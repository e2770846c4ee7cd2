"""
The co-training data: which dataset each optimizer step trains on, which samples it reads, and how a sample
becomes clips. Read top to bottom: dataset specs; the schedule (round robin, or a weighted interleave);
the sampler, whose whole state is one integer, so a resumed run sees exactly the batches an uninterrupted
one would; ClipDataset, one sample -> R training clips uint8 (R, C, T, H, W), or its test views. Pixels
are read in video.py, the on-disk layouts parsed in layouts.py, the DataLoaders built in loaders.py. Clips leave the loader as uint8 and
are normalised on the GPU (Normalize): 4x less to copy.
"""

import functools
import logging
import math
import os
from dataclasses import dataclass, replace
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import kinetics
from layouts import IMAGE_EXTS, VIDEO_EXTS, DatasetError, Listing, leave_out, listing
from video import (READ_ERRORS, VideoError, crop_resize, eval_image_box, eval_video_boxes, hflip, image_crops,
                   image_size, open_video, random_resized_box, train_video_box)
from video import read_video  # noqa: F401  (`from data import read_video` is public)

log = logging.getLogger(__name__)
MAX_TRIES = 10  # substitutes tried for an unreadable training sample before giving up

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
         DatasetSpec('k710', 'video', 'kinetics', 'k710'),  # the three as one (kinetics.py)
         DatasetSpec('ssv2', 'video', 'segment', 'ssv2', flip=False),  # "left to right" is a label
         DatasetSpec('mit', 'video', 'kinetics', 'mit', rate=8),  # 3-second clips: 8x8 spans 2.1 s
         image_spec('in1k', 'imagenet'),
         image_spec('in21k', 'in21k'))


def custom_spec(name, paths):
    """Video or image, by the extensions of the listed files; videos take segment sampling unless told."""
    exts = [os.path.splitext(os.fsdecode(p))[1].lower() for p in paths[:1000]]
    n_video, n_image = sum(e in VIDEO_EXTS for e in exts), sum(e in IMAGE_EXTS for e in exts)
    if n_video == n_image == 0:
        raise DatasetError(f"dataset '{name}': no video ({' '.join(VIDEO_EXTS)}) or image "
                           f"({' '.join(IMAGE_EXTS)}) files among the listed paths")
    return image_spec(name) if n_image > n_video else DatasetSpec(name, 'video', 'segment')

# -----------------------------------------------------------------------------
# the schedule: which dataset trains at each optimizer step


def schedule(step, weights):
    """The dataset that optimizer step `step` trains on: one period of `interleave(weights)` after
    another. Equal weights: round robin, step % D. No RNG, so all ranks and a resumed run agree."""
    order = interleave(tuple(float(w) for w in weights))
    return order[step % len(order)]


def steps_before(step, d, weights):
    """How many optimizer steps < `step` train dataset d."""
    weights = tuple(float(w) for w in weights)
    full, rest = divmod(step, len(interleave(weights)))
    mine = steps_of(weights)[d]
    return full * len(mine) + int(np.searchsorted(mine, np.int32(rest)))  # of mine's type: no copy of mine


@functools.cache
def steps_of(weights):
    """The steps of one period of the schedule that train each dataset, in order: a search, not a count."""
    order = np.frombuffer(interleave(weights), np.uint8)
    return [np.flatnonzero(order == d).astype(np.int32) for d in range(len(weights))]  # 4 bytes a step in all


@functools.cache
def interleave(weights):
    """One period of the schedule, as bytes of dataset indices. Equal weights: (0, 1, ..., D-1). Otherwise
    dataset d gets k_d steps a period, k the weights as small integers, spread as evenly as possible:
    each step goes to the dataset owed the most (smooth weighted round robin)."""
    if not weights or min(weights) <= 0:
        raise ValueError(f"dataset weights must be positive, got {list(weights)}")
    if len(set(weights)) == 1:
        return bytes(range(len(weights)))
    counts = integer_ratio(weights)
    period, owed, order = sum(counts), [0] * len(counts), bytearray(sum(counts))  # a byte a step
    for t in range(period):
        for i, k in enumerate(counts):
            owed[i] += k
        d = owed.index(max(owed))  # ties -> the lowest index
        owed[d] -= period
        order[t] = d
    return bytes(order)


EXACT_PERIOD = 10_000_000  # whole-number weights (--epochs' steps) are kept exactly up to this many steps


def integer_ratio(weights):
    """Small integers in the ratio of the weights: [2, 1, 1] for 0.5, 0.25, 0.25. Whole numbers are kept
    exactly (--epochs gives each dataset its steps); other awkward ratios are rounded to 1/10,000 rather
    than make a period of more than 100,000 steps."""
    fracs = [Fraction(w).limit_denominator(1000) for w in weights]
    lcm = math.lcm(*(f.denominator for f in fracs))
    ints = [int(f * lcm) for f in fracs]
    ints = [i // math.gcd(*ints) for i in ints]
    whole = all(float(w).is_integer() for w in weights) and sum(ints) <= EXACT_PERIOD
    if sum(ints) > 100_000 and not whole:
        ints = [max(1, round(10_000 * w / sum(weights))) for w in weights]
    return ints

# -----------------------------------------------------------------------------
# the sampler


class MultiDatasetBatchSampler:
    """Yields forever, for micro-batch m = start_micro, start_micro + 1, ...: batch_sizes[d] keys
    (d, index, sample_seed) of dataset d = schedule(m // grad_accum).

    Dataset d has one endless stream for all ranks: position g is sample perm[g % n] of epoch g // n, perm
    a permutation seeded by (seed, d, epoch), and the sample's seed comes from its position. Each
    micro-batch of d reads the next world x batch_sizes[d] positions, rank r the r-th slice of them, into
    the next epoch without a seam. Where d's stream stands is the samples read over all ranks, a function
    of m alone: m is the whole state of the sampler, also for a run resumed with another world size.
    """

    def __init__(self, lengths, batch_sizes, weights=None, grad_accum=1, rank=0, world=1, seed=0,
                 start_micro=0):
        assert len(lengths) == len(batch_sizes) == len(weights or lengths)
        assert 0 <= rank < world and grad_accum >= 1
        self.lengths, self.batch_sizes = list(lengths), list(batch_sizes)
        self.weights = [1.0] * len(lengths) if weights is None else [float(w) for w in weights]
        self.grad_accum, self.rank, self.world, self.seed = grad_accum, rank, world, seed
        self.start_micro = start_micro
        self.perms = {}  # d -> (epoch, that epoch's permutation)

    def batch(self, m):
        step, micro = divmod(m, self.grad_accum)
        d = schedule(step, self.weights)
        # micro-batches of d before m: all micro-batches of a step read the step's dataset
        before = steps_before(step, d, self.weights) * self.grad_accum + micro
        start = (before * self.world + self.rank) * self.batch_sizes[d]  # this rank's slice of d's stream
        return [self.key(d, g) for g in range(start, start + self.batch_sizes[d])]

    def key(self, d, g):
        epoch, j = divmod(g, self.lengths[d])
        if self.perms.get(d, (None,))[0] != epoch:
            self.perms[d] = (epoch, np.random.default_rng([self.seed, d, epoch]).permutation(self.lengths[d]))
        ss = np.random.SeedSequence([self.seed, d, epoch, j])
        return d, int(self.perms[d][1][j]), int(ss.generate_state(1, np.uint64)[0] >> 1)

    def __iter__(self):
        m = self.start_micro
        while True:
            yield self.batch(m)
            m += 1

# -----------------------------------------------------------------------------
# the dataset


def build_dataset(name, data_dir, split, *, frames=8, img_size=224, train=None, views=None, sampling=None,
                  cache_dir=None, validation=None):
    """The dataset <data_dir>/<name>, its listing kept in cache_dir (layouts.listing). views: (clips, crops)
    in eval mode instead of the spec's, e.g. (1, 1); sampling: spec fields instead, {'sampling': 'kinetics'};
    validation: {name: Listing}, whose videos are left out (the guard, layouts.leave_out)."""
    if split not in ('train', 'val'):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if name.startswith('demo_') and name not in SPECS:
        raise DatasetError(f"unknown demo dataset '{name}': import demo to register the demo sets")
    layout = SPECS[name].layout if name in SPECS else 'custom'
    if layout == 'k710':
        samples = kinetics.listing(data_dir, split, cache_dir)
    else:
        samples = listing(name, data_dir, split, layout, cache_dir)
    if validation is not None:  # the kept samples saved beside the listing
        samples = leave_out(samples, validation, samples.file + '-guarded' if samples.file else None)
    spec = changed(SPECS.get(name) or custom_spec(name, samples.paths), views, sampling)
    train = split == 'train' if train is None else train
    return ClipDataset(spec, samples, frames=frames, img_size=img_size, train=train)


def changed(spec, views=None, sampling=None):
    """The spec with the test views (clips, crops) and the sampling fields ({'sampling': 'kinetics'}) given."""
    if sampling and spec.kind != 'video':
        raise DatasetError(f"dataset '{spec.name}' holds images: --sampling is for video datasets")
    views = dict(test_clips=views[0], test_crops=views[1]) if views else {}
    return replace(spec, **views, **(sampling or {}))


class ClipDataset(torch.utils.data.Dataset):
    """Train mode: key (index, sample_seed[, R]) -> {'x': uint8 (R, C, T, H, W), 'y', 'failed': [paths
    replaced], 'dropped': []}: R training clips of one sample (repeated sampling; R = 1 by default), each
    with its own window, crop and flip, a video decoded once for all R. Every random draw comes from
    sample_seed, so a key always gives the same bytes, and clip r of R is the clip of R = 1 from its seeds.
    A sample whose substitutes all fail is dropped: no clips (R = 0), and 'dropped' says why in one line.
    Eval mode: key index -> {'x': uint8 (V, C, T, H, W), 'y', 'ok', 'index'}, V = clips x crops views,
    clip-major; an unreadable sample is not replaced: x is zeros and ok is False."""

    def __init__(self, spec, samples: Listing, *, frames=8, img_size=224, train=True):
        self.spec, self.samples, self.train = spec, samples, train
        self.classes, self.problems = samples.classes, samples.problems
        self.frames = frames if spec.kind == 'video' else 1
        self.img_size = img_size
        # images have no temporal clips: their views are the spatial crops
        self.num_views = 1 if train else spec.test_crops * (spec.test_clips if spec.kind == 'video' else 1)
        self.lengths = {}  # path -> true frame count where a read found the header's too large
        self.before_read = None  # loaders.py's: a quarantined path raises; in a loader worker it notes the read

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        if self.train:
            if not isinstance(key, tuple):
                raise TypeError(f"{self.spec.name} is in train mode: index it with (index, sample_seed)")
            return self.train_item(int(key[0]), int(key[1]), int(key[2]) if len(key) > 2 else 1)
        return self.eval_item(int(key))

    def train_item(self, index, seed, num_sample=1):
        rng = np.random.default_rng(seed)
        failed, err, first = [], None, index
        for _ in range(MAX_TRIES):
            path, label = self.samples.path(index), int(self.samples.labels[index])
            # per clip, one seed for time and one for space: a window drawn again after a lying header
            # leaves the crop and flip as they were
            seeds = rng.integers(0, 2**63, size=(num_sample, 2))
            try:
                if self.before_read:
                    self.before_read(index, path)
                x = torch.from_numpy(self.train_clips(path, seeds))  # (R, T, H, W, C)
                return {'x': x.permute(0, 4, 1, 2, 3).contiguous(), 'y': label, 'failed': failed, 'dropped': []}
            except READ_ERRORS as e:  # never stop training: take another sample of this dataset
                warn_once(path, e)
                failed.append(path)
                err, index = e, int(rng.integers(len(self.samples)))
        # the same keys fail the same way: dropping the sample lets the run (and every resume) go on
        s = self.img_size
        return {'x': torch.zeros(0, 3, self.frames, s, s, dtype=torch.uint8), 'y': -1, 'failed': failed,
                'dropped': [f"sample {first} dropped: no readable file in {MAX_TRIES} tries (last error: {err})"]}

    def train_clips(self, path, seeds):
        """(R, T, img, img, 3) uint8 for R = len(seeds): clip r's frames drawn from seeds[r, 0], its crop
        and flip from seeds[r, 1]. One decode of the file for all R."""
        rngs = [np.random.default_rng(int(s)) for s in seeds[:, 1]]
        if self.spec.kind == 'image':
            with Image.open(path) as im:
                h, w = image_size(im)
                boxes = [random_resized_box(h, w, rng, (self.spec.min_area, 1.0)) for rng in rngs]
                clips = image_crops(im, boxes, self.img_size)[:, None]  # (R, T = 1, img, img, 3)
        else:
            clips = [crop_resize(c, train_video_box(*c.shape[1:3], self.img_size, rng), self.img_size)
                     for c, rng in zip(self.read_clips(path, seeds[:, 0]), rngs)]
        out = []
        for x, rng in zip(clips, rngs):
            flip = rng.random() < 0.5  # drawn always, so the stream does not depend on spec.flip
            out.append(hflip(x) if self.spec.flip and flip else x)
        return np.stack(out)

    def eval_item(self, index):
        path = self.samples.path(index)
        try:
            if self.before_read:
                self.before_read(index, path)
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
            with Image.open(path) as im:
                h, w = image_size(im)
                boxes = [eval_image_box(h, w, s)] if crops == 1 else eval_video_boxes(h, w, crops)
                views = image_crops(im, boxes, s)[:, None]  # (V, T = 1, s, s, 3)
        else:
            clips = self.read_clips(path)
            views = [crop_resize(c, box, s) for c in clips for box in eval_video_boxes(*c.shape[1:3], crops)]
        return torch.from_numpy(np.stack(views)).permute(0, 4, 1, 2, 3).contiguous()  # (V, C, T, H, W)

    def read_clips(self, path, t_seeds=None):
        """(T, H, W, 3) clips of one video, from one open and one decode: one per seed in t_seeds (training),
        else the spec's test clips. Each clip is drawn from the length the file states; a header that
        overstates it is found out by the read that runs off the end, which tells the true length, kept for
        the file. A training clip that reaches past the true end is drawn again, from the same seed and the
        true length; where one test clip does, all are, so they keep the test rule's order and spacing.
        Either way the frames do not depend on what this process read before."""
        with open_video(path) as video:
            stated = self.draw(video.length, video.fps, t_seeds)
            for attempt in range(2):
                n = self.lengths.get(path, video.length)
                past = [c.max() >= n for c in stated]
                past = past if t_seeds is not None else [any(past)] * len(past)
                redrawn = self.draw(n, video.fps, t_seeds) if any(past) else stated
                clips = [r if p else c for c, r, p in zip(stated, redrawn, past)]
                try:
                    return np.split(video.read(np.concatenate(clips)), len(clips))
                except VideoError as e:
                    if attempt or not e.num_frames:
                        raise
                    self.lengths[path] = e.num_frames

    def draw(self, n, fps, t_seeds=None):
        """The frame indices of each clip in a video of n frames: one per seed, else the test clips."""
        if t_seeds is None:
            k = self.spec.test_clips
            return [self.indices(n, fps, clip_idx=c, num_clips=k) for c in range(k)]
        return [self.indices(n, fps, rng=np.random.default_rng(int(s))) for s in t_seeds]

    def indices(self, n, fps, rng=None, clip_idx=0, num_clips=1):
        if self.spec.sampling == 'segment':
            return segment_indices(n, self.frames, rng, clip_idx, num_clips)
        return kinetics_indices(n, self.frames, self.spec.rate, fps, clip_idx, num_clips, rng)


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


def load_test_views(path, spec_name, *, frames=8, img_size=224, views=None, sampling=None):
    """uint8 (V, C, T, H, W): the test views of one file, sampled as dataset `spec_name` samples (a
    custom name: video or image by the file's extension)."""
    spec = changed(SPECS.get(spec_name) or custom_spec(spec_name, [path]), views, sampling)
    empty = Listing.from_pairs('', [], [])
    return ClipDataset(spec, empty, frames=frames, img_size=img_size, train=False).views(str(path))


_WARNED = set()  # paths this process has warned about


def warn_once(path, err):
    if path not in _WARNED:  # per process: each DataLoader worker warns once per path
        _WARNED.add(path)
        log.warning(f"unreadable sample {path}: {err}")

# -----------------------------------------------------------------------------
# normalisation and mixing, on the device


class Normalize:
    """uint8 (..., C, T, H, W) -> float32 (x/255 - mean) / std, with mean and std kept on the device."""

    def __init__(self, mean, std, device):
        self.mean, self.std = per_channel(mean, device), per_channel(std, device)

    def __call__(self, x):
        assert x.shape[-4] == 3, f"expected (..., C=3, T, H, W), got {tuple(x.shape)}"
        return (x.float() / 255.0 - self.mean) / self.std


def per_channel(values, device):
    """"0.45,0.45,0.45" or a sequence -> a (C, 1, 1, 1) tensor, to broadcast over (C, T, H, W)."""
    values = values.split(',') if isinstance(values, str) else values
    return torch.tensor([float(v) for v in values], device=device).reshape(-1, 1, 1, 1)


def mix(x, y, num_classes, mixup=0.0, cutmix=0.0, smoothing=0.0, rng=None):
    """Mixup or CutMix of one batch on its device -> (x, soft targets (B, num_classes)). Each clip is paired
    with the clip `shift` places on (a roll of the batch, shift drawn from rng), lambda ~ Beta(alpha, alpha);
    with both alphas > 0 a batch takes one of the two at even odds. CutMix pastes the partner's box into
    every frame of a clip, and lambda becomes the area left. Targets: label-smoothed one-hot, mixed.
    Both alphas 0: x and the class indices y as they are."""
    if mixup == cutmix == 0:
        return x, y
    target = F.one_hot(y, num_classes).float() * (1 - smoothing) + smoothing / num_classes
    use_cutmix = cutmix > 0 and (mixup == 0 or rng.random() < 0.5)
    lam = float(rng.beta(cutmix, cutmix) if use_cutmix else rng.beta(mixup, mixup))
    shift = int(rng.integers(1, len(x))) if len(x) > 1 else 0
    partner = x.roll(shift, dims=0)
    if use_cutmix:
        (y0, y1), (x0, x1) = [cut(size, math.sqrt(1 - lam), rng) for size in x.shape[-2:]]
        x = x.clone()
        x[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]  # the same box in every frame (..., T, H, W)
        lam = 1 - (y1 - y0) * (x1 - x0) / (x.shape[-2] * x.shape[-1])
    else:
        x = lam * x + (1 - lam) * partner
    return x, lam * target + (1 - lam) * target.roll(shift, dims=0)


def cut(size, fraction, rng):
    """One side of a CutMix box: `fraction` of `size` around a uniform centre, clipped to [0, size]."""
    centre, half = int(rng.integers(size)), round(size * fraction) / 2
    return max(0, round(centre - half)), min(size, round(centre + half))
