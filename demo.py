"""
The built-in demo data: three small datasets of bright shapes on dark, smooth backgrounds, written in the
real layouts so the real parsers read them, and registered in data.SPECS on import.

  demo_kinetics   Kinetics layout, mp4: the label is the shape (appearance)
  demo_ssv2       SSv2 layout, VP9 webm: the label is the motion, left/right included (no flip)
  demo_imagenet   ImageNet folders, JPEG stills of the same shapes

The data-limited sets of `tools/study_data_limited.py` share structure without sharing labels, as
the real datasets do, and have fixed validation sets of 216 clips; their training clips per class are
the study's variable (the first N of a fixed sequence, so a smaller set is part of a larger one):

  demo_few_kinetics   Kinetics layout: a shape, still or moving (appearance and some motion)
  demo_few_ssv2       SSv2 layout: the direction any shape moves in (motion only)
  demo_few_images     ImageNet folders: stills of shapes demo_few_kinetics does not have, 128 a class

prepare(data_dir, names) writes the sets among `names` that are missing or out of date; train.py calls
it once, before any dataset is opened.
"""

import contextlib
import csv
import json
import math
import os
import shutil
import string
import time

import cv2
import numpy as np

import data

SHAPES = ('circle', 'L-shape', 'triangle', 'cross', 'ring', 'bar')  # tellable apart at 4x4 patches
MOTIONS = ('Moving [something] from left to right', 'Moving [something] from right to left',
           'Moving [something] up', 'Moving [something] down',
           'Moving [something] towards the camera', 'Moving [something] away from the camera')
TRAIN_PER_CLASS = {'demo_kinetics': 60, 'demo_ssv2': 32, 'demo_imagenet': 96,
                   'demo_few_kinetics': 8, 'demo_few_ssv2': 8, 'demo_few_images': 128}
VAL_PER_CLASS = 16
FEW_VAL = 216  # validation clips of each data-limited set: one clip is less than half a point
# (label, shape, motion) of the Kinetics-layout sets: motion None wanders, 'still' stays put
KINETICS_CLASSES = {'demo_kinetics': [(s, s, None) for s in SHAPES],
                    'demo_few_kinetics': [(f'{s} {m}', s, None if m == 'moving' else 'still')
                                          for s in ('circle', 'triangle', 'cross')
                                          for m in ('still', 'moving')]}
IMAGE_CLASSES = {'demo_imagenet': SHAPES, 'demo_few_images': ('L-shape', 'ring', 'bar')}
STREAMS = {'demo_kinetics': 0, 'demo_ssv2': 1, 'demo_imagenet': 2,  # each set its own random stream
           'demo_few_kinetics': 3, 'demo_few_ssv2': 4, 'demo_few_images': 5}
HW = (48, 64)     # video frame height, width
LENGTH = (16, 24)  # frames per clip (inclusive)
FPS = 12
SEED = 0
VERSION = 3  # bump when the generator changes: older demo folders are then written anew

data.register(
    data.DatasetSpec('demo_kinetics', 'video', 'kinetics', 'kinetics', rate=6),  # 12 fps: 8 frames span ~19
    data.DatasetSpec('demo_ssv2', 'video', 'segment', 'ssv2', flip=False),
    # one big object, which an 8% crop would miss; 32 px stills cost little, but 2x the video batch suffices
    data.image_spec('demo_imagenet', 'imagenet', min_area=0.35, batch_scale=2),
    data.DatasetSpec('demo_few_kinetics', 'video', 'kinetics', 'kinetics', rate=6),
    data.DatasetSpec('demo_few_ssv2', 'video', 'segment', 'ssv2', flip=False),
    data.image_spec('demo_few_images', 'imagenet', min_area=0.35, batch_scale=2))
NAMES = ['demo_kinetics', 'demo_ssv2', 'demo_imagenet']
FEW_NAMES = ['demo_few_kinetics', 'demo_few_ssv2', 'demo_few_images']


