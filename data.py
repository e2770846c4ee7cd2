"""
Datasets, decoding, sampling and the co-training loader for CoVeR.

Read top to bottom:
  1. dataset specs and the on-disk layouts we parse (Kinetics, SSv2, Moments in Time, ImageNet-1k/21k-P,
     a plain `path label` list for custom data, and the generated demo sets);
  2. decoding: frame-exact sequential video reads with OpenCV, images with Pillow;
  3. temporal sampling (Kinetics style and SSv2 segments) and spatial transforms;
  4. ClipDataset: one sample -> uint8 (C, T, H, W) in train mode, test views (V, C, T, H, W) in eval
     mode; bad files are replaced in training, flagged in eval;
  5. the multi-dataset schedule and sampler: the whole loader state is one integer (the micro-batch
     counter), so a resumed run sees exactly the batches an uninterrupted one would;
  6. the demo data generator (coloured shapes that move), written in the real layouts above.

Clips leave the loader as uint8; normalize() turns them into floats on the GPU (4x less to transfer).
"""

import contextlib
import csv
import functools
import json
import logging
import math
import os
import shutil
import string
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, replace
from fractions import Fraction

# FFmpeg prints one line per broken packet and OpenCV a warning per unopenable file; we report every
# unreadable file ourselves (once per path), so keep stderr readable. Set these variables to override.
os.environ.setdefault('OPENCV_FFMPEG_LOGLEVEL', '-8')  # AV_LOG_QUIET
os.environ.setdefault('OPENCV_LOG_LEVEL', 'ERROR')

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

VIDEO_EXTS = ('.mp4', '.webm', '.avi', '.mkv', '.mov')
IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')
MAX_TRIES = 10  # substitutes tried for an unreadable training sample before giving up


class DatasetError(Exception):
    """A dataset cannot be used at all (missing, laid out differently, nothing readable)."""


class SampleError(Exception):
    """One file cannot be read; the dataset replaces it (train) or flags it (eval)."""


class VideoError(SampleError):
    def __init__(self, msg, num_frames=None):
        super().__init__(msg)
        self.num_frames = num_frames  # set when the video simply ended early: its true length


# Everything a broken file can raise while we decode it. Bugs in our own code (TypeError, ...) are
# deliberately not in this list, so they surface instead of being "replaced".
READ_ERRORS = (SampleError, OSError, ValueError, SyntaxError, EOFError, struct.error, cv2.error,
               Image.DecompressionBombError)

# -----------------------------------------------------------------------------
# specs and layouts


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    kind: str             # 'video' or 'image'
    sampling: str         # 'kinetics' | 'segment' | 'image'
    rate: int = 32        # kinetics style: sampling rate in 30-fps frames (converted by the file's fps)
    flip: bool = True     # horizontal flip label-safe?
    test_clips: int = 1   # temporal clips at test
    test_crops: int = 3   # spatial crops at test
    batch_scale: int = 1  # per-dataset batch = batch_size * batch_scale unless overridden
    weight: float = 1.0   # default share of the optimizer steps, relative to the other datasets (--weights overrides)
    min_area: float = 0.08  # images: RandomResizedCrop's smallest crop, as a fraction of the image area


def _image_spec(name, **kw):
    # An image is a T=1 clip: with 8-frame clips it costs ~1/8 of a video sample, so a 4x larger image
    # batch is still cheaper than a video batch and makes better use of an image step.
    # Test view: the ImageNet convention (short side img*256/224, one centre crop), so the val top-1 is
    # comparable with published ImageNet numbers -> num_views = 1.
    return DatasetSpec(name, 'image', 'image', test_crops=1, batch_scale=4, **kw)


SPECS = {
    'k400': DatasetSpec('k400', 'video', 'kinetics'),
    'k600': DatasetSpec('k600', 'video', 'kinetics'),
    'k700': DatasetSpec('k700', 'video', 'kinetics'),
    'ssv2': DatasetSpec('ssv2', 'video', 'segment', flip=False),  # "left to right" labels: no flip
    'mit': DatasetSpec('mit', 'video', 'kinetics', rate=8),       # 3-second clips: 8x8 spans 2.1 s
    'in1k': _image_spec('in1k'),
    'in21k': _image_spec('in21k'),
    # demo clips are 12 fps and 16-24 frames long: rate 6 -> 2.4 file frames apart, 8 frames ~ 19 frames
    'demo_kinetics': DatasetSpec('demo_kinetics', 'video', 'kinetics', rate=6),
    # the motion set is the one a from-scratch model learns slowest (the direction of a motion needs the order
    # of frames, which it has to discover): it gets twice the steps of the others
    'demo_ssv2': DatasetSpec('demo_ssv2', 'video', 'segment', flip=False, weight=2),
    'demo_imagenet': _image_spec('demo_imagenet', min_area=0.35),  # one big object: an 8% crop misses it
}
FORMATS = {'k400': 'kinetics', 'k600': 'kinetics', 'k700': 'kinetics', 'demo_kinetics': 'kinetics',
           'ssv2': 'ssv2', 'demo_ssv2': 'ssv2', 'mit': 'mit', 'in1k': 'imagenet',
           'demo_imagenet': 'imagenet', 'in21k': 'in21k'}  # any other name: 'custom'
LAYOUTS = {
    'kinetics': "annotations/{train,val}.csv (header label,youtube_id,time_start,time_end,split) with clips "
                "{train,val}/<youtube_id>_<start:06d>_<end:06d>.mp4, or class folders {train,val}/<class>/*.mp4",
    'ssv2': "something-something-v2-{train,validation,labels}.json and 20bn-something-something-v2/<id>.webm",
    'mit': "training/<class>/*.mp4, validation/<class>/*.mp4, optional moments_categories.txt (class,idx)",
    'imagenet': "train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (val sorted into class folders)",
    'in21k': "imagenet21k_train/<wnid>/ and imagenet21k_val/<wnid>/ (ImageNet-21K-P), or train/ and val/; the raw "
             "winter-21 release (wnid folders, no split) needs the 21K-P preprocessing or a split of your own",
    'custom': "train.csv / val.csv with lines '<path relative to the folder> <int label>' (optional "
              "classes.txt, one name per line), or class folders train/<class>/, val/<class>/",
}


def demo_names():
    return ['demo_kinetics', 'demo_ssv2', 'demo_imagenet']


