"""
OpenCV's reader counts a file's frames by grab() at its first open in a process (a header's count can be
wrong); what that costs, against a reader that takes the header's count, alternated in one process:

  git show 43877b3:video.py > video_before.py
  python tools/bench_opencv_count.py --before video_before.py FILE...

A sample is video_info and a read of 8 evenly spaced frames. 'first': every file's first sample in a process
(an empty video.KNOWN); 'again': a later one. Prints each side's fastest of --rounds, in ms a sample.
"""

import argparse
import importlib.util
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's modules

import video  # noqa: E402


def one_pass(mod, files, again):
    if not again:
        mod.KNOWN = mod.Known(64 * 2**20)
    start = time.perf_counter()
    for f in files:
        n, _ = mod.video_info(f)
        mod.read_video(f, np.linspace(0, n - 1, 8).round().astype(int))
    return (time.perf_counter() - start) * 1e3 / len(files)


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--before", required=True, help="a video.py that takes the header's count")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    spec = importlib.util.spec_from_file_location("video_before", args.before)
    before = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(before)
    video.BACKEND = before.BACKEND = "opencv"
    for again in (False, True):
        times = {video: [], before: []}
        for r in range(args.rounds):
            for mod in (video, before) if r % 2 == 0 else (before, video):  # alternated: the same machine load
                if again:
                    one_pass(mod, args.files, False)
                times[mod].append(one_pass(mod, args.files, again))
        now, then = min(times[video]), min(times[before])
        print(f"{'again' if again else 'first'}: counted {now:.2f} ms, header {then:.2f} ms, ratio {now / then:.2f}")


if __name__ == "__main__":
    main()
