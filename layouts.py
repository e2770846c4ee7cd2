"""
How each dataset lies on disk, as its release ships it, and the listing of samples read from it.

A listing holds one split's sample paths, class indices and YouTube ids as compact arrays. Saved to a file
it is memory-mapped, so DataLoader workers and all ranks of a node share one copy, and a run keeps the list
it started with across restarts. The guard (leave_out) drops the training samples that are validation videos.
"""

import csv
import hashlib
import json
import logging
import os
import re
from collections import Counter

import numpy as np

log = logging.getLogger(__name__)

VIDEO_EXTS = ('.mp4', '.webm', '.avi', '.mkv', '.mov')
IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')

DESCRIPTIONS = {  # layout -> what we expect on disk, for error messages
    'kinetics': "annotations/{train,val}.csv (header label,youtube_id,time_start,time_end,split) with clips "
                "{train,val}/<youtube_id>_<start:06d>_<end:06d>.mp4, or class folders "
                "{train,val}/<class>/*.mp4",
    'ssv2': "something-something-v2-{train,validation,labels}.json and 20bn-something-something-v2/<id>.webm",
    'mit': "training/<class>/*.mp4, validation/<class>/*.mp4, optional moments_categories.txt (class,idx)",
    'imagenet': "train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (val sorted into class folders)",
    'in21k': "imagenet21k_train/<wnid>/ and imagenet21k_val/<wnid>/ (ImageNet-21K-P), or train/ and val/; "
             "the raw winter-21 release (wnid folders, no split) needs the 21K-P preprocessing or a split "
             "of your own",
    'custom': "train.csv / val.csv with lines '<path relative to the folder> <int label>' (optional "
              "classes.txt, one name per line), or class folders train/<class>/, val/<class>/",
}
FOLDERS = {  # layout -> (train folder names, val folder names, extensions); the first that exists is used
    'kinetics': (['train'], ['val', 'validate'], VIDEO_EXTS),
    'mit': (['training'], ['validation'], VIDEO_EXTS),
    'imagenet': (['train'], ['val'], IMAGE_EXTS),
    'in21k': (['imagenet21k_train', 'train'], ['imagenet21k_val', 'val'], IMAGE_EXTS),
    'custom': (['train'], ['val'], VIDEO_EXTS + IMAGE_EXTS),
}


# a clip named as Kinetics names them: <YouTube id, 11 characters>_<start:06d>_<end:06d>.<ext>
YOUTUBE_CLIP = re.compile(rb'([A-Za-z0-9_-]{11})_[0-9]{6}_[0-9]{6}\.[A-Za-z0-9]+')


class DatasetError(Exception):
    """A dataset cannot be used at all (missing, laid out differently, nothing readable)."""


