"""loaders.py's watched training loader, in this process: a worker killed, stopped, or stuck in a read that
never returns (a FIFO, as a stalled network mount) costs a restart and that one sample, named and
quarantined; the batches are the batches of a loader that never read the sample, bit for bit."""

import contextlib
import errno
import itertools
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import data
import loaders
from helpers import readers_of, signal_the_reader
from media import image_set_with_a_stall, write_image

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


# ---- the job's signals: SIGTERM and SIGSTOP / SIGCONT to the whole process group are no worker's fault

CHILD = """
import json, os, signal, sys, threading
sys.path[:0] = [{root!r}, {tests!r}]
import data, loaders

if __name__ == "__main__":  # the fork server imports this file too
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    datasets = [data.build_dataset("mine", sys.argv[1], "train", img_size=16)]
    batches = loaders.TrainBatches(datasets, ["mine"], [4], out_dir=sys.argv[2], time_limit=float(sys.argv[3]),
                                   workers=2, stopping=stopping, weights=[1], seed=3, num_sample=[1])
    failed = [next(batches)["failed"] for _ in range({micro})]
    print(json.dumps({{"failed": failed, "restarts": len(batches.restarts), "quarantine": list(batches.quarantine),
                      "stopping": stopping.is_set()}}), flush=True)
"""


def serve(fifo, content, stop):
    """Each open of the FIFO to read gets `content`, until `stop` is set: the stall is a slow file, not a dead one."""
    while not stop.is_set():
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # fails until a reader waits in open()
        except OSError:
            time.sleep(0.02)
            continue
        os.set_blocking(fd, True)
        with contextlib.suppress(BrokenPipeError):  # a reader that left (killed with the job)
            os.write(fd, content)
        os.close(fd)


