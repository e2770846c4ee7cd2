"""
Multi-view testing of a trained checkpoint (its moving average of the weights when train.py kept one):
temporal clips x spatial crops per video, softmax averaged. A clip that cannot be decoded is counted as
failed, never replaced: top-1/top-5 are over the clips that decoded, "clips" is the whole validation set.

    python eval.py --ckpt out/ckpt.pt                        # the checkpoint's datasets and data folder
    python eval.py --ckpt out/ckpt.pt --datasets k400 --views 1x3
    torchrun --nproc_per_node=8 eval.py --ckpt out/ckpt.pt   # every clip counted once over all ranks
    python eval.py --ckpt out/ckpt.pt --video clip.mp4 --head k400   # top-5 class names for one file

Features for linear probes or retrieval: features.py, with the same flags.
"""

import argparse
import contextlib
import json
import os
import sys

import torch
import torch.distributed as dist

import checkpoints
import data
import loaders
import demo  # noqa: F401  (registers the demo sets)
import model as M
import recipes
import runtime


@torch.inference_mode()
def evaluate(model, dataset, *, head, normalize, device, dtype=torch.float32, rank=0, world=1, batch_size=8,
             workers=2):
    """Top-1 / top-5 / per-class top-1 of `head` on `dataset` (train=False) over all ranks, in eval mode."""
    model.eval()
    loader = loaders.build_eval_loader(dataset, batch_size=max(1, batch_size), rank=rank, world=world,
                                    workers=workers, pin_memory=device.type == "cuda")
    K = len(dataset.classes)
    counts = torch.zeros(4, K, dtype=torch.float64, device=device)  # per class: top-1, top-5, decoded, failed
    for batch in loader:
        B, V = batch["x"].shape[:2]  # (B, V, C, T, H, W) uint8
        x = normalize(batch["x"].to(device, non_blocking=True)).flatten(0, 1)  # (B*V, C, T, H, W)
        with runtime.autocast(device, dtype):
            logits = model(x, head=head)
        prob = logits.float().softmax(dim=-1).view(B, V, K).mean(dim=1)  # average the views' softmax
        y, ok = batch["y"].to(device), batch["ok"].to(device)
        top = prob.topk(min(5, K), dim=-1).indices  # (B, 5)
        counts[0].index_add_(0, y, ((top[:, 0] == y) & ok).double())
        counts[1].index_add_(0, y, ((top == y[:, None]).any(dim=-1) & ok).double())
        counts[2].index_add_(0, y, ok.double())
        counts[3].index_add_(0, y, (~ok).double())
    if world > 1:
        dist.all_reduce(counts)
    top1, top5, decoded, failed = counts.sum(dim=1).tolist()
    seen = counts[2] > 0
    acc = counts[0] / counts[2].clamp(min=1)
    return {"top1": top1 / max(decoded, 1), "top5": top5 / max(decoded, 1), "clips": int(decoded + failed),
            "failed": int(failed), "views": dataset.num_views,
            "mean_class_top1": acc[seen].mean().item() if seen.any() else 0.0,
            "per_class_top1": {c: round(a, 4) for c, a, s in zip(dataset.classes, acc.tolist(), seen) if s}}


def test_all(model, datasets, *, batch_sizes, out=None, rank=0, **kw):
    """Tests each of `datasets` ({name: dataset}); rank 0 prints a table and writes it to `out` (JSON)."""
    results = {n: evaluate(model, ds, head=n, batch_size=batch_sizes[n], rank=rank, **kw)
               for n, ds in datasets.items()}
    if rank == 0:
        print("\ntest, softmax averaged over each clip's views:\n"
              "  dataset           top-1  top-5 mean-class  clips views failed")
        for n, r in results.items():
            top1, top5, mean_class = (100 * r[k] for k in ("top1", "top5", "mean_class_top1"))
            print(f"  {n:16s} {top1:6.1f} {top5:6.1f} {mean_class:10.1f} {r['clips']:6d} {r['views']:5d} "
                  f"{r['failed']:6d}")
        if out:
            try:  # a temporary file, renamed: a full disk leaves no eval.json cut short
                with open(f"{out}.tmp", "w") as f:
                    json.dump(results, f, indent=1)
                os.replace(f"{out}.tmp", out)
            except OSError as e:
                with contextlib.suppress(OSError):
                    os.remove(f"{out}.tmp")
                sys.exit(f"error: cannot write {out}: {e.strerror or e} (the results are printed above)")
    return results


