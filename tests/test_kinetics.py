"""kinetics.py and the guard on miniature official K400 / K600 / K700 layouts (annotation CSVs and real clips):
training sets that hold validation videos of another version and of their own, renamed classes, a video in
two versions; real train.py and eval.py runs."""

import argparse
import json
import os

import numpy as np
import pytest
import torch

import data
import eval as evaluate_mod
import kinetics
import layouts
import recipes
import train
from media import tiny_video, write_kinetics_csv


def yid(tag):
    """An 11-character YouTube-like id."""
    return f"{tag:-<11}"


# version -> split -> [(label, YouTube id)]. The K400 validation videos v400a, v400b are in K400's own training
# list (v400a), K600's (v400b) and K700's (v400a); K600's v600a is in K700's; a3 is in K400 and K700 (renamed
# class). "drinking" (K400) and "sipping cup" (K600/K700) stay two classes: a split, not a rename.
LISTS = {
    "k400": {"train": [("abseiling", "a1"), ("dying hair", "a2"), ("making bed", "a3"), ("drinking", "a4"),
                       ("abseiling", "v400a")],
             "val": [("abseiling", "v400a"), ("dying hair", "v400b")]},
    "k600": {"train": [("abseiling", "b1"), ("dyeing hair", "b2"), ("sipping cup", "b3"),
                       ("passing american football (not in game)", "b4"), ("dyeing hair", "v400b")],
             "val": [("sipping cup", "v600a")]},
    "k700": {"train": [("abseiling", "c1"), ("dyeing hair", "c2"), ("making the bed", "c3"), ("sipping cup", "c4"),
                       ("passing American football (not in game)", "c5"), ("abseiling", "v400a"),
                       ("sipping cup", "v600a"), ("making the bed", "a3")],
             "val": [("making the bed", "v700a")]},
}
# the training files that are validation videos of a version, per training set
VAL_IN_TRAIN = {"k400": ["v400a"], "k600": ["v400b"], "k700": ["v400a", "v600a"]}
MERGED = ["abseiling", "drinking", "dyeing hair", "making the bed", "passing American football (not in game)",
          "sipping cup"]


def write_versions(root, versions=("k400", "k600", "k700"), spoil=True):
    """The versions in the official flat layout; the training copies of validation videos are not videos
    (spoil): a read of one in training is a failure that the run counts."""
    for v in versions:
        for split, rows in LISTS[v].items():
            folder = "train" if split == "train" else "val"
            write_kinetics_csv(root / v / "annotations" / f"{split}.csv",
                               [[label, yid(t), 10, 20, "train" if split == "train" else "validate"]
                                for label, t in rows])
            for _, t in rows:
                path = root / v / folder / f"{yid(t)}_000010_000020.mp4"
                if spoil and split == "train" and t in VAL_IN_TRAIN[v]:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(b"not a video: a validation video, never to be read in training")
                else:
                    tiny_video(path)
    return str(root)


@pytest.fixture(scope="module")
def kinetics_dir(tmp_path_factory):
    return write_versions(tmp_path_factory.mktemp("kinetics"))


RUN = ["--recipe", "demo", "--img_size", "32", "--frames", "4", "--batch_size", "4", "--workers", "0",
       "--warmup_steps", "1", "--eval_every", "0", "--log_every", "1", "--final_eval", "none"]


def ids_of(ds):
    return sorted(ds.samples.ids[i].decode().rstrip("-") for i in range(len(ds)))


def test_listings_carry_the_youtube_id_of_each_clip(kinetics_dir, tmp_path):
    ds = data.build_dataset("k700", kinetics_dir, "train")
    assert ids_of(ds) == sorted(t for _, t in LISTS["k700"]["train"])
    tiny_video(tmp_path / "mine" / "train" / "a" / f"{yid('x1')}_000001_000011.avi")  # any layout, any extension
    tiny_video(tmp_path / "mine" / "train" / "a" / "my_clip_000001_000011.mp4")  # an id is 11 characters
    tiny_video(tmp_path / "mine" / "train" / "a" / "take3.mp4")
    mine = data.build_dataset("mine", tmp_path, "train", cache_dir=str(tmp_path / "cache"))
    assert sorted(mine.samples.ids.tolist()) == [b"", b"", yid("x1").encode()]
    assert isinstance(mine.samples.ids, np.memmap)  # saved with the listing, memory-mapped back