@contextlib.contextmanager
def quiet_stderr():
    """OpenCV prints (from C, to fd 2) a harmless notice for every webm writer it opens."""
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def canvas(rng, h, w):
    """A static background: smooth dark colour blotches (a 3x4 grid of random colours, upsampled)."""
    blotches = rng.integers(20, 110, (3, 4, 3)).astype(np.uint8)
    return cv2.resize(blotches, (w, h), interpolation=cv2.INTER_CUBIC)


def colour(rng):
    """A bright colour of random hue: colour says nothing about the label."""
    hsv = np.array([[[rng.integers(0, 180), rng.integers(0, 120), rng.integers(220, 256)]]], np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].tolist()


def draw(img, shape, cx, cy, r, angle, bgr):
    """Draw `shape` of radius ~r at (cx, cy), turned by `angle`, to 1/16 pixel (shift=4)."""
    rot = np.array([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]])

    def poly(points):  # (k, 2) offsets from the centre
        p = np.asarray(points, dtype=np.float64) @ rot + (cx, cy)
        cv2.fillPoly(img, [np.round(p * 16).astype(np.int32)], bgr, cv2.LINE_AA, shift=4)
    if shape in ('circle', 'ring'):
        thickness = -1 if shape == 'circle' else max(2, round(r / 3))
        cv2.circle(img, (round(cx * 16), round(cy * 16)), round(r * 16), bgr, thickness, cv2.LINE_AA, shift=4)
    elif shape == 'L-shape':
        t = r / 2.5
        left, right = -0.8 * r, 0.8 * r
        poly([[left, -r], [left + t, -r], [left + t, r - t], [right, r - t], [right, r], [left, r]])
    elif shape == 'triangle':
        poly([[r * math.cos(a), r * math.sin(a)] for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])
    elif shape == 'bar':
        poly([[-r, -r / 4], [r, -r / 4], [r, r / 4], [-r, r / 4]])
    else:  # cross: two thinner bars
        poly([[-r, -r / 5], [r, -r / 5], [r, r / 5], [-r, r / 5]])
        poly([[-r / 5, -r], [r / 5, -r], [r / 5, r], [-r / 5, r]])


def render(rng, shape, h, w, xs, ys, rs, angles):
    """(n, h, w, 3) BGR frames of one shape along the path (xs, ys) with radii rs."""
    bg, bgr = canvas(rng, h, w), colour(rng)
    bg = np.clip(bg + rng.normal(0, 8, bg.shape), 0, 255)  # static grain
    frames = np.empty((len(xs), h, w, 3), np.uint8)
    for i in range(len(xs)):
        f = bg.copy()
        draw(f, shape, xs[i], ys[i], rs[i], angles[i], bgr)
        # light fresh noise per frame; strong noise makes VP9 encoding slow
        frames[i] = np.clip(f + rng.normal(0, 2, f.shape), 0, 255)
    return frames


