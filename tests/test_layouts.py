"""layouts.py: each dataset's on-disk layout parsed from real files written here, and the compact
listings that every rank and DataLoader worker shares."""

import argparse
import hashlib
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

import data
import layouts
import runtime
from media import make_ssv2, tiny_video, write_image, write_kinetics_csv


def pairs(ds):
    """[(absolute path, class index)] of a dataset's listing."""
    return [(ds.samples.path(i), int(ds.samples.labels[i])) for i in range(len(ds))]


def test_kinetics_flat_csv(tmp_path, caplog):
    root = tmp_path / 'k400'
    rows = [['passing American football (in game)', 'aaa', 17, 27, 'train', 0],
            ['abseiling', 'b-b_b', 0, 10, 'train', 0],
            ['zumba', 'ccc', 3, 13, 'train', 1],
            ['abseiling', 'gone', 5, 15, 'train', 0]]       # listed but not on disk
    write_kinetics_csv(root / 'annotations' / 'train.csv', rows)
    with open(root / 'annotations' / 'train.csv', 'a') as f:
        f.write('abseiling,broken,notanumber,10,train,0\n\n')
    for label, yid, t0, t1, *_ in rows[:3]:
        tiny_video(root / 'train' / f'{yid}_{t0:06d}_{t1:06d}.mp4')
    write_kinetics_csv(root / 'annotations' / 'validate.csv',
                       [['zumba', 'vvv', 1, 11, 'validate'], ['not a train class', 'www', 1, 11, 'validate']], is_cc=False)
    tiny_video(root / 'val' / 'vvv_000001_000011.mp4')
    tiny_video(root / 'val' / 'www_000001_000011.mp4')
    with caplog.at_level('WARNING'):
        tr = data.build_dataset('k400', tmp_path, 'train')
    assert tr.classes == ['abseiling', 'passing American football (in game)', 'zumba']
    assert sorted((os.path.basename(p), y) for p, y in pairs(tr)) == [
        ('aaa_000017_000027.mp4', 1), ('b-b_b_000000_000010.mp4', 0), ('ccc_000003_000013.mp4', 2)]
    assert tr.problems == {'missing': 1, 'malformed_line': 1}
    assert 'gone_000005_000015.mp4' in caplog.text and 'missing 1' in caplog.text
    va = data.build_dataset('k400', tmp_path, 'val')
    assert va.classes == tr.classes and va.problems == {'unknown_label': 1} and pairs(va)[0][1] == 2
    assert not va.train and va.num_views == 3 and os.path.isabs(pairs(va)[0][0])


def test_kinetics_class_folders_and_empty_class(tmp_path):
    root = tmp_path / 'k700'
    tiny_video(root / 'train' / 'riding_a_bike' / 'x_000000_000010.mp4')
    tiny_video(root / 'train' / 'abseiling' / 'y.mp4')
    os.makedirs(root / 'train' / 'empty class')
    (root / 'train' / 'abseiling' / 'notes.txt').write_text('ignored')
    tiny_video(root / 'val' / 'riding_a_bike' / 'z.mp4')
    tiny_video(root / 'val' / 'unknown' / 'w.mp4')
    tr = data.build_dataset('k700', tmp_path, 'train')
    assert tr.classes == ['abseiling', 'empty class', 'riding_a_bike'] and len(tr) == 2
    assert tr.problems == {'empty_class_folder': 1}  # the class keeps its index, it just has no clips
    va = data.build_dataset('k700', tmp_path, 'val')
    assert [y for _, y in pairs(va)] == [2] and va.problems == {'unknown_label': 1}