def get_spec(name, data_dir='data'):
    """Spec of a known dataset; for a custom one, video or image is decided by the files it lists."""
    if name in SPECS:
        return SPECS[name]
    if name.startswith('demo_'):
        raise DatasetError(f"unknown demo dataset '{name}': the demo sets are {demo_names()}")
    try:
        return _custom_spec(name, _parse(os.path.join(data_dir, name), 'custom', 'train', Counter())[1])
    except (DatasetError, OSError, ValueError) as e:
        raise DatasetError(f"custom dataset '{name}': {e}; expected under {data_dir}/{name}/: {LAYOUTS['custom']}") from None


def _custom_spec(name, entries):
    exts = Counter(os.path.splitext(p)[1].lower() for p, _ in entries[:1000])
    n_video = sum(c for e, c in exts.items() if e in VIDEO_EXTS)
    n_image = sum(c for e, c in exts.items() if e in IMAGE_EXTS)
    if n_video == n_image == 0:
        raise DatasetError(f"dataset '{name}': no video ({' '.join(VIDEO_EXTS)}) or image "
                           f"({' '.join(IMAGE_EXTS)}) files among the listed paths (found {dict(exts)})")
    if n_image > n_video:
        return _image_spec(name)
    # Custom videos may be of any length, so sample segment style (8 frames always cover the whole video).
    return DatasetSpec(name, 'video', 'segment', flip=True)

# -----------------------------------------------------------------------------
# parsers: -> classes (index -> name), entries [(absolute path, class name)], and whether the entries come
# from a list (annotation file) and so may name files that are not on disk

FOLDERS = {  # format -> (train folder, val folder, extensions); the first existing name is used
    'kinetics': (['train'], ['val', 'validate'], VIDEO_EXTS),
    'mit': (['training'], ['validation'], VIDEO_EXTS),
    'imagenet': (['train'], ['val'], IMAGE_EXTS),
    'in21k': (['imagenet21k_train', 'train'], ['imagenet21k_val', 'val'], IMAGE_EXTS),
    'custom': (['train'], ['val'], VIDEO_EXTS + IMAGE_EXTS),
}


def _first(root, names, isdir=True):
    for n in names:
        if (os.path.isdir if isdir else os.path.isfile)(os.path.join(root, n)):
            return os.path.join(root, n)
    raise DatasetError(f"no {' or '.join(names)} in {root}")


def _scan_folders(split_dir, exts, problems):
    """Class folders -> (sorted class names, entries). Files with other extensions are ignored; an empty
    folder is still a class (it keeps its index) and is counted as 'empty_class_folder'."""
    classes, entries = [], []
    for d in sorted((e for e in os.scandir(split_dir) if e.is_dir()), key=lambda e: e.name):
        files = sorted(f.path for f in os.scandir(d.path) if f.name.lower().endswith(exts) and f.is_file())
        problems['empty_class_folder'] += not files
        classes.append(d.name)
        entries += [(f, d.name) for f in files]
    return classes, entries


def _read_kinetics_csv(path, clip_dir, problems):
    with open(path, newline='') as f:
        rows = csv.reader(f)
        header = [h.strip() for h in next(rows, [])]
        need = ['label', 'youtube_id', 'time_start', 'time_end']
        if not set(need) <= set(header):
            raise DatasetError(f"{path}: expected the header label,youtube_id,time_start,time_end,split; got {header}")
        col, entries = [header.index(c) for c in need], []
        for row in rows:
            if not any(c.strip() for c in row):
                continue
            try:
                label, yid, t0, t1 = (row[i] for i in col)
                entries.append((os.path.join(clip_dir, f'{yid}_{int(float(t0)):06d}_{int(float(t1)):06d}.mp4'), label))
            except (IndexError, ValueError):
                problems['malformed_line'] += 1
    return entries


def _read_list(path, root, problems):
    """`path label` lines (PySlowFast / MMAction2 style); the path may contain spaces, the label is last."""
    entries = []
    with open(path) as f:
        for line in f:
            parts = line.strip().rsplit(None, 1)
            if len(parts) == 2 and parts[1].lstrip('-').isdigit():
                entries.append((os.path.join(root, parts[0]), int(parts[1])))
            elif parts:
                problems['malformed_line'] += 1
    return entries


def _parse(root, fmt, split, problems):
    """Class index: the train labels (or train folders) in alphabetical order, unless the release fixes the
    order (SSv2 labels json, moments_categories.txt, custom classes.txt / integer labels)."""
    quiet = Counter()  # problems of the train listing, when only its class names are needed
    train_problems = problems if split == 'train' else quiet
    ann = os.path.join(root, 'annotations')
    if fmt == 'kinetics' and os.path.isdir(ann):
        train = _read_kinetics_csv(_first(ann, ['train.csv'], False), os.path.join(root, 'train'), train_problems)
        classes = sorted({label for _, label in train})
        if split == 'train':
            return classes, train, True
        clip_dir = _first(root, FOLDERS['kinetics'][1])
        return classes, _read_kinetics_csv(_first(ann, ['val.csv', 'validate.csv'], False), clip_dir, problems), True
    if fmt == 'ssv2':
        def load(kind):
            with open(_first(root, [f'something-something-v2-{kind}.json'], False)) as f:
                return json.load(f)
        labels = load('labels')  # {"Holding something next to something": "12", ...}
        classes = sorted(labels, key=lambda t: int(labels[t]))
        if [int(labels[t]) for t in classes] != list(range(len(classes))):
            raise DatasetError(f"{root}: the label indices in the labels json are not 0..{len(classes) - 1}")
        entries = []
        for item in load('train' if split == 'train' else 'validation'):
            try:
                entries.append((os.path.join(root, '20bn-something-something-v2', f"{item['id']}.webm"),
                                item['template'].replace('[', '').replace(']', '')))
            except (KeyError, TypeError, AttributeError):
                problems['malformed_line'] += 1
        return classes, entries, True
    if fmt == 'custom' and os.path.isfile(os.path.join(root, 'train.csv')):
        listed = train = _read_list(os.path.join(root, 'train.csv'), root, train_problems)
        if os.path.isfile(os.path.join(root, 'classes.txt')):
            with open(os.path.join(root, 'classes.txt')) as f:
                classes = [line.strip() for line in f if line.strip()]
        else:  # no names: the integer labels are the names
            classes = [str(i) for i in range(max((y for _, y in train), default=-1) + 1)]
        if split == 'val':
            listed = _read_list(_first(root, ['val.csv'], False), root, problems)
        # an integer outside the map gets a name that is not in it -> counted as unknown_label
        return classes, [(p, classes[y] if 0 <= y < len(classes) else f'<label {y}>') for p, y in listed], True
    train_dir, val_dir, exts = FOLDERS[fmt]
    classes, entries = _scan_folders(_first(root, train_dir), exts, train_problems)
    if split == 'val':
        entries = _scan_folders(_first(root, val_dir), exts, quiet)[1]
    if fmt == 'mit' and os.path.isfile(os.path.join(root, 'moments_categories.txt')):
        with open(os.path.join(root, 'moments_categories.txt')) as f:  # `class,idx` lines
            pairs = [line.strip().rsplit(',', 1) for line in f if line.strip()]
        classes = [c for c, _ in sorted(pairs, key=lambda p: int(p[1]))]
    return classes, entries, False