def test_the_guard_counts_and_leaves_out_validation_videos_of_any_version(kinetics_dir):
    val = {v: data.build_dataset(v, kinetics_dir, "val").samples for v in kinetics.VERSIONS}
    for v in kinetics.VERSIONS:
        ds = data.build_dataset(v, kinetics_dir, "train", validation=val)
        assert ids_of(ds) == sorted(t for _, t in LISTS[v]["train"] if t not in VAL_IN_TRAIN[v])
        whose = {w: sum(yid(t) in {yid(u) for _, u in LISTS[w]["val"]} for t in VAL_IN_TRAIN[v]) for w in val}
        assert ds.samples.left_out == {"total": len(VAL_IN_TRAIN[v]), "of": whose}
    assert data.build_dataset("k700", kinetics_dir, "train", validation=val).samples.left_out["of"] == \
        {"k400": 1, "k600": 1, "k700": 0}


def test_k710_merges_renamed_classes_keeps_splits_apart_and_each_video_once(kinetics_dir, tmp_path):
    tr = data.build_dataset("k710", kinetics_dir, "train", cache_dir=str(tmp_path))
    assert tr.classes == MERGED
    rows = {tr.samples.ids[i].decode().rstrip("-"): (os.fsdecode(tr.samples.paths[i]).split(os.sep)[0],
                                                      tr.classes[tr.samples.labels[i]]) for i in range(len(tr))}
    every = {t for v in LISTS for _, t in LISTS[v]["train"]}
    assert len(tr) == len(rows) == len(every) == 16  # 18 rows, two videos listed twice
    assert rows["a3"] == ("k700", "making the bed") and rows["v400a"] == ("k700", "abseiling")  # the latest's
    assert rows["a2"] == ("k400", "dyeing hair") and rows["a4"] == ("k400", "drinking")
    assert rows["b4"] == ("k600", "passing American football (not in game)")
    assert tr.problems == {"same_video_in_a_later_version": 2}
    assert os.path.exists(tr.samples.path(0))
    assert {f.split("-")[0] for f in os.listdir(tmp_path)} == {"k400", "k600", "k700", "k710"}  # each cached
    va = data.build_dataset("k710", kinetics_dir, "val", cache_dir=str(tmp_path))
    assert va.classes == MERGED and ids_of(va) == ["v400a", "v400b", "v600a", "v700a"]
    guarded = data.build_dataset("k710", kinetics_dir, "train", validation={"k710": va.samples})
    assert guarded.samples.left_out == {"total": 3, "of": {"k710": 3}} and len(guarded) == 13
    # a head restricted to one version: its classes' rows of the merged head, in its order
    k400 = data.build_dataset("k400", kinetics_dir, "val")
    assert k400.classes == ["abseiling", "drinking", "dying hair", "making bed"]
    assert kinetics.label_rows("k400", k400.classes, MERGED) == [0, 1, 2, 3]
    assert kinetics.label_rows("k600", ["abseiling", "dyeing hair", "passing american football (not in game)",
                                        "sipping cup"], MERGED) == [0, 2, 4, 5]


def test_a_version_is_tested_through_its_rows_of_the_k710_head(kinetics_dir):
    """A stand-in model whose k710 logits favour 'sipping cup' (not a K400 class), then 'dyeing hair': on K400's
    validation set every clip is called K400's 'dying hair', right for one of its two clips."""
    class Fixed(torch.nn.Module):
        def forward(self, x, head):
            assert head == "k710"
            return torch.tensor([0.0, 1.0, 3.0, 2.0, 0.0, 9.0]).expand(len(x), -1)

    val = data.build_dataset("k400", kinetics_dir, "val", train=False, img_size=32, frames=4)
    rows = kinetics.label_rows("k400", val.classes, MERGED)
    r = evaluate_mod.evaluate(Fixed(), val, head="k710", rows=rows, device=torch.device("cpu"), workers=0,
                              normalize=data.Normalize([0.5] * 3, [0.5] * 3, "cpu"))
    assert r["top1"] == 0.5 and r["per_class_top1"] == {"abseiling": 0.0, "dying hair": 1.0}


def test_training_never_reads_a_validation_video_and_says_what_it_left_out(kinetics_dir, tmp_path, capsys):
    """Every training sample read (more steps than samples): with the guard no read fails, and the start-up
    report and log.jsonl give each set's count; with --train_on_val_videos the spoilt copies are read."""
    common = RUN + ["--datasets", "k400,k600,k700", "--data_dir", kinetics_dir, "--max_steps", "9"]
    train.main(common + ["--out_dir", str(tmp_path / "on")])
    out = capsys.readouterr().out
    ckpt = torch.load(tmp_path / "on" / "ckpt.pt", weights_only=True)
    assert ckpt["failed"] == {"k400": 0, "k600": 0, "k700": 0} and ckpt["config"]["train_on_val_videos"] is False
    assert "\n    k400: 1 left out (validation videos of k400: 1)\n    k600: 1 left out (validation videos of k400: " \
           "1)\n    k700: 2 left out (validation videos of k400: 1, k600: 1)\n" in out
    record = next(json.loads(line) for line in open(tmp_path / "on" / "log.jsonl") if '"guard"' in line)
    assert record["guard"] == {"on": True, "left_out": {
        "k400": {"total": 1, "of": {"k400": 1, "k600": 0, "k700": 0}},
        "k600": {"total": 1, "of": {"k400": 1, "k600": 0, "k700": 0}},
        "k700": {"total": 2, "of": {"k400": 1, "k600": 1, "k700": 0}}}}
    train.main(common + ["--out_dir", str(tmp_path / "off"), "--train_on_val_videos", "--stop_at", "6"])
    assert "NOT left out of training" in capsys.readouterr().out
    failed = torch.load(tmp_path / "off" / "ckpt.pt", weights_only=True)["failed"]
    assert all(failed[v] > 0 for v in kinetics.VERSIONS), failed
    with pytest.raises(SystemExit, match="trained with validation videos; resume it with --train_on_val_videos"):
        train.main(common + ["--out_dir", str(tmp_path / "off")])  # the guard on would change its training set


