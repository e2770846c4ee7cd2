"""
The loaders: DataLoaders over data.py's datasets, driven by its multi-dataset sampler. Training batches are
one dataset's clips (uint8, collated side by side); evaluation shards a split over the ranks with no
padding. Workers start from a clean forkserver process, decode with one thread, and end with the run.
The training loader is watched (TrainBatches): a worker that dies or sticks on one sample costs a restart
at the first micro-batch the loop has not consumed, and the sample it was reading is quarantined: never
read again, on any rank, also after a resume (<out_dir>/quarantine.jsonl).
"""

import contextlib
import functools
import json
import multiprocessing.connection
import os
import signal
import threading
import time
import weakref

import cv2
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
from data import MultiDatasetBatchSampler
from video import SampleError

POLL = 1.0  # seconds between the watchdog's looks at the workers
RESTARTS, WINDOW = 3, 600.0  # more restarts than this within the window: not one bad file, the machine
QUARANTINE = "quarantine.jsonl"
PID, DATASET, INDEX, SINCE, PARENT = range(5)  # the columns of a watched loader's table, a row per worker
AFTER_GIVING_UP = RESTARTS + 1  # restarts allowed for the steps the loop takes to read that the run must stop
TRAIN_PREFETCH = 4  # batches each training worker prepares ahead (they wait in /dev/shm; runtime.shm_warning)
EVAL_PREFETCH = 2  # and each evaluation worker


class MultiDataset(torch.utils.data.Dataset):
    """Key (d, index, sample_seed) -> datasets[d][(index, sample_seed, num_sample[d])], 'dataset': d added."""

    def __init__(self, datasets, num_sample):
        self.datasets, self.num_sample = list(datasets), list(num_sample)
        self.row = None  # in a watched loader's worker: its row of the table

    def __getitem__(self, key):
        d, index, seed = key
        try:
            return {**self.datasets[d][(index, seed, self.num_sample[d])], 'dataset': d}
        finally:
            if self.row is not None:
                self.row[SINCE] = 0  # between samples


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
                       seed=0, workers=4, start_micro=0, pin_memory=False, table=None):
    """An endless loader of {'x': (B, C, T, H, W) uint8, 'y': (B,), 'dataset': int, 'failed': [paths],
    'dropped': [lines], 'blank': bool}, B = batch_sizes[d] clips: B / R samples of dataset d with
    R = num_sample[d] clips each (default 1), fewer where a sample was dropped (collate_train).
    To resume, pass start_micro = the number of micro-batches already consumed. With a `table` (TrainBatches)
    the workers note in it what they read."""
    assert all(d.train for d in datasets), "build_train_loader needs datasets built with train=True"
    num_sample = num_sample or [1] * len(datasets)
    assert all(b % r == 0 for b, r in zip(batch_sizes, num_sample)), (batch_sizes, num_sample)
    samples = [b // r for b, r in zip(batch_sizes, num_sample)]
    sampler = MultiDatasetBatchSampler([len(d) for d in datasets], samples, weights, grad_accum, rank, world,
                                       seed, start_micro)
    return torch.utils.data.DataLoader(MultiDataset(datasets, num_sample), batch_sampler=sampler,
                                       collate_fn=collate_train,
                                       **loader_kwargs(workers, pin_memory, TRAIN_PREFETCH, table))


def build_eval_loader(dataset, *, batch_size, rank=0, world=1, workers=4, pin_memory=False, indices=None):
    """Rank r evaluates samples r, r + world, ... of `indices` (default: all): no padding, every sample counted
    once over the ranks. Batches: {'x': (B, V, C, T, H, W) uint8, 'y': (B,), 'ok': (B,) bool, 'index': (B,)}."""
    assert not dataset.train, "build_eval_loader needs a dataset built with train=False"
    mine = (range(len(dataset)) if indices is None else indices)[rank::world]
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=mine,
                                       **loader_kwargs(workers, pin_memory, EVAL_PREFETCH))


# -----------------------------------------------------------------------------
# the watched training loader