def _drop_missing(entries, problems, examples):
    """Keep the listed files that exist: one directory listing per folder instead of a stat per file."""
    listings, kept = {}, []
    for path, label in entries:
        folder, fname = os.path.split(path)
        if folder not in listings:
            listings[folder] = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        if fname in listings[folder]:
            kept.append((path, label))
        else:
            problems['missing'] += 1
            examples.setdefault('missing', path)
    return kept


def build_dataset(name, data_dir, split, *, frames=8, img_size=224, train=None, views=None):
    """Parse <data_dir>/<name> (generating the demo sets on first use) and report start-up problems once.
    views: (clips, crops) for eval mode instead of the spec's test_clips x test_crops, e.g. (1, 1)."""
    if split not in ('train', 'val'):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if name.startswith('demo_'):
        get_spec(name)  # an unknown demo name raises, listing the real ones
        _ensure_demo(name, data_dir)
    root = os.path.abspath(os.path.join(data_dir, name))
    fmt, problems, examples = FORMATS.get(name, 'custom'), Counter(), {}
    try:
        if not os.path.isdir(root):
            raise DatasetError(f"no folder {root}")
        classes, entries, listed = _parse(root, fmt, split, problems)
    except (DatasetError, OSError, ValueError) as e:
        raise DatasetError(f"dataset '{name}' ({split}) cannot be read: {e}.\n  Expected under {root}/: "
                           f"{LAYOUTS[fmt]}.\n  Fix: put the data there in that layout, or point --data_dir at "
                           f"the folder that holds '{name}/'.") from None
    entries = _drop_missing(entries, problems, examples) if listed else entries
    index = {c: i for i, c in enumerate(classes)}
    samples = [(p, index[label]) for p, label in entries if label in index]
    if len(samples) < len(entries):  # val labels that train does not have (no head output for them)
        problems['unknown_label'] = len(entries) - len(samples)
        examples['unknown_label'] = next(repr(label) for _, label in entries if label not in index)
    if not problems['empty_class_folder']:
        del problems['empty_class_folder']
    report = ', '.join(f"{k} {v}" + (f" (e.g. {examples[k]})" if k in examples else '') for k, v in sorted(problems.items()))
    if not samples:
        raise DatasetError(f"dataset '{name}' ({split}) has no usable samples under {root} "
                           f"({report or 'nothing listed'}).\n  Expected: {LAYOUTS[fmt]}.")
    spec = SPECS[name] if name in SPECS else _custom_spec(name, entries)
    spec = replace(spec, test_clips=views[0], test_crops=views[1]) if views else spec
    msg = f"{name}/{split}: {len(samples)} samples, {len(classes)} classes, {spec.kind}"
    (log.warning if report else log.info)(msg + (f"; skipped or noted at start-up: {report}" if report else ''))
    return ClipDataset(spec, split, samples, classes, dict(problems), frames=frames, img_size=img_size,
                       train=split == 'train' if train is None else train)

# -----------------------------------------------------------------------------
# decoding


def _open_video(path):
    if not os.path.isfile(path):
        raise VideoError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise VideoError(f"{path}: empty file (0 bytes)")
    # one decoder thread: parallelism comes from DataLoader workers, not from FFmpeg threads
    cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])
    if not cap.isOpened():
        raise VideoError(f"{path}: FFmpeg cannot open it (corrupt, truncated or not a video)")
    return cap


def _header(cap):
    return int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), float(cap.get(cv2.CAP_PROP_FPS))


def video_info(path):
    """(true number of frames, fps). The header is used when plausible, else we count by decoding.

    A header count that is too large (a truncated file) looks plausible; read_video catches it later
    (VideoError.num_frames) and the dataset re-samples with the true length. A count that is too small
    cannot be seen without decoding everything; then only the first `count` frames get sampled.
    """
    cap = _open_video(path)
    try:
        n, fps = _header(cap)
        fps_ok = math.isfinite(fps) and 0 < fps < 1000  # broken webm headers report 1000
        if n <= 0 or n > 1_000_000 or not fps_ok:
            n = 0
            while cap.grab():
                n += 1
    finally:
        cap.release()
    if n == 0:
        raise VideoError(f"{path}: no decodable frames")
    if not fps_ok:
        _warn_once(path, f"unusable fps {fps} in the header, assuming 30")
        fps = 30.0
    return n, fps