def clip(rng, shape, motion=None):
    """(n, H, W, 3) BGR. motion None: the shape wanders, bouncing inside a central box (demo_kinetics);
    'still': it stays where it is, but for hand-held jitter; otherwise an index into MOTIONS."""
    (h, w), n = HW, int(rng.integers(LENGTH[0], LENGTH[1] + 1))
    t = np.linspace(0, 1, n)
    rs = np.full(n, rng.uniform(13, 16) if motion in (None, 'still') else rng.uniform(11, 14))  # room to move
    # mostly upright, turning a little: at 32 px a freely turned square is hard to tell from a disc
    angles = rng.uniform(-0.4, 0.4) + t * rng.uniform(-0.5, 0.5)
    if motion is None:
        # wander inside the central 20 x 12 px, which every train crop and test view contains
        lo, hi = np.array([w / 2 - 10, h / 2 - 6]), np.array([w / 2 + 10, h / 2 + 6])
        pos, vel, path = rng.uniform(lo, hi), rng.normal(0, 1.5, 2), []
        for _ in range(n):
            path.append(pos)
            vel = vel + rng.normal(0, 0.4, 2)
            vel = np.where((pos + vel < lo) | (pos + vel > hi), -vel, vel)
            pos = np.clip(pos + vel, lo, hi)
        xs, ys = np.array(path).T
    elif motion == 'still':
        x, y = rng.uniform(w / 2 - 10, w / 2 + 10), rng.uniform(h / 2 - 6, h / 2 + 6)
        xs, ys = x + rng.normal(0, 0.5, n), y + rng.normal(0, 0.5, n)
    else:
        a, b, c = rng.uniform(0.15, 0.3), rng.uniform(0.7, 0.85), rng.uniform(0.35, 0.65)
        along = a + (b - a) * (t if motion in (0, 3) else t[::-1])  # travel fraction: rising or falling
        xs, ys = (along * w, np.full(n, c * h)) if motion < 2 else (np.full(n, c * w), along * h)
        if motion >= 4:  # towards / away from the camera: the shape grows / shrinks near the middle
            xs, ys = np.full(n, rng.uniform(0.35, 0.65) * w), np.full(n, c * h)
            small, big = rng.uniform(5, 7), rng.uniform(15, 18)
            rs = small + (big - small) * (t if motion == 4 else t[::-1])
        xs, ys = xs + rng.normal(0, 0.5, n), ys + rng.normal(0, 0.5, n)  # hand-held jitter
    return render(rng, shape, h, w, xs, ys, rs, angles)


def still(rng, shape):
    h, w = HW[0], int(rng.integers(48, 73))
    h, w = (w, h) if rng.random() < 0.3 else (h, w)  # some portrait images
    r = rng.uniform(15, 19)  # large and near the centre, as in ImageNet
    x, y = w / 2 + rng.uniform(-w, w) / 10, h / 2 + rng.uniform(-h, h) / 10
    return render(rng, shape, h, w, [x], [y], [r], [rng.uniform(-0.4, 0.4)])[0]


def write_video(path, frames, fourcc):
    with quiet_stderr():
        vw = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*fourcc), FPS, (frames.shape[2], frames.shape[1]))
    if not vw.isOpened():
        raise data.DatasetError(f"cannot write {path}: this OpenCV build has no '{fourcc}' encoder")
    for f in frames:
        vw.write(f)
    vw.release()


