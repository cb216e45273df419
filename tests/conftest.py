import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from sam_factory import save_tiny_sam_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sam_checkpoint(tmp_path_factory) -> Path:
    """An official-layout `.pth` of a tiny random SAM; load with build_sam("auto", checkpoint=...)."""
    return save_tiny_sam_checkpoint(tmp_path_factory.mktemp("sam") / "tiny_sam.pth")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One PyTorch thread for a test module (``pytestmark = pytest.mark.usefixtures(...)``),
    restored afterwards. The tiny test models run many small ops; on a 2-core machine shared
    with other processes (the servers and Ray workers some tests start, or other jobs), two
    threads waiting on each other made them up to 10-20x slower. Speed only: every comparison
    runs both sides in the same process, with the same thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty weights cache (LANGSAM_CACHE) for one test, the hub offline (the weights tests)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("LANGSAM_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LANGSAM_OFFLINE", raising=False)
    return root