def read_video(path, indices):
    """uint8 (len(indices), H, W, 3) RGB: exactly the frames at those 0-based decode-order indices.

    Never seeks (frame seeking is exact only at keyframes on some codecs): decodes from the start,
    grab() for frames we skip (no colour conversion), retrieve() for the ones we keep, and stops right
    after the last one needed. Only the requested frames are held in memory.
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if indices.size == 0 or indices.min() < 0:
        raise ValueError(f"need non-negative frame indices, got {indices}")
    wanted = set(indices.tolist())
    last = int(indices.max())
    kept = {}
    cap = _open_video(path)
    try:
        for i in range(last + 1):
            if not cap.grab():
                raise VideoError(f"{path}: frame {last} requested but the video ends after {i} frames", num_frames=i)
            if i in wanted:
                ok, frame = cap.retrieve()
                if not ok or frame is None:
                    raise VideoError(f"{path}: frame {i} could not be converted")
                kept[i] = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    finally:
        cap.release()
    return np.stack([kept[i] for i in indices.tolist()])  # (T, H, W, 3)


def load_image(path, reduce=1.0):
    """uint8 (H, W, 3) RGB with EXIF orientation applied.

    reduce > 1: a JPEG may come back up to that many times smaller per side: its decoder scales in the
    DCT domain (1/2, 1/4, 1/8), which skips most of the decoding work. Callers that crop and resize to a
    small output ask for what their crop still needs, and map their box by the size they get.

    Transparent images are composited on white (what a browser shows: web images with alpha are made
    for white pages, and the colour under alpha = 0 is often black or junk). 16-bit greyscale ('I;16',
    and 'I', which older Pillow used for 16-bit PNGs) is scaled by 1/257; L, P, CMYK, ... go through
    Pillow's convert. Truncated files raise (Pillow's default), they are not filled with grey.
    """
    with Image.open(path) as im:
        return np.asarray(_rgb_image(im, reduce))


def _rgb_image(im, reduce=1.0):
    """An opened Pillow image -> the decoded image in mode RGB, as load_image describes."""
    if reduce >= 2:
        im.draft(None, (math.ceil(im.width / reduce), math.ceil(im.height / reduce)))  # JPEG only; else no-op
    im.load()
    ImageOps.exif_transpose(im, in_place=True)  # in place: no copy when there is nothing to turn
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
    """Kinetics style: `frames` frames, `rate` frames apart at 30 fps (rate*fps/30 file frames apart).

    Frame i of a clip starting at `start` is floor(start + i*rate*fps/30), clamped to [0, n-1] (short
    videos repeat their last frame). The start lies in [0, n - span], span = frames*rate*fps/30:
    train: integer uniform in [0, floor(n - span)]; test: clip k of N is centred in the k-th of N equal
    parts of that range, start = floor((n - span) * (k + 0.5) / N), so N = 1 is the middle clip.
    """
    n = num_video_frames
    step = rate * fps / 30.0
    room = max(n - frames * step, 0.0)
    if rng is not None:
        start = int(rng.integers(0, math.floor(room) + 1))
    else:
        start = math.floor(room * (clip_idx + 0.5) / num_clips)
    # multiply before dividing so exact cases (30 fps, 25 fps at rate 32 -> 80, 160) have no float error
    idx = np.floor(start + np.arange(frames) * rate * fps / 30.0).astype(np.int64)
    return np.clip(idx, 0, n - 1)


def segment_indices(num_video_frames, frames, rng=None, clip_idx=0, num_clips=1):
    """SSv2 style: cut [0, n) into `frames` equal segments and take one frame per segment:
    floor((k + u) * n / frames), u uniform in [0, 1) per segment in train, u = 0.5 (the middle) at test
    (u = (clip + 0.5) / num_clips for several test clips). Videos shorter than `frames` repeat frames."""
    n = num_video_frames
    u = rng.random(frames) if rng is not None else np.full(frames, (clip_idx + 0.5) / num_clips)
    idx = np.floor((np.arange(frames) + u) * n / frames).astype(np.int64)
    return np.clip(idx, 0, n - 1)

# -----------------------------------------------------------------------------
# spatial transforms. A box is (y0, x0, h, w) in ORIGINAL pixel coordinates; we resize just that region
# to the output size, which equals resize-whole-frame-then-crop up to rounding and costs far less.


def image_crops(path, boxes_for, out):
    """uint8 (len(boxes), out, out, 3): the boxes boxes_for(H, W) of an image whose displayed size is H x W,
    each resized to out x out (_crop_resize). A JPEG is decoded only as large as the boxes need (see
    load_image); the file is opened once, for its header and its pixels."""
    with Image.open(path) as im:
        if im.format == 'JPEG':  # size and EXIF (in APP1) come before the pixels: boxes first, then decode
            W, H = im.size
            if im.getexif().get(0x0112) in (5, 6, 7, 8):  # orientation: turned by 90 degrees
                H, W = W, H
            boxes = boxes_for(H, W)
            img = np.asarray(_rgb_image(im, reduce=min(min(b[2], b[3]) for b in boxes) / out))
        else:  # other formats may keep EXIF after the pixels: the boxes come from the decoded image
            img = np.asarray(_rgb_image(im))
            H, W = img.shape[:2]
            boxes = boxes_for(H, W)
    sy, sx = img.shape[0] / H, img.shape[1] / W  # the decoded size over the full size
    return np.concatenate([_crop_resize(img[None], (y0 * sy, x0 * sx, bh * sy, bw * sx), out) for y0, x0, bh, bw in boxes])


def _crop_resize(frames, box, out):
    """(T, H, W, 3) uint8 -> (T, out, out, 3): the box, rounded to whole pixels, resized to out x out."""
    H, W = frames.shape[1:3]
    bh, bw = max(1, min(H, round(box[2]))), max(1, min(W, round(box[3])))
    y0, x0 = min(max(0, round(box[0])), H - bh), min(max(0, round(box[1])), W - bw)
    # bilinear aliases when shrinking by more than 2x (e.g. 1080p sources); area averaging does not
    interp = cv2.INTER_AREA if min(bh, bw) > 2 * out else cv2.INTER_LINEAR
    return np.stack([cv2.resize(f[y0:y0 + bh, x0:x0 + bw], (out, out), interpolation=interp) for f in frames])


def train_video_box(h, w, img_size, rng):
    """Short side scaled to a random integer in [img*256/224, img*320/224], random img x img crop."""
    short = int(rng.integers(round(img_size * 256 / 224), round(img_size * 320 / 224) + 1))
    side = img_size * min(h, w) / short  # the crop's side in original pixels
    return rng.uniform(0, h - side), rng.uniform(0, w - side), side, side


def random_resized_box(h, w, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """The usual RandomResizedCrop: area fraction in `scale`, log-uniform aspect ratio, 10 tries, then a
    centre crop with the aspect ratio clamped into `ratio`."""
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
    bottom for portrait); a single crop is the centre one."""
    side = min(h, w)
    offsets = [(max(h, w) - side) / 2] if crops == 1 else np.linspace(0, max(h, w) - side, crops)
    return [(o, 0, side, side) if h > w else (0, o, side, side) for o in offsets]


def eval_image_box(h, w, img_size):
    """ImageNet convention: short side to img*256/224, centre img x img crop."""
    side = img_size * min(h, w) / round(img_size * 256 / 224)
    return (h - side) / 2, (w - side) / 2, side, side

# -----------------------------------------------------------------------------
# the dataset

_WARNED = set()


def _warn_once(path, err):
    if path not in _WARNED:  # per process: each DataLoader worker warns once per path
        _WARNED.add(path)
        log.warning(f"unreadable sample {path}: {err}")