def test_ssv2_json(tmp_path):
    root = tmp_path / 'ssv2'
    labels = {'Pushing something from left to right': '1', 'Holding something next to something': '0'}
    make_ssv2(root, {'5': 'Pushing [something] from left to right', '6': 'Holding [something] next to [something]'},
              {'7': 'Holding [something] next to [something]'}, labels=labels)
    os.remove(root / '20bn-something-something-v2' / '6.webm')
    entries = json.loads((root / 'something-something-v2-train.json').read_text()) + [{'id': '9'}]
    (root / 'something-something-v2-train.json').write_text(json.dumps(entries))
    tr = data.build_dataset('ssv2', tmp_path, 'train')
    assert tr.classes == ['Holding something next to something', 'Pushing something from left to right']
    assert [(os.path.basename(p), y) for p, y in pairs(tr)] == [('5.webm', 1)]
    assert tr.problems == {'missing': 1, 'malformed_line': 1} and tr.spec.sampling == 'segment'
    assert [y for _, y in pairs(data.build_dataset('ssv2', tmp_path, 'val'))] == [0]


def test_mit_folders_and_categories(tmp_path):
    root = tmp_path / 'mit'
    tiny_video(root / 'training' / 'barking' / 'a.mp4')
    tiny_video(root / 'training' / 'applauding' / 'b.mp4')
    tiny_video(root / 'validation' / 'barking' / 'c.mp4')
    assert data.build_dataset('mit', tmp_path, 'train').classes == ['applauding', 'barking']
    (root / 'moments_categories.txt').write_text('barking,0\napplauding,1\n')  # the release's order wins
    va = data.build_dataset('mit', tmp_path, 'val')
    assert va.classes == ['barking', 'applauding'] and pairs(va)[0][1] == 0 and va.spec.rate == 8


def test_imagenet_layouts(tmp_path):
    for name, tr_dir, va_dir in [('in1k', 'train', 'val'), ('in21k', 'imagenet21k_train', 'imagenet21k_val')]:
        root = tmp_path / name
        write_image(root / tr_dir / 'n02' / 'n02_1.JPEG')
        write_image(root / tr_dir / 'n01' / 'n01_1.JPEG')
        write_image(root / tr_dir / 'n01' / 'n01_2.jpeg')
        write_image(root / va_dir / 'n02' / 'ILSVRC2012_val_00000001.JPEG')
        tr = data.build_dataset(name, tmp_path, 'train', img_size=32)
        assert tr.classes == ['n01', 'n02'] and [y for _, y in pairs(tr)] == [0, 0, 1]
        assert tr.spec.kind == 'image' and tr.frames == 1 and tr.spec.batch_scale == 4
        va = data.build_dataset(name, tmp_path, 'val', img_size=32)
        assert [y for _, y in pairs(va)] == [1] and va.num_views == 1


def test_custom_csv_and_folders(tmp_path):
    root = tmp_path / 'mine'
    tiny_video(root / 'clips' / 'a b.mp4')
    tiny_video(root / 'clips' / 'c.avi')
    (root / 'train.csv').write_text('clips/a b.mp4 1\nclips/c.avi 0\nclips/missing.mp4 0\njust-a-path\nclips/c.avi x\n')
    (root / 'val.csv').write_text('clips/c.avi 0\nclips/a b.mp4 7\n')
    tr = data.build_dataset('mine', tmp_path, 'train')
    assert tr.classes == ['0', '1'] and tr.spec.kind == 'video' and tr.spec.sampling == 'segment'
    assert [(os.path.basename(p), y) for p, y in pairs(tr)] == [('a b.mp4', 1), ('c.avi', 0)]
    assert tr.problems == {'missing': 1, 'malformed_line': 2}
    (root / 'classes.txt').write_text('dog\ncat\n')
    va = data.build_dataset('mine', tmp_path, 'val')
    assert va.classes == ['dog', 'cat'] and [y for _, y in pairs(va)] == [0] and va.problems == {'unknown_label': 1}
    write_image(tmp_path / 'pics' / 'train' / 'cat' / '1.PNG')
    write_image(tmp_path / 'pics' / 'val' / 'cat' / '2.jpg')
    pics = data.build_dataset('pics', tmp_path, 'val')
    assert pics.classes == ['cat'] and pics.spec.kind == 'image'


