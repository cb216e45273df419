"""SAM 2 / 2.1 checkpoints: the registry, strict loading both ways with Meta's `sam2`, `auto`
family and size inference, and clear errors across families."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from sam2_factory import (
    LAYOUT_HINTS,
    TINY_WIDTH,
    build_reference_sam2,
    model_type,
    tiny_sam2_checkpoint,  # noqa: F401  (session fixture)
)
from sam_factory import make_tiny_sam, randomize_parameters

from sam import CheckpointError, build_sam, save_checkpoint
from sam.build import (
    MODEL_SPECS,
    SAM2_SPECS,
    SAM_SPECS,
    describe_checkpoint,
    infer_sam2_config,
    load_state_dict_file,
    resolve_model_type,
)
from sam.sam2 import Sam2

OFFICIAL_CONFIGS = {
    "tiny": "sam2{v}_hiera_t.yaml",
    "small": "sam2{v}_hiera_s.yaml",
    "base_plus": "sam2{v}_hiera_b+.yaml",
    "large": "sam2{v}_hiera_l.yaml",
}


def official_config(name: str):
    """The reference's bundled YAML config for a registry name."""
    from pathlib import Path

    import sam2

    version, size = name.split("_hiera_")
    folder = "sam2.1" if version == "sam2.1" else "sam2"
    suffix = ".1" if version == "sam2.1" else ""
    return OmegaConf.load(Path(sam2.__file__).parent / "configs" / folder / OFFICIAL_CONFIGS[size].format(v=suffix))


def reference_on_meta(name: str):
    """Meta's full-size model built on the meta device: shapes and names, no memory."""
    from sam2.build_sam import build_sam2

    version, size = name.split("_hiera_")
    short = {"tiny": "t", "small": "s", "base_plus": "b+", "large": "l"}[size]
    folder = "sam2.1" if version == "sam2.1" else "sam2"
    real_linspace = torch.linspace

    def cpu_linspace(*args, **kwargs):
        # Hiera reads its (zero) drop-path rates with .item(), impossible on meta tensors.
        kwargs["device"] = "cpu"
        return real_linspace(*args, **kwargs)

    torch.linspace = cpu_linspace
    try:
        with torch.device("meta"):
            return build_sam2(f"configs/{folder}/{version}_hiera_{short}.yaml", None, device="meta")
    finally:
        torch.linspace = real_linspace


# --------------------------------------------------------------------------- registry
def test_registry_holds_the_official_sam2_checkpoints():
    assert len(SAM2_SPECS) == 8 and set(SAM_SPECS) <= set(MODEL_SPECS) and set(SAM2_SPECS) <= set(MODEL_SPECS)
    for name, spec in SAM2_SPECS.items():
        folder = "092824" if spec.version == "2.1" else "072824"
        assert spec.url == f"https://dl.fbaipublicfiles.com/segment_anything_2/{folder}/{name}.pt"
        assert spec.filename == f"{name}.pt"
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
        assert 150_000_000 < spec.size_bytes < 900_000_000
        assert spec.family == "sam2" and spec.version == ("2.1" if name.startswith("sam2.1") else "2.0")
    assert SAM2_SPECS["sam2.1_hiera_small"].sha256.startswith("6d1aa6f3")
    assert SAM2_SPECS["sam2.1_hiera_large"].size_bytes == 898083611
    assert resolve_model_type("sam2.1_hiera_b+") == "sam2.1_hiera_base_plus"
    assert resolve_model_type("sam2_hiera_t") == "sam2_hiera_tiny"
    with pytest.raises(ValueError, match="sam2.1_hiera_small"):
        build_sam("sam2.1_hiera_huge")