class ClipDataset(torch.utils.data.Dataset):
    """Train mode: key (index, sample_seed) -> {'x': uint8 (C, T, H, W), 'y', 'failed': [paths replaced]}.
    All randomness comes from np.random.default_rng(sample_seed): the same key gives the same bytes.
    Eval mode: key index -> {'x': uint8 (V, C, T, H, W), 'y', 'ok', 'index'}, V = test_clips*test_crops
    views, clip-major; an unreadable sample is not replaced: x is zeros and ok is False."""

    def __init__(self, spec, split, samples, classes, problems, *, frames=8, img_size=224, train=True):
        self.spec, self.split, self.train = spec, split, train
        self.frames = frames if spec.kind == 'video' else 1
        self.img_size = img_size
        self.samples, self.classes, self.problems = samples, classes, problems
        # images have no temporal clips: their views are the spatial crops only
        self.num_views = 1 if train else spec.test_crops * (spec.test_clips if spec.kind == 'video' else 1)
        self._lengths = {}  # path -> (true frame count, fps), filled lazily in each worker

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        if self.train:
            if not isinstance(key, tuple):
                raise TypeError(f"{self.spec.name} is in train mode: index it with (index, sample_seed)")
            return self._train_item(int(key[0]), int(key[1]))
        return self._eval_item(int(key))

    def _train_item(self, index, seed):
        rng = np.random.default_rng(seed)
        failed, err = [], None
        for _ in range(MAX_TRIES):
            path, label = self.samples[index]
            # separate streams for time and space, so a re-sample after a lying header (which redraws the
            # temporal indices) gives the same bytes as a cached-length read of the same key
            t_seed, s_seed = rng.integers(0, 2**63, size=2)
            try:
                x = self._load_train(path, int(t_seed), np.random.default_rng(s_seed))
                x = torch.from_numpy(x).permute(3, 0, 1, 2).contiguous()  # (T, H, W, C) -> (C, T, H, W)
                return {'x': x, 'y': label, 'failed': failed}
            except READ_ERRORS as e:  # bad file: never stop training, take another sample of this dataset
                _warn_once(path, e)
                failed.append(path)
                err, index = e, int(rng.integers(len(self.samples)))
        raise DatasetError(f"no readable sample in {self.spec.name}/{self.split} after {MAX_TRIES} tries "
                           f"(last error: {err}); check the files, the codecs OpenCV's FFmpeg supports, "
                           f"and disk/network access. Failed: {failed}")

    def _load_train(self, path, t_seed, rng):
        """-> (T, img, img, 3) uint8."""
        if self.spec.kind == 'image':
            x = image_crops(path, lambda h, w: [random_resized_box(h, w, rng, (self.spec.min_area, 1.0))], self.img_size)
        else:
            img = self._read_clip(path, lambda n, fps: [self._indices(n, fps, np.random.default_rng(t_seed))])[0]
            x = _crop_resize(img, train_video_box(img.shape[1], img.shape[2], self.img_size, rng), self.img_size)
        flip = rng.random() < 0.5  # drawn always, so the rng stream does not depend on spec.flip
        return np.stack([cv2.flip(f, 1) for f in x]) if self.spec.flip and flip else x  # 3x numpy's [:, :, ::-1]

    def _eval_item(self, index):
        path, label = self.samples[index]
        try:
            x, ok = self.views(path), True
        except READ_ERRORS as e:
            _warn_once(path, e)
            x, ok = torch.zeros(self.num_views, 3, self.frames, self.img_size, self.img_size, dtype=torch.uint8), False
        return {'x': x, 'y': label, 'ok': ok, 'index': index}

    def views(self, path):
        """uint8 (V, C, T, H, W): the test views of one file, clip-major. Raises if it cannot be read.
        Images: one crop -> the ImageNet centre crop; several -> the video rule with T = 1."""
        s, crops = self.img_size, self.spec.test_crops
        if self.spec.kind == 'image':
            views = image_crops(path, lambda h, w: [eval_image_box(h, w, s)] if crops == 1 else eval_video_boxes(h, w, crops),
                                s)[:, None]  # (V, T = 1, s, s, 3)
        else:
            n_clips = self.spec.test_clips
            clips = self._read_clip(path, lambda n, fps: [self._indices(n, fps, None, c, n_clips) for c in range(n_clips)])
            views = [_crop_resize(c, box, s) for c in clips for box in eval_video_boxes(*c.shape[1:3], crops)]
        return torch.from_numpy(np.stack(views)).permute(0, 4, 1, 2, 3).contiguous()  # (V, T, H, W, C) -> (V, C, T, H, W)

    def _indices(self, n, fps, rng, clip_idx=0, num_clips=1):
        if self.spec.sampling == 'segment':
            return segment_indices(n, self.frames, rng, clip_idx, num_clips)
        return kinetics_indices(n, self.frames, self.spec.rate, fps, clip_idx, num_clips, rng)

    def _read_clip(self, path, make_indices):
        """make_indices(n, fps) -> list of index arrays; all clips come from ONE sequential decode.
        A header that claims more frames than the file has is corrected here: the read that runs off
        the end knows the true length, which we cache and sample again with (once)."""
        if path not in self._lengths:
            self._lengths[path] = video_info(path)
        for attempt in range(2):
            n, fps = self._lengths[path]
            clips = make_indices(n, fps)
            try:
                frames = read_video(path, np.concatenate(clips))  # (sum T, H, W, 3)
                return np.split(frames, np.cumsum([len(c) for c in clips])[:-1])
            except VideoError as e:
                if attempt or not e.num_frames:
                    raise
                self._lengths[path] = (e.num_frames, fps)


def load_test_views(path, spec_name, *, frames=8, img_size=224, views=None):
    """uint8 (V, C, T, H, W): the test views of one video or image file, sampled as dataset `spec_name`
    would sample it (a custom name: video or image by the file's extension). For predicting one file."""
    spec = SPECS[spec_name] if spec_name in SPECS else _custom_spec(spec_name, [(str(path), 0)])
    spec = replace(spec, test_clips=views[0], test_crops=views[1]) if views else spec
    return ClipDataset(spec, 'val', [], [], {}, frames=frames, img_size=img_size, train=False).views(str(path))


def normalize(x, mean, std):
    """uint8 (..., C, T, H, W) -> float32 (x/255 - mean)/std, on x's device. mean/std: 3 values or 1."""
    assert x.shape[-4] == 3, f"expected (..., C=3, T, H, W), got {tuple(x.shape)}"
    mean = torch.as_tensor(mean, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)  # (C, 1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
    return (x.float() / 255.0 - mean) / std

# -----------------------------------------------------------------------------
# co-training schedule and loaders


