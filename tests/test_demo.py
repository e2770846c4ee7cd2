"""demo.py: the demo sets are written deterministically, in the real layouts, once, and anew when the
generator changes."""

import json
import os

import numpy as np
import pytest
import torch

import data
import demo
import train
import video

MOTION_STEPS = 750  # well past the point where the recipe finds the order of frames


def pairs(ds):
    return [(ds.samples.path(i), int(ds.samples.labels[i])) for i in range(len(ds))]


@pytest.fixture
def small_demo(monkeypatch):
    monkeypatch.setattr(demo, 'TRAIN_PER_CLASS', {'demo_kinetics': 2, 'demo_ssv2': 2, 'demo_imagenet': 2})
    monkeypatch.setattr(demo, 'VAL_PER_CLASS', 1)


def test_demo_generation_is_deterministic_and_parses(tmp_path, small_demo, capsys):
    runs = []
    for d in ['a', 'b']:
        out = {}
        demo.prepare(str(tmp_path / d))
        for name in demo.NAMES:
            tr = data.build_dataset(name, tmp_path / d, 'train', img_size=32)
            va = data.build_dataset(name, tmp_path / d, 'val', img_size=32)
            assert len(tr) == 2 * 6 and len(va) == 6 and tr.problems == {} and len(tr.classes) == 6
            path = tr.samples.path(0)
            first = video.load_image(path) if tr.spec.kind == 'image' else video.read_video(path, [0])[0]
            out[name] = ([(os.path.relpath(p, tmp_path / d), y) for p, y in pairs(tr) + pairs(va)], tr.classes, first)
            assert tr[(0, 0)]['x'].shape == ((1, 3, 8, 32, 32) if tr.spec.kind == 'video' else (1, 3, 1, 32, 32))
        runs.append(out)
    for name in demo.NAMES:
        assert runs[0][name][0] == runs[1][name][0] and runs[0][name][1] == runs[1][name][1]
        np.testing.assert_array_equal(runs[0][name][2], runs[1][name][2])
    printed = capsys.readouterr().out
    assert printed.count('generated demo dataset') == 6 and ' s\n' in printed
    assert runs[0]['demo_kinetics'][1] == sorted(demo.SHAPES)
    assert runs[0]['demo_ssv2'][1][0] == 'Moving something from left to right'
    root = tmp_path / 'a' / 'demo_kinetics'
    assert sorted(os.listdir(root)) == ['DEMO_VERSION', 'annotations', 'train', 'val']
    assert open(root / 'annotations' / 'train.csv').readline().strip() == 'label,youtube_id,time_start,time_end,split'
    assert not [p for p in os.listdir(tmp_path / 'a') if '.tmp-' in p]  # temp folders renamed away
    n, fps = video.video_info(data.build_dataset('demo_ssv2', tmp_path / 'a', 'train').samples.path(0))
    assert fps == demo.FPS and demo.LENGTH[0] <= n <= demo.LENGTH[1]


def test_both_readers_give_the_demo_the_same_bytes(tmp_path, small_demo, monkeypatch):
    """The demo's clips, training and test views, are the same with or without PyAV: same lengths, same
    frames (so the demo's numbers do not depend on which reader is installed)."""
    demo.prepare(str(tmp_path))
    for name in ['demo_kinetics', 'demo_ssv2']:
        items = {}
        for backend in ['pyav', 'opencv']:
            monkeypatch.setattr(video, 'BACKEND', backend)
            tr = data.build_dataset(name, tmp_path, 'train', img_size=32)
            va = data.build_dataset(name, tmp_path, 'val', img_size=32)
            items[backend] = [tr[(i, 7 * i, 2)]['x'] for i in range(len(tr))] + [va[i]['x'] for i in range(len(va))]
        assert all(torch.equal(a, b) for a, b in zip(items['pyav'], items['opencv']))


def test_demo_is_not_regenerated_when_present(tmp_path, small_demo, monkeypatch):
    demo.prepare(str(tmp_path), ['demo_imagenet'])
    monkeypatch.setattr(demo, 'MAKERS', {'demo_imagenet': None})  # would fail if it tried to write again
    demo.prepare(str(tmp_path), ['demo_imagenet'])
    assert len(data.build_dataset('demo_imagenet', tmp_path, 'val')) == 6