def test_dataset_errors_say_where_and_what(tmp_path):
    with pytest.raises(data.DatasetError, match=r'(?s)k400.*annotations/\{train,val\}\.csv.*--data_dir'):
        data.build_dataset('k400', tmp_path, 'train')
    tiny_video(tmp_path / 'ssv2' / 'x.mp4')
    with pytest.raises(data.DatasetError, match='something-something-v2-labels.json'):
        data.build_dataset('ssv2', tmp_path, 'train')
    write_kinetics_csv(tmp_path / 'k600' / 'annotations' / 'train.csv', [['a', 'x', 0, 10, 'train']])
    with pytest.raises(data.DatasetError, match='no usable samples.*missing 1'):
        data.build_dataset('k600', tmp_path, 'train')
    (tmp_path / 'txt' / 'train' / 'a').mkdir(parents=True)
    (tmp_path / 'txt' / 'train' / 'a' / 'x.txt').write_text('')
    with pytest.raises(data.DatasetError, match='no usable samples'):
        data.build_dataset('txt', tmp_path, 'train')
    with pytest.raises(data.DatasetError, match='demo sets'):
        data.build_dataset('demo_nope', tmp_path, 'train')
    with pytest.raises(ValueError):
        data.build_dataset('k400', tmp_path, 'test')


def test_listing_is_kept_and_shared_as_a_file(tmp_path):
    """Listed once into the cache folder; read back from it (also after the folder changes on disk), and
    sent to a DataLoader worker as a file name, not as a copy of the arrays."""
    for i in range(3):
        write_image(tmp_path / 'pics' / 'train' / f'c{i}' / 'a.png', seed=i)
    cache = tmp_path / 'listings'
    ds = data.build_dataset('pics', tmp_path, 'train', img_size=16, cache_dir=str(cache))
    key = hashlib.sha1(os.fsencode(str(tmp_path / 'pics'))).hexdigest()[:8]  # the listed folder
    assert sorted(os.listdir(cache)) == [f'pics-train-{key}.json', f'pics-train-{key}.npy'] and len(ds) == 3
    assert isinstance(ds.samples.paths, np.memmap)
    write_image(tmp_path / 'pics' / 'train' / 'c3' / 'b.png')  # a new file after the run started
    again = data.build_dataset('pics', tmp_path, 'train', img_size=16, cache_dir=str(cache))
    assert pairs(again) == pairs(ds) and again.classes == ['c0', 'c1', 'c2']
    assert len(data.build_dataset('pics', tmp_path, 'train', img_size=16)) == 4  # no cache: listed anew
    back = pickle.loads(pickle.dumps(ds))
    assert pairs(back) == pairs(ds) and back[(1, 5)]['y'] == 1
    moved = tmp_path / 'moved'
    moved.mkdir()
    os.rename(tmp_path / 'pics', moved / 'pics')  # another data_dir: its own listing, not the cached one
    assert data.build_dataset('pics', moved, 'train', img_size=16, cache_dir=str(cache)).samples.root == str(moved / 'pics')


def test_a_listing_of_another_folder_never_replaces_a_runs_listing(tmp_path):
    """eval.py or features.py with another --data_dir lists into the run's folder of listings: the run's
    own files stay as they are, and a worker that opens the run's listing gets the run's samples."""
    for root in ('a', 'b'):
        for i in range(2 if root == 'a' else 3):
            write_image(tmp_path / root / 'pics' / 'val' / f'c{i}' / 'x.png', seed=i)
            write_image(tmp_path / root / 'pics' / 'train' / f'c{i}' / 'x.png', seed=i)
    cache = tmp_path / 'run' / 'listings'
    run = data.build_dataset('pics', tmp_path / 'a', 'val', img_size=16, cache_dir=str(cache))
    before = {f: ((cache / f).read_bytes(), os.stat(cache / f).st_mtime_ns) for f in os.listdir(cache)}
    other = data.build_dataset('pics', tmp_path / 'b', 'val', img_size=16, cache_dir=str(cache))
    assert len(other) == 3 and {f: ((cache / f).read_bytes(), os.stat(cache / f).st_mtime_ns) for f in before} == before
    worker = pickle.loads(pickle.dumps(run))  # as a DataLoader worker opens it, from its file
    assert len(worker) == 2 and worker.samples.root == str(tmp_path / 'a' / 'pics')
    assert data.build_dataset('pics', tmp_path / 'a', 'val', img_size=16, cache_dir=str(cache)).samples.file == run.samples.file


