import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import demo  # noqa: E402


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """The three demo datasets, written once per test session at a reduced size (same formats, same readers)."""
    d = tmp_path_factory.mktemp("demo")
    mp = pytest.MonkeyPatch()
    mp.setattr(demo, "TRAIN_PER_CLASS", {"demo_kinetics": 6, "demo_ssv2": 6, "demo_imagenet": 8})
    mp.setattr(demo, "VAL_PER_CLASS", 3)
    demo.prepare(str(d))
    mp.undo()
    return str(d)
