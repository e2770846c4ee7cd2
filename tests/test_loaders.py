"""loaders.py's watched training loader, in this process: a worker killed, stopped, or stuck in a read that
never returns (a FIFO, as a stalled network mount) costs a restart and that one sample, named and
quarantined; the batches are the batches of a loader that never read the sample, bit for bit."""

import itertools
import os
import signal
import threading
import time

import pytest
import torch

import data
import loaders
from helpers import signal_the_reader
from media import image_set_with_a_stall

KW = dict(weights=[1], seed=3, num_sample=[1])
MICRO = 8  # micro-batches of 4 from 13 samples: the stall is met in two epochs


def stall_set(tmp_path):
    fifo = image_set_with_a_stall(tmp_path / "data" / "mine")
    return fifo, lambda: [data.build_dataset("mine", tmp_path / "data", "train", img_size=16)]


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP", "stuck"])
def test_a_worker_lost_mid_read_costs_that_sample_and_nothing_else(tmp_path, capsys, fault):
    fifo, datasets = stall_set(tmp_path)
    reference = datasets()  # read in this process, the stall quarantined from the start
    reference[0].before_read = loaders.Guard([fifo])
    expected = list(itertools.islice(loaders.build_train_loader(reference, [4], workers=0, **KW), MICRO))
    index = next(i for i in range(len(reference[0])) if reference[0].samples.path(i) == fifo)
    met = [m for m, b in enumerate(data.MultiDatasetBatchSampler([13], [4], seed=3).batch(m) for m in range(MICRO))
           if any(key[1] == index for key in b)]
    assert len(met) == 2 and [m for m, b in enumerate(expected) if fifo in b["failed"]] == met

    limit = 60 if fault == "SIGKILL" else 2  # a kill is no stuck read, however long it takes to find the reader
    batches = loaders.TrainBatches(datasets(), ["mine"], [4], out_dir=str(tmp_path), time_limit=limit, workers=2, **KW)
    if fault != "stuck":  # a stuck read needs no help: nobody ever writes to the FIFO
        threading.Thread(target=signal_the_reader, args=(fifo, getattr(signal, fault)), daemon=True).start()
    got = [next(batches) for _ in range(MICRO)]
    for a, b in zip(expected, got):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"]) and a["failed"] == b["failed"]

    said = [line for line in capsys.readouterr().out.splitlines() if "] loader worker " in line]
    assert len(said) == 1, said  # once: the second epoch skips the quarantined sample unread
    assert said[0].startswith("[rank 0] loader worker ") and said[0].endswith(
        f", reading {fifo}: quarantined; the loader starts again at micro-batch {met[0]}")
    assert {"SIGKILL": "killed by SIGKILL", "SIGSTOP": "stopped (T); --sample_time_limit 2): ended",
            "stuck": "sleeping (S); --sample_time_limit 2): ended"}[fault] in said[0]
    assert [(e["dataset"], e["path"]) for e in batches.new] == [("mine", fifo)]
    assert batches.failed is None and len(batches.restarts) == 1


def test_a_worker_killed_between_samples_costs_no_sample(tmp_path, capsys):
    """Killed while it waits with its batches made (a full prefetch): nothing named or quarantined, and the
    batches are those of a loader without the fault."""
    fifo, datasets = stall_set(tmp_path)
    os.remove(fifo)  # listed, not on disk: left out of the listing
    reference = datasets()
    reference[0].before_read = loaders.Guard([])
    expected = list(itertools.islice(loaders.build_train_loader(reference, [4], workers=0, **KW), 3))
    batches = loaders.TrainBatches(datasets(), ["mine"], [4], out_dir=str(tmp_path), time_limit=60, workers=2, **KW)
    got = [next(batches)]
    deadline = time.monotonic() + 120
    while not (batches.rows[:, loaders.PID].all() and not batches.rows[:, loaders.SINCE].any()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # both workers have made their batches and wait
    os.kill(int(batches.rows[0, loaders.PID]), signal.SIGKILL)
    got += [next(batches), next(batches)]
    for a, b in zip(expected, got):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"]) and a["failed"] == b["failed"] == []
    said = [line for line in capsys.readouterr().out.splitlines() if "] loader worker " in line]
    assert len(said) == 1 and "killed by SIGKILL; the loader starts again at micro-batch " in said[0], said
    assert batches.new == [] and batches.quarantine == {}