class TrainBatches:
    """build_train_loader's batches, one micro-batch a next(), watched. A worker that dies (any signal, any
    exit), that reads one sample for longer than `time_limit` seconds, or that gives no batch for that long
    while the loop waits and no worker reads (stopped): the workers are ended, what they were reading is
    named and quarantined, and a new loader starts at the first micro-batch the loop has not consumed (the
    sampler's whole state), so the loop gets the batches it would have got, a quarantined sample replaced
    as an unreadable file is. Time is the watchdog's own looks: time it did not see (the job suspended) is
    not stuck time. More than RESTARTS restarts within WINDOW seconds: `failed` says why the run must stop,
    and the batches the loop reads until it stops come from watched workers as before where the workers were
    reading (a stalled mount), from this process where they died reading nothing. Once `stopping` is set
    (SIGTERM: the job's processes all get it), a worker's death is no fault: nothing is quarantined or
    counted, and new workers read what the loop needs before it saves."""

    def __init__(self, datasets, names, batch_sizes, *, out_dir, time_limit, rank=0, workers=4, start_micro=0,
                 stopping=None, **kw):
        self.datasets, self.names, self.batch_sizes, self.kw = datasets, names, batch_sizes, kw
        self.stopping = stopping or threading.Event()
        self.out_dir, self.limit, self.rank, self.workers = out_dir, time_limit, rank, workers
        self.micro = start_micro  # the first micro-batch the loop has not consumed
        self.quarantine = read_quarantine(out_dir)  # {path: entry}
        if self.quarantine and rank == 0:
            print(f"quarantine: {len(self.quarantine)} files that stopped a loader worker are replaced unread "
                  f"({os.path.join(out_dir, QUARANTINE)})")
        self.new = []  # entries quarantined here since the ranks last shared theirs
        self.restarts, self.failed = [], None  # when each restart was; why the run must stop
        self.excused = False  # whether workers that died with the job (SIGTERM) were started again
        self.lock, self.waiting = threading.Lock(), None  # since when the loop waits for a batch
        self.ticks = {}  # the watchdog's looks at each thing unchanged: what it has seen stuck, in POLLs
        self.start(workers)
        if workers:
            threading.Thread(target=watchdog, args=(weakref.ref(self),), daemon=True).start()

    def start(self, workers):
        """A new loader at micro-batch self.micro; its iterator (and its workers) come with the first next()."""
        for ds in self.datasets:
            ds.before_read = Guard(self.quarantine)
        self.applied = set(self.quarantine)
        table = torch.zeros(workers, 5, dtype=torch.float64).share_memory_() if workers else None
        self.rows = table.numpy() if workers else None  # this process's view of the workers' rows
        self.ended = {}  # pid -> why the watchdog ended that worker
        self.pids = []  # (pid, start time) of each worker: the watchdog signals no other process
        self.loader = build_train_loader(self.datasets, self.batch_sizes, rank=self.rank, workers=workers,
                                         start_micro=self.micro, table=table, **self.kw)
        self.batches = None

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            batch, fault = self.next_or_fault()
            if fault is None:
                self.micro += 1
                return batch
            if self.stopping.is_set() and not self.ended and not self.excused:  # the job's end took them too
                self.excused = True  # once: a worker that dies again, or that the watchdog ended, is a fault
                tqdm.write(f"[rank {self.rank}] SIGTERM: {'; '.join(fault[0])}; new workers read the batches "
                           f"left before the save, from micro-batch {self.micro}")
                self.start_again()
            else:
                self.restart(*fault)

    def next_or_fault(self):
        """-> (the next batch, None), or (None, (what happened, [(d, index) being read])) when a worker died."""
        if self.batches is None:
            try:
                batches = iter(self.loader)
            except (OSError, EOFError) as e:  # no worker to start: fork refused (ENOMEM, EAGAIN), no fork server
                return None, ([f"loader workers could not start ({e.strerror or e})"
                               if isinstance(e, OSError) else f"loader workers could not start ({e!r})"], [])
            with self.lock:
                self.batches = batches
                self.pids = [(w.pid, started(w.pid)) for w in getattr(batches, "_workers", [])]
        self.waiting = time.monotonic()
        try:
            return next(self.batches), None
        except Exception:  # DataLoader's word that a worker died, a failed read of what it sent, or its own error
            fault = self.fault()
            if fault is None:
                raise  # a worker's own error, raised again here by DataLoader: the run's to see
            return None, fault
        finally:
            self.waiting = None

    def fault(self):
        """-> (what happened, [(d, index) the dead workers were reading]) when a worker has died, else None."""
        workers = getattr(self.batches, "_workers", None)  # DataLoader's processes
        if not workers:  # loading in this process
            return None
        multiprocessing.connection.wait([w.sentinel for w in workers], timeout=POLL)  # an exit may lag its signs
        for process in workers:
            if process.pid in self.ended:  # SIGKILLed by the watchdog: gone in a moment
                process.join(timeout=POLL)
        what, reading = [], []
        with self.lock:
            server = int(self.rows[:, PARENT].max())  # one fork server for all: named by any worker that started
            for w, (process, row) in enumerate(zip(workers, self.rows)):
                if process.exitcode is not None:
                    why = self.ended.get(process.pid) or exit_status(process.exitcode, server)
                    what.append(f"loader worker {w} (pid {process.pid}) {why}")
                    if row[SINCE]:
                        reading.append((int(row[DATASET]), int(row[INDEX])))
        return (what, reading) if what else None

    def look(self):
        """The watchdog's look (watchdog()): end a worker that reads one sample for longer than the limit, one
        that starts that long without using the CPU, and all of them when the loop has waited that long for a
        batch while none reads. Each look counts POLL seconds for what it sees unchanged since the last look.
        The loop then meets dead workers, as it meets one the kernel killed."""
        with self.lock:
            if self.rows is None or not self.pids:
                return
            seen, self.ticks = self.ticks, {}

            def stuck(key):  # seconds this look and the ones before saw `key` unchanged
                self.ticks[key] = seen.get(key, 0) + 1
                return self.ticks[key] * POLL

            for (pid, start), (registered, _, _, since, _) in zip(self.pids, self.rows.tolist()):
                if since and (s := stuck(("read", pid, since))) > self.limit:
                    self.end(pid, start, f"stuck for {s:.0f} s on one sample ({{state}}; --sample_time_limit "
                                         f"{self.limit:g}): ended")
                elif not registered and (cpu := cpu_time(pid)) is not None:  # still starting
                    if (s := stuck(("start", pid, cpu))) > self.limit:
                        self.end(pid, start, f"stuck for {s:.0f} s while starting ({{state}}; --sample_time_limit "
                                             f"{self.limit:g}): ended")
            waiting = self.waiting
            if waiting and self.rows[:, PID].all() and not self.rows[:, SINCE].any():
                if (s := stuck(("wait", waiting))) > self.limit:
                    for pid, start in self.pids:
                        self.end(pid, start, f"{{state}} while none read and the loop waited {s:.0f} s for a "
                                             "batch: ended")

    def end(self, pid, start, why):  # the watchdog's; why has a {state} to fill in
        if pid in self.ended or not mine(pid, start):  # one already dead tells its own exit; pids get reused
            return
        self.ended[pid] = why.format(state=process_state(pid))
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)  # it also ends a stopped (SIGSTOP) process

    def restart(self, what, reading):
        """End the workers, quarantine what the dead ones were reading, and start again at self.micro."""
        paths = [self.datasets[d].samples.path(i) for d, i in reading]
        for (d, _), path in zip(reading, paths):
            entry = {"dataset": self.names[d], "path": path, "why": "; ".join(what)}
            self.quarantine[path] = entry
            self.new.append(entry)
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < WINDOW] + [now]
        tqdm.write(f"[rank {self.rank}] {'; '.join(what)}" + (f", reading {', '.join(map(printable, paths))}: "
                                                              "quarantined" if paths else "")
                   + f"; the loader starts again at micro-batch {self.micro}")
        if self.failed and len(self.restarts) > RESTARTS + AFTER_GIVING_UP:  # nothing read, nothing to save
            raise SystemExit(f"error: {self.failed}; and {AFTER_GIVING_UP} more while the run stopped: no "
                             "checkpoint after the last one saved")
        if len(self.restarts) > RESTARTS and not self.failed:
            self.failed = (f"the loader's workers failed {len(self.restarts)} times within {WINDOW / 60:g} "
                           f"minutes, the last: {'; '.join(what)}. More than a few bad files: is the machine "
                           "out of memory (dmesg names the OOM killer) or /dev/shm full? Try fewer --workers")
        self.start_again(0 if self.failed and not paths else self.workers)  # no file's fault: workers die here

    def start_again(self, workers=None):
        with self.lock:
            for process in getattr(self.batches, "_workers", []):
                if process.exitcode is None:
                    process.kill()
            self.batches = self.loader = None  # DataLoader's shutdown joins the workers, closes its queues
            self.pids = []
            self.start((0 if self.rows is None else len(self.rows)) if workers is None else workers)  # as it was

    def share_and_restart(self, rt):
        """After a step on which some rank quarantined samples: every rank takes every rank's, rank 0 writes
        the list, and a loader started without some of them starts again at the next micro-batch."""
        new = self.new
        if rt.world > 1:
            every = [None] * rt.world
            dist.all_gather_object(every, self.new, group=rt.startup_group)
            new = [entry for entries in every for entry in entries]
        self.new = []
        for entry in new:
            self.quarantine.setdefault(entry["path"], entry)
        if rt.master:
            write_quarantine(self.out_dir, self.quarantine)
        if set(self.quarantine) != self.applied:
            self.start_again()


