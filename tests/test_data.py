"""data.py: the schedule and the sampler's streams, sampling math against cases computed by hand, and datasets
on real encoded files that each test writes into tmp_path (never ../shared)."""

import math
import os

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import data  # conftest.py puts the project root on sys.path
import demo  # noqa: F401  (registers the demo sets' specs)
import loaders
import video
from layouts import Listing
from media import band_frames, decode_all, make_ssv2, noise_frames, tiny_video, write_image, write_video


def one_file(spec_name, path, **kw):
    """An eval-mode dataset of the single file `path`."""
    return data.ClipDataset(data.SPECS[spec_name], Listing.from_pairs(os.path.dirname(path), ['a'], [(path, 0)]),
                            train=False, **kw)


# ----------------------------------------------------------------------------- schedule and sampler


def test_schedule_round_robin_and_weighted():
    assert [data.schedule(s, [1, 1, 1]) for s in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert [data.schedule(s, [2.0, 2.0]) for s in range(4)] == [0, 1, 0, 1]
    assert [data.schedule(s, [2, 1]) for s in range(6)] == [0, 1, 0, 0, 1, 0]  # smooth weighted round robin
    assert [data.schedule(s, [0.5, 0.25, 0.25]) for s in range(8)] == [0, 1, 2, 0, 0, 1, 2, 0]
    w = [3, 1.5, 0.7]
    counts = np.bincount([data.schedule(s, w) for s in range(5200)], minlength=3)
    np.testing.assert_allclose(counts / 5200, np.array(w) / sum(w), atol=1e-3)
    for s in [0, 1, 7, 52, 99, 1000]:
        for d in range(3):
            assert data.steps_before(s, d, w) == sum(data.schedule(t, w) == d for t in range(s))
    with pytest.raises(ValueError):
        data.schedule(0, [1, 0])


def test_whole_number_weights_give_each_dataset_exactly_its_steps():
    """--epochs makes the weights each dataset's steps, the run their sum: past 100,000 steps a period they are
    kept exactly (not rounded to 1/10,000), so the run is one period and each dataset gets its budget, spread
    as evenly as before (after t steps, dataset d has had t x its share, give or take less than one step)."""
    for w in [[225_000, 53_000, 43_203], [109_687, 8]]:
        run = sum(w)
        assert [data.steps_before(run, d, w) for d in range(len(w))] == w
        order = np.frombuffer(data.interleave(tuple(float(k) for k in w)), np.uint8)
        t = np.arange(1, run + 1)
        assert len(order) == run and all(np.abs(np.cumsum(order == d) - t * k / run).max() < 1 for d, k in enumerate(w))
        # a peer of the rule on the first steps: step t goes to the dataset furthest behind t x its share
        had = [0] * len(w)
        for step in range(3000):
            d = max(range(len(w)), key=lambda i: ((step + 1) * w[i] - run * had[i], -i))
            assert data.schedule(step, w) == d
            had[d] += 1


def test_grad_accum_micro_batches_share_a_dataset():
    smp = data.MultiDatasetBatchSampler([50, 30, 20], [2, 3, 4], weights=[2, 1, 1], grad_accum=4)
    ds_of = [smp.batch(m)[0][0] for m in range(64)]
    assert all(ds_of[m] == ds_of[m - m % 4] for m in range(64))
    assert ds_of[::4] == [data.schedule(s, [2, 1, 1]) for s in range(16)]
    assert all(len(smp.batch(m)) == [2, 3, 4][ds_of[m]] for m in range(64))
    # dataset 0 (8 of the 16 steps, 4 micro-batches of 2) reads its stream without gaps: epoch 0 is a permutation
    keys0 = [k for m in range(64) for k in smp.batch(m) if k[0] == 0]
    assert len(keys0) == 8 * 4 * 2 and sorted(k[1] for k in keys0[:50]) == list(range(50))


def test_one_process_reads_the_pinned_keys():
    """World 1: the keys of the streams as they have always been (the demo's numbers and every resumed run
    depend on them), written out."""
    smp = data.MultiDatasetBatchSampler([7, 4], [3, 2], [1, 2], seed=5)
    assert [smp.batch(m) for m in range(4)] == [
        [(1, 2, 8998383282213416150), (1, 0, 36080290488236166)],
        [(0, 1, 6315739163131927091), (0, 4, 1017089499078358358), (0, 2, 4611015874644486473)],
        [(1, 3, 104331856019241716), (1, 1, 6148511947802144829)],
        [(1, 1, 6058759078026276609), (1, 0, 6321458344578365835)]]
    perm = np.random.default_rng([5, 0, 0]).permutation(7)  # dataset 0, epoch 0; its sample seeds by position
    seeds = [int(np.random.SeedSequence([5, 0, 0, j]).generate_state(1, np.uint64)[0] >> 1) for j in range(3)]
    assert smp.batch(1) == [(0, int(i), s) for i, s in zip(perm[:3], seeds)]


@pytest.mark.parametrize('world,n', [(2, 10), (3, 10), (3, 11), (2, 1)])
def test_ddp_ranks_read_slices_of_the_one_process_stream(world, n):
    """Rank r's micro-batch is the r-th slice of what one process reads with the global batch: every epoch
    is read whole over the ranks (n odd, or fewer samples than ranks, too), each sample with its own seed."""
    b, accum, weights = 2, 2, [1, 2]
    one = data.MultiDatasetBatchSampler([n, 5], [b * world, 3 * world], weights, accum, seed=3)
    ranks = [data.MultiDatasetBatchSampler([n, 5], [b, 3], weights, accum, rank=r, world=world, seed=3)
             for r in range(world)]
    for m in range(24):
        assert [k for smp in ranks for k in smp.batch(m)] == one.batch(m)
    read = [k for m in range(24) for smp in ranks for k in smp.batch(m) if k[0] == 0]  # 8 steps of 2 x 2 x world
    epochs = len(read) // n
    assert sorted(k[1] for k in read[:epochs * n]) == sorted(list(range(n)) * epochs)
    assert len({k[2] for k in read}) == len(read)  # distinct augmentation per sample


@pytest.mark.parametrize('before, after', [((2, 1), (1, 1)), ((1, 1), (2, 1)), ((2, 1), (3, 1)), ((2, 1), (1, 2))])
def test_a_resume_with_another_world_size_reads_on_where_the_run_stopped(before, after):
    """The same global batch (6 samples a step) over (processes, --grad_accum) `before` for 5 steps, then
    over `after`: every step reads the keys one process reads, so no sample is read twice or skipped."""
    def step_keys(step, world, accum):
        ranks = [data.MultiDatasetBatchSampler([7, 11], [6 // world // accum] * 2, [2, 1], accum, rank=r,
                                               world=world, seed=1) for r in range(world)]
        return sorted(k for smp in ranks for m in range(accum) for k in smp.batch(step * accum + m))
    for step in range(5, 12):
        assert step_keys(step, *after) == step_keys(step, *before) == step_keys(step, 1, 1)


def test_stream_crosses_epochs_without_a_seam():
    smp = data.MultiDatasetBatchSampler([5], [2], seed=1)
    flat = [k[1] for m in range(5) for k in smp.batch(m)]   # 10 positions = exactly 2 epochs
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:]) == list(range(5))

