"""Checkpoint loading: the official layout, strictness, safetensors, size inference, safety."""

import pickle

import pytest
import torch
from pickle_payload import CreatesFile
from sam_factory import TINY_SAM_OVERRIDES, make_tiny_sam

from sam import CheckpointError, SAM_SPECS, build_sam, sam_model_registry, save_checkpoint
from sam.build import infer_encoder_config


@pytest.fixture(scope="module")
def reference_vit_b_checkpoint(tmp_path_factory):
    """The reference's full-size vit_b, with random values, saved as the official .pth layout."""
    from segment_anything import sam_model_registry as reference_registry

    torch.manual_seed(0)
    reference = reference_registry["vit_b"](checkpoint=None)
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.01 * torch.randn_like(param))
    path = tmp_path_factory.mktemp("ckpt") / "sam_vit_b_random.pth"
    torch.save(reference.state_dict(), path)
    return path, reference.state_dict()


def test_reference_vit_b_loads_strictly_and_saves_back(reference_vit_b_checkpoint, tmp_path):
    path, reference_state = reference_vit_b_checkpoint
    ours = sam_model_registry["vit_b"](checkpoint=path)
    ours_state = ours.state_dict()
    assert set(ours_state) == set(reference_state)
    for key, value in reference_state.items():
        assert torch.equal(ours_state[key], value), key
    # Ours saves back into a file the reference loads strictly.
    from segment_anything import sam_model_registry as reference_registry

    round_trip = save_checkpoint(ours, tmp_path / "ours.pth")
    reloaded = reference_registry["vit_b"](checkpoint=str(round_trip))
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, reference_state[key]), key


def test_checkpoint_of_another_size_names_type_and_keys(reference_vit_b_checkpoint):
    path, _ = reference_vit_b_checkpoint
    with pytest.raises(CheckpointError) as info:
        build_sam("vit_l", checkpoint=path)
    message = str(info.value)
    assert "'vit_l'" in message
    assert "image_encoder.patch_embed.proj.weight" in message or "image_encoder.blocks.12" in message
    assert "looks like vit_b" in message


def test_auto_infers_the_encoder_and_registry_sizes():
    for name, spec in SAM_SPECS.items():
        # Shapes alone decide the inference, so empty tensors stand in for the big checkpoints.
        state = {
            "image_encoder.patch_embed.proj.weight": torch.empty(spec.encoder_embed_dim, 3, 16, 16),
        }
        head_dim = spec.encoder_embed_dim // spec.encoder_num_heads
        for index in range(spec.encoder_depth):
            span = 127 if index in spec.encoder_global_attn_indexes else 27
            state[f"image_encoder.blocks.{index}.norm1.weight"] = torch.empty(spec.encoder_embed_dim)
            state[f"image_encoder.blocks.{index}.attn.rel_pos_h"] = torch.empty(span, head_dim)
        assert infer_encoder_config(state) == spec.encoder_config(), name


def test_tiny_checkpoint_round_trip_pth_and_safetensors(tmp_path):
    model = make_tiny_sam(seed=5)
    for suffix in (".pth", ".safetensors"):
        path = save_checkpoint(model, tmp_path / f"tiny{suffix}")
        loaded = build_sam("auto", checkpoint=path)
        encoder = loaded.image_encoder
        assert len(encoder.blocks) == TINY_SAM_OVERRIDES["encoder_depth"]
        assert [i for i, b in enumerate(encoder.blocks) if b.window_size == 0] == [1]
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), (suffix, key)
        # Explicit overrides load the same file strictly too.
        build_sam("vit_b", checkpoint=path, **TINY_SAM_OVERRIDES)


def test_unknown_model_type_lists_valid_names():
    with pytest.raises(ValueError, match="vit_h, vit_l, vit_b, default"):
        build_sam("vit_x")
    with pytest.raises(ValueError, match="unknown build_sam overrides"):
        build_sam("vit_b", encoder_width=3)
    with pytest.raises(ValueError, match="needs a checkpoint"):
        build_sam("auto")
    from sam.build import MODEL_ALIASES, MODEL_SPECS

    assert {"default", "vit_h", "vit_l", "vit_b", "sam2.1_hiera_small", "sam2_hiera_large"} <= set(sam_model_registry)
    assert set(sam_model_registry) == set(MODEL_ALIASES) | set(MODEL_SPECS)
    with torch.device("meta"):  # every name builds (no memory: meta tensors)
        assert type(sam_model_registry["sam2.1_hiera_b+"]()).__name__ == "Sam2"


def test_registry_holds_official_checkpoints():
    assert SAM_SPECS["vit_b"].filename == "sam_vit_b_01ec64.pth"
    assert SAM_SPECS["vit_b"].size_bytes == 375042383
    for spec in SAM_SPECS.values():
        assert spec.url.startswith("https://dl.fbaipublicfiles.com/segment_anything/")
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1), "payload": CreatesFile(str(marker))}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        build_sam("auto", checkpoint=path)
    assert not marker.exists()
    # A bare pickle (not torch's zip format) is refused the same way.
    raw = tmp_path / "evil_raw.pth"
    raw.write_bytes(pickle.dumps(CreatesFile(str(marker))))
    with pytest.raises(CheckpointError):
        build_sam("auto", checkpoint=raw)
    assert not marker.exists()


def test_truncated_empty_and_foreign_checkpoints_are_clear_errors(tmp_path):
    good = save_checkpoint(make_tiny_sam(seed=1), tmp_path / "good.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        build_sam("auto", checkpoint=truncated)
    for junk in (b"\x00\x01\x02\x03", b"PK\x03\x04", b"\x80\x02"):  # a few bytes of something
        tiny = tmp_path / "tiny.pth"
        tiny.write_bytes(junk)
        with pytest.raises(CheckpointError, match="corrupt or truncated|refusing to load"):
            build_sam("auto", checkpoint=tiny)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        build_sam("auto", checkpoint=empty)
    foreign = tmp_path / "foreign.pth"
    torch.save({"linear.weight": torch.zeros(2, 2)}, foreign)
    with pytest.raises(CheckpointError, match="not a SAM checkpoint"):
        build_sam("auto", checkpoint=foreign)
    with pytest.raises(CheckpointError, match="does not match SAM model type 'vit_b'.*not look like a SAM"):
        build_sam("vit_b", checkpoint=foreign)
    not_safetensors = tmp_path / "bad.safetensors"
    not_safetensors.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="safetensors"):
        build_sam("auto", checkpoint=not_safetensors)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_sam("vit_b", checkpoint=tmp_path / "missing.pth")