@functools.lru_cache(maxsize=16)
def _interleave(weights):
    """One period of the smooth weighted round-robin over integer weights, and prefix counts per dataset.
    Each period every dataset d gets exactly w_d steps, spread out as evenly as possible."""
    fracs = [Fraction(w).limit_denominator(1000) for w in weights]
    if not fracs or min(fracs) <= 0:
        raise ValueError(f"dataset weights must be positive, got {list(weights)}")
    lcm = math.lcm(*(f.denominator for f in fracs))
    ints = [int(f * lcm) for f in fracs]
    ints = [i // math.gcd(*ints) for i in ints]
    if sum(ints) > 100_000:  # awkward ratios: approximate to 1/10000 instead of a huge period
        ints = [max(1, round(10_000 * w / sum(weights))) for w in weights]
    period, D = sum(ints), len(ints)
    order, current = np.empty(period, dtype=np.int64), np.zeros(D, dtype=np.int64)
    for s in range(period):
        current += ints
        d = int(np.argmax(current))  # ties -> lowest index, so equal weights give 0, 1, ..., D-1
        current[d] -= period
        order[s] = d
    prefix = np.zeros((period + 1, D), dtype=np.int64)  # prefix[s, d]: steps < s (within a period) given to d
    prefix[1:] = np.cumsum(np.eye(D, dtype=np.int64)[order], axis=0)
    return order, prefix


def schedule(step, weights):
    """Index of the dataset that trains at optimizer step `step` (deterministic, no RNG).
    Equal weights: round robin, step % D. Otherwise the smooth weighted round-robin: long-run step
    frequencies are proportional to the weights (rounded to ratios of small integers)."""
    order, _ = _interleave(tuple(float(w) for w in weights))
    return int(order[step % len(order)])


def _steps_before(step, d, weights):
    """How many optimizer steps < `step` train dataset d: O(1) from the per-period prefix counts."""
    order, prefix = _interleave(tuple(float(w) for w in weights))
    full, rest = divmod(step, len(order))
    return int(full * prefix[-1, d] + prefix[rest, d])


class MultiDatasetBatchSampler:
    """Yields forever, for micro-batch m = start_micro, start_micro + 1, ...: batch_sizes[d] keys
    (d, index, sample_seed) of dataset d = schedule(m // grad_accum).

    Dataset d has its own endless stream: epoch e is a permutation seeded by (seed, d, e), the same on
    all ranks; rank r reads perm[r::world][:len // world] (equal shard lengths, like DistributedSampler
    with drop_last), batch after batch, into the next epoch without a seam. Where d's stream stands at
    micro-batch m is a pure function of m, so the integer m is the whole state of the sampler.
    """

    def __init__(self, lengths, batch_sizes, weights=None, grad_accum=1, rank=0, world=1, seed=0, start_micro=0):
        assert len(lengths) == len(batch_sizes) == len(weights or lengths) and 0 <= rank < world and grad_accum >= 1
        self.shard_len = [n // world for n in lengths]
        if min(self.shard_len) == 0:
            raise DatasetError(f"a dataset has fewer samples ({min(lengths)}) than there are ranks ({world})")
        self.lengths, self.batch_sizes = list(lengths), list(batch_sizes)
        self.weights = [1.0] * len(lengths) if weights is None else [float(w) for w in weights]
        self.grad_accum, self.rank, self.world, self.seed, self.start_micro = grad_accum, rank, world, seed, start_micro
        self._shards = {}  # d -> (epoch, this rank's shard of that epoch's permutation)

    def micro_batches_before(self, m, d):
        """Micro-batches < m that dataset d receives (all micro-batches of one step share a dataset)."""
        step, sub = divmod(m, self.grad_accum)
        before = _steps_before(step, d, self.weights) * self.grad_accum
        return before + (sub if schedule(step, self.weights) == d else 0)

    def batch(self, m):
        d = schedule(m // self.grad_accum, self.weights)
        start = self.micro_batches_before(m, d) * self.batch_sizes[d]  # position in d's stream
        return [self._key(d, p) for p in range(start, start + self.batch_sizes[d])]

    def _key(self, d, p):
        epoch, j = divmod(p, self.shard_len[d])
        if self._shards.get(d, (None,))[0] != epoch:
            perm = np.random.default_rng([self.seed, d, epoch]).permutation(self.lengths[d])
            self._shards[d] = (epoch, perm[self.rank::self.world][:self.shard_len[d]])
        # position j of rank r's shard is position j*world + r of the epoch's permutation
        ss = np.random.SeedSequence([self.seed, d, epoch, j * self.world + self.rank])
        return d, int(self._shards[d][1][j]), int(ss.generate_state(1, np.uint64)[0] >> 1)

    def __iter__(self):
        m = self.start_micro
        while True:
            yield self.batch(m)
            m += 1


class MultiDataset(torch.utils.data.Dataset):
    """Dispatches key (d, index, sample_seed) to datasets[d][(index, sample_seed)], adds 'dataset': d."""

    def __init__(self, datasets):
        self.datasets = list(datasets)

    def __len__(self):
        return sum(len(d) for d in self.datasets)

    def __getitem__(self, key):
        d, index, seed = key
        item = self.datasets[d][(index, seed)]
        item['dataset'] = d
        return item


def collate_train(batch):
    return {'x': torch.stack([b['x'] for b in batch]),  # (B, C, T, H, W) uint8
            'y': torch.tensor([b['y'] for b in batch], dtype=torch.long),
            'dataset': batch[0]['dataset'],
            'failed': [p for b in batch for p in b['failed']]}


def worker_init(_, owner=None):
    # one decoder thread per worker: the workers are the parallelism
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    if owner is not None:
        threading.Thread(target=_exit_with, args=(owner,), daemon=True).start()


def _exit_with(pid):
    """End this worker once process `pid`, the one it loads for, has ended (also by SIGKILL). A forkserver
    worker is a child of the fork server, not of that process, so DataLoader's own check (is my parent
    alive?) never fires, and worker and fork server (which waits for its children) would run for ever."""
    while True:
        time.sleep(1)
        try:
            os.kill(pid, 0)
        except OSError:  # no such process (or, after pid reuse, someone else's)
            os._exit(0)


def _loader_kwargs(workers, pin_memory, prefetch):
    kw = dict(num_workers=workers, pin_memory=pin_memory, worker_init_fn=functools.partial(worker_init, owner=os.getpid()))
    if workers > 0:
        # Workers start from a clean forkserver process, not a fork of this one: a fork inherits OpenCV's
        # thread pool (a worker forked while it was busy hangs for ever inside cv2) and, under DDP, the
        # process group's sockets (a worker outliving a killed rank keeps them open, and an elastic
        # restart then hangs connecting to it).
        kw.update(persistent_workers=True, prefetch_factor=prefetch, multiprocessing_context="forkserver")
    return kw


def build_train_loader(datasets, batch_sizes, *, weights=None, grad_accum=1, rank=0, world=1, seed=0, workers=4,
                       start_micro=0, pin_memory=False):
    """An endless loader of {'x': (B, C, T, H, W) uint8, 'y': (B,), 'dataset': int, 'failed': [paths]}.
    Resume by passing start_micro = the number of micro-batches already consumed."""
    assert all(d.train for d in datasets), "build_train_loader needs datasets built with train=True"
    sampler = MultiDatasetBatchSampler([len(d) for d in datasets], batch_sizes, weights, grad_accum, rank, world,
                                       seed, start_micro)
    return torch.utils.data.DataLoader(MultiDataset(datasets), batch_sampler=sampler, collate_fn=collate_train,
                                       **_loader_kwargs(workers, pin_memory, 4))


def build_eval_loader(dataset, *, batch_size, rank=0, world=1, workers=4, pin_memory=False):
    """Rank r evaluates samples r, r + world, ...: no padding, every sample counted once across ranks.
    Batches: {'x': (B, V, C, T, H, W) uint8, 'y': (B,), 'ok': (B,) bool, 'index': (B,)}."""
    assert not dataset.train, "build_eval_loader needs a dataset built with train=False"
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=range(rank, len(dataset), world),
                                       **_loader_kwargs(workers, pin_memory, 2))

# -----------------------------------------------------------------------------
# demo data: coloured shapes on cluttered, noisy backgrounds, written in the real layouts so the real
# parsers read them. demo_kinetics: which shape (appearance); demo_ssv2: how it moves (motion, no flip);
# demo_imagenet: stills of the same shapes. The motion set is the smallest, so co-training can help it.

DEMO_SHAPES = ('circle', 'square', 'triangle', 'cross', 'ring', 'bar')
DEMO_MOTIONS = ('Moving [something] from left to right', 'Moving [something] from right to left',
                'Moving [something] up', 'Moving [something] down',
                'Moving [something] towards the camera', 'Moving [something] away from the camera')
DEMO_TRAIN_PER_CLASS = {'demo_kinetics': 60, 'demo_ssv2': 32, 'demo_imagenet': 96}
DEMO_VAL_PER_CLASS = 16
DEMO_HW = (48, 64)     # video frame height, width
DEMO_LEN = (16, 24)    # frames per clip (inclusive)
DEMO_FPS = 12
DEMO_SEED = 0
DEMO_VERSION = 2  # bump when the generator changes: older demo folders are then regenerated


@contextlib.contextmanager
def _quiet_stderr():
    """OpenCV prints (from C, to fd 2) a harmless 'tag not supported, fallback' notice for every webm
    writer it opens; silence it so generating the demo does not print hundreds of identical lines."""
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _demo_canvas(rng, h, w):
    """A static background: smooth dark colour blotches (a 3x4 grid of random colours, upsampled)."""
    return cv2.resize(rng.integers(20, 110, (3, 4, 3)).astype(np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)


def _demo_colour(rng):
    """A bright colour of random hue: colour says nothing about the label, shape or motion does. (A first
    version drew saturated colours on mid-grey clutter: at equal brightness a from-scratch ViT stayed at
    chance for hundreds of steps; bright on dark, it separates the shapes within a hundred.)"""
    hsv = np.array([[[rng.integers(0, 180), rng.integers(0, 120), rng.integers(220, 256)]]], np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].tolist()


def _draw(img, shape, cx, cy, r, angle, colour):
    """Draw `shape` of radius ~r at (cx, cy) rotated by `angle`, at sub-pixel precision (shift=4: 1/16 px)."""
    rot = np.array([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]])

    def poly(points):  # (k, 2) offsets from the centre
        p = np.asarray(points, dtype=np.float64) @ rot + (cx, cy)
        cv2.fillPoly(img, [np.round(p * 16).astype(np.int32)], colour, cv2.LINE_AA, shift=4)
    if shape in ('circle', 'ring'):
        thickness = -1 if shape == 'circle' else max(2, round(r / 3))
        cv2.circle(img, (round(cx * 16), round(cy * 16)), round(r * 16), colour, thickness, cv2.LINE_AA, shift=4)
    elif shape == 'square':
        poly(0.8 * r * np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]))
    elif shape == 'triangle':
        poly([[r * math.cos(a), r * math.sin(a)] for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])
    elif shape == 'bar':
        poly([[-r, -r / 4], [r, -r / 4], [r, r / 4], [-r, r / 4]])
    else:  # cross: two thinner bars
        poly([[-r, -r / 5], [r, -r / 5], [r, r / 5], [-r, r / 5]])
        poly([[-r / 5, -r], [r / 5, -r], [r / 5, r], [-r / 5, r]])