def arguments(description):
    """The flags eval.py and features.py share."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out/ckpt.pt", help="a ckpt.pt written by train.py")
    p.add_argument("--datasets", help="comma-separated datasets (default: the checkpoint's)")
    p.add_argument("--data_dir", help="data folder (default: the checkpoint's)")
    p.add_argument("--views", type=lambda v: tuple(int(n) for n in v.lower().split("x")),
                   help="CLIPSxCROPS, e.g. 1x3 (default: the dataset's; 1x3 for K400 and SSv2)")
    p.add_argument("--batch_size", type=int, default=8, help="videos per forward pass, with all their views")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers")
    p.add_argument("--dtype", choices=list(runtime.DTYPES), help="autocast precision (default: the run's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--video", help="one video or image file instead of the datasets")
    p.add_argument("--head", help="with --video: which dataset's classes (default: the first head)")
    p.add_argument("--split", default="val", choices=["train", "val"], help="the datasets' split")
    p.add_argument("--live", action="store_true", help="the live weights, not their moving average (--ema)")
    return p


def load(args):
    """-> (runtime, model on its device, the run's config, its label maps, the dataset names to use), with
    one line and exit status 1 for a file that is not a checkpoint of train.py or lacks a head asked for."""
    try:  # missing, empty, cut short, not a checkpoint, not train.py's: one line
        ckpt = checkpoints.read_file(args.ckpt)
        runtime.check_run_checkpoint(ckpt, args.ckpt)
    except ValueError as e:
        sys.exit(f"error: --ckpt {e}")
    run, label_maps = ckpt["config"], ckpt["label_maps"]
    names = (args.datasets or run["datasets"]).split(",")
    names = [args.head or names[0]] if args.video else names
    if set(names) - set(label_maps):
        sys.exit(f"error: the checkpoint has heads {list(label_maps)}, not {set(names) - set(label_maps)}")
    if args.live:
        ckpt.pop("ema", None)
    rt = runtime.setup(args.device)
    # the load report says which weights: the moving average or the live ones
    model = M.TimeSformer.from_pretrained(ckpt, verbose=rt.master and not args.video).to(rt.device).eval()
    return rt, model, run, label_maps, names


def open_datasets(args, rt, run, label_maps, names, split="val"):
    """{name: dataset in eval mode} of one split, from the run's listings."""
    listings = os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "listings")  # made by train.py
    try:
        datasets = {n: runtime.rank0_first(rt, data.build_dataset, n, args.data_dir or run["data_dir"],
                                           split, train=False, cache_dir=listings, **sizes(args, run, n))
                    for n in names}
    except data.DatasetError as e:
        sys.exit(f"error: {e}")
    if any(ds.classes != label_maps[n] for n, ds in datasets.items()):
        sys.exit("error: the classes on disk differ from the ones the checkpoint was trained with")
    loaders.guard(datasets.values(), os.path.dirname(os.path.abspath(args.ckpt)))  # quarantined: failed, unread
    return datasets


def sizes(args, run, name):
    """The run's clip shape and its sampling of dataset `name` (train.py --sampling), and --views."""
    flags = argparse.Namespace(datasets=run["datasets"], recipe=run["recipe"], sampling=run.get("sampling", ""))
    return dict(frames=run["frames"], img_size=run["img_size"], views=args.views,
                sampling=recipes.sampling(flags, name))


def file_views(args, run, name):
    """uint8 (V, C, T, H, W): the test views of the file --video, as dataset `name` samples them."""
    try:
        return data.load_test_views(args.video, name, **sizes(args, run, name))
    except (*data.READ_ERRORS, data.DatasetError) as e:
        sys.exit(f"error: cannot read {args.video}: {e}")


def main(argv=None):
    p = arguments(__doc__)
    p.add_argument("--out", help="where to write the JSON (default: <ckpt folder>/eval.json)")
    args = p.parse_args(argv)
    rt, model, run, label_maps, names = load(args)
    normalize = data.Normalize(run["mean"], run["std"], rt.device)
    dtype = runtime.DTYPES[args.dtype or run["dtype"]]
    if args.video:  # top-5 classes of one file, its test views' softmax averaged
        x = file_views(args, run, names[0])  # (V, C, T, H, W) uint8
        with torch.inference_mode(), runtime.autocast(rt.device, dtype):
            prob = model(normalize(x.to(rt.device)), head=names[0]).float().softmax(-1).mean(0)
        for p, i in zip(*prob.topk(min(5, len(prob)))):
            print(f"{p.item():7.2%}  {label_maps[names[0]][i]}")
        return
    datasets = open_datasets(args, rt, run, label_maps, names, args.split)
    test_all(model, datasets, batch_sizes=dict.fromkeys(names, args.batch_size), rank=rt.rank, world=rt.world,
             out=args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "eval.json"),
             normalize=normalize, device=rt.device, dtype=dtype, workers=args.workers)
    runtime.teardown(rt)


if __name__ == "__main__":
    main()