def test_k710_trains_one_head_and_tests_each_version_on_its_rows(kinetics_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(RUN + ["--datasets", "k710", "--data_dir", kinetics_dir, "--out_dir", str(out), "--max_steps", "4",
                      "--final_eval", "multiview"])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["label_maps"] == {"k710": MERGED} and ckpt["failed"] == {"k710": 0}
    results = json.load(open(out / "eval.json"))
    assert set(results) == set(kinetics.VERSIONS)
    for v, r in results.items():
        assert r["head"] == "k710" and r["guard"] == "on" and r["clips"] == len(LISTS[v]["val"]) and r["failed"] == 0
    evaluate_mod.main(["--ckpt", str(out / "ckpt.pt"), "--workers", "0", "--out", str(out / "again.json")])
    again = json.load(open(out / "again.json"))
    assert {v: again[v]["top1"] for v in again} == {v: results[v]["top1"] for v in results}
    evaluate_mod.main(["--ckpt", str(out / "ckpt.pt"), "--workers", "0", "--datasets", "k600", "--out",
                       str(out / "k600.json")])
    assert json.load(open(out / "k600.json"))["k600"]["top1"] == results["k600"]["top1"]
    assert ckpt["config"]["k710_versions"] == list(kinetics.VERSIONS)
    del ckpt["config"]["k710_versions"]  # a checkpoint from before the record: the versions on disk, said
    (out / "old").mkdir()
    torch.save(ckpt, out / "old" / "ckpt.pt")
    evaluate_mod.main(["--ckpt", str(out / "old" / "ckpt.pt"), "--workers", "0"])
    assert "does not record which Kinetics versions" in capsys.readouterr().out
    assert {v: r["top1"] for v, r in json.load(open(out / "old" / "eval.json")).items()} == \
        {v: results[v]["top1"] for v in results}


def test_bad_input_is_one_line(tmp_path, kinetics_dir):
    def error(argv):
        with pytest.raises(SystemExit) as e:
            train.main(RUN + ["--out_dir", str(tmp_path / "o"), "--max_steps", "2"] + argv)
        assert "\n" not in str(e.value), str(e.value)
        return str(e.value)

    (tmp_path / "empty").mkdir()
    assert "has none of k400/, k600/, k700/" in error(["--datasets", "k710", "--data_dir", str(tmp_path / "empty")])
    assert "name k710 or the versions, not both" in error(["--datasets", "k710,k400", "--data_dir", kinetics_dir])
    clash = write_versions(tmp_path / "clash", ["k400"], spoil=False)
    with open(os.path.join(clash, "k400", "annotations", "train.csv"), "a") as f:
        f.write(f"dyeing hair,{yid('a9')},10,20,train,0\n")  # both names of one class in one version
    tiny_video(os.path.join(clash, "k400", "train", f"{yid('a9')}_000010_000020.mp4"))
    assert "'dyeing hair' and 'dying hair', which k710 merges into one" in error(
        ["--datasets", "k710", "--data_dir", clash])
    with pytest.raises(layouts.DatasetError, match="trained without k700"):
        kinetics.label_rows("k700", ["abseiling", "zumba"], MERGED)


def test_the_guard_leaves_out_every_video_a_validation_list_names_on_disk_or_not(tmp_path):
    """K400's val.csv names v2 (its file missing, as 1-3% are) and v3 (a class K400 does not train): both are
    validation videos, and K700's training copies of them are left out; so in k710, whose merged validation
    set lists neither as a sample."""
    root = tmp_path / "d"
    lists = {"k400": {"train": [("abseiling", "a1"), ("zumba", "a2")],
                      "val": [("abseiling", "v1"), ("zumba", "v2"), ("yoga", "v3")]},
             "k700": {"train": [("abseiling", "c1"), ("abseiling", "v1"), ("zumba", "v2"), ("yoga", "v3")],
                      "val": [("yoga", "c9")]}}
    for v, splits in lists.items():
        for split, rows in splits.items():
            write_kinetics_csv(root / v / "annotations" / f"{split}.csv",
                               [[label, yid(t), 10, 20, split] for label, t in rows])
            for _, t in rows:
                if (v, t) != ("k400", "v2"):
                    tiny_video(root / v / ("train" if split == "train" else "val") / f"{yid(t)}_000010_000020.mp4")
    val = {v: data.build_dataset(v, str(root), "val", cache_dir=str(tmp_path / "cache")).samples for v in lists}
    assert ids_of_listing(val["k400"]) == ["v1"] and val["k400"].problems == {"missing": 1, "unknown_label": 1}
    assert sorted(val["k400"].absent_ids.tolist()) == [yid("v2").encode(), yid("v3").encode()]
    k700 = data.build_dataset("k700", str(root), "train", validation=val)
    assert ids_of(k700) == ["c1"] and k700.samples.left_out == {"total": 3, "of": {"k400": 3, "k700": 0}}
    cached = data.build_dataset("k400", str(root), "val", cache_dir=str(tmp_path / "cache")).samples
    assert cached.absent_ids.tolist() == val["k400"].absent_ids.tolist()  # kept with the saved listing
    k710_val = data.build_dataset("k710", str(root), "val").samples
    k710 = data.build_dataset("k710", str(root), "train", validation={"k710": k710_val})
    assert sorted(ids_of(k710)) == ["a1", "a2", "c1"] and k710.samples.left_out["total"] == 3


def ids_of_listing(samples):
    return sorted(i.decode().rstrip("-") for i in samples.ids.tolist())


def test_a_k710_run_is_tested_on_the_versions_it_was_built_from(tmp_path):
    """A k710 run built from K400 and K700 records them; K600 appears mid-run (its validation video v600a is
    in K700's training list, so k710 trained on it, and its 'yoga' is no class of the head): the final test and
    eval.py test K400 and K700 only, at k710's --sampling; K600 asked for, or a version missing, is one line."""
    root = write_versions(tmp_path / "d", ["k400", "k700"], spoil=False)
    out = tmp_path / "run"
    run = RUN + ["--datasets", "k710", "--data_dir", root, "--out_dir", str(out), "--max_steps", "2",
                 "--final_eval", "multiview", "--sampling", "k710=kinetics:4"]
    train.main(run + ["--stop_at", "1"])
    write_versions(tmp_path / "d", ["k600"], spoil=False)
    with open(os.path.join(root, "k600", "annotations", "train.csv"), "a") as f:
        f.write(f"yoga,{yid('b9')},10,20,train,0\n")
    tiny_video(os.path.join(root, "k600", "train", f"{yid('b9')}_000010_000020.mp4"))
    train.main(run)  # resumed: its listing is the one it started with
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["k710_versions"] == ["k400", "k700"]
    assert set(json.load(open(out / "eval.json"))) == {"k400", "k700"}
    evaluate_mod.main(["--ckpt", str(out / "ckpt.pt"), "--workers", "0", "--out", str(out / "again.json")])
    assert set(json.load(open(out / "again.json"))) == {"k400", "k700"}
    run_config = ckpt["config"]
    for v in ("k400", "k700"):  # tested as k710 trained: --sampling k710=kinetics:4
        assert recipes.sampling(argparse.Namespace(**run_config), v) == {"sampling": "kinetics", "rate": 4}
        assert evaluate_mod.sizes(argparse.Namespace(views=None), run_config, v)["sampling"]["rate"] == 4

    def error(*argv):
        with pytest.raises(SystemExit) as e:
            evaluate_mod.main(["--ckpt", str(out / "ckpt.pt"), "--workers", "0", "--out", str(out / "e.json"), *argv])
        assert "\n" not in str(e.value) and e.value.code != 0, e.value
        return str(e.value)

    assert "built from k400, k700, not k600" in error("--datasets", "k600")
    (tmp_path / "empty").mkdir()
    assert "has no k400/, k700/" in error("--data_dir", str(tmp_path / "empty"))
    only = write_versions(tmp_path / "only400", ["k400"], spoil=False)
    assert "has no k700/" in error("--data_dir", only)


def test_the_versions_of_a_k710_listing_saved_before_it_recorded_them(kinetics_dir, tmp_path):
    merged = data.build_dataset("k710", kinetics_dir, "train").samples
    assert merged.parts == ["k400", "k600", "k700"] == kinetics.versions(merged)
    merged.parts = None  # as saved before the record: the folders of its paths
    assert kinetics.versions(merged.subset(np.flatnonzero(merged.paths < b"k600"))) == ["k400"]
    assert kinetics.versions(merged) == ["k400", "k600", "k700"]