def test_demo_from_an_older_generator_is_regenerated(tmp_path, small_demo, monkeypatch, capsys):
    demo.prepare(str(tmp_path), ['demo_imagenet'])
    stamp = tmp_path / 'demo_imagenet' / 'DEMO_VERSION'
    assert stamp.read_text().strip() == str(demo.VERSION)
    stamp.unlink()  # as a folder written before versions existed
    (tmp_path / 'demo_imagenet' / 'train' / 'stale.txt').write_text('from the old generator')
    demo.prepare(str(tmp_path), ['demo_imagenet'])
    assert len(data.build_dataset('demo_imagenet', tmp_path, 'val')) == 6
    assert 'older demo generator' in capsys.readouterr().out
    assert stamp.exists() and not (tmp_path / 'demo_imagenet' / 'train' / 'stale.txt').exists()
    assert sorted(os.listdir(tmp_path)) == ['demo_imagenet']  # no stale or temp folder left behind


def test_image_crop_scale_comes_from_the_spec(tmp_path, small_demo, monkeypatch):
    """demo_imagenet's one big object would be missed by an 8% crop: its spec asks for >= 35% of the area."""
    seen = []
    real = data.random_resized_box
    monkeypatch.setattr(data, 'random_resized_box', lambda h, w, rng, scale: seen.append(scale) or real(h, w, rng, scale))
    demo.prepare(str(tmp_path), ['demo_imagenet'])
    data.build_dataset('demo_imagenet', tmp_path, 'train', img_size=32)[(0, 0)]
    assert seen == [(0.35, 1.0)] and data.SPECS['in1k'].min_area == 0.08


def test_data_limited_sets_nest_keep_their_validation_and_still_means_still(tmp_path):
    """The study's sets: N = 1 training clips a class are the first of N = 2, the validation clips are the
    same for both, and demo_few_kinetics' 'still' shapes move less than its 'moving' ones."""
    def files(root):
        return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), 'rb').read()
                for d, _, fs in os.walk(root) for f in fs if f.endswith(('.mp4', '.JPEG', '.csv'))}
    sets = {}
    for n in (1, 2):
        demo.prepare(str(tmp_path / f'n{n}'), ['demo_few_kinetics', 'demo_few_images'], train_per_class=n,
                     val_per_class=2)
        sets[n] = {name: files(tmp_path / f'n{n}' / name) for name in ('demo_few_kinetics', 'demo_few_images')}
    for name in sets[1]:
        val = {k: v for k, v in sets[1][name].items() if 'val' in k and not k.endswith('.csv')}
        assert val and all(sets[2][name][k] == v for k, v in val.items())
        train1 = [v for k, v in sets[1][name].items() if 'train' in k and not k.endswith('.csv')]
        assert train1 and set(train1) <= set(sets[2][name].values())
    ds = data.build_dataset('demo_few_kinetics', tmp_path / 'n2', 'train', img_size=32)
    assert ds.classes == sorted(f'{s} {m}' for s in ('circle', 'triangle', 'cross') for m in ('still', 'moving'))
    travel = {}  # how far the bright shape's centre goes over the clip, in pixels
    for i in range(len(ds)):
        frames = video.read_video(ds.samples.path(i), range(demo.LENGTH[0])).max(axis=-1)
        centres = np.array([np.argwhere(f > 200).mean(axis=0) for f in frames])
        state = ds.classes[ds.samples.labels[i]].split()[1]
        travel.setdefault(state, []).append(np.linalg.norm(np.diff(centres, axis=0), axis=1).sum())
    assert max(travel['still']) < min(travel['moving']), travel
    assert data.build_dataset('demo_few_images', tmp_path / 'n2', 'val').classes == ['n90000000', 'n90000001',
                                                                                       'n90000002']


def test_unknown_demo_name_is_refused():
    with pytest.raises(data.DatasetError, match='demo sets are'):
        demo.prepare('unused', ['demo_nope'])


def test_the_demo_recipe_learns_the_direction_of_motion(tmp_path):
    """The motion set's labels are directions (left/right, up/down, towards/away): a model blind to the
    order of frames stays at 50% within each pair. A short run of the demo recipe on demo_ssv2 alone must
    tell directions apart on the validation clips it never saw."""
    out = tmp_path / "out"
    train.main(["--recipe", "demo", "--datasets", "demo_ssv2", "--data_dir", str(tmp_path / "data"),
                "--out_dir", str(out), "--max_steps", str(MOTION_STEPS), "--eval_every", "0", "--workers", "1"])
    top1 = json.load(open(out / "eval.json"))["demo_ssv2"]["top1"]
    assert top1 >= 0.7, top1  # pairs told apart; chance is 1/6, blind to the order of frames 1/2
