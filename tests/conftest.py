import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import load_reference_and_builder


def pytest_collection_modifyitems(items):
    """A test that starts an engine is also ``slow``: ``-m "not slow"`` is the engine-free tier,
    as ``-m "not engine"`` is."""
    for item in items:
        if item.get_closest_marker("engine") is not None:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    from tiny_models import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-refrag", k=16, max_positions=8192)


@pytest.fixture(scope="session")
def tiny_reference_and_builder(tiny_ckpt):
    return load_reference_and_builder(tiny_ckpt)


@pytest.fixture(scope="session")
def reference(tiny_reference_and_builder):
    return tiny_reference_and_builder[0]


@pytest.fixture(scope="session")
def builder(tiny_reference_and_builder):
    return tiny_reference_and_builder[1]