# ----------------------------------------------------------------------------- datasets of real files

@pytest.mark.parametrize('backend', ['pyav', 'opencv', 'header'])
def test_truncated_webm_header_lies_and_dataset_recovers(tmp_path, monkeypatch, backend):
    """A truncated webm keeps its header (claims 40 frames) but decodes fewer: where a reader takes the
    header's count, the dataset re-samples with the true length instead of crashing or clamping into the wrong
    range. Both readers count the frames there are, so they know the true length from the start; the bytes
    are the same either way."""
    monkeypatch.setattr(video, 'BACKEND', 'pyav' if backend == 'pyav' else 'opencv')
    if backend == 'header':
        monkeypatch.setattr(video.OpenCVVideo, 'length', STATED)
    root = tmp_path / 'cust'
    path = write_video(root / 'a.webm', noise_frames(40, seed=5))
    blob = open(path, 'rb').read()
    open(path, 'wb').write(blob[:int(len(blob) * 0.6)])
    true_n = len(decode_all(path))
    assert 5 < true_n < 40 and video.video_info(path) == ((40, 12.0) if backend == 'header' else (true_n, 12.0))
    (root / 'train.csv').write_text('a.webm 0\n')
    (root / 'val.csv').write_text('a.webm 0\n')
    ev = data.build_dataset('cust', tmp_path, 'val', frames=8, img_size=32)
    item = ev[0]
    assert item['ok']
    expect = video.read_video(path, data.segment_indices(true_n, 8))  # the middle of 8 true segments
    box = video.eval_video_boxes(48, 64, 3)[1]
    np.testing.assert_array_equal(item['x'][1].permute(1, 2, 3, 0).numpy(), video.crop_resize(expect, box, 32))
    assert ev.lengths == ({path: true_n} if backend == 'header' else {})  # learned where the header lied
    # train: same key -> same bytes, whether the true length is already known or not; with R clips from
    # one decode too, every window redrawn from its own seed inside the true length
    for R in (1, 3):
        tr = data.build_dataset('cust', tmp_path, 'train', frames=8, img_size=32)
        a = tr[(0, 123, R)]
        assert a['failed'] == [] and a['x'].shape[0] == R and torch.equal(a['x'], tr[(0, 123, R)]['x'])
        fresh = data.build_dataset('cust', tmp_path, 'train', frames=8, img_size=32)
        fresh.lengths[path] = true_n  # as if the true length had been known from the start
        assert torch.equal(a['x'], fresh[(0, 123, R)]['x'])


# a reader that takes a header's frame count (OpenCV's, as a reader that trusts headers would): a truncated
# webm's 40 frames stated, which data.py finds out by a read past the true end
STATED = property(lambda self: int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT)))


def header_reader(_=None):
    """A DataLoader worker's start: read with OpenCV, believing a webm header's frame count."""
    video.BACKEND = 'opencv'
    video.OpenCVVideo.length = STATED