def splits(name, classes, train_per_class=None, val_per_class=None):
    val = val_per_class or (FEW_VAL // classes if name in FEW_NAMES else VAL_PER_CLASS)
    return [('train', train_per_class or TRAIN_PER_CLASS[name]), ('val', val)]


def make_kinetics(out, name='demo_kinetics', train_per_class=None, val_per_class=None):
    os.makedirs(os.path.join(out, 'annotations'))
    classes = KINETICS_CLASSES[name]
    for split, per_class in splits(name, len(classes), train_per_class, val_per_class):
        os.makedirs(os.path.join(out, split))
        rows = [['label', 'youtube_id', 'time_start', 'time_end', 'split']]
        for i in range(per_class * len(classes)):
            rng = np.random.default_rng([SEED, STREAMS[name], split == 'val', i])
            label, shape, motion = classes[i % len(classes)]
            yid = ''.join(rng.choice(list(string.ascii_letters + string.digits + '-_'), 11))
            t0 = int(rng.integers(0, 290))
            file = f'{yid}_{t0:06d}_{t0 + 10:06d}.mp4'
            write_video(os.path.join(out, split, file), clip(rng, shape, motion), 'mp4v')
            rows.append([label, yid, t0, t0 + 10, 'train' if split == 'train' else 'validate'])
        with open(os.path.join(out, 'annotations', f'{split}.csv'), 'w', newline='') as f:
            csv.writer(f).writerows(rows)


def make_ssv2(out, name='demo_ssv2', train_per_class=None, val_per_class=None):
    os.makedirs(os.path.join(out, '20bn-something-something-v2'))
    labels = {t.replace('[', '').replace(']', ''): str(k) for k, t in enumerate(MOTIONS)}
    with open(os.path.join(out, 'something-something-v2-labels.json'), 'w') as f:
        json.dump(labels, f, indent=1)
    next_id = 1
    for split, per_class in splits(name, len(MOTIONS), train_per_class, val_per_class):
        items = []
        for i in range(per_class * len(MOTIONS)):
            rng = np.random.default_rng([SEED, STREAMS[name], split == 'val', i])
            motion, shape = i % len(MOTIONS), SHAPES[int(rng.integers(len(SHAPES)))]
            write_video(os.path.join(out, '20bn-something-something-v2', f'{next_id}.webm'),
                        clip(rng, shape, motion), 'VP90')
            label = MOTIONS[motion].replace('[something]', shape)
            items.append({'id': str(next_id), 'label': label[0].lower() + label[1:],
                          'template': MOTIONS[motion], 'placeholders': [shape]})
            next_id += 1
        file = f"something-something-v2-{'train' if split == 'train' else 'validation'}.json"
        with open(os.path.join(out, file), 'w') as f:
            json.dump(items, f, indent=1)


def make_imagenet(out, name='demo_imagenet', train_per_class=None, val_per_class=None):
    shapes = IMAGE_CLASSES[name]
    wnids = [f'n{90000000 + k}' for k in range(len(shapes))]  # wnid-like names; class k is shapes[k]
    for split, per_class in splits(name, len(shapes), train_per_class, val_per_class):
        for k, wnid in enumerate(wnids):
            os.makedirs(os.path.join(out, split, wnid))
            for i in range(per_class):
                rng = np.random.default_rng([SEED, STREAMS[name], split == 'val', k, i])
                serial = k * per_class + i
                file = f'{wnid}_{i}.JPEG' if split == 'train' else f'ILSVRC2012_val_{serial:08d}.JPEG'
                path = os.path.join(out, split, wnid, file)
                cv2.imwrite(path, still(rng, shapes[k]), [cv2.IMWRITE_JPEG_QUALITY, 90])


MAKERS = {'demo_kinetics': make_kinetics, 'demo_ssv2': make_ssv2, 'demo_imagenet': make_imagenet,
          'demo_few_kinetics': make_kinetics, 'demo_few_ssv2': make_ssv2, 'demo_few_images': make_imagenet}


def prepare(data_dir, names=NAMES, train_per_class=None, val_per_class=None):
    """Write <data_dir>/<name> for each demo set among `names` unless it is there at VERSION, with
    train_per_class training clips a class (else TRAIN_PER_CLASS's), val_per_class validation clips."""
    for name in names:
        if name.startswith('demo_') and name not in MAKERS:
            raise data.DatasetError(f"unknown demo dataset '{name}': the demo sets are {NAMES + FEW_NAMES}")
        if name in MAKERS:
            write_once(name, data_dir, train_per_class, val_per_class)


def write_once(name, data_dir, train_per_class=None, val_per_class=None):
    """Written to a private temporary folder and renamed into place: a half-written set is never read,
    and processes racing to write it do not collide."""
    target = os.path.join(data_dir, name)
    stamp = os.path.join(target, 'DEMO_VERSION')
    if os.path.isdir(target):
        if os.path.isfile(stamp) and open(stamp).read().strip() == str(VERSION):
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
    MAKERS[name](tmp, name, train_per_class, val_per_class)
    with open(os.path.join(tmp, 'DEMO_VERSION'), 'w') as f:
        f.write(f'{VERSION}\n')
    try:
        os.rename(tmp, target)  # fails if another process renamed its (identical) copy first
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isdir(target):
            raise
        return
    print(f"generated demo dataset {target} in {time.time() - t0:.1f} s")