def _demo_frames(rng, shape, h, w, xs, ys, rs, angles):
    bg, colour = _demo_canvas(rng, h, w), _demo_colour(rng)
    bg = np.clip(bg + rng.normal(0, 8, bg.shape), 0, 255)  # static grain: part of the clutter
    frames = np.empty((len(xs), h, w, 3), np.uint8)  # (T, H, W, 3) BGR
    for i in range(len(xs)):
        f = bg.copy()
        _draw(f, shape, xs[i], ys[i], rs[i], angles[i], colour)
        # light fresh noise per frame; strong per-frame noise would make VP9 encoding 3x slower
        frames[i] = np.clip(f + rng.normal(0, 2, f.shape), 0, 255)
    return frames


def _demo_clip(rng, shape, motion=None):
    """(n, H, W, 3) BGR. motion None: the shape wanders and bounces off the borders (demo_kinetics);
    otherwise an index into DEMO_MOTIONS."""
    (h, w), n = DEMO_HW, int(rng.integers(DEMO_LEN[0], DEMO_LEN[1] + 1))
    t = np.linspace(0, 1, n)
    rs = np.full(n, rng.uniform(13, 16) if motion is None else rng.uniform(11, 14))  # motion needs room to move
    # mostly upright, turning a little: at 32 px a freely rotated square is hard to tell from a disc
    angles = rng.uniform(-0.4, 0.4) + t * rng.uniform(-0.5, 0.5)
    if motion is None:
        # wander inside the central 20 x 12 px, which every train crop and test view contains (like
        # Kinetics, where the action is mostly near the centre), bouncing off that box
        lo, hi = np.array([w / 2 - 10, h / 2 - 6]), np.array([w / 2 + 10, h / 2 + 6])
        pos, vel, path = rng.uniform(lo, hi), rng.normal(0, 1.5, 2), []
        for _ in range(n):
            path.append(pos)
            vel = vel + rng.normal(0, 0.4, 2)
            vel = np.where((pos + vel < lo) | (pos + vel > hi), -vel, vel)
            pos = np.clip(pos + vel, lo, hi)
        xs, ys = np.array(path).T
    else:
        a, b, c = rng.uniform(0.15, 0.3), rng.uniform(0.7, 0.85), rng.uniform(0.35, 0.65)
        along = a + (b - a) * (t if motion in (0, 3) else t[::-1])  # travel fraction: rising or falling
        xs, ys = (along * w, np.full(n, c * h)) if motion < 2 else (np.full(n, c * w), along * h)
        if motion >= 4:  # towards / away from the camera: the shape grows / shrinks near the middle
            xs, ys = np.full(n, rng.uniform(0.35, 0.65) * w), np.full(n, c * h)
            small, big = rng.uniform(5, 7), rng.uniform(15, 18)
            rs = small + (big - small) * (t if motion == 4 else t[::-1])
        xs, ys = xs + rng.normal(0, 0.5, n), ys + rng.normal(0, 0.5, n)  # hand-held jitter
    return _demo_frames(rng, shape, h, w, xs, ys, rs, angles)