def test_a_listings_problems_are_said_once_a_process_listed_or_from_the_cache(tmp_path, caplog):
    """What a listing left out is said by the process that lists it, and by each process that reads it back
    from the cache (another rank, a resumed run), once: not again at every reopen (the final test's)."""
    root = tmp_path / 'mine'
    tiny_video(root / 'a.mp4')
    (root / 'train.csv').write_text('a.mp4 0\n')
    (root / 'val.csv').write_text('a.mp4 0\ngone.mp4 0\na.mp4 3\n')
    said = f"mine/val: skipped or noted while listing: missing 1 (e.g. {root / 'gone.mp4'}), unknown_label 1 (e.g. 3)"
    for times in (1, 0):  # listed, then read back from the cache
        caplog.clear()
        with caplog.at_level('WARNING'):
            va = data.build_dataset('mine', tmp_path, 'val', cache_dir=str(tmp_path / 'listings'))
        assert va.problems == {'missing': 1, 'unknown_label': 1} and caplog.text.count(said) == times
    code = ("import logging, layouts; logging.basicConfig(format='%(message)s')\n"
            f"for _ in range(3): layouts.listing('mine', {str(tmp_path)!r}, 'val', 'custom', "
            f"{str(tmp_path / 'listings')!r})")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       cwd=os.path.dirname(layouts.__file__))
    assert r.stderr.count(said) == 1  # another process, from the cache


def test_a_listing_saved_before_the_folder_was_in_its_name_is_kept(tmp_path):
    """A run started before listings were keyed by their folder saved <name>-<split>.{json,npy} (no report in
    the JSON). Resumed, it reads that file and keeps using it though the folder changed meanwhile, and saves
    no second listing; another folder of the same name gets a listing of its own."""
    for i in range(3):
        write_image(tmp_path / 'a' / 'pics' / 'train' / f'c{i}' / 'x.png', seed=i)
    cache = tmp_path / 'run' / 'listings'
    cache.mkdir(parents=True)
    old = layouts.listing('pics', tmp_path / 'a', 'train', 'custom').save(str(cache / 'pics-train'))
    meta = json.loads((cache / 'pics-train.json').read_text())
    del meta['report']  # as the listings before the folder's hash wrote it
    (cache / 'pics-train.json').write_text(json.dumps(meta))
    write_image(tmp_path / 'a' / 'pics' / 'train' / 'c3' / 'x.png')  # a class added after the run started
    for _ in range(2):
        ds = data.build_dataset('pics', tmp_path / 'a', 'train', img_size=16, cache_dir=str(cache))
        assert ds.samples.file == str(cache / 'pics-train')
        assert pairs(ds) == [(old.path(i), int(old.labels[i])) for i in range(3)]
        assert ds.classes == ['c0', 'c1', 'c2'] and sorted(os.listdir(cache)) == ['pics-train.json', 'pics-train.npy']
    assert len(pickle.loads(pickle.dumps(ds))) == 3  # a worker opens the same file
    write_image(tmp_path / 'b' / 'pics' / 'train' / 'c0' / 'x.png')
    other = data.build_dataset('pics', tmp_path / 'b', 'train', img_size=16, cache_dir=str(cache))
    assert len(other) == 1 and other.samples.file != ds.samples.file and len(os.listdir(cache)) == 4