def watchdog(ref):
    """A thread: a TrainBatches' look() each POLL seconds while it lives (`ref` is a weak reference). A thread,
    as the loop may wait where it cannot look: a stopped worker never answers the request for the memory of
    a batch it sent."""
    while True:
        time.sleep(POLL)
        batches = ref()
        if batches is None:
            return
        batches.look()
        del batches  # no strong reference while asleep: the loader's end is the thread's


class Guard:
    """ClipDataset.before_read (data.py): a quarantined path raises as an unreadable file does. In a watched
    loader's worker it first writes the dataset, the index and the time into the worker's row."""

    def __init__(self, paths, row=None, d=0):
        self.paths, self.row, self.d = frozenset(paths), row, d

    def __call__(self, index, path):
        if self.row is not None:
            self.row[SINCE] = 0  # the row is read while it is written: the time goes last
            self.row[DATASET], self.row[INDEX], self.row[SINCE] = self.d, index, time.monotonic()
        if path in self.paths:
            raise SampleError(f"quarantined: it stopped a loader worker ({QUARANTINE} in the run's folder)")


def guard(datasets, folder):
    """Each dataset skips the paths quarantined in `folder` (a run's out_dir), counted as unreadable."""
    quarantine = read_quarantine(folder)
    for ds in datasets:
        ds.before_read = Guard(quarantine)