def test_a_lying_header_gives_the_same_bytes_whatever_was_read_before(tmp_path, monkeypatch):
    """A truncated webm claims 40 frames and has fewer. Windows drawn from 40 that end before the true end
    are kept, the others drawn again from the true length: the same bytes for a key whether the process
    found the true length out before (keys in another order) or not, with 0, 1 or 2 loader workers."""
    monkeypatch.setattr(video, 'BACKEND', 'opencv')
    monkeypatch.setattr(video.OpenCVVideo, 'length', STATED)
    path = write_video(tmp_path / 'cust' / 'a.webm', noise_frames(40, seed=5))
    blob = open(path, 'rb').read()
    open(path, 'wb').write(blob[:int(len(blob) * 0.6)])
    true_n = len(decode_all(path))
    (tmp_path / 'cust' / 'train.csv').write_text('a.webm 0\n')
    kinetics = {'sampling': 'kinetics', 'rate': 5}  # 4 frames 2 apart: windows that fit the true length too
    tr = data.build_dataset('cust', tmp_path, 'train', frames=4, img_size=16, sampling=kinetics)
    # the window key (0, s) draws from the 40 frames stated (ClipDataset.train_item's seeds)
    window = [int(np.random.default_rng(s).integers(0, 2**63, size=(1, 2))[0, 0]) for s in range(40)]
    stated = {s: data.kinetics_indices(40, 4, 5, 12.0, rng=np.random.default_rng(w)) for s, w in enumerate(window)}
    fits = [s for s in stated if stated[s].max() < true_n]
    keys = [(0, s, 1) for s in fits[:3]] + [(0, s, 1) for s in stated if s not in fits][:3]
    assert len(keys) == 6 and 5 < true_n < 40
    reads = []
    for order, workers in [(keys, 0), (keys[::-1], 0), (keys, 1), (keys[::-1], 2)]:
        loader = torch.utils.data.DataLoader(tr, batch_size=None, sampler=order, num_workers=workers,
                                             worker_init_fn=header_reader, multiprocessing_context='forkserver'
                                             if workers else None)
        reads.append({key: item['x'] for key, item in zip(order, loader)})
    for r in reads[1:]:
        assert all(torch.equal(r[key], reads[0][key]) for key in keys)
    assert tr.lengths == {path: true_n}  # found out by the first read past the true end, kept
    for views in [(1, 1), (3, 1)]:  # the test clips too: the middle one fits, the last does not
        fresh, knows = (data.build_dataset('cust', tmp_path, 'train', frames=4, img_size=16, train=False,
                                           sampling=kinetics, views=views) for _ in range(2))
        knows.lengths[path] = true_n
        assert torch.equal(fresh[0]['x'], knows[0]['x'])


