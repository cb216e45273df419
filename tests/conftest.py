import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from sam_factory import save_tiny_sam_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sam_checkpoint(tmp_path_factory) -> Path:
    """An official-layout `.pth` of a tiny random SAM; load with build_sam("auto", checkpoint=...)."""
    return save_tiny_sam_checkpoint(tmp_path_factory.mktemp("sam") / "tiny_sam.pth")
