"""
The Kinetics versions as one dataset, `k710`: whichever of k400, k600 and k700 lie in --data_dir, their
classes merged into one label space by name (RENAMES), each YouTube video once. A version is tested on the
rows of the merged head that are its classes (label_rows), so one model gives K400, K600 and K700 top-1.
The versions share videos: the guard (layouts.leave_out) keeps every version's validation videos out of
training. What was decided and why: docs/kinetics.md.
"""

import hashlib
import logging
import os

import numpy as np

import layouts

log = logging.getLogger(__name__)

VERSIONS = ('k400', 'k600', 'k700')

# A class of an earlier version -> the name a later version gave it. From VideoMAE V2's
# misc/k710_identical_label_merge.json (as in MMAction2's tools/data/kinetics710/label_map_k710.txt), checked
# against the three versions' class lists (725 names, 714 classes here). Four more of its merges are not
# made: they are splits, where the later name is one narrow case of the earlier class, and merged, most of
# the earlier class's videos would carry a wrong name: drinking -> sipping cup, sniffing -> smelling feet,
# picking fruit -> picking apples, skiing (not slalom or crosscountry) -> skiing mono. The merges below keep
# the bulk of the class: a new spelling, or a "(not X)" that names the part split off.
RENAMES = {
    'balloon blowing': 'inflating balloons',
    'changing wheel': 'changing wheel (not on bike)',
    'cooking sausages': 'cooking sausages (not on barbeque)',
    'dying hair': 'dyeing hair',
    'garbage collecting': 'person collecting garbage',
    'hugging': 'hugging (not baby)',
    'making bed': 'making the bed',
    'opening bottle': 'opening bottle (not wine)',
    'passing american football (not in game)': 'passing American football (not in game)',  # recased in K700
    'throwing ball': 'throwing ball (not baseball or American football)',
    'tying tie': 'tying necktie',
}


def present(data_dir):
    """The Kinetics versions that have a folder in data_dir."""
    return [v for v in VERSIONS if os.path.isdir(os.path.join(data_dir, v))]


def merged_names(version, classes):
    """A version's class names in k710 (class folders' '_' read as ' '); two that become one are a clash."""
    names = [RENAMES.get(c.replace('_', ' '), c.replace('_', ' ')) for c in classes]
    seen = {}  # merged name -> the class that has it
    for c, n in zip(classes, names):
        if n in seen:
            raise layouts.DatasetError(f"{version} has the classes {seen[n]!r} and {c!r}, which k710 merges into "
                                       "one (kinetics.py RENAMES): join them on disk, or drop the entry from RENAMES")
        seen[n] = c
    return names


def listing(data_dir, split, cache_dir=None):
    """k710's Listing of one split: each version listed (and cached) as itself, then merged; cached as
    <cache_dir>/k710-<split>-<hash of data_dir>, keyed by the folder as layouts.listing keys its listings."""
    root = os.path.abspath(data_dir)
    key = hashlib.sha1(os.fsencode(root)).hexdigest()[:8]
    file = os.path.join(cache_dir, f'k710-{split}-{key}') if cache_dir else None
    if file and os.path.exists(file + '.json'):
        cached = layouts.Listing.load(file)
        if cached.root == root:
            if cached.report:  # said again, as layouts.listing does
                log.warning(f"k710/{split}: skipped or noted while listing: {cached.report}")
            return cached
    versions = present(data_dir)
    if not versions:
        raise layouts.DatasetError(f"k710 merges the Kinetics versions in --data_dir, and {root} has none of "
                                   f"{', '.join(f'{v}/' for v in VERSIONS)}: put them there in their layout")
    result = merge(root, {v: layouts.listing(v, data_dir, split, 'kinetics', cache_dir) for v in versions})
    if file:
        os.makedirs(cache_dir, exist_ok=True)
        result = result.save(file)
    return result


def merge(root, parts):
    """One Listing of the versions' listings ({version: Listing of <root>/<version>}, oldest first): classes
    by merged name, in alphabetical order; a video in several versions kept once, as the latest version lists
    it (its label the latest name). Paths are relative to root."""
    versions = list(parts)[::-1]  # the latest first
    names = {v: merged_names(v, parts[v].classes) for v in versions}
    classes = sorted(set().union(*names.values()))
    index = {c: i for i, c in enumerate(classes)}
    paths = np.concatenate([np.char.add(os.fsencode(v + os.sep), parts[v].paths) for v in versions])
    labels = np.concatenate([np.array([index[n] for n in names[v]], np.int32)[parts[v].labels] for v in versions])
    ids = np.concatenate([parts[v].ids for v in versions])
    first = np.unique(ids, return_index=True)[1]  # the first row of each id: the latest version's
    keep = np.union1d(first[ids[first] != b''], np.flatnonzero(ids == b''))  # a file with no id is its own
    problems = {f'{v}_{kind}': n for v in versions for kind, n in parts[v].problems.items()}
    if len(keep) < len(ids):
        problems['same_video_in_a_later_version'] = len(ids) - len(keep)
    report = '; '.join(f'{v}: {parts[v].report}' for v in versions if parts[v].report)
    absent = np.unique(np.concatenate([parts[v].absent_ids for v in versions]))  # of the validation lists
    return layouts.Listing(root, classes, paths[keep], labels[keep], problems, report=report, ids=ids[keep],
                           absent_ids=absent, parts=list(parts))


def versions(samples):
    """The versions a k710 listing was merged from, as it records them (one saved before it did: the
    folders of its paths)."""
    if samples.parts is not None:
        return samples.parts
    folders = set(np.unique(np.char.partition(samples.paths, os.fsencode(os.sep))[:, 0]).tolist())
    return [v for v in VERSIONS if os.fsencode(v) in folders]


def label_rows(version, classes, merged):
    """The rows of a k710 head (its classes `merged`) of `version`'s classes, in that version's order: the
    logits of those rows are the version's logits."""
    index = {c: i for i, c in enumerate(merged)}
    names = merged_names(version, classes)
    missing = [c for c in names if c not in index]
    if missing:
        raise layouts.DatasetError(f"the k710 head has no row for {len(missing)} of {version}'s classes (e.g. "
                                   f"{missing[0]!r}): it was trained without {version}")
    return [index[n] for n in names]