class Listing:
    """One split of a dataset: sample i is the file root/paths[i] of class labels[i], a clip of the YouTube
    video ids[i] (b'' where its file name does not say). absent_ids: the videos its list names that are not
    samples (not on disk, or of a class training lacks), kept for a validation split, whose every video the
    guard leaves out. parts: the datasets a merged listing was made of (k710: its versions). left_out: what
    the guard left out, if it ran."""

    def __init__(self, root, classes, paths, labels, problems, file=None, report='', ids=None, left_out=None,
                 absent_ids=(), parts=None):
        self.root, self.classes, self.problems, self.file = root, classes, problems, file
        self.paths, self.labels = paths, labels  # bytes (N,), int32 (N,)
        self.report = report  # the problems in words, with an example of each
        self._ids = ids  # bytes (N,); None: read off the paths when first asked for, once a process
        self.absent_ids = np.array(absent_ids, dtype='S')
        self.left_out, self.parts = left_out, parts  # what the guard left out (leave_out); the merged sets

    @property
    def ids(self):
        if self._ids is None:  # a listing saved before ids, or made here: its paths are read once
            self._ids = youtube_ids(self.paths)
        return self._ids

    @classmethod
    def from_pairs(cls, root, classes, pairs, problems=None, report=''):
        """From [(absolute path, class index)]."""
        prefix = os.path.join(root, '')
        rel = [p[len(prefix):] if p.startswith(prefix) else os.path.relpath(p, root) for p, _ in pairs]
        paths = np.array([os.fsencode(p) for p in rel], dtype=bytes)
        labels = np.array([y for _, y in pairs], dtype=np.int32)
        return cls(root, classes, paths, labels, dict(problems or {}), report=report)

    def __len__(self):
        return len(self.labels)

    def path(self, i):
        return os.path.join(self.root, os.fsdecode(self.paths[i]))

    def save(self, file):
        """Write the arrays and a JSON sidecar (atomically: rename), then return the memory-mapped copy. The
        temporary names are this save's own: ranks on several hosts may save to one shared folder."""
        for ext, write in [('.npy', lambda f: np.save(f, np.rec.fromarrays([self.paths, self.labels, self.ids],
                                                                            names='path,label,id'))),
                           ('.json', lambda f: f.write(json.dumps(self.meta()).encode()))]:
            tmp = f'{file}{ext}.tmp-{os.urandom(8).hex()}'
            with open(tmp, 'wb') as f:
                write(f)
            os.replace(tmp, file + ext)
        return Listing.load(file)

    def meta(self):
        return {'root': self.root, 'classes': self.classes, 'problems': self.problems, 'report': self.report,
                'left_out': self.left_out, 'absent_ids': [i.decode() for i in self.absent_ids],
                'parts': self.parts}

    def digest(self):
        """A short hash of what the listing holds: its arrays and its sidecar."""
        h = hashlib.sha1(json.dumps(self.meta()).encode())
        for a in (self.paths, self.labels, self.ids):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:8]

    @classmethod
    def load(cls, file):
        with open(file + '.json') as f:
            meta = json.load(f)
        records = np.load(file + '.npy', mmap_mode='r')
        ids = records['id'] if 'id' in records.dtype.names else None  # a listing saved before ids: read anew
        return cls(meta['root'], meta['classes'], records['path'], records['label'], meta['problems'], file,
                   meta.get('report', ''), ids, meta.get('left_out'), meta.get('absent_ids', ()), meta.get('parts'))

    def subset(self, rows):
        """The samples `rows` (indices), as a Listing in memory."""
        return Listing(self.root, self.classes, self.paths[rows], self.labels[rows], self.problems,
                       report=self.report, ids=self.ids[rows], absent_ids=self.absent_ids, parts=self.parts)

    def __getstate__(self):  # a saved listing travels to workers as its file name, not as a copy
        return self.meta() | {'file': self.file} if self.file else self.__dict__

    def __setstate__(self, state):
        self.__dict__.update(Listing.load(state['file']).__dict__ if state.get('file') else state)


def listing(name, data_dir, split, layout, cache_dir=None):
    """The Listing of <data_dir>/<name>, split 'train' or 'val'. With cache_dir it is kept in
    <cache_dir>/<name>-<split>-<hash of the folder>: read back when there, else listed and saved there.
    Keyed by the folder, so listing another --data_dir (eval.py, features.py) never replaces the listing
    that a run's workers read. A <name>-<split> of the same folder, saved before the hash was in the name,
    is read and kept: a run goes on with the list it started with."""
    root = os.path.abspath(os.path.join(data_dir, name))
    key = hashlib.sha1(os.fsencode(root)).hexdigest()[:8]
    file = os.path.join(cache_dir, f'{name}-{split}-{key}') if cache_dir else None
    for saved in [os.path.join(cache_dir, f'{name}-{split}'), file] if cache_dir else []:
        if os.path.exists(saved + '.json'):
            cached = Listing.load(saved)
            if cached.root == root:
                say_problems(name, split, cached.report, saved)
                return cached
    try:
        if not os.path.isdir(root):
            raise DatasetError(f"no folder {root}")
        problems, examples = Counter(), {}
        classes, entries, listed = parse(root, layout, split, problems)
    except (DatasetError, OSError, ValueError) as e:
        raise DatasetError(f"dataset '{name}' ({split}) cannot be read: {e}.\n  Expected under {root}/: "
                           f"{DESCRIPTIONS[layout]}.\n  Fix: put the data there in that layout, or point "
                           f"--data_dir at the folder that holds '{name}/'.") from None
    named = entries  # every entry of the list, on disk or not
    entries = drop_missing(entries, problems, examples) if listed else entries
    index = {c: i for i, c in enumerate(classes)}
    if len(index) < len(classes) and any(isinstance(label, str) for _, label in entries):
        raise DatasetError(f"dataset '{name}' labels its samples by class name, and {repeated_name(classes)} "
                           f"of its class list: each name must be one class")
    # a custom list's integer labels are class indices as given (its names are only shown); names looked up
    labels = [label if isinstance(label, int) else index.get(label, -1) for _, label in entries]
    pairs = [(p, y) for (p, _), y in zip(entries, labels) if 0 <= y < len(classes)]
    if len(pairs) < len(entries):  # val labels that train does not have (no head output for them)
        problems['unknown_label'] = len(entries) - len(pairs)
        examples['unknown_label'] = next(repr(label) for (_, label), y in zip(entries, labels)
                                         if not 0 <= y < len(classes))
    problems = {k: v for k, v in sorted(problems.items()) if v}
    report = ', '.join(f"{k} {v}" + (f" (e.g. {examples[k]})" if k in examples else '')
                       for k, v in problems.items())
    if not pairs:
        raise DatasetError(f"dataset '{name}' ({split}) has no usable samples under {root} "
                           f"({report or 'nothing listed'}).\n  Expected: {DESCRIPTIONS[layout]}.")
    say_problems(name, split, report, file)
    result = Listing.from_pairs(root, classes, pairs, problems, report)
    if split == 'val':  # a validation video is one whether or not its file is here (the guard)
        listed_ids = youtube_ids([os.fsencode(p) for p, _ in named])
        result.absent_ids = np.setdiff1d(listed_ids[listed_ids != b''], result.ids)
    if file:
        os.makedirs(cache_dir, exist_ok=True)
        result = result.save(file)
    return result