def test_test_views_of_a_lying_header_follow_the_test_rule_on_the_true_length(tmp_path, monkeypatch):
    """A truncated webm claims 40 frames (a reader that takes the header believes it). Three test clips of 4
    frames at rate 5 (12 fps: 2 frames apart, a span of 8): clip k starts at floor((n - 8) * (2k + 1) / 6) of
    the true n, in order and evenly spread, though the first two clips drawn from the 40 stated would fit. The
    same views whether the process knew the true length before or not."""
    monkeypatch.setattr(video, 'BACKEND', 'opencv')
    monkeypatch.setattr(video.OpenCVVideo, 'length', STATED)
    path = write_video(tmp_path / 'cust' / 'a.webm', noise_frames(40, seed=5))
    blob = open(path, 'rb').read()
    open(path, 'wb').write(blob[:int(len(blob) * 0.6)])
    frames = decode_all(path)
    n = len(frames)
    # drawn from the 40 stated, clips 0 and 1 (frames 5-11, 16-22) fit the true length, clip 2 (26-32) does not
    assert video.video_info(path) == (40, 12.0) and 22 < n <= 32
    (tmp_path / 'cust' / 'val.csv').write_text('a.webm 0\n')
    (tmp_path / 'cust' / 'train.csv').write_text('a.webm 0\n')
    kinetics = {'sampling': 'kinetics', 'rate': 5}
    fresh, knows = (data.build_dataset('cust', tmp_path, 'val', frames=4, img_size=16, sampling=kinetics,
                                       views=(3, 1)) for _ in range(2))
    knows.lengths[path] = n
    starts = [(n - 8) * (2 * k + 1) // 6 for k in range(3)]
    box = video.eval_video_boxes(48, 64, 1)[0]
    expect = [video.crop_resize(frames[s:s + 8:2], box, 16) for s in starts]  # (T, 16, 16, 3) each
    for ds in (fresh, knows, fresh):
        x = ds[0]['x'].permute(0, 2, 3, 4, 1).numpy()  # (V, T, H, W, C)
        assert all(np.array_equal(x[k], expect[k]) for k in range(3)), starts
    assert fresh.lengths == {path: n}


def test_large_jpeg_is_decoded_only_as_large_as_the_crop_needs(tmp_path):
    """A 640x480 JPEG rotated by EXIF: the header gives the displayed size, a reduced decode is the
    displayed image at 1/4 scale, and the crops made from it match crops from the full decode."""
    yy, xx = np.mgrid[0:480, 0:640]
    img = np.stack([xx * 255 // 639, yy * 255 // 479, np.full_like(xx, 90)], -1).astype(np.uint8)  # smooth ramps
    img[100:200, 50:300] = (250, 250, 250)  # a white block: where it lands shows the orientation
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(img).save(tmp_path / 'big.jpg', exif=exif, quality=95)
    full = video.load_image(tmp_path / 'big.jpg')
    assert full.shape[:2] == (640, 480)
    small = video.load_image(tmp_path / 'big.jpg', reduce=4.5)  # 4.5x fits 4x, not 8x
    assert small.shape == (160, 120, 3)
    np.testing.assert_allclose(small.astype(float), cv2.resize(full, (120, 160), interpolation=cv2.INTER_AREA), atol=12)
    for ext in ['png', 'tiff']:  # no reduced decoding there: the crops come from the full image
        Image.fromarray(img).save(tmp_path / f'big.{ext}', exif=exif)
        ds = one_file('in1k', str(tmp_path / f'big.{ext}'), img_size=32)
        view = ds[0]['x'][0, :, 0].permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(view, video.crop_resize(video.load_image(tmp_path / f'big.{ext}')[None],
                                                              video.eval_image_box(640, 480, 32), 32)[0])
    ds = one_file('in1k', str(tmp_path / 'big.jpg'), img_size=32)
    view = ds[0]['x'][0, :, 0].permute(1, 2, 0).numpy().astype(float)  # (32, 32, 3), from a 1/8-size decode
    box = video.eval_image_box(640, 480, 32)
    ref = video.crop_resize(full[None], box, 32)[0]
    assert np.abs(view - ref).mean() < 4, np.abs(view - ref).mean()


def test_each_jpeg_crop_is_decoded_as_if_it_were_alone(tmp_path):
    """R crops of a large JPEG: each box is decoded at the size it needs alone (1/1 to 1/8), so clip r of R
    is the clip R = 1 gives for its seeds; the decode size is Pillow's draft, read off without decoding."""
    yy, xx = np.mgrid[0:480, 0:640]
    img = np.stack([xx * 255 // 639, yy * 255 // 479, (xx * yy) % 256], -1).astype(np.uint8)
    os.makedirs(tmp_path / 'pics' / 'train' / 'a')
    path = str(tmp_path / 'pics' / 'train' / 'a' / 'big.jpg')
    Image.fromarray(img).save(path, quality=90)
    for reduce in [1.5, 2, 2.01, 3.9, 4, 5.3, 7.99, 8, 9, 17]:  # Pillow's choice against draft_scale's
        with Image.open(path) as im:
            scale = video.draft_scale(im, reduce)
            if reduce >= 2:  # as rgb_image asks
                im.draft(None, (math.ceil(640 / reduce), math.ceil(480 / reduce)))
            assert im.size == (math.ceil(640 / scale), math.ceil(480 / scale)), reduce
    ds = data.build_dataset('pics', tmp_path, 'train', img_size=32)
    mixed = 0
    for seed in range(8):
        seeds = np.random.default_rng(seed).integers(0, 2**63, size=(4, 2))
        clips = ds.train_clips(path, seeds)  # (R, T, H, W, 3)
        for r in range(4):
            np.testing.assert_array_equal(clips[r], ds.train_clips(path, seeds[r:r + 1])[0])
        boxes = [video.random_resized_box(480, 640, np.random.default_rng(int(s)), (0.08, 1.0)) for s in seeds[:, 1]]
        with Image.open(path) as im:
            mixed += len({video.draft_scale(im, min(b[2], b[3]) / 32) for b in boxes}) > 1
    assert mixed  # some samples' crops needed decodes of different sizes


@pytest.mark.parametrize('backend', ['pyav', 'opencv'])
def test_repeated_sampling_takes_several_clips_from_one_decode(tmp_path, monkeypatch, backend):
    """R training clips of one video: one open of the file (its length, then one decode) for all R, R
    different windows (each frames 32 apart), crops and flips of their own, and clip 0 is the clip R = 1
    gives for the same key."""
    monkeypatch.setattr(video, 'BACKEND', backend)
    write_video(tmp_path / 'k400' / 'train' / 'a' / 'v.mp4', noise_frames(300, 48, 64), fps=30)
    opens, reads = [], []
    real_open, real_read = data.open_video, video.Video.read
    monkeypatch.setattr(data, 'open_video', lambda p: opens.append(p) or real_open(p))
    monkeypatch.setattr(video.Video, 'read', lambda v, idx: reads.append(np.asarray(idx)) or real_read(v, idx))
    ds = data.build_dataset('k400', tmp_path, 'train', frames=8, img_size=32)
    x = ds[(0, 7, 4)]['x']
    assert x.shape == (4, 3, 8, 32, 32) and len(opens) == 1 and len(reads) == 1  # one open: length, then frames
    windows = reads[0].reshape(4, 8)
    assert (np.diff(windows, axis=1) == 32).all() and len(set(windows[:, 0].tolist())) > 1
    assert all(not torch.equal(x[i], x[j]) for i in range(4) for j in range(i))
    ds[(0, 8, 4)]
    assert len(opens) == 2  # one open per sample
    assert torch.equal(ds[(0, 7, 1)]['x'][0], x[0])
    img = write_image(tmp_path / 'in1k' / 'train' / 'n1' / 'a.JPEG', (60, 80))
    pics = data.build_dataset('in1k', tmp_path, 'train', img_size=16)
    x = pics[(0, 5, 3)]['x']
    assert x.shape == (3, 3, 1, 16, 16) and not torch.equal(x[0], x[1])  # three crops of one image
    assert torch.equal(pics[(0, 5)]['x'][0], x[0]) and img


# ----------------------------------------------------------------------------- temporal sampling


def test_kinetics_indices_hand_computed():
    # 300 frames at 30 fps, 8 x 32: span 256, room 44, middle start 22, every 32nd frame
    np.testing.assert_array_equal(data.kinetics_indices(300, 8, 32, 30.0, 0, 1), [22, 54, 86, 118, 150, 182, 214, 246])
    # 25 fps: 32 frames at 30 fps = 26.67 file frames; span 213.3, room 86.7, start floor(43.3) = 43,
    # frames floor(43 + i * 26.67)
    np.testing.assert_array_equal(data.kinetics_indices(300, 8, 32, 25.0, 0, 1), [43, 69, 96, 123, 149, 176, 203, 229])
    # 3 test clips: starts floor(44 * (k + 0.5) / 3) = 7, 22, 36
    for k, start in enumerate([7, 22, 36]):
        np.testing.assert_array_equal(data.kinetics_indices(300, 8, 32, 30.0, k, 3), start + 32 * np.arange(8))
    # short video: start 0, clamped to the last frame
    np.testing.assert_array_equal(data.kinetics_indices(100, 8, 32, 30.0, 0, 1), [0, 32, 64, 96, 99, 99, 99, 99])
    np.testing.assert_array_equal(data.kinetics_indices(1, 8, 32, 30.0, 0, 1), np.zeros(8))
    starts = {int(data.kinetics_indices(300, 8, 32, 30.0, rng=np.random.default_rng(s))[0]) for s in range(400)}
    assert starts == set(range(45))  # train: every integer start in [0, 44]
    idx = data.kinetics_indices(300, 8, 32, 30.0, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(np.diff(idx), 32)


def test_segment_indices_hand_computed():
    np.testing.assert_array_equal(data.segment_indices(10, 4), [1, 3, 6, 8])  # floor((k + .5) * 2.5)
    np.testing.assert_array_equal(data.segment_indices(3, 8), [0, 0, 0, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(data.segment_indices(1, 8), np.zeros(8))
    np.testing.assert_array_equal(data.segment_indices(80, 8), np.arange(8) * 10 + 5)
    seen = np.stack([data.segment_indices(80, 8, np.random.default_rng(s)) for s in range(300)])
    assert ((seen // 10) == np.arange(8)).all()  # one frame inside each segment [10k, 10k + 9]
    assert {int(v) for v in seen[:, 3]} == set(range(30, 40))

# ----------------------------------------------------------------------------- views, flips, items


def test_test_views_left_centre_right_and_portrait(tmp_path):
    root = tmp_path / 'views'
    write_video(root / 'land.mp4', band_frames(6, 48, 96))
    write_video(root / 'port.mp4', band_frames(6, 96, 48))
    (root / 'train.csv').write_text('land.mp4 0\nport.mp4 0\n')
    (root / 'val.csv').write_text('land.mp4 0\nport.mp4 0\n')
    ds = data.build_dataset('views', tmp_path, 'val', frames=4, img_size=32)
    assert ds.num_views == 3
    for i in range(2):
        x = ds[i]['x']
        assert x.shape == (3, 3, 4, 32, 32) and x.dtype == torch.uint8
        for v, colour in enumerate(range(3)):  # view v sits on band v: red, green, blue
            means = x[v].float().mean(dim=(1, 2, 3))
            assert means.argmax() == colour, (i, v, means)


def test_views_override_and_single_file_views(tmp_path):
    root = tmp_path / 'k400'
    path = write_video(root / 'val' / 'a' / 'v.mp4', noise_frames(300, 24, 40), fps=30)
    os.makedirs(root / 'train' / 'a')
    ds = data.build_dataset('k400', tmp_path, 'val', frames=8, img_size=16, views=(2, 3))
    x = ds[0]['x']
    assert ds.num_views == 6 and x.shape == (6, 3, 8, 16, 16)
    for c in range(2):  # clip-major: views 3c..3c+2 are clip c's three crops
        frames = video.read_video(path, data.kinetics_indices(300, 8, 32, 30.0, c, 2))
        for k, box in enumerate(video.eval_video_boxes(24, 40, 3)):
            np.testing.assert_array_equal(x[3 * c + k].permute(1, 2, 3, 0).numpy(), video.crop_resize(frames, box, 16))
    assert torch.equal(data.load_test_views(path, 'k400', frames=8, img_size=16, views=(2, 3)), x)
    assert data.load_test_views(path, 'my_custom_set', frames=4, img_size=16).shape == (3, 3, 4, 16, 16)
    with pytest.raises(video.VideoError):
        data.load_test_views(str(tmp_path / 'nope.mp4'), 'k400')
    img = write_image(tmp_path / 'in1k' / 'val' / 'n1' / 'a.JPEG', (30, 50))
    write_image(tmp_path / 'in1k' / 'train' / 'n1' / 'a.JPEG')
    assert data.build_dataset('in1k', tmp_path, 'val', img_size=16, views=(1, 3))[0]['x'].shape == (3, 3, 1, 16, 16)
    assert data.build_dataset('in1k', tmp_path, 'val', img_size=16, views=(1, 1)).num_views == 1
    assert data.load_test_views(img, 'in1k', img_size=16).shape == (1, 3, 1, 16, 16)


def test_flip_policy(tmp_path):
    assert data.SPECS['k400'].flip and data.SPECS['demo_kinetics'].flip and data.SPECS['in1k'].flip
    assert not data.SPECS['ssv2'].flip and not data.SPECS['demo_ssv2'].flip
    frames = band_frames(6, colours=((255, 0, 0), (0, 0, 255)))  # red left half, blue right half
    write_video(tmp_path / 'k400' / 'train' / 'a' / 'v.mp4', frames)
    make_ssv2(tmp_path / 'ssv2', {'1': 'Pushing [something] from left to right'}, {}, frames)
    for name, should_flip in [('k400', True), ('ssv2', False)]:
        ds = data.build_dataset(name, tmp_path, 'train', frames=4, img_size=32)
        flipped = sum(bool(ds[(0, s)]['x'][0, 0, :, :, :4].float().mean() < 128) for s in range(30))  # red not left
        assert 0 < flipped < 30 if should_flip else flipped == 0, (name, flipped)


def test_item_shapes_and_determinism(tmp_path):
    root = tmp_path / 'mix'
    write_video(root / 'train' / 'a' / 'v.mp4', noise_frames(20, 40, 60))
    write_video(root / 'val' / 'a' / 'v.mp4', noise_frames(20, 40, 60))
    ds = data.build_dataset('mix', tmp_path, 'train', frames=8, img_size=32)
    a, b, c = ds[(0, 1)], ds[(0, 1)], ds[(0, 2)]
    assert a['x'].shape == (1, 3, 8, 32, 32) and a['x'].dtype == torch.uint8 and a['y'] == 0 and a['failed'] == []
    assert torch.equal(a['x'], b['x']) and not torch.equal(a['x'], c['x'])
    with pytest.raises(TypeError):
        ds[0]
    write_image(root / 'train' / 'b' / 'i.png')
    (root / 'train' / 'a' / 'v.mp4').unlink()
    (root / 'val' / 'a' / 'v.mp4').unlink()
    write_image(root / 'val' / 'b' / 'i.JPG')
    ds = data.build_dataset('mix', tmp_path, 'train', img_size=32)
    assert ds.spec.kind == 'image' and ds.spec.batch_scale == 4 and ds[(0, 0)]['x'].shape == (1, 3, 1, 32, 32)
    ev = data.build_dataset('mix', tmp_path, 'val', img_size=32)
    assert ev.num_views == 1 and ev[0]['x'].shape == (1, 3, 1, 32, 32) and ev[0]['ok']


def test_normalize():
    x = torch.randint(0, 256, (2, 3, 3, 4, 5, 5), dtype=torch.uint8)  # (B, V, C, T, H, W)
    out = data.Normalize((0.1, 0.2, 0.3), "0.5,0.25,0.2", "cpu")(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    ref = (x.float() / 255 - torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1, 1)) / torch.tensor([0.5, 0.25, 0.2]).view(3, 1, 1, 1)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(data.Normalize('0.5', [0.5], 'cpu')(x[0, 0]), x[0, 0].float() / 127.5 - 1)

# ----------------------------------------------------------------------------- bad files


def make_bad_video_set(root):
    good = tiny_video(root / 'good.mp4', 20)
    (root / 'zero.mp4').write_bytes(b'')
    blob = open(good, 'rb').read()
    (root / 'trunc.mp4').write_bytes(blob[:len(blob) // 2])
    (root / 'junk.mp4').write_bytes(np.random.default_rng(0).bytes(3000))
    (root / 'junk.webm').write_bytes(np.random.default_rng(1).bytes(3000))
    tiny_video(root / 'one.mp4', 1)
    tiny_video(root / 'short.webm', 3)
    tiny_video(root / 'gone.mp4', 5)
    names = ['good.mp4', 'zero.mp4', 'trunc.mp4', 'junk.mp4', 'junk.webm', 'one.mp4', 'short.webm', 'gone.mp4']
    for split in ['train', 'val']:
        (root / f'{split}.csv').write_text(''.join(f'{n} {i % 2}\n' for i, n in enumerate(names)))
    return names, {'zero.mp4', 'trunc.mp4', 'junk.mp4', 'junk.webm', 'gone.mp4'}


def test_bad_videos_are_replaced_in_train_and_flagged_in_eval(tmp_path):
    names, bad = make_bad_video_set(tmp_path / 'bad')
    tr = data.build_dataset('bad', tmp_path, 'train', frames=8, img_size=32)
    ev = data.build_dataset('bad', tmp_path, 'val', frames=8, img_size=32)
    os.remove(tmp_path / 'bad' / 'gone.mp4')  # disappears after start-up (network disk, cleanup job...)
    for i, name in enumerate(names):
        item = tr[(i, 10 + i)]
        assert item['x'].shape == (1, 3, 8, 32, 32)
        failed = [os.path.basename(p) for p in item['failed']]
        if name in bad:
            assert failed[0] == name and set(failed) <= bad and item['y'] in (0, 1)
        else:
            assert failed == [], name
        e = ev[i]
        assert e['ok'] == (name not in bad) and e['index'] == i and e['x'].shape == (3, 3, 8, 32, 32)
        if name in bad:
            assert (e['x'] == 0).all()
    np.testing.assert_array_equal(video.read_video(str(tmp_path / 'bad' / 'one.mp4'), [0, 0]).shape, (2, 24, 32, 3))
    # a sample whose substitutes all fail too: dropped (no clips), in one line, the same way every time
    for n in names:
        if n not in bad and os.path.exists(tmp_path / 'bad' / n):
            (tmp_path / 'bad' / n).write_bytes(b'')
    item = tr[(3, 0, 2)]
    assert item['x'].shape == (0, 3, 8, 32, 32) and len(item['failed']) == data.MAX_TRIES
    assert item['failed'][0].endswith('junk.mp4') and item['failed'] == tr[(3, 0, 2)]['failed']
    [line] = item['dropped']
    assert line.startswith(f'sample 3 dropped: no readable file in {data.MAX_TRIES} tries') and '\n' not in line


def test_bad_images_are_replaced_and_odd_modes_load(tmp_path):
    root = tmp_path / 'imgs'
    rgb = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    d = root / 'train' / 'a'
    d.mkdir(parents=True)
    Image.fromarray(rgb[..., 0]).save(d / 'gray.jpg')
    Image.fromarray(rgb).convert('CMYK').save(d / 'cmyk.jpg')
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 200).save(d / 'deep.png')
    Image.fromarray(np.dstack([rgb, rgb[..., 0]])).save(d / 'alpha.png')
    Image.fromarray(rgb).convert('P').save(d / 'pal.png', transparency=3)
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.fromarray(rgb).save(d / 'rot.jpg', exif=exif)
    Image.fromarray(rgb).save(d / 'rot.png', exif=exif)
    Image.fromarray(rgb).save(d / 'trunc.jpg')
    (d / 'trunc.jpg').write_bytes((d / 'trunc.jpg').read_bytes()[:300])
    (d / 'junk.png').write_bytes(b'\x89PNG\r\n\x1a\n' + bytes(100))
    (d / 'zero.jpg').write_bytes(b'')
    os.symlink(root / 'train', root / 'val')  # val = train here
    tr = data.build_dataset('imgs', tmp_path, 'train', img_size=32)
    ev = data.build_dataset('imgs', tmp_path, 'val', img_size=32)
    bad = {'trunc.jpg', 'junk.png', 'zero.jpg'}
    for i in range(len(tr)):
        path = tr.samples.path(i)
        name = os.path.basename(path)
        item = tr[(i, i)]
        assert item['x'].shape == (1, 3, 1, 32, 32)
        assert bool(item['failed']) == (name in bad) and (not item['failed'] or os.path.basename(item['failed'][0]) == name)
        assert ev[i]['ok'] == (name not in bad), name

# ----------------------------------------------------------------------------- mixup and cutmix


def partners(target, y, smoothing, K):
    """From mixed targets of clips with distinct labels: each clip's lambda and the clip it was mixed with."""
    lam = (target[torch.arange(len(y)), y] - smoothing / K) / (1 - smoothing)
    rest = target.clone()
    rest[torch.arange(len(y)), y] = -1
    return lam, [int((y == rest[i].argmax()).nonzero()) for i in range(len(y))]


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_mixup_targets_sum_to_one_and_match_lambda(smoothing):
    x, y, K = torch.randn(6, 3, 4, 16, 16), torch.tensor([4, 0, 5, 2, 7, 1]), 9
    mixed, target = data.mix(x, y, K, mixup=0.8, smoothing=smoothing, rng=np.random.default_rng(3))
    torch.testing.assert_close(target.sum(dim=1), torch.ones(6))
    lam, partner = partners(target, y, smoothing, K)
    assert torch.allclose(lam, lam[0]) and 0 < lam[0] < 1 and len(set(partner)) == 6  # one pairing of the batch
    assert all(p != i for i, p in enumerate(partner)) and len({(p - i) % 6 for i, p in enumerate(partner)}) == 1
    for i, p in enumerate(partner):
        torch.testing.assert_close(mixed[i], lam[i] * x[i] + (1 - lam[i]) * x[p])


def test_cutmix_pastes_one_box_into_every_frame_and_lambda_is_the_area_left():
    x, y, K = torch.arange(5.0).view(5, 1, 1, 1, 1).expand(5, 3, 4, 16, 16).contiguous(), torch.arange(5), 5
    for seed in range(20):
        mixed, target = data.mix(x, y, K, cutmix=1.0, rng=np.random.default_rng(seed))
        lam, partner = partners(target, y, 0.0, K)
        for i, p in enumerate(partner):
            pasted = mixed[i] != i  # (C, T, H, W): where the partner's pixels are
            assert (pasted == pasted[0, 0]).all()  # the same box in every frame and channel
            rows, cols = pasted[0, 0].any(dim=1).nonzero(), pasted[0, 0].any(dim=0).nonzero()
            if len(rows):
                assert pasted[0, 0, rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # a box
                assert (mixed[i][pasted] == p).all()
            assert abs(float(lam[i]) - (1 - pasted[0, 0].float().mean())) < 1e-6


def test_mixing_off_leaves_the_batch_and_the_class_indices():
    x, y = torch.randn(4, 3, 2, 8, 8), torch.tensor([0, 1, 2, 1])
    mixed, target = data.mix(x, y, 3, 0.0, 0.0, 0.1, np.random.default_rng(0))
    assert mixed is x and target is y  # so the loss is the same call as without mixing, bit for bit


# ----------------------------------------------------------------------------- loaders


def small_train_sets(tmp_path):
    for i in range(5):
        write_video(tmp_path / 'vid' / 'train' / f'c{i % 2}' / f'{i}.mp4', noise_frames(10, 24, 32, seed=i))
        write_image(tmp_path / 'pic' / 'train' / f'c{i % 3}' / f'{i}.png', (30, 20), seed=i)
    (tmp_path / 'vid' / 'train' / 'c0' / 'bad.mp4').write_bytes(b'not a video')
    return [data.build_dataset(n, tmp_path, 'train', frames=4, img_size=16) for n in ('vid', 'pic')]


@pytest.mark.parametrize('workers, num_sample', [(0, [1, 1]), (2, [1, 1]), (2, [3, 2])])
def test_resume_gives_identical_batches(tmp_path, workers, num_sample):
    sets = small_train_sets(tmp_path)
    kw = dict(weights=[1, 2], grad_accum=2, seed=7, workers=workers, num_sample=num_sample)
    full = loaders.build_train_loader(sets, [3, 4], **kw)
    it = iter(full)
    ref = [next(it) for _ in range(24)]  # dataset 0 reads a whole epoch, bad file included
    resumed = loaders.build_train_loader(sets, [3, 4], start_micro=9, **kw)
    it2 = iter(resumed)
    for b in ref[9:]:
        r = next(it2)
        assert torch.equal(b['x'], r['x']) and torch.equal(b['y'], r['y'])
        assert b['dataset'] == r['dataset'] and b['failed'] == r['failed']
    for m, b in enumerate(ref):
        assert b['dataset'] == data.schedule(m // 2, [1, 2]) and b['x'].dtype == torch.uint8
        assert b['x'].shape == ((3, 3, 4, 16, 16) if b['dataset'] == 0 else (4, 3, 1, 16, 16))
        R = num_sample[b['dataset']]  # a sample's R clips side by side, its label repeated
        assert torch.equal(b['y'], b['y'][::R].repeat_interleave(R))
    failed = [p for b in ref for p in b['failed']]
    assert failed and all(p.endswith('bad.mp4') for p in failed)  # flat list of str, bad file replaced
    del it, it2


def test_a_batch_loses_its_dropped_samples_and_one_that_loses_all_is_one_blank_clip():
    def item(y, clips):
        return {'x': torch.full((clips, 3, 2, 4, 4), y, dtype=torch.uint8), 'y': y, 'dataset': 1,
                'failed': ['p'] * (clips == 0), 'dropped': ['gone'] * (clips == 0)}
    b = loaders.collate_train([item(5, 2), item(-1, 0), item(7, 2)])
    assert b['x'].shape == (4, 3, 2, 4, 4) and b['y'].tolist() == [5, 5, 7, 7] and (b['x'][:, 0, 0, 0, 0] == b['y']).all()
    assert b['dropped'] == ['gone'] and b['failed'] == ['p'] and not b['blank'] and b['dataset'] == 1
    b = loaders.collate_train([item(-1, 0), item(-1, 0)])
    assert b['blank'] and b['x'].shape == (1, 3, 2, 4, 4) and not b['x'].any() and b['y'].tolist() == [0]
    assert b['dropped'] == ['gone', 'gone']


def test_eval_loader_counts_every_sample_once(tmp_path):
    for i in range(7):
        write_image(tmp_path / 'pic' / 'val' / f'c{i % 2}' / f'{i}.png', seed=i)
        write_image(tmp_path / 'pic' / 'train' / f'c{i % 2}' / f'{i}.png', seed=i)
    ds = data.build_dataset('pic', tmp_path, 'val', img_size=16)
    seen = []
    for r in range(3):
        for b in loaders.build_eval_loader(ds, batch_size=2, rank=r, world=3, workers=0):
            assert b['x'].shape[1:] == (1, 3, 1, 16, 16) and b['ok'].dtype == torch.bool and b['ok'].all()
            seen += b['index'].tolist()
    assert sorted(seen) == list(range(7))

