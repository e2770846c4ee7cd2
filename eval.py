"""
Multi-view testing of a trained checkpoint: temporal clips x spatial crops per video, softmax averaged.

    python eval.py --ckpt out/ckpt.pt                        # the checkpoint's datasets and data folder
    python eval.py --ckpt out/ckpt.pt --datasets k400 --views 1x3
    torchrun --nproc_per_node=8 eval.py --ckpt out/ckpt.pt   # every clip counted once over all ranks
    python eval.py --ckpt out/ckpt.pt --video clip.mp4 --head k400   # top-5 class names for one file

A clip that cannot be decoded is counted as failed, never replaced; top-1/top-5 are over the clips that
decoded, and "clips" is the whole validation set.
"""

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

import data
import demo
import model as M
import runtime


@torch.inference_mode()
def evaluate(model, dataset, *, head, normalize, device, dtype=torch.float32, rank=0, world=1, batch_size=8,
             workers=2):
    """Top-1 / top-5 / per-class top-1 of `head` on `dataset` (built with train=False), over all ranks."""
    was_training = model.training
    model.eval()
    loader = data.build_eval_loader(dataset, batch_size=max(1, batch_size), rank=rank, world=world, workers=workers,
                                    pin_memory=device.type == "cuda")
    K = len(dataset.classes)
    hits = torch.zeros(4, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, decoded, failed
    class_hits = torch.zeros(2, K, dtype=torch.float64, device=device)  # per class: top-1 hits, decoded
    for batch in loader:
        B, V = batch["x"].shape[:2]  # (B, V, C, T, H, W) uint8
        x = normalize(batch["x"].to(device, non_blocking=True)).flatten(0, 1)  # (B*V, C, T, H, W)
        with runtime.autocast(device, dtype):
            logits = model(x, head=head)
        prob = logits.float().softmax(dim=-1).view(B, V, K).mean(dim=1)  # average the views' softmax
        y, ok = batch["y"].to(device), batch["ok"].to(device)
        top = prob.topk(min(5, K), dim=-1).indices  # (B, 5)
        hit1 = (top[:, 0] == y) & ok
        hit5 = (top == y[:, None]).any(dim=-1) & ok
        hits += torch.stack([hit1.sum(), hit5.sum(), ok.sum(), (~ok).sum()]).double()
        class_hits[0].index_add_(0, y[ok], hit1[ok].double())
        class_hits[1].index_add_(0, y[ok], torch.ones_like(y[ok], dtype=torch.float64))
    if world > 1:
        dist.all_reduce(hits)
        dist.all_reduce(class_hits)
    model.train(was_training)
    top1, top5, decoded, failed = hits.tolist()
    seen = class_hits[1] > 0
    per_class = (class_hits[0] / class_hits[1].clamp(min=1)).tolist()
    return {"top1": top1 / max(decoded, 1), "top5": top5 / max(decoded, 1), "clips": int(decoded + failed),
            "failed": int(failed), "views": dataset.num_views,
            "mean_class_top1": (class_hits[0][seen] / class_hits[1][seen]).mean().item() if seen.any() else 0.0,
            "per_class_top1": {dataset.classes[i]: round(a, 4) for i, a in enumerate(per_class) if seen[i]}}


def test_all(model, datasets, *, batch_sizes, out, rank=0, **kw):
    """The multi-view test of each of `datasets` ({name: dataset}); rank 0 prints a table and writes `out`."""
    results = {n: evaluate(model, ds, head=n, batch_size=batch_sizes[n], rank=rank, **kw) for n, ds in datasets.items()}
    if rank == 0:
        print(f"multi-view test, softmax averaged over each clip's views:\n  {'dataset':16s} {'top-1':>6s} {'top-5':>6s} "
              f"{'mean-class':>10s} {'clips':>6s} {'views':>5s} {'failed':>6s}")
        for n, r in results.items():
            print(f"  {n:16s} {100 * r['top1']:6.1f} {100 * r['top5']:6.1f} {100 * r['mean_class_top1']:10.1f} "
                  f"{r['clips']:6d} {r['views']:5d} {r['failed']:6d}")
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out/ckpt.pt", help="a ckpt.pt written by train.py")
    p.add_argument("--datasets", help="comma-separated datasets to test (default: the checkpoint's)")
    p.add_argument("--data_dir", help="data folder (default: the checkpoint's)")
    p.add_argument("--views", help="CLIPSxCROPS, e.g. 1x3 (default: per dataset, as the paper: 1x3 for K400 and SSv2)")
    p.add_argument("--batch_size", type=int, default=8, help="videos per forward pass (each with all its views)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers")
    p.add_argument("--dtype", choices=list(runtime.DTYPES), help="autocast precision (default: the run's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--out", help="where to write the JSON (default: <ckpt folder>/eval.json)")
    p.add_argument("--video", help="predict one video or image file instead of testing datasets")
    p.add_argument("--head", help="with --video: which dataset's classes (default: the first head)")
    args = p.parse_args(argv)
    if not os.path.isfile(args.ckpt):
        sys.exit(f"error: no checkpoint at {args.ckpt}; train one with train.py or pass --ckpt")
    try:
        ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=True)
        run, label_maps = ckpt["config"], ckpt["label_maps"]
    except Exception as e:  # truncated, foreign or not a checkpoint at all
        sys.exit(f"error: {args.ckpt} is not a checkpoint of train.py ({type(e).__name__}: {e})")
    names = (args.datasets or run["datasets"]).split(",")
    head = args.head or names[0]
    unknown = [n for n in ([head] if args.video else names) if n not in label_maps]
    if unknown:
        sys.exit(f"error: the checkpoint has heads {list(label_maps)}, none for {unknown}")
    views = tuple(int(v) for v in args.views.lower().split("x")) if args.views else None
    rt = runtime.setup(args.device)
    model = M.TimeSformer.from_pretrained(ckpt, verbose=False).to(rt.device).eval()
    del ckpt
    dtype = runtime.DTYPES[args.dtype or run["dtype"]]
    dtype = torch.bfloat16 if rt.device.type == "cpu" and dtype == torch.float16 else dtype
    normalize = data.Normalize(run["mean"], run["std"], rt.device)
    frames, img_size = run["frames"], run["img_size"]
    ckpt_dir = os.path.dirname(os.path.abspath(args.ckpt))

    if args.video:
        try:
            x = data.load_test_views(args.video, head, frames=frames, img_size=img_size, views=views)
        except (*data.READ_ERRORS, data.DatasetError) as e:
            sys.exit(f"error: cannot read {args.video}: {e}")
        with torch.inference_mode(), runtime.autocast(rt.device, dtype):
            prob = model(normalize(x.to(rt.device)), head=head).float().softmax(-1).mean(0)  # views averaged
        p, i = prob.topk(min(5, prob.numel()))
        for j, v in zip(i.tolist(), p.tolist()):
            print(f"{v:7.2%}  {label_maps[head][j]}")
        return

    def open_val(n):  # with the run's listing of the split, kept beside the checkpoint
        demo.prepare(args.data_dir or run["data_dir"], [n])
        return data.build_dataset(n, args.data_dir or run["data_dir"], "val", frames=frames, img_size=img_size,
                                  train=False, views=views, cache_dir=os.path.join(ckpt_dir, "listings"))

    try:
        datasets = {n: runtime.rank0_first(rt, lambda: open_val(n)) for n in names}
    except data.DatasetError as e:
        sys.exit(f"error: {e}")
    changed = [n for n, ds in datasets.items() if ds.classes != label_maps[n]]
    if changed:
        sys.exit(f"error: the classes of {changed} on disk differ from the ones the checkpoint was trained with")
    test_all(model, datasets, batch_sizes=dict.fromkeys(names, args.batch_size), out=args.out or os.path.join(ckpt_dir, "eval.json"),
             rank=rt.rank, world=rt.world, normalize=normalize, device=rt.device, dtype=dtype, workers=args.workers)
    runtime.teardown(rt)


if __name__ == "__main__":
    main()