def read_quarantine(folder):
    """{path: entry} from <folder>/quarantine.jsonl, a {"dataset", "path", "why"} object a line; {} if none.
    A line that is not one is said and left out (at worst its file stops a worker again); so is a file that
    cannot be read, in one line."""
    file, entries = os.path.join(folder, QUARANTINE), {}
    if not os.path.lexists(file):
        return entries
    try:
        with open(file, "rb") as f:  # bytes: a line that is not UTF-8 is one bad line, not the file's end
            lines = f.read().splitlines()
    except OSError as e:
        print(f"warning: cannot read {printable(file)} ({e.strerror or e}): its files may be read again")
        return entries
    for n, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
            entries[entry["path"]] = entry
        except (ValueError, TypeError, KeyError):
            if line.strip():
                print(f"warning: {printable(file)} line {n} is not a quarantine entry ({{\"path\": ...}}): ignored")
    return entries


def write_quarantine(folder, entries):
    """Write the list whole (a temporary file, renamed); a disk that refuses is one line, and the run goes on."""
    file = os.path.join(folder, QUARANTINE)
    try:
        with open(f"{file}.tmp", "w") as f:
            f.writelines(json.dumps(e) + "\n" for e in entries.values())
        os.replace(f"{file}.tmp", file)
    except OSError as e:
        tqdm.write(f"warning: cannot write {file} ({e.strerror or e}): a resumed run will read its samples again")


