"""langsam.weights: registry, cache, checksum-verified download, offline errors. Never downloads:
downloads here read local file:// URLs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from langsam import weights
from langsam.weights import (
    ChecksumMismatchError,
    WeightsUnavailableError,
    download_file,
    resolve_grounding_dino,
    resolve_sam_checkpoint,
)


def _payload(tmp_path: Path, data: bytes = b"pretend checkpoint bytes" * 100) -> tuple[Path, str]:
    source = tmp_path / "source.pth"
    source.write_bytes(data)
    return source, hashlib.sha256(data).hexdigest()


def test_registry_comes_from_sam_specs():
    spec = weights.sam_checkpoint_spec("vit_b")
    assert spec.url == "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"
    assert spec.size_bytes == 375_042_383
    assert spec.sha256 == "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"
    assert weights.sam_checkpoint_spec("default").filename == "sam_vit_h_4b8939.pth"
    with pytest.raises(ValueError, match="vit_b"):
        weights.sam_checkpoint_spec("vit_q")
    assert weights.GROUNDING_DINO_MODELS["grounding-dino-base"] == "IDEA-Research/grounding-dino-base"


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LANGSAM_CACHE", str(tmp_path / "x"))
    assert weights.cache_dir() == tmp_path / "x" and weights.hf_cache_dir() == tmp_path / "x" / "huggingface"
    monkeypatch.delenv("LANGSAM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert weights.cache_dir() == tmp_path / "xdg" / "langsam" and weights.hf_cache_dir() is None


def test_is_offline(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("LANGSAM_OFFLINE", raising=False)
    assert not weights.is_offline()
    monkeypatch.setenv("LANGSAM_OFFLINE", "true")
    assert weights.is_offline()
    monkeypatch.setenv("LANGSAM_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert weights.is_offline()


def test_local_checkpoint_used_as_is(tmp_path, cache):
    source, _ = _payload(tmp_path)
    assert resolve_sam_checkpoint("vit_h", source) == source
    assert resolve_sam_checkpoint("auto", str(source)) == source
    with pytest.raises(ValueError, match="does not exist"):
        resolve_sam_checkpoint("vit_b", tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="sam_checkpoint"):
        resolve_sam_checkpoint("auto")
    with pytest.raises(ValueError, match="vit_b"):
        resolve_sam_checkpoint("vit_x")


def test_offline_missing_checkpoint_names_file_url_and_flag(cache):
    with pytest.raises(WeightsUnavailableError) as info:
        resolve_sam_checkpoint("vit_b")
    message = str(info.value)
    assert "sam_vit_b_01ec64.pth" in message
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth" in message
    assert "sam_checkpoint=" in message and "--sam-checkpoint" in message
    assert not (cache / "sam").exists() or not any((cache / "sam").iterdir())


def test_cached_checkpoint_found_by_size_and_wrong_size_refetched(cache):
    target = cache / "sam" / "sam_vit_b_01ec64.pth"
    target.parent.mkdir(parents=True)
    with open(target, "wb") as handle:  # sparse file of the official size: no 375 MB written
        handle.truncate(375_042_383)
    assert resolve_sam_checkpoint("vit_b") == target
    target.write_bytes(b"truncated")
    with pytest.raises(WeightsUnavailableError):  # offline: cannot refetch, but the bad file is gone
        resolve_sam_checkpoint("vit_b")
    assert not target.exists()


def test_download_verifies_sha256(tmp_path):
    source, digest = _payload(tmp_path)
    destination = tmp_path / "cache" / "ok.pth"
    assert download_file(source.as_uri(), destination, sha256=digest, size=source.stat().st_size, progress=False) == destination
    assert destination.read_bytes() == source.read_bytes()


@pytest.mark.parametrize("problem", ["sha256", "size"])
def test_corrupt_download_is_removed_and_reported(tmp_path, problem):
    source, digest = _payload(tmp_path)
    destination = tmp_path / "cache" / "bad.pth"
    kwargs = {"sha256": "0" * 64} if problem == "sha256" else {"sha256": digest, "size": 12}
    with pytest.raises(ChecksumMismatchError, match="bad.pth") as info:
        download_file(source.as_uri(), destination, progress=False, **kwargs)
    assert source.as_uri() in str(info.value)
    assert not destination.exists()
    assert [p.name for p in destination.parent.iterdir() if not p.name.endswith(".lock")] == []


def test_failed_download_is_weights_unavailable(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="could not download"):
        download_file((tmp_path / "nope.pth").as_uri(), tmp_path / "c" / "x.pth", progress=False)


def test_online_resolve_downloads_into_cache_once(tmp_path, cache, monkeypatch):
    from sam.build import SamSpec

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    source, digest = _payload(tmp_path)
    spec = SamSpec("vit_b", 8, 1, 1, (0,), url=source.as_uri(), sha256=digest, size_bytes=source.stat().st_size)
    monkeypatch.setattr(weights, "sam_checkpoint_spec", lambda sam_type: spec)
    path = resolve_sam_checkpoint("vit_b", progress=False)
    assert path == cache / "sam" / "source.pth" and path.read_bytes() == source.read_bytes()
    source.unlink()  # a second call must not download again
    assert resolve_sam_checkpoint("vit_b", progress=False) == path

    corrupt = SamSpec("vit_b", 8, 1, 1, (0,), url=_payload(tmp_path, b"other")[0].as_uri(), sha256="f" * 64)
    monkeypatch.setattr(weights, "sam_checkpoint_spec", lambda sam_type: corrupt)
    path.unlink()
    with pytest.raises(ChecksumMismatchError, match="corrupt"):
        resolve_sam_checkpoint("vit_b", progress=False)
    assert not path.exists()


def test_grounding_dino_local_folder_and_offline_hub_error(tmp_path, cache):
    folder = tmp_path / "gdino"
    folder.mkdir()
    with pytest.raises(ValueError, match="config.json"):
        resolve_grounding_dino(folder)
    (folder / "config.json").write_text("{}")
    assert resolve_grounding_dino(folder) == str(folder)
    with pytest.raises(ValueError, match="neither an existing folder nor a hub id"):
        resolve_grounding_dino("./no/such/folder")
    with pytest.raises(WeightsUnavailableError) as info:
        resolve_grounding_dino("grounding-dino-base")
    message = str(info.value)
    assert "IDEA-Research/grounding-dino-base" in message
    assert "https://huggingface.co/IDEA-Research/grounding-dino-base" in message
    assert "detector=" in message and "HF_HUB_OFFLINE" in message


def test_sam2_checkpoints_come_from_the_same_registry(cache):
    spec = weights.sam_checkpoint_spec("sam2.1_hiera_small")
    assert spec.url == "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_small.pt"
    assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0 and spec.size_bytes > 100_000_000
    with pytest.raises(WeightsUnavailableError) as info:  # offline here: the message says what to do
        resolve_sam_checkpoint("sam2.1_hiera_small")
    assert "sam2.1_hiera_small.pt" in str(info.value) and spec.url in str(info.value)
    target = cache / "sam" / "sam2.1_hiera_small.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as handle:  # sparse file of the official size
        handle.truncate(spec.size_bytes)
    assert resolve_sam_checkpoint("sam2.1_hiera_small") == target
