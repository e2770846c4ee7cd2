"""
train.py under PyTorch's profiler, for tools/selfcheck.py: after --skip optimizer steps and one warm-up
step, --steps steps are profiled, and rank 0 writes to --json their mean step time, the GPU's idle share
(the time in those steps that no kernel or copy runs) and kernels per step, the run's peak GPU memory and
the process group's backend. Launched as train.py is, its own flags before `--`, train.py's after:

    torchrun --nproc_per_node=1 tools/profile_train.py --json prof.json --skip 10 --steps 10 -- --ddp ...

--steps 0 profiles nothing (the backend and peak memory are still written).
"""

import argparse
import json
import os
import sys

# the project's modules are in the folder above, which is not on the path when this runs as a script
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402
from torch.profiler import ProfilerActivity, profile, schedule  # noqa: E402

import train  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True, help="where rank 0 writes the summary")
    p.add_argument("--skip", type=int, default=10, help="optimizer steps before the warm-up step")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps profiled (0: none)")
    return p.parse_args(argv)


def busy_time(intervals, start, end):
    """Microseconds of [start, end] that the union of the (start, end) intervals covers."""
    busy, reach = 0.0, start
    for a, b in sorted(intervals):
        a, b = max(a, reach), min(b, end)
        if b > a:
            busy, reach = busy + b - a, b
    return busy


def summarize(events, whole):
    """Step time, the GPU's idle share and kernels per step of the profiled steps, from the profiler's events:
    the first `whole` of its ProfilerStep spans (one per optimizer step; a span after them no optimizer step
    ended: the run's final save, test and teardown) and the GPU's kernels and copies; {} for none."""
    spans = sorted((e.time_range for e in events if e.name.startswith("ProfilerStep")), key=lambda r: r.start)
    spans = spans[:max(whole, 0)]
    if not spans:
        return {}
    gpu = [e for e in events if e.device_type == DeviceType.CUDA]
    start, end = min(s.start for s in spans), max(s.end for s in spans)
    out = {"steps": len(spans), "step_ms": (end - start) / len(spans) / 1000}
    if gpu:
        busy = busy_time([(e.time_range.start, e.time_range.end) for e in gpu], start, end)
        kernels = [e for e in gpu if not e.name.startswith(("Memcpy", "Memset"))]
        out.update(gpu_idle=1 - busy / (end - start), kernels_per_step=len(kernels) / len(spans))
    return out


class Recorder:
    """The profiler, stepped by the optimizer's steps, and what it and the steps show."""

    def __init__(self, skip, steps, cuda):
        self.result, self.profiler, self.skip, self.steps, self.taken = {}, None, skip, steps, 0
        if steps:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            self.profiler = profile(activities=activities, on_trace_ready=self.trace_ready,
                                    schedule=schedule(skip_first=skip, wait=0, warmup=1, active=steps, repeat=1))

    def trace_ready(self, prof):  # after the window's last step, or at stop() when the run ended within it
        whole = min(self.steps, self.taken - self.skip - 1)  # the steps taken after the warm-up one
        self.result.update(summarize(prof.events(), whole))

    def after_step(self, optimizer, args, kwargs):  # an optimizer step-post hook
        self.result.setdefault("backend", dist.get_backend() if dist.is_initialized() else None)
        self.taken += 1
        if self.profiler is not None:
            self.profiler.step()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    args, train_argv = parse_args(argv[:cut]), argv[cut + 1:]
    cuda = torch.cuda.is_available() and not train.get_args(train_argv).device.startswith(("cpu", "mps"))
    recorder = Recorder(args.skip, args.steps, cuda)
    hook = register_optimizer_step_post_hook(recorder.after_step)
    if recorder.profiler is not None:
        recorder.profiler.start()
    try:
        train.main(train_argv)
    finally:
        if recorder.profiler is not None:
            recorder.profiler.stop()  # a window cut short by the run's end: its whole steps are summarized
        hook.remove()
    if int(os.environ.get("RANK", 0)) == 0:
        recorder.result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        with open(args.json, "w") as f:
            json.dump(recorder.result, f, indent=1)


if __name__ == "__main__":
    main()
