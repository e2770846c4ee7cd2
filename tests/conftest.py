import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """The three demo datasets, generated once per test session at a reduced size (the full demo takes
    ~25 s to write; the formats and readers are the same)."""
    d = tmp_path_factory.mktemp("demo")
    mp = pytest.MonkeyPatch()
    mp.setattr(data, "DEMO_TRAIN_PER_CLASS", {"demo_kinetics": 6, "demo_ssv2": 6, "demo_imagenet": 8})
    mp.setattr(data, "DEMO_VAL_PER_CLASS", 3)
    for name in data.demo_names():
        data.build_dataset(name, str(d), "train")
    mp.undo()
    return str(d)
