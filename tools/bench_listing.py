"""
Listing at Kinetics scale, timed: the work a run does once at start-up (listings are cached after it). The
annotation CSVs are generated; no clip is on disk, so the check that each listed file exists (one directory
listing per folder, layouts.drop_missing) is not timed. Sizes as Kinetics': one training CSV of --rows rows
(650k: K710's videos), validation lists of 20k / 28k / 35k videos (K400 / K600 / K700) of which 5% are in
the training list, and for k710's merge three training listings of 240k / 383k / 542k rows that share
videos as the versions do (~650k videos in all).

  python tools/bench_listing.py               # full scale, a few minutes
  python tools/bench_listing.py --scale 0.01  # a smoke test

Prints the fastest of --rounds, in seconds, for: parsing the CSV; the listing's arrays (Listing.from_pairs,
YouTube ids included); the ids alone; save, and load memory-mapped; the guard (layouts.leave_out, the kept
listing saved); kinetics.merge of the three versions. One JSON line too (and appended to --json FILE).
"""

import argparse
import csv
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's modules

import kinetics  # noqa: E402
import layouts  # noqa: E402

ALPHABET = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", np.uint8)


def youtube_like(n, rng):
    """n random 11-character ids (bytes 'S11'); at 64^11 of them, a repeat is never drawn."""
    return rng.choice(ALPHABET, (n, 11)).view("S11").ravel()


def listing_of(root, ids, classes, rng):
    """A Listing of clips <id>_000010_000020.mp4 in <root>/train with random labels."""
    labels = rng.integers(len(classes), size=len(ids))
    return layouts.Listing.from_pairs(root, classes, [(os.path.join(root, "train", f"{i.decode()}_000010_000020.mp4"),
                                                       int(y)) for i, y in zip(ids, labels)])


def fastest(fn, rounds):
    best, result = float("inf"), None
    for _ in range(rounds):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--rows", type=int, default=650_000, help="rows of the training CSV")
    p.add_argument("--scale", type=float, default=1.0, help="every size x this (0.01: a smoke test)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", help="append the JSON line to this file")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    n = max(1, round(args.rows * args.scale))
    classes = [f"class {k:03d}" for k in range(700)]
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        val_ids = {v: youtube_like(max(1, round(m * args.scale)), rng) for v, m in
                   [("k400", 20_000), ("k600", 28_000), ("k700", 35_000)]}
        shared = np.concatenate([ids[: len(ids) // 20] for ids in val_ids.values()])  # 5%: in training too
        train_ids = np.concatenate([youtube_like(n - len(shared), rng), shared])
        csv_path = os.path.join(tmp, "train.csv")
        with open(csv_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["label", "youtube_id", "time_start", "time_end", "split"])
            w.writerows([classes[int(y)], i.decode(), 10, 20, "train"] for i, y in
                        zip(train_ids, rng.integers(len(classes), size=n)))
        root = os.path.join(tmp, "k700")
        times["parse"], entries = fastest(lambda: layouts.read_kinetics_csv(csv_path, os.path.join(root, "train"),
                                                                            {}), args.rounds)
        index = {c: k for k, c in enumerate(classes)}
        pairs = [(path, index[label]) for path, label in entries]
        times["arrays with ids"], train = fastest(lambda: layouts.Listing.from_pairs(root, classes, pairs), args.rounds)
        times["ids alone"], _ = fastest(lambda: layouts.youtube_ids(train.paths), args.rounds)
        file = os.path.join(tmp, "k700-train")
        times["save"], _ = fastest(lambda: train.save(file), args.rounds)
        times["load"], saved = fastest(lambda: layouts.Listing.load(file), args.rounds)
        val = {v: listing_of(os.path.join(tmp, v), ids, classes, rng) for v, ids in val_ids.items()}
        times["guard"], kept = fastest(lambda: layouts.leave_out(saved, val, os.path.join(tmp, "guarded")), args.rounds)
        # k710: K600 holds most of K400's training videos, K700 most of K600's (~650k videos in all)
        sizes = [round(m * args.scale) for m in (240_000, 383_000, 542_000)]
        pool = youtube_like(round(650_000 * args.scale), rng)
        picks = [pool[: sizes[0]], pool[rng.permutation(round(sizes[0] * 1.6))[: sizes[1]]],
                 pool[-sizes[2]:]]
        parts = {v: listing_of(os.path.join(tmp, v), ids, classes, rng) for v, ids in zip(kinetics.VERSIONS, picks)}
        times["k710 merge"], merged = fastest(lambda: kinetics.merge(tmp, parts), args.rounds)
    result = {"rows": n, "left_out": kept.left_out, "k710_rows": sum(sizes), "k710_videos": len(merged),
              "seconds": {k: round(v, 3) for k, v in times.items()}}
    print(f"listing {n} training rows (fastest of {args.rounds}; no clip on disk, existence check not timed):")
    for k, v in times.items():
        print(f"  {k:18s} {v:8.3f} s")
    print(f"  guard left out {kept.left_out['total']} (of {kept.left_out['of']}); k710: {sum(sizes)} rows, "
          f"{len(merged)} videos")
    print(json.dumps(result))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