def test_a_repeated_class_name_keeps_its_labels_or_is_one_line_of_error(tmp_path):
    """ImageNet-1k's readable names hold 'crane' (134, 517) and 'maillot' (638, 639) twice. A custom list
    labels by integer: its labels are kept as given and the names only shown. A layout that labels by
    name (MiT's categories file) cannot tell two classes of one name apart: one line naming both places."""
    root = tmp_path / 'mine'
    names = ['crane', 'maillot', 'crane', 'maillot']
    for i in range(4):
        tiny_video(root / f'{i}.mp4')
    (root / 'classes.txt').write_text('\n'.join(names) + '\n')
    (root / 'train.csv').write_text(''.join(f'{i}.mp4 {i}\n' for i in range(4)))
    (root / 'val.csv').write_text('3.mp4 3\n0.mp4 0\n')
    tr = data.build_dataset('mine', tmp_path, 'train')
    assert tr.classes == names and [y for _, y in pairs(tr)] == [0, 1, 2, 3]
    assert [y for _, y in pairs(data.build_dataset('mine', tmp_path, 'val'))] == [3, 0]
    tiny_video(tmp_path / 'mit' / 'training' / 'crane' / 'a.mp4')
    tiny_video(tmp_path / 'mit' / 'validation' / 'crane' / 'b.mp4')
    (tmp_path / 'mit' / 'moments_categories.txt').write_text('maillot,0\ncrane,1\nbird,2\ncrane,3\n')
    with pytest.raises(data.DatasetError) as e:
        data.build_dataset('mit', tmp_path, 'train')
    assert str(e.value) == ("dataset 'mit' labels its samples by class name, and 'crane' is at positions 1 and 3 "
                            "of its class list: each name must be one class")


def test_a_large_listing_pickles_to_a_few_hundred_bytes(tmp_path):
    """ImageNet-21K has 11M samples and every DataLoader worker of every rank gets the dataset: a saved
    listing travels as its file name, and in memory it costs the bytes of its paths plus 4 per label."""
    n = 200_000
    big = layouts.Listing.from_pairs(str(tmp_path), ['a', 'b'], [(str(tmp_path / f'n0{i % 2}/{i:08d}.JPEG'), i % 2)
                                                                 for i in range(n)])
    assert big.paths.nbytes + big.labels.nbytes == n * (len('n00/00000000.JPEG') + 4)
    saved = big.save(str(tmp_path / 'big'))
    assert len(pickle.dumps(saved)) < 500 < len(pickle.dumps(big)) // 1000
    assert saved.path(n - 1) == str(tmp_path / f'n01/{n - 1:08d}.JPEG') and saved.labels[n - 1] == 1
    # a worker process opens the file itself, memory-mapped
    code = ("import pickle, sys, numpy as np; s = pickle.load(sys.stdin.buffer); "
            "assert isinstance(s.labels, np.memmap) and len(s) == %d; print(s.path(7))" % n)
    out = subprocess.run([sys.executable, '-c', code], input=pickle.dumps(saved), capture_output=True,
                         cwd=os.path.dirname(layouts.__file__), check=True).stdout
    assert out.decode().strip() == str(tmp_path / 'n01/00000007.JPEG')


def test_the_guard_leaves_out_the_validation_videos_it_counts(tmp_path):
    """Ids from the file names (any layout); counts by hand: a training video that two validation sets hold
    counts for both and is left out once; a file name without an id is never left out."""
    def listing(names):
        return layouts.Listing.from_pairs(str(tmp_path), ['a'], [(str(tmp_path / n), 0) for n in names])

    clip = '{}_000001_000011.mp4'.format
    train = listing([clip('AAAAAAAAAAA'), clip('BBBBBBBBBBB'), clip('CCCCCCCCCCC'), 'x/CCCCCCCCCCC.mp4',
                     clip('DDDDDDDDDDD').replace('.mp4', '.webm'), 'short_000001_000011.mp4'])
    assert train.ids.tolist() == [b'AAAAAAAAAAA', b'BBBBBBBBBBB', b'CCCCCCCCCCC', b'', b'DDDDDDDDDDD', b'']
    val = {'one': listing([clip('BBBBBBBBBBB'), clip('DDDDDDDDDDD'), 'plain.mp4']),
           'two': listing(['y/' + clip('BBBBBBBBBBB')])}
    kept = layouts.leave_out(train, val, str(tmp_path / 'guarded'))
    assert kept.left_out == {'total': 2, 'of': {'one': 2, 'two': 1}, 'unchecked': 2}  # 2 names give no id
    assert [os.path.basename(kept.path(i)) for i in range(len(kept))] == [
        clip('AAAAAAAAAAA'), clip('CCCCCCCCCCC'), 'CCCCCCCCCCC.mp4', 'short_000001_000011.mp4']
    assert isinstance(kept.labels, np.memmap) and len(pickle.dumps(kept)) < 500  # to workers as a file name
    assert layouts.Listing.load(kept.file).left_out == kept.left_out
    assert runtime.guard_lines(argparse.Namespace(train_on_val_videos=False), ['mine'], [data.ClipDataset(
        data.custom_spec('mine', kept.paths), kept)])[1] == \
        "    mine: 2 left out (validation videos of one: 2, two: 1); 2 not checked (their file names give no YouTube id)"
    assert layouts.leave_out(listing([clip('AAAAAAAAAAA'), clip('BBBBBBBBBBB')]), val).left_out == \
        {'total': 1, 'of': {'one': 1, 'two': 1}}  # every sample has an id: none unchecked
    assert layouts.leave_out(listing(['plain.mp4']), val).left_out is None  # no ids: not checked
    with pytest.raises(layouts.DatasetError, match='every training sample .* is a validation video of one'):
        layouts.leave_out(listing([clip('BBBBBBBBBBB')]), val)


