"""
The loaders: DataLoaders over data.py's datasets, driven by its multi-dataset sampler. Training batches are
one dataset's clips (uint8, collated side by side); evaluation shards a split over the ranks with no
padding. Workers start from a clean forkserver process, decode with one thread, and end with the run.
"""

import functools
import os
import threading
import time

import cv2
import torch

from data import MultiDatasetBatchSampler

TRAIN_PREFETCH = 4  # batches each training worker prepares ahead (they wait in /dev/shm)


class MultiDataset(torch.utils.data.Dataset):
    """Key (d, index, sample_seed) -> datasets[d][(index, sample_seed, num_sample[d])], 'dataset': d added."""

    def __init__(self, datasets, num_sample):
        self.datasets, self.num_sample = list(datasets), list(num_sample)

    def __getitem__(self, key):
        d, index, seed = key
        return {**self.datasets[d][(index, seed, self.num_sample[d])], 'dataset': d}


def collate_train(batch):
    """B samples of R clips -> (B*R, C, T, H, W) uint8, a sample's clips side by side, its label repeated.
    A dropped sample has no clips; where none is left, 'blank' is True and x one blank clip, which the loop
    weighs zero (a rank with no sample still takes part in the step's backward)."""
    x = torch.cat([b['x'] for b in batch])
    y = torch.tensor([b['y'] for b in batch for _ in b['x']], dtype=torch.long)
    blank = len(x) == 0
    if blank:
        x, y = torch.zeros(1, *x.shape[1:], dtype=torch.uint8), torch.zeros(1, dtype=torch.long)
    return {'x': x, 'y': y, 'dataset': batch[0]['dataset'], 'blank': blank,
            'failed': [p for b in batch for p in b['failed']],
            'dropped': [message for b in batch for message in b['dropped']]}


def build_train_loader(datasets, batch_sizes, *, num_sample=None, weights=None, grad_accum=1, rank=0, world=1,
                       seed=0, workers=4, start_micro=0, pin_memory=False):
    """An endless loader of {'x': (B, C, T, H, W) uint8, 'y': (B,), 'dataset': int, 'failed': [paths],
    'dropped': [lines], 'blank': bool}, B = batch_sizes[d] clips: B / R samples of dataset d with
    R = num_sample[d] clips each (default 1), fewer where a sample was dropped (collate_train).
    To resume, pass start_micro = the number of micro-batches already consumed."""
    assert all(d.train for d in datasets), "build_train_loader needs datasets built with train=True"
    num_sample = num_sample or [1] * len(datasets)
    assert all(b % r == 0 for b, r in zip(batch_sizes, num_sample)), (batch_sizes, num_sample)
    samples = [b // r for b, r in zip(batch_sizes, num_sample)]
    sampler = MultiDatasetBatchSampler([len(d) for d in datasets], samples, weights, grad_accum, rank, world,
                                       seed, start_micro)
    return torch.utils.data.DataLoader(MultiDataset(datasets, num_sample), batch_sampler=sampler,
                                       collate_fn=collate_train, **loader_kwargs(workers, pin_memory, TRAIN_PREFETCH))


def build_eval_loader(dataset, *, batch_size, rank=0, world=1, workers=4, pin_memory=False, indices=None):
    """Rank r evaluates samples r, r + world, ... of `indices` (default: all): no padding, every sample counted
    once over the ranks. Batches: {'x': (B, V, C, T, H, W) uint8, 'y': (B,), 'ok': (B,) bool, 'index': (B,)}."""
    assert not dataset.train, "build_eval_loader needs a dataset built with train=False"
    mine = (range(len(dataset)) if indices is None else indices)[rank::world]
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=mine,
                                       **loader_kwargs(workers, pin_memory, prefetch=2))


def loader_kwargs(workers, pin_memory, prefetch):
    kw = dict(num_workers=workers, pin_memory=pin_memory,
              worker_init_fn=functools.partial(worker_init, owner=os.getpid()))
    if workers > 0:
        # Workers start from a clean forkserver process, not a fork of this one: a fork inherits OpenCV's
        # thread pool (a worker forked while it was busy hangs in cv2) and, under DDP, the process group's
        # sockets (a worker outliving a killed rank holds them, and an elastic restart hangs on it).
        kw.update(persistent_workers=True, prefetch_factor=prefetch, multiprocessing_context="forkserver")
    return kw


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