def exit_status(code, parent=0):
    """How a worker ended, from its exit code: 255 is the fork server's word that it could not tell."""
    if code == 255 and parent and ended(parent, wait=2.0):
        return f"ended with the fork server (pid {parent}), which is gone"
    if code >= 0:
        return f"exited with status {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:  # a real-time signal has no name
        return f"killed by signal {-code}"


def ended(pid, wait):
    """Whether the process has ended, given `wait` seconds to go (a fork server killed with its workers may
    still be on its way out when their deaths are seen)."""
    deadline = time.monotonic() + wait
    while process_state(pid) not in ("gone", "dead (Z)"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def proc_stat(pid):
    """/proc/<pid>/stat's fields from the state on (state, ppid, ...); None when the process is gone; [] where
    there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None if os.path.isdir("/proc") else []
    except (OSError, IndexError):
        return []


def started(pid):
    """The start time of process `pid` (clock ticks since boot), None if unknown: with the pid, it names one process."""
    fields = proc_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def cpu_time(pid):
    """CPU time process `pid` has used (clock ticks), None if unknown."""
    fields = proc_stat(pid)
    return int(fields[11]) + int(fields[12]) if fields and len(fields) > 12 else None


def mine(pid, start):
    """Whether `pid` is still the live process that started at `start` (not one that reuses its pid)."""
    fields = proc_stat(pid)
    if fields == []:  # no /proc to ask: the pid it is
        return True
    return bool(fields) and fields[0] != "Z" and start is not None and int(fields[19]) == start


def process_state(pid):
    """'stopped (T)' and the like, from /proc where there is one (a stalled disk shows as D); 'gone'."""
    fields = proc_stat(pid)
    if fields is None:
        return "gone"
    if not fields:
        return "state unknown"
    return f"{STATES.get(fields[0], 'state')} ({fields[0]})"


def printable(path):
    """A path as it prints anywhere: bytes that are not UTF-8 (os.fsdecode's surrogates) as \\x.. escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


STATES = {"R": "running", "S": "sleeping", "D": "in uninterruptible disk wait", "T": "stopped", "Z": "dead"}


def loader_kwargs(workers, pin_memory, prefetch, table=None):
    # the workers' seeds from a generator of the loader's own: a restart draws nothing from torch's
    kw = dict(num_workers=workers, pin_memory=pin_memory, generator=torch.Generator(),
              worker_init_fn=functools.partial(worker_init, owner=os.getpid(), table=table))
    if workers > 0:
        # Workers start from a clean forkserver process, not a fork of this one: a fork inherits OpenCV's
        # thread pool (a worker forked while it was busy hangs in cv2) and, under DDP, the process group's
        # sockets (a worker outliving a killed rank holds them, and an elastic restart hangs on it).
        kw.update(persistent_workers=True, prefetch_factor=prefetch, multiprocessing_context="forkserver")
    return kw


def worker_init(worker_id, owner=None, table=None):
    cv2.setNumThreads(1)  # one decoder thread per worker: the workers are the parallelism
    torch.set_num_threads(1)
    if owner is not None:
        threading.Thread(target=exit_with, args=(owner,), daemon=True).start()
    if table is not None:  # a watched loader: this worker's row of the table says what it reads
        row = table.numpy()[worker_id]
        row[PARENT], row[PID] = os.getppid(), os.getpid()  # the fork server: its death ends the workers
        multi = torch.utils.data.get_worker_info().dataset
        multi.row = row
        for d, ds in enumerate(multi.datasets):
            ds.before_read = Guard(ds.before_read.paths, row, d)
            data._WARNED.update(ds.before_read.paths)  # said where quarantined, not again by each new worker


def exit_with(pid):
    """End this worker once process `pid`, which it loads for, has ended (also by SIGKILL). A forkserver
    worker is a child of the fork server, so DataLoader's own check on its parent never fires."""
    while True:
        time.sleep(1)
        try:
            os.kill(pid, 0)
        except OSError:  # no such process (or, after pid reuse, someone else's)
            os._exit(0)