@pytest.mark.parametrize("name", sorted(SAM2_SPECS))
def test_registry_architectures_are_the_official_configs(name):
    trunk = official_config(name).model.image_encoder.trunk
    spec = SAM2_SPECS[name]
    assert spec.trunk_embed_dim == trunk.embed_dim
    assert spec.trunk_num_heads == trunk.num_heads
    assert tuple(spec.trunk_stages) == tuple(trunk.get("stages", (2, 3, 16, 3)))
    assert tuple(spec.trunk_global_att_blocks) == tuple(trunk.get("global_att_blocks", (12, 16, 20)))
    assert tuple(spec.trunk_window_spec) == tuple(trunk.get("window_spec", (8, 4, 14, 7)))
    assert tuple(spec.trunk_pos_embed_size) == tuple(trunk.get("window_pos_embed_bkg_spatial_size", (14, 14)))


@pytest.mark.parametrize("name", sorted(SAM2_SPECS))
def test_full_size_models_have_the_official_parameters_and_auto_names_them(name):
    """Every official parameter name and shape, in the official order, for all eight sizes
    (meta device: no memory), and `auto` reads family, version and size back off them."""
    with torch.device("meta"):
        ours = build_sam(name)
    ours_shapes = [(key, tuple(value.shape)) for key, value in ours.state_dict().items()]
    reference_shapes = [(key, tuple(value.shape)) for key, value in reference_on_meta(name).state_dict().items()]
    assert ours_shapes == reference_shapes
    state = ours.state_dict()
    config = infer_sam2_config(state)
    assert config["name"] == name and config["version"] == SAM2_SPECS[name].version
    assert describe_checkpoint(state) == f"{name} (SAM {SAM2_SPECS[name].version})"
    assert ("no_obj_embed_spatial" in state) == (SAM2_SPECS[name].version == "2.1")
    assert isinstance(ours, Sam2) and ours.model_type == name


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("version", ["2.1", "2.0"])
def test_reference_checkpoint_loads_strictly_and_saves_back(tmp_path, version):
    """A file saved from Meta's model ({"model": state_dict}, as the official .pt files) loads
    strictly into ours, by explicit type and by `auto`; ours saves a file Meta's loader accepts."""
    from sam2.build_sam import _load_checkpoint

    reference = randomize_parameters(build_reference_sam2(version, "tiny", TINY_WIDTH), seed=7)
    reference_state = {key: value.clone() for key, value in reference.state_dict().items()}
    path = tmp_path / "reference.pt"
    torch.save({"model": reference_state}, path)

    explicit = build_sam(model_type(version, "tiny"), checkpoint=path, trunk_embed_dim=TINY_WIDTH)
    inferred = build_sam("auto", checkpoint=path, **LAYOUT_HINTS["tiny"])
    for model in (explicit, inferred):
        assert isinstance(model, Sam2) and model.version == version
        state = model.state_dict()
        assert list(state) == list(reference_state)
        for key, value in reference_state.items():
            assert torch.equal(state[key], value), key

    saved = save_checkpoint(explicit, tmp_path / "ours.pt")
    assert set(torch.load(saved, weights_only=True)) == {"model"}
    with torch.no_grad():
        for tensor in reference.state_dict().values():
            tensor.zero_()  # forget the weights, so the load below must bring every one back
    _load_checkpoint(reference, str(saved))  # raises on any missing or unexpected key
    for key, value in reference.state_dict().items():
        assert torch.equal(value, reference_state[key]), key


def test_safetensors_round_trip_and_session_fixture(tmp_path, tiny_sam2_checkpoint):  # noqa: F811
    model = build_sam("sam2.1_hiera_tiny", checkpoint=tiny_sam2_checkpoint, trunk_embed_dim=TINY_WIDTH)
    path = save_checkpoint(model, tmp_path / "tiny.safetensors")
    flat = load_state_dict_file(path)
    assert "no_mem_embed" in flat  # flat: no {"model": ...} wrapper in safetensors
    loaded = build_sam("auto", checkpoint=path, **LAYOUT_HINTS["tiny"])
    loaded_state = loaded.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded_state[key], value), key