_SAID = set()  # the saved listings whose problems this process has told


def say_problems(name, split, report, file):
    """What a listing left out, in a line: once per process for a saved listing (whoever opens it hears it,
    not at every reopen), at every listing for one that is not saved."""
    if report and file not in _SAID:
        log.warning(f"{name}/{split}: skipped or noted while listing: {report}")
    if file:
        _SAID.add(file)


def repeated_name(classes):
    """The first class name that repeats, in words: "'crane' is at positions 134 and 517"."""
    seen = {}
    for i, c in enumerate(classes):
        if c in seen:
            return f"{c!r} is at positions {seen[c]} and {i}"
        seen[c] = i


def youtube_ids(paths):
    """The YouTube id in each path's file name (Kinetics' <id>_<start:06d>_<end:06d>.<ext>), else b''."""
    found = (YOUTUBE_CLIP.fullmatch(os.path.basename(p)) for p in paths)
    return np.array([m.group(1) if m else b'' for m in found], dtype='S')  # 1 byte a sample where none has one


def leave_out(samples, validation, file=None):
    """The guard: `samples` less those whose YouTube video is a video of a validation set in `validation`
    ({name: Listing}): a sample of it, or a video its list names that is not one (absent_ids). left_out =
    {'total': how many, 'of': {name: how many were its videos}} (a video may be in several), and 'unchecked':
    how many have no id in their file name, where some do; None where none does. When some are left out the
    rest is saved to `file`-<hash of it>, shared with the workers as a listing is: the first process saves
    it, the others (other ranks, later starts) find it there and read it."""
    named = samples.ids != b''
    if not named.any():  # not a set of YouTube clips: nothing to check
        samples.left_out = None
        return samples
    hit, counts = np.zeros(len(samples), bool), {}
    for name, val in validation.items():
        theirs = named & np.isin(samples.ids, np.concatenate([val.ids[val.ids != b''], val.absent_ids]))
        counts[name] = int(theirs.sum())
        hit |= theirs
    if hit.all():
        raise DatasetError(f"every training sample under {samples.root} is a validation video of "
                           f"{', '.join(n for n, c in counts.items() if c)}: train on other data, or pass "
                           "--train_on_val_videos")
    if hit.any():
        samples = samples.subset(np.flatnonzero(~hit))
    unchecked = int((~named).sum())
    samples.left_out = {'total': int(hit.sum()), 'of': counts} | ({'unchecked': unchecked} if unchecked else {})
    if hit.any() and file:
        file = f'{file}-{samples.digest()}'
        samples = Listing.load(file) if os.path.exists(file + '.json') else samples.save(file)
    return samples


# -----------------------------------------------------------------------------
# parsers: -> (class names in index order, [(absolute path, class name, or class index in a custom list)],
# whether the entries come from an annotation list and may name files that are not on disk)