def _demo_still(rng, shape):
    h, w = DEMO_HW[0], int(rng.integers(48, 73))
    h, w = (w, h) if rng.random() < 0.3 else (h, w)  # some portrait images
    r = rng.uniform(15, 19)  # large and near the centre, as in ImageNet: RandomResizedCrop must still see it
    x, y = w / 2 + rng.uniform(-w, w) / 10, h / 2 + rng.uniform(-h, h) / 10
    return _demo_frames(rng, shape, h, w, [x], [y], [r], [rng.uniform(-0.4, 0.4)])[0]


def _write_video(path, frames, fourcc):
    with _quiet_stderr():
        vw = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*fourcc), DEMO_FPS, (frames.shape[2], frames.shape[1]))
    if not vw.isOpened():
        raise DatasetError(f"cannot write {path}: this OpenCV build has no '{fourcc}' encoder")
    for f in frames:
        vw.write(f)
    vw.release()


def _demo_splits(name):
    return [('train', DEMO_TRAIN_PER_CLASS[name]), ('val', DEMO_VAL_PER_CLASS)]


def _make_demo_kinetics(out):
    os.makedirs(os.path.join(out, 'annotations'))
    for split, per_class in _demo_splits('demo_kinetics'):
        os.makedirs(os.path.join(out, split))
        rows = [['label', 'youtube_id', 'time_start', 'time_end', 'split']]
        for i in range(per_class * len(DEMO_SHAPES)):
            rng = np.random.default_rng([DEMO_SEED, 0, split == 'val', i])
            label = DEMO_SHAPES[i % len(DEMO_SHAPES)]
            yid = ''.join(rng.choice(list(string.ascii_letters + string.digits + '-_'), 11))
            t0 = int(rng.integers(0, 290))
            _write_video(os.path.join(out, split, f'{yid}_{t0:06d}_{t0 + 10:06d}.mp4'), _demo_clip(rng, label), 'mp4v')
            rows.append([label, yid, t0, t0 + 10, 'train' if split == 'train' else 'validate'])
        with open(os.path.join(out, 'annotations', f'{split}.csv'), 'w', newline='') as f:
            csv.writer(f).writerows(rows)


def _make_demo_ssv2(out):
    os.makedirs(os.path.join(out, '20bn-something-something-v2'))
    labels = {t.replace('[', '').replace(']', ''): str(k) for k, t in enumerate(DEMO_MOTIONS)}
    with open(os.path.join(out, 'something-something-v2-labels.json'), 'w') as f:
        json.dump(labels, f, indent=1)
    next_id = 1
    for split, per_class in _demo_splits('demo_ssv2'):
        items = []
        for i in range(per_class * len(DEMO_MOTIONS)):
            rng = np.random.default_rng([DEMO_SEED, 1, split == 'val', i])
            motion, shape = i % len(DEMO_MOTIONS), DEMO_SHAPES[int(rng.integers(len(DEMO_SHAPES)))]
            template = DEMO_MOTIONS[motion]
            _write_video(os.path.join(out, '20bn-something-something-v2', f'{next_id}.webm'),
                         _demo_clip(rng, shape, motion), 'VP90')
            label = template.replace('[something]', shape)
            items.append({'id': str(next_id), 'label': label[0].lower() + label[1:], 'template': template,
                          'placeholders': [shape]})
            next_id += 1
        with open(os.path.join(out, f"something-something-v2-{'train' if split == 'train' else 'validation'}.json"), 'w') as f:
            json.dump(items, f, indent=1)


def _make_demo_imagenet(out):
    wnids = [f'n{90000000 + k}' for k in range(len(DEMO_SHAPES))]  # wnid-like names; index k = DEMO_SHAPES[k]
    for split, per_class in _demo_splits('demo_imagenet'):
        for k, wnid in enumerate(wnids):
            os.makedirs(os.path.join(out, split, wnid))
            for i in range(per_class):
                rng = np.random.default_rng([DEMO_SEED, 2, split == 'val', k, i])
                fname = f'{wnid}_{i}.JPEG' if split == 'train' else f'ILSVRC2012_val_{k * per_class + i:08d}.JPEG'
                cv2.imwrite(os.path.join(out, split, wnid, fname), _demo_still(rng, DEMO_SHAPES[k]),
                            [cv2.IMWRITE_JPEG_QUALITY, 90])


_DEMO_MAKERS = {'demo_kinetics': _make_demo_kinetics, 'demo_ssv2': _make_demo_ssv2, 'demo_imagenet': _make_demo_imagenet}


def _ensure_demo(name, data_dir):
    """Generate <data_dir>/<name> unless it exists at DEMO_VERSION. Written to a private temp folder and
    renamed into place, so a half-written set is never read, and processes racing to create it (torchrun
    ranks) cannot collide."""
    target = os.path.join(data_dir, name)
    stamp = os.path.join(target, 'DEMO_VERSION')
    if os.path.isdir(target):
        if os.path.isfile(stamp) and open(stamp).read().strip() == str(DEMO_VERSION):
            return
        stale = f'{target}.stale-{os.getpid()}'
        try:
            os.rename(target, stale)  # atomic: one racing process moves it away, the others find it gone
            print(f"regenerating {target}: it was written by an older demo generator")
            shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass
        if os.path.isdir(target):  # another process has put a fresh copy in place meanwhile
            return
    tmp = f'{target}.tmp-{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    t0 = time.time()
    _DEMO_MAKERS[name](tmp)
    with open(os.path.join(tmp, 'DEMO_VERSION'), 'w') as f:
        f.write(f'{DEMO_VERSION}\n')
    try:
        os.rename(tmp, target)  # atomic; fails if another process renamed its (identical) copy first
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isdir(target):
            raise
        return
    print(f"generated demo dataset {target} in {time.time() - t0:.1f} s")