def held_reader(fifo, proc=None, timeout=120):
    """Wait until a process opens the FIFO to read and let its open return: -> the write end, unwritten (the
    reader now waits in read(), in the middle of the sample)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            assert time.monotonic() < deadline and (proc is None or proc.poll() is None)
            time.sleep(0.02)


@pytest.mark.parametrize("signals", ["SIGTERM", "SIGSTOP"])
def test_the_jobs_own_signals_quarantine_nothing(tmp_path, signals):
    """SIGTERM to the process group (preemption, scancel) kills the workers and the fork server with the job: no
    fault, nothing quarantined or counted, and new workers give the batches. A job suspended for longer than the
    limit (Ctrl-Z / fg, scontrol suspend) while a worker reads: the read was not stuck, the time was nobody's."""
    fifo, _ = stall_set(tmp_path)
    png = tmp_path / "a.png"
    write_image(png, (24, 24))
    script = tmp_path / "child.py"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script.write_text(CHILD.format(root=root, tests=os.path.join(root, "tests"), micro=MICRO))
    p = subprocess.Popen([sys.executable, str(script), str(tmp_path / "data"), str(tmp_path), "3"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    stop = threading.Event()
    try:
        fd = held_reader(fifo, p)
        reader = readers_of(fifo)
        if signals == "SIGTERM":
            os.killpg(p.pid, signal.SIGTERM)
            deadline = time.monotonic() + 60
            while any(loaders.process_state(pid) not in ("gone", "dead (Z)") for pid in reader):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            os.close(fd)
        else:
            os.killpg(p.pid, signal.SIGSTOP)
            time.sleep(8)  # over the limit of 3 s
            os.killpg(p.pid, signal.SIGCONT)
            time.sleep(0.5)  # the watchdog's first look after the pause, while the read goes on
            os.set_blocking(fd, True)
            os.write(fd, png.read_bytes())
            os.close(fd)
        threading.Thread(target=serve, args=(fifo, png.read_bytes(), stop), daemon=True).start()
        text = p.communicate(timeout=300)[0]
    finally:
        stop.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0, text[-3000:]
    result = json.loads([line for line in text.splitlines() if line.startswith('{"failed"')][-1])
    assert result["quarantine"] == [] and result["restarts"] == 0, text[-3000:]
    assert all(failed == [] for failed in result["failed"]), result  # the FIFO read whole, each time
    lines = [line for line in text.splitlines() if "] " in line and "loader" in line]
    if signals == "SIGTERM":
        assert result["stopping"] and len(lines) == 1 and lines[0].startswith("[rank 0] SIGTERM: loader worker "), lines
        assert "quarantined" not in lines[0] and "status 255" not in lines[0]
    else:
        assert lines == [], lines


# ---- the watchdog's reach: after the give-up, at a worker's start, and never past this loader's own workers


def stalled_set(root, n, stalls):
    """n PNGs and `stalls` FIFOs (reads that never return: a stalled mount), listed in train.csv. -> the FIFOs."""
    fifos = [os.path.join(str(root), f"s{i}.png") for i in range(stalls)]
    os.makedirs(root, exist_ok=True)
    for i in range(n):
        write_image(os.path.join(root, f"{i}.png"), (24, 24), seed=i)
    for fifo in fifos:
        os.mkfifo(fifo)
    names = [f"{i}.png" for i in range(n)] + [os.path.basename(f) for f in fifos]
    (root / "train.csv").write_text("".join(f"{name} {i % 2}\n" for i, name in enumerate(names)))
    return fifos


def in_time(call, timeout=150):
    """call() in a thread: -> its result, or what it raised; an AssertionError if it does not end in time."""
    out = []

    def run():
        try:
            out.append(call())
        except BaseException as e:  # noqa: BLE001 (SystemExit included: it is the answer looked for)
            out.append(e)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert out, f"no answer in {timeout} s: a hang"
    return out[0]


def release(fifos):
    for fifo in fifos:  # a reader left waiting in this process gets an empty file
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.parametrize("healthy", [8, 0])
def test_after_the_give_up_the_reads_stay_watched(tmp_path, capsys, healthy):
    """A stalled mount: each stall costs a restart, the fourth gives up (`failed`), and the reads the loop still
    needs are watched as before, not made unwatched in this process where a stall would hang the run. With
    some files readable the batches come; with none, a few more restarts end the run in one line."""
    fifos = stalled_set(tmp_path / "data" / "mine", healthy, 5 if healthy else 10)
    datasets = [data.build_dataset("mine", tmp_path / "data", "train", img_size=16)]
    batches = loaders.TrainBatches(datasets, ["mine"], [4], out_dir=str(tmp_path), time_limit=1, workers=1, **KW)
    try:
        got = in_time(lambda: [next(batches) for _ in range(4)])  # 16 samples: each of the 13 met
    finally:
        release(fifos)
    said = [line for line in capsys.readouterr().out.splitlines() if "] loader worker " in line]
    assert batches.failed.startswith("the loader's workers failed 4 times within 10 minutes, the last: loader worker 0")
    if healthy:
        assert isinstance(got, list) and len(said) == len(batches.restarts) == 5, said
        assert sorted(batches.quarantine) == fifos and all(f in said[i] for i, f in enumerate(sorted(
            fifos, key=lambda f: next(n for n, line in enumerate(said) if f in line))))
    else:
        assert isinstance(got, SystemExit) and len(said) == len(batches.restarts) == 8, (got, said)
        assert str(got).startswith(f"error: {batches.failed}; and 4 more while the run stopped: no checkpoint")


def test_a_worker_stuck_while_it_starts_is_ended(tmp_path, capsys):
    """Stopped before it has written its row (a stalled mount under the environment, swap): no sample read, yet
    ended after the limit, as a stuck read is; the batches come."""
    stalled_set(tmp_path / "data" / "mine", 8, 0)
    datasets = [data.build_dataset("mine", tmp_path / "data", "train", img_size=16)]
    batches = loaders.TrainBatches(datasets, ["mine"], [2], out_dir=str(tmp_path), time_limit=2, workers=2, **KW)
    before = {p.pid for p in multiprocessing.active_children()}
    stopped = []

    def stop_the_first():
        while not (new := [p for p in multiprocessing.active_children() if p.pid not in before]):
            time.sleep(0.0005)
        os.kill(new[0].pid, signal.SIGSTOP)
        stopped.append(new[0].pid)
    threading.Thread(target=stop_the_first, daemon=True).start()
    try:
        got = in_time(lambda: next(batches), timeout=90)
    finally:
        for pid in stopped:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    assert isinstance(got, dict), got
    said = [line for line in capsys.readouterr().out.splitlines() if "] loader worker " in line]
    assert len(said) == 1 and f"(pid {stopped[0]}) stuck for 3 s while starting (stopped (T); " in said[0], said


def test_a_dead_workers_pid_taken_by_another_process_is_never_signalled(tmp_path):
    """A worker killed from outside mid-read leaves its row while the loop is elsewhere (validating); its pid
    may meanwhile name another process (reuse, simulated: a `sleep` under that pid). The watchdog leaves that
    process alone; the loop then meets the dead worker as usual."""
    fifo, = stalled_set(tmp_path / "data" / "mine", 3, 1)
    datasets = [data.build_dataset("mine", tmp_path / "data", "train", img_size=16)]
    batches = loaders.TrainBatches(datasets, ["mine"], [1], out_dir=str(tmp_path), time_limit=2, workers=1,
                                   weights=[1], seed=0, num_sample=[1])
    assert datasets[0].samples.path(3) == fifo
    next(batches)  # the worker goes on ahead to the FIFO while the loop is elsewhere
    signal_the_reader(fifo, signal.SIGKILL)
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        with batches.lock:  # the dead worker's pid, reused by `sleep`
            batches.rows[0, loaders.PID] = sleeper.pid
            batches.pids = [(sleeper.pid, batches.pids[0][1])]
        time.sleep(5)  # past the limit: the row's read looks stuck
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_name_that_is_not_utf8_prints(tmp_path, capsys):
    """A file name that is not UTF-8 (os.fsdecode gives it surrogates, as a folder's listing does) in the line of
    a restart: escaped, as any name must print on a UTF-8 terminal; quarantined under its own name."""
    root = tmp_path / "data" / "mine"
    for c in ("c0", "c1"):
        for i in range(3):
            write_image(root / "train" / c / f"{i}.png", (24, 24), seed=i)
    name = os.fsdecode(os.fsencode(str(root / "train" / "c0")) + b"/st\xe9ll.png")
    write_image(name, (24, 24))
    datasets = [data.build_dataset("mine", tmp_path / "data", "train", img_size=16)]
    index = next(i for i in range(len(datasets[0])) if datasets[0].samples.path(i) == name)
    batches = loaders.TrainBatches(datasets, ["mine"], [2], out_dir=str(tmp_path), time_limit=60, workers=1, **KW)
    batches.restart(["loader worker 0 (pid 1) killed by SIGKILL"], [(0, index)])  # as the loop's next() calls it
    assert capsys.readouterr().out.splitlines() == [
        f"[rank 0] loader worker 0 (pid 1) killed by SIGKILL, reading {root}/train/c0/st\\xe9ll.png: quarantined; "
        "the loader starts again at micro-batch 0"]
    assert list(batches.quarantine) == [name]


def test_a_damaged_quarantine_list_is_said_not_a_traceback(tmp_path, capsys):
    """Lines that are not entries (not UTF-8, not an object) are each said and left out; a list that cannot be
    read at all (a folder by that name) is one line. eval.py reads it through loaders.guard, as training does."""
    good = [{"dataset": "mine", "path": f"/x/{i}.png", "why": "a test"} for i in range(2)]
    (tmp_path / "quarantine.jsonl").write_bytes(json.dumps(good[0]).encode() + b"\n\xff\xfe{not utf-8\n[1, 2]\n\n"
                                                + json.dumps(good[1]).encode() + b"\n")
    assert loaders.read_quarantine(str(tmp_path)) == {e["path"]: e for e in good}
    assert capsys.readouterr().out.splitlines() == [
        f"warning: {tmp_path}/quarantine.jsonl line {n} is not a quarantine entry ({{\"path\": ...}}): ignored"
        for n in (2, 3)]
    folder = tmp_path / "run"
    (folder / "quarantine.jsonl").mkdir(parents=True)
    loaders.guard([], str(folder))
    assert capsys.readouterr().out.splitlines() == [
        f"warning: cannot read {folder}/quarantine.jsonl (Is a directory): its files may be read again"]


def test_every_exit_is_said():
    assert loaders.exit_status(-9) == "killed by SIGKILL" and loaders.exit_status(3) == "exited with status 3"
    assert loaders.exit_status(-40) == "killed by signal 40"  # a real-time signal: no name
    assert loaders.exit_status(255) == "exited with status 255"  # no fork server named: its own exit


def test_workers_that_cannot_start_cost_a_restart(tmp_path, capsys, monkeypatch):
    """The kernel refuses the fork (EAGAIN: too many processes; ENOMEM), injected at the start of a worker:
    a restart, counted and said, not a traceback; the batches then come."""
    stalled_set(tmp_path / "data" / "mine", 8, 0)
    datasets = [data.build_dataset("mine", tmp_path / "data", "train", img_size=16)]
    batches = loaders.TrainBatches(datasets, ["mine"], [2], out_dir=str(tmp_path), time_limit=60, workers=1, **KW)
    start, refused = multiprocessing.context.ForkServerProcess._Popen, []

    def refuse_twice(process):
        if len(refused) < 2:
            refused.append(process)
            raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        return start(process)
    monkeypatch.setattr(multiprocessing.context.ForkServerProcess, "_Popen", staticmethod(refuse_twice))
    assert isinstance(next(batches), dict) and len(batches.restarts) == 2
    said = [line for line in capsys.readouterr().out.splitlines() if "] loader workers " in line]
    assert said == ["[rank 0] loader workers could not start (Resource temporarily unavailable); the loader starts "
                    "again at micro-batch 0"] * 2


def test_new_workers_do_not_say_each_quarantined_file_again(tmp_path, capfd):
    """A quarantined file was said where it was quarantined (the restart's line, or the count at start-up): the
    workers of each new loader skip it without a warning of their own."""
    stalled_set(tmp_path / "data" / "mine", 8, 0)
    datasets = [data.build_dataset("mine", tmp_path / "data", "train", img_size=16)]
    path = datasets[0].samples.path(0)
    (tmp_path / "quarantine.jsonl").write_text(json.dumps({"dataset": "mine", "path": path, "why": "a test"}) + "\n")
    batches = loaders.TrainBatches(datasets, ["mine"], [4], out_dir=str(tmp_path), time_limit=60, workers=1, **KW)
    failed = []
    for _ in range(3):  # three loaders, each reading an epoch and more
        failed += [f for _ in range(3) for f in next(batches)["failed"]]
        batches.start_again()
    assert failed.count(path) >= 3  # met by each, replaced unread
    assert "unreadable sample" not in capfd.readouterr().err