def parse(root, layout, split, problems):
    """Class index: the train labels (or train folders) in alphabetical order, unless the release fixes
    the order (SSv2 labels json, moments_categories.txt, custom classes.txt / integer labels)."""
    train_problems = problems if split == 'train' else Counter()  # only the names of train are needed
    ann = os.path.join(root, 'annotations')
    if layout == 'kinetics' and os.path.isdir(ann):
        train_csv = first(ann, ['train.csv'], isdir=False)
        train = read_kinetics_csv(train_csv, os.path.join(root, 'train'), train_problems)
        classes = sorted({label for _, label in train})
        if split == 'train':
            return classes, train, True
        clip_dir = first(root, FOLDERS['kinetics'][1])
        val_csv = first(ann, ['val.csv', 'validate.csv'], isdir=False)
        return classes, read_kinetics_csv(val_csv, clip_dir, problems), True
    if layout == 'ssv2':
        return parse_ssv2(root, split, problems)
    if layout == 'custom' and os.path.isfile(os.path.join(root, 'train.csv')):
        listed = train = read_list(os.path.join(root, 'train.csv'), root, train_problems)
        if os.path.isfile(os.path.join(root, 'classes.txt')):
            with open(os.path.join(root, 'classes.txt')) as f:
                classes = [line.strip() for line in f if line.strip()]
        else:  # no names: the integer labels are the names
            classes = [str(i) for i in range(max((y for _, y in train), default=-1) + 1)]
        if split == 'val':
            listed = read_list(first(root, ['val.csv'], False), root, problems)
        return classes, listed, True
    train_dir, val_dir, exts = FOLDERS[layout]
    classes, entries = scan_folders(first(root, train_dir), exts, train_problems)
    if split == 'val':
        entries = scan_folders(first(root, val_dir), exts, Counter())[1]
    if layout == 'mit' and os.path.isfile(os.path.join(root, 'moments_categories.txt')):
        with open(os.path.join(root, 'moments_categories.txt')) as f:  # `class,idx` lines
            pairs = [line.strip().rsplit(',', 1) for line in f if line.strip()]
        classes = [c for c, _ in sorted(pairs, key=lambda p: int(p[1]))]
    return classes, entries, False


def parse_ssv2(root, split, problems):
    def load(kind):
        with open(first(root, [f'something-something-v2-{kind}.json'], False)) as f:
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


def first(root, names, isdir=True):
    for n in names:
        if (os.path.isdir if isdir else os.path.isfile)(os.path.join(root, n)):
            return os.path.join(root, n)
    raise DatasetError(f"no {' or '.join(names)} in {root}")


def scan_folders(split_dir, exts, problems):
    """Class folders -> (sorted class names, entries). Other extensions are ignored; an empty folder is
    still a class (it keeps its index) and is counted as 'empty_class_folder'."""
    classes, entries = [], []
    for d in sorted((e for e in os.scandir(split_dir) if e.is_dir()), key=lambda e: e.name):
        files = sorted(f.path for f in os.scandir(d.path) if f.name.lower().endswith(exts) and f.is_file())
        problems['empty_class_folder'] += not files
        classes.append(d.name)
        entries += [(f, d.name) for f in files]
    return classes, entries


def read_kinetics_csv(path, clip_dir, problems):
    with open(path, newline='') as f:
        rows = csv.reader(f)
        header = [h.strip() for h in next(rows, [])]
        need = ['label', 'youtube_id', 'time_start', 'time_end']
        if not set(need) <= set(header):
            raise DatasetError(f"{path}: expected the header label,youtube_id,time_start,time_end,split; "
                               f"got {header}")
        col, entries = [header.index(c) for c in need], []
        for row in rows:
            if not any(c.strip() for c in row):
                continue
            try:
                label, yid, t0, t1 = (row[i] for i in col)
                name = f'{yid}_{int(float(t0)):06d}_{int(float(t1)):06d}.mp4'
                entries.append((os.path.join(clip_dir, name), label))
            except (IndexError, ValueError):
                problems['malformed_line'] += 1
    return entries


def read_list(path, root, problems):
    """`path label` lines (PySlowFast / MMAction2 style); the path may hold spaces, the label is last."""
    entries = []
    with open(path) as f:
        for line in f:
            parts = line.strip().rsplit(None, 1)
            if len(parts) == 2 and parts[1].lstrip('-').isdigit():
                entries.append((os.path.join(root, parts[0]), int(parts[1])))
            elif parts:
                problems['malformed_line'] += 1
    return entries


def drop_missing(entries, problems, examples):
    """Keep the listed files that exist: one directory listing per folder, not a stat per file."""
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