def test_auto_reads_a_second_layout_off_a_file(tmp_path):
    """The hiera-large block layout (2.1 here; 2.0 and the tiny layout are read back in the
    round-trip tests above): stages, windows and global blocks come back as saved."""
    model = build_sam("sam2.1_hiera_large", trunk_embed_dim=TINY_WIDTH)
    path = save_checkpoint(model, tmp_path / "large_layout.pt")
    loaded = build_sam("auto", checkpoint=path, **LAYOUT_HINTS["large"])
    assert loaded.version == "2.1"
    trunk, expected = loaded.image_encoder.trunk, model.image_encoder.trunk
    assert trunk.stages == expected.stages == (2, 6, 36, 4)
    assert trunk.window_spec == expected.window_spec == (8, 4, 16, 8)
    assert [b.window_size for b in trunk.blocks] == [b.window_size for b in expected.blocks]
    assert [b.attn.num_heads for b in trunk.blocks] == [b.attn.num_heads for b in expected.blocks]
    loaded_state = loaded.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded_state[key], value), key


# --------------------------------------------------------------------------- errors
def test_sam1_file_as_sam2_type_and_reverse_say_what_the_file_is(tmp_path, tiny_sam2_checkpoint):  # noqa: F811
    sam1_path = save_checkpoint(make_tiny_sam(seed=1), tmp_path / "sam1.pth")
    with pytest.raises(CheckpointError) as info:
        build_sam("sam2.1_hiera_tiny", checkpoint=sam1_path)
    message = str(info.value)
    assert "'sam2.1_hiera_tiny'" in message and "the model is SAM 2.1" in message
    assert "looks like a custom SAM 1 encoder (embed_dim=64" in message
    assert "model_type='auto'" in message

    with pytest.raises(CheckpointError) as info:
        build_sam("vit_b", checkpoint=tiny_sam2_checkpoint)
    message = str(info.value)
    assert "'vit_b'" in message and "SAM 1" in message and "custom SAM 2.1 model" in message

    # An official-size SAM 1 layout is named (shapes only decide it, so empty tensors will do).
    with torch.device("meta"):
        vit_b_state = build_sam("vit_b").state_dict()
    assert describe_checkpoint(vit_b_state) == "vit_b (SAM 1)"


def test_wrong_version_or_size_names_what_the_file_looks_like(tmp_path):
    path_20 = save_checkpoint(build_sam("sam2_hiera_tiny", trunk_embed_dim=TINY_WIDTH), tmp_path / "sam2.0_tiny.pt")
    with pytest.raises(CheckpointError) as info:
        build_sam("sam2.1_hiera_tiny", checkpoint=path_20, trunk_embed_dim=TINY_WIDTH)
    message = str(info.value)
    assert "missing keys: no_obj_embed_spatial" in message and "SAM 2.0" in message

    path_21 = save_checkpoint(build_sam("sam2.1_hiera_tiny", trunk_embed_dim=TINY_WIDTH), tmp_path / "sam2.1_tiny.pt")
    with pytest.raises(CheckpointError) as info:
        build_sam("sam2.1_hiera_small", checkpoint=path_21)
    message = str(info.value)
    assert "'sam2.1_hiera_small'" in message and "shape mismatches" in message
    assert f"trunk embed_dim={TINY_WIDTH}" in message and "stages=(1, 2, 7, 2)" in message


def test_auto_on_a_custom_trunk_asks_for_what_the_weights_do_not_record(tiny_sam2_checkpoint):  # noqa: F811
    with pytest.raises(CheckpointError) as info:
        build_sam("auto", checkpoint=tiny_sam2_checkpoint)
    message = str(info.value)
    for key in ("trunk_num_heads", "trunk_global_att_blocks", "trunk_window_spec"):
        assert key in message


def test_overrides_are_checked_per_family(tiny_sam2_checkpoint):  # noqa: F811
    with pytest.raises(ValueError, match="unknown build_sam overrides.*SAM 2"):
        build_sam("sam2.1_hiera_tiny", encoder_depth=2)
    with pytest.raises(ValueError, match="unknown build_sam overrides.*SAM 1"):
        build_sam("vit_b", trunk_embed_dim=16)
    with pytest.raises(ValueError, match="SAM 1 overrides do not apply"):
        build_sam("auto", checkpoint=tiny_sam2_checkpoint, encoder_depth=2)