def test_a_listing_saved_without_ids_reads_them_from_its_paths(tmp_path, monkeypatch):
    paths = np.array([b'k/ABCDEFGHIJK_000001_000011.mp4', b'k/x.mp4'])
    np.save(tmp_path / 'old.npy', np.rec.fromarrays([paths, np.zeros(2, np.int32)], names='path,label'))
    (tmp_path / 'old.json').write_text(json.dumps({'root': str(tmp_path), 'classes': ['a'], 'problems': {}}))
    calls = []
    read = layouts.youtube_ids
    monkeypatch.setattr(layouts, 'youtube_ids', lambda paths: calls.append(len(paths)) or read(paths))
    old = layouts.Listing.load(str(tmp_path / 'old'))
    assert calls == []  # not at every load (each worker loads it): when first asked for, once
    assert old.ids.tolist() == [b'ABCDEFGHIJK', b''] and old.left_out is None
    assert old.ids.tolist() == [b'ABCDEFGHIJK', b''] and calls == [2]


def test_a_guarded_listing_is_saved_once_and_read_by_the_others(tmp_path, monkeypatch):
    """The first process saves the kept samples under a hash of them; another rank (or a later start) finds
    them and reads them, and a listing that changed is saved anew. Two hosts whose processes have one pid
    save to one shared folder: each save's temporary files are its own."""
    clip = '{}_000001_000011.mp4'.format

    def listing(ids):
        return layouts.Listing.from_pairs(str(tmp_path), ['a'], [(str(tmp_path / clip(i * 11)), 0) for i in ids])

    val = {'v': listing('B')}
    first = layouts.leave_out(listing('ABC'), val, str(tmp_path / 'k-train-guarded'))
    saved = sorted(os.listdir(tmp_path))
    assert [f for f in saved if f.endswith('.json')] == [os.path.basename(first.file) + '.json']

    def no_save(self, file):
        raise AssertionError(f'saved again: {file}')

    with monkeypatch.context() as m:
        m.setattr(layouts.Listing, 'save', no_save)
        other = layouts.leave_out(listing('ABC'), val, str(tmp_path / 'k-train-guarded'))  # rank 1: reads it
    assert other.file == first.file and other.paths.tolist() == first.paths.tolist() and sorted(os.listdir(tmp_path)) == saved
    changed = layouts.leave_out(listing('ABCD'), val, str(tmp_path / 'k-train-guarded'))
    assert changed.file != first.file and len(changed) == 3

    monkeypatch.setattr(os, 'getpid', lambda: 4242)  # the same pid on two hosts
    replace, nested = os.replace, []

    def replace_after_another_save(src, dst):  # the other host saves the same file between write and rename
        if not nested:
            nested.append(src)
            listing('XY').save(str(tmp_path / 'shared'))
        replace(src, dst)

    monkeypatch.setattr(os, 'replace', replace_after_another_save)
    assert len(listing('XY').save(str(tmp_path / 'shared'))) == 2
    assert not [f for f in os.listdir(tmp_path) if '.tmp-' in f]
