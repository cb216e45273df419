"""SAM 3 in the registry and the weights cache: the gated hub download (mocked: never the network),
its checksum against the SHA-256 the hub records, and checkpoints of the wrong family."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import httpx
import pytest
from huggingface_hub.errors import GatedRepoError
from sam_factory import TINY_SAM_OVERRIDES, save_tiny_sam_checkpoint

from langsam import weights
from langsam.weights import (
    ChecksumMismatchError,
    WeightsAccessError,
    WeightsError,
    WeightsUnavailableError,
    resolve_sam_checkpoint,
)
from sam.build import MODEL_SPECS, CheckpointError, build_sam, checkpoint_family, load_state_dict_file, valid_model_types
from sam.sam3 import Sam3Config, Sam3Image, load_sam3
from sam.sam3.build import meta_checkpoint

URL = "https://huggingface.co/facebook/sam3/resolve/main/sam3.pt"


@pytest.fixture
def hub(monkeypatch, cache):
    """The two hub calls, mocked; `online` turns HF_HUB_OFFLINE off (nothing reaches the network)."""
    import huggingface_hub

    calls = SimpleNamespace(download=[], metadata=[], file=None, etag=None, error=None)

    def download(repo_id, filename, **kwargs):
        calls.download.append((repo_id, filename, kwargs.get("local_files_only")))
        if calls.error is not None:
            raise calls.error
        return str(calls.file)

    def metadata(url, **kwargs):
        calls.metadata.append(url)
        return SimpleNamespace(etag=calls.etag, size=calls.file.stat().st_size)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", metadata)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    return calls


def test_registry_row():
    spec = MODEL_SPECS["sam3"]
    assert (spec.family, spec.hf_repo, spec.hf_filename, spec.gated) == ("sam3", "facebook/sam3", "sam3.pt", True)
    assert spec.url == URL and spec.filename == "sam3.pt"
    # No published SHA-256 or size could be found; the registry does not make one up.
    assert spec.sha256 is None and spec.size_bytes is None
    assert weights.sam_checkpoint_spec("sam3") is spec
    assert "sam3" not in valid_model_types()  # not a SAM box predictor size (CLI --sam-type choices)
    with pytest.raises(ValueError, match="valid types: .*sam3"):
        build_sam("sam_three")


def test_gated_download_without_token_says_how_to_get_access(hub, tmp_path):
    response = httpx.Response(401, request=httpx.Request("GET", URL))
    hub.error = GatedRepoError("401 Client Error. Cannot access gated repo for url " + URL, response=response)
    with pytest.raises(WeightsAccessError) as info:
        resolve_sam_checkpoint("sam3")
    message = str(info.value)
    assert "request access on https://huggingface.co/facebook/sam3" in message
    assert "`hf auth login`" in message and "HF_TOKEN" in message and "sam3_checkpoint=PATH" in message
    assert isinstance(info.value, WeightsUnavailableError)  # callers that handle "unavailable" handle it too
    assert hub.download == [("facebook/sam3", "sam3.pt", False)]


def test_download_is_checked_against_the_hub_sha256(hub, tmp_path, cache):
    hub.file = tmp_path / "blob" / "sam3.pt"
    hub.file.parent.mkdir()
    hub.file.write_bytes(b"pretend sam3 weights" * 50)
    hub.etag = '"' + hashlib.sha256(hub.file.read_bytes()).hexdigest() + '"'
    assert resolve_sam_checkpoint("sam3") == hub.file
    assert (cache / "sam" / "sam3.verified").read_text().startswith(hub.etag.strip('"'))
    assert hub.metadata == [URL]
    # Verified once: a later start (offline too) neither hashes nor asks the hub again.
    hub.etag = "0" * 64
    assert resolve_sam_checkpoint("sam3") == hub.file and len(hub.metadata) == 1
    # A changed file is checked again, and refused when it differs from the hub's digest.
    hub.file.write_bytes(b"tampered")
    with pytest.raises(ChecksumMismatchError, match="should have 0000"):
        resolve_sam_checkpoint("sam3")
    # A file the hub gives no SHA-256 for (not an LFS object) is refused, not trusted.
    hub.etag = '"12-abc"'
    with pytest.raises(WeightsError, match="gives no SHA-256 .* refusing the unverified file"):
        resolve_sam_checkpoint("sam3")


def test_offline_without_the_file(cache):
    with pytest.raises(WeightsUnavailableError) as info:
        resolve_sam_checkpoint("sam3")  # the real huggingface_hub, local files only
    message = str(info.value)
    assert "downloads are off" in message and "https://huggingface.co/facebook/sam3" in message
    assert "sam3_checkpoint=PATH" in message


def test_wrong_family_is_a_clear_error(tmp_path):
    import torch

    tiny = Sam3Config(image_size=56, pretrain_image_size=28, vit_dim=64, vit_depth=2, vit_heads=1, vit_mlp_dim=32,
                      window_size=2, global_blocks=(1,), d_model=32, num_heads=1, ffn_dim=32, text_width=64, text_layers=1,
                      text_heads=1, text_mlp_dim=32, text_output_dim=16, geometry_layers=1, roi_size=2,
                      encoder_layers=1, decoder_layers=1, num_queries=4, pixel_decoder_stages=1)
    sam3_file = tmp_path / "sam3.pt"
    torch.save(meta_checkpoint(Sam3Image(tiny)), sam3_file)  # Meta's layout, no config.json: sizes from the weights
    sam1_file = save_tiny_sam_checkpoint(tmp_path / "sam1.pth")
    assert checkpoint_family(load_state_dict_file(sam3_file)) == "sam3"
    with pytest.raises(CheckpointError, match="looks like a SAM 3 model .*model_type='sam3'"):
        build_sam("vit_b", sam3_file, **TINY_SAM_OVERRIDES)
    with pytest.raises(CheckpointError, match="not a SAM 3 checkpoint: it looks like a SAM 1 checkpoint"):
        build_sam("sam3", sam1_file)
    with pytest.raises(ValueError, match="takes no overrides"):
        build_sam("sam3", sam3_file, encoder_depth=2)
    # "auto" reads the family off the file; the model is the same as load_sam3's.
    model = build_sam("auto", sam3_file)
    assert isinstance(model, Sam3Image)
    reference = load_sam3(sam3_file).state_dict()
    assert all((value == reference[key]).all() for key, value in model.state_dict().items())
