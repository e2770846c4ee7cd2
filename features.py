"""
Features of a trained checkpoint, for linear probes, retrieval or clustering: the final-normed CLS feature
that every head reads (TimeSformer.forward_features), of each video of a dataset split, its test views
averaged. The flags are eval.py's; the weights are the moving average when train.py kept one (--live: not).

    python features.py --ckpt out/ckpt.pt --split train        # out/features/<dataset>_train.npz
    torchrun --nproc_per_node=8 features.py --ckpt out/ckpt.pt  # every clip once over all ranks
    python features.py --ckpt out/ckpt.pt --video clip.mp4     # out/features/clip.mp4.npz

np.load reads the files without pickle: features (N, D) float32, paths (N,), labels (N,) and classes,
and ok (N,), False where a file could not be decoded (its row is the feature of blank views).
"""

import os

import numpy as np
import torch
import torch.distributed as dist

import data
import loaders
import runtime
from eval import arguments, file_views, load, open_datasets


@torch.inference_mode()
def extract(model, dataset, out, *, normalize, device, dtype=torch.float32, rank=0, world=1, batch_size=8,
            workers=2):
    """Writes the features of every sample of `dataset` (train=False) to the .npz `out`. Rank r takes
    samples r, r + world, ...; rank 0 gathers them and writes them in the dataset's order."""
    model.eval()
    loader = loaders.build_eval_loader(dataset, batch_size=max(1, batch_size), rank=rank, world=world,
                                    workers=workers, pin_memory=device.type == "cuda")
    mine = [np.zeros((0, model.cfg.width), np.float32)], [np.zeros(0, np.int64)], [np.zeros(0, bool)]
    for batch in loader:
        B, V = batch["x"].shape[:2]  # (B, V, C, T, H, W) uint8
        x = normalize(batch["x"].to(device, non_blocking=True)).flatten(0, 1)  # (B*V, C, T, H, W)
        with runtime.autocast(device, dtype):
            features = model.forward_features(x).float().view(B, V, -1).mean(dim=1)  # (B, D)
        for part, array in zip(mine, (features.cpu().numpy(), batch["index"].numpy(), batch["ok"].numpy())):
            part.append(array)
    parts = [[np.concatenate(part) for part in mine]] * world
    if world > 1:
        dist.gather_object(parts[0], parts if rank == 0 else None)
    if rank == 0:
        features, index, ok = (np.concatenate(p) for p in zip(*parts))
        order = np.argsort(index)
        assert (index[order] == np.arange(len(dataset))).all(), "every sample exactly once over the ranks"
        np.savez(out, features=features[order], ok=ok[order], labels=np.asarray(dataset.samples.labels),
                 paths=np.array([dataset.samples.path(i) for i in range(len(dataset))]),
                 classes=np.array(dataset.classes))
        print(f"wrote {out}: {len(dataset)} features of {model.cfg.width}")


def main(argv=None):
    p = arguments(__doc__)
    p.add_argument("--out", help="the folder to write to (default: <ckpt folder>/features)")
    args = p.parse_args(argv)
    rt, model, run, label_maps, names = load(args)
    kw = dict(normalize=data.Normalize(run["mean"], run["std"], rt.device), device=rt.device,
              dtype=runtime.DTYPES[args.dtype or run["dtype"]])
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "features")
    os.makedirs(out, exist_ok=True)
    if args.video:  # one file: its views as the dataset `names[0]` would test it
        x = file_views(args, run, names[0])  # (V, C, T, H, W) uint8
        with torch.inference_mode(), runtime.autocast(rt.device, kw["dtype"]):
            feature = model.forward_features(kw["normalize"](x.to(rt.device))).float().mean(0, keepdim=True)
        path = os.path.join(out, os.path.basename(args.video) + ".npz")
        np.savez(path, features=feature.cpu().numpy(), paths=np.array([args.video]), ok=np.array([True]))
        print(f"wrote {path}")
        return
    for n, ds in open_datasets(args, rt, run, label_maps, names, args.split).items():
        extract(model, ds, os.path.join(out, f"{n}_{args.split}.npz"), rank=rt.rank, world=rt.world,
                batch_size=args.batch_size, workers=args.workers, **kw)
    runtime.teardown(rt)


if __name__ == "__main__":
    main()
