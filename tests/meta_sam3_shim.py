"""Meta's `sam3` 0.1.4 image model, built at tiny sizes and run on CPU in-process (a test reference).

`sam3.model_builder.build_sam3_image_model` hard-codes the released sizes (840M parameters; its
`set_image` on one 1008 px image takes minutes on a CPU), so `build_meta_sam3_image` assembles the
same parts from Meta's own classes, with the arguments `model_builder` passes them, at the sizes of
a `sam.sam3.Sam3Config`. What it takes to make Meta's code run on a machine without CUDA:

- `PositionEmbeddingSine(precompute_resolution=None)` and `TransformerDecoder(resolution=None,
  stride=None)`: with a resolution, both precompute tables with `device="cuda"` at construction
  (the builder passes 1008); without, they compute them on the fly on the features' device.
- `meta_cpu()`: while Meta's code runs, `Tensor.pin_memory()` (called on CPU tensors by
  `geometry_encoders.py` for box prompts) returns the tensor itself; it is restored on exit, so the
  rest of the session is untouched.
- `sam3/model/edt.py` imports `triton` at module level (for the video tracker's distance transform,
  which the image model never calls). Where triton is missing, a stand-in `sam3.model.edt` whose
  `edt_triton` raises goes into `sys.modules` before anything imports it; `triton` itself is never
  faked (torch probes for it).
- The BPE vocabulary: the wheel leaves out `assets/bpe_simple_vocab_16e6.txt.gz`, the builder's
  default path; open_clip ships the same file (`open_clip.tokenizer.default_bpe()`).
- No download: nothing calls `download_ckpt_from_hf` (the builder's `load_from_HF=True` default);
  weights come from a file in Meta's `sam3.pt` layout through `load_meta_weights`, strictly.
- `TextTransformer` hard-codes a 512-wide `text_projection` (the released width); it is replaced by
  one of the config's `text_output_dim` so the checkpoint loads strictly (SAM 3 never uses the
  pooled, projected output).
- The interactive (SAM 1 task) predictor: `build_tracker` makes the whole video tracker at the
  released sizes, of which `Sam3Image.predict_inst` reads only the SAM heads, `no_mem_embed` and
  `_prepare_backbone_features`. `MetaTrackerHeads` holds exactly those (Meta's `PromptEncoder`,
  `MaskDecoder`, `TwoWayTransformer` with `build_tracker`'s arguments at tiny sizes, and
  `Sam3TrackerBase._prepare_backbone_features` itself); `SAM3InteractiveImagePredictor` hard-codes
  the released feature sizes (288, 144, 72) in `_bb_feat_sizes`, which are set to the tiny grid's.
"""

from __future__ import annotations

import contextlib
import json
import sys
import types
from pathlib import Path

import torch
from torch import nn


def _stub_edt() -> None:
    if "sam3.model.edt" in sys.modules:
        return
    try:
        import triton  # noqa: F401
        return
    except ImportError:
        pass
    stub = types.ModuleType("sam3.model.edt")

    def edt_triton(data):
        raise RuntimeError("sam3.model.edt needs triton (the video tracker only); stubbed by tests/meta_sam3_shim.py")

    stub.edt_triton = edt_triton
    sys.modules["sam3.model.edt"] = stub


_stub_edt()


@contextlib.contextmanager
def meta_cpu():
    """Run Meta's code on CPU: `Tensor.pin_memory` is a no-op inside the block."""
    original = torch.Tensor.pin_memory
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.pin_memory = original


def _attention(config, batch_first=False, dropout=0.1):
    from sam3.model.model_misc import MultiheadAttentionWrapper

    return MultiheadAttentionWrapper(num_heads=config.num_heads, dropout=dropout, embed_dim=config.d_model,
                                     batch_first=batch_first)


class MetaTrackerHeads(nn.Module):
    """The parts of Meta's `Sam3TrackerBase` that its image-model interactive predictor uses, built
    as `build_tracker` builds them (`_build_sam_heads`), at the given sizes."""

    num_feature_levels = 3

    def __init__(self, d_model: int, image_size: int, patch_size: int, num_heads: int = 8, mlp_dim: int = 2048,
                 iou_head_hidden_dim: int = 256) -> None:
        from sam3.sam.mask_decoder import MaskDecoder
        from sam3.sam.prompt_encoder import PromptEncoder
        from sam3.sam.transformer import TwoWayTransformer

        super().__init__()
        grid = image_size // patch_size
        self.image_size = image_size
        self.sam_prompt_encoder = PromptEncoder(embed_dim=d_model, image_embedding_size=(grid, grid),
                                                input_image_size=(image_size, image_size), mask_in_chans=16)
        self.sam_mask_decoder = MaskDecoder(
            num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=d_model, mlp_dim=mlp_dim, num_heads=num_heads),
            transformer_dim=d_model, iou_head_depth=3, iou_head_hidden_dim=iou_head_hidden_dim, use_high_res_features=True,
            iou_prediction_use_sigmoid=True, pred_obj_scores=True, pred_obj_scores_mlp=True, use_multimask_token_for_obj_ptr=True,
            dynamic_multimask_via_stability=True, dynamic_multimask_stability_delta=0.05, dynamic_multimask_stability_thresh=0.98,
        )
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, d_model))

    @property
    def device(self) -> torch.device:
        return self.no_mem_embed.device

    def _prepare_backbone_features(self, backbone_out):
        from sam3.model.sam3_tracker_base import Sam3TrackerBase

        return Sam3TrackerBase._prepare_backbone_features(self, backbone_out)


def build_meta_sam3_image(config, interactive: dict | None = None, max_hole_area: float = 256.0) -> nn.Module:
    """Meta's `Sam3Image` (eval mode) with `config`'s sizes: the parts and arguments of
    `sam3.model_builder.build_sam3_image_model`, CPU-safe as the module docstring says. With
    `interactive` (MetaTrackerHeads' sizes: num_heads, mlp_dim, iou_head_hidden_dim), as with
    `enable_inst_interactivity=True`: the second (SAM 2) neck and a `SAM3InteractiveImagePredictor`."""
    from open_clip.tokenizer import default_bpe
    from sam3.model.decoder import TransformerDecoder, TransformerDecoderLayer
    from sam3.model.encoder import TransformerEncoderFusion, TransformerEncoderLayer
    from sam3.model.geometry_encoders import SequenceGeometryEncoder
    from sam3.model.maskformer_segmentation import PixelDecoder, UniversalSegmentationHead
    from sam3.model.model_misc import MLP, DotProductScoring, TransformerWrapper
    from sam3.model.necks import Sam3DualViTDetNeck
    from sam3.model.position_encoding import PositionEmbeddingSine
    from sam3.model.sam3_image import Sam3Image
    from sam3.model.text_encoder_ve import VETextEncoder
    from sam3.model.tokenizer_ve import SimpleTokenizer
    from sam3.model.vitdet import ViT
    from sam3.model.vl_combiner import SAM3VLBackbone

    c = config
    d = c.d_model

    def position_encoding():
        return PositionEmbeddingSine(num_pos_feats=d, normalize=True, scale=None, temperature=10000, precompute_resolution=None)

    trunk = ViT(
        img_size=c.image_size, pretrain_img_size=c.pretrain_image_size, patch_size=c.patch_size, embed_dim=c.vit_dim,
        depth=c.vit_depth, num_heads=c.vit_heads, mlp_ratio=c.vit_mlp_dim / c.vit_dim, norm_layer="LayerNorm",
        drop_path_rate=0.1, qkv_bias=True, use_abs_pos=True, tile_abs_pos=True, global_att_blocks=tuple(c.global_blocks),
        rel_pos_blocks=(), use_rope=True, use_interp_rope=True, window_size=c.window_size, pretrain_use_cls_token=True,
        retain_cls_token=False, ln_pre=True, ln_post=False, return_interm_layers=False, bias_patch_embed=False,
    )
    neck = Sam3DualViTDetNeck(position_encoding=position_encoding(), d_model=d, scale_factors=list(c.scale_factors),
                              trunk=trunk, add_sam2_neck=interactive is not None)
    text = VETextEncoder(tokenizer=SimpleTokenizer(bpe_path=default_bpe()), d_model=d, width=c.text_width,
                         heads=c.text_heads, layers=c.text_layers, context_length=c.context_length, vocab_size=c.vocab_size)
    text.encoder.text_projection = nn.Parameter(torch.empty(c.text_width, c.text_output_dim))
    for block in text.encoder.transformer.resblocks:  # mlp_ratio would round; set the width exactly
        block.mlp.c_fc = nn.Linear(c.text_width, c.text_mlp_dim)
        block.mlp.c_proj = nn.Linear(c.text_mlp_dim, c.text_width)
    backbone = SAM3VLBackbone(visual=neck, text=text, scalp=1)

    encoder = TransformerEncoderFusion(
        layer=TransformerEncoderLayer(
            activation="relu", d_model=d, dim_feedforward=c.ffn_dim, dropout=0.1, pos_enc_at_attn=True,
            pos_enc_at_cross_attn_keys=False, pos_enc_at_cross_attn_queries=False, pre_norm=True,
            self_attention=_attention(c, batch_first=True), cross_attention=_attention(c, batch_first=True),
        ),
        num_layers=c.encoder_layers, d_model=d, num_feature_levels=1, frozen=False, use_act_checkpoint=True,
        add_pooled_text_to_img_feat=False, pool_text_with_mask=True,
    )
    decoder = TransformerDecoder(
        layer=TransformerDecoderLayer(activation="relu", d_model=d, dim_feedforward=c.ffn_dim, dropout=0.1,
                                      cross_attention=_attention(c), n_heads=c.num_heads, use_text_cross_attention=True),
        num_layers=c.decoder_layers, num_queries=c.num_queries, return_intermediate=True, box_refine=True,
        num_o2m_queries=0, dac=True, boxRPB="log", d_model=d, frozen=False, interaction_layer=None,
        dac_use_selfatt_ln=True, resolution=None, stride=None, use_act_checkpoint=True, presence_token=True,
    )
    transformer = TransformerWrapper(encoder=encoder, decoder=decoder, d_model=d)
    scoring = DotProductScoring(d_model=d, d_proj=d, prompt_mlp=MLP(
        input_dim=d, hidden_dim=c.ffn_dim, output_dim=d, num_layers=2, dropout=0.1, residual=True, out_norm=nn.LayerNorm(d)))
    segmentation = UniversalSegmentationHead(
        hidden_dim=d, upsampling_stages=c.pixel_decoder_stages, aux_masks=False, presence_head=False,
        dot_product_scorer=None, act_ckpt=True, cross_attend_prompt=_attention(c, dropout=0),
        pixel_decoder=PixelDecoder(num_upsampling_stages=c.pixel_decoder_stages, interpolation_mode="nearest", hidden_dim=d),
    )
    geometry = SequenceGeometryEncoder(
        pos_enc=position_encoding(), encode_boxes_as_points=False, points_direct_project=True, points_pool=True,
        points_pos_enc=True, boxes_direct_project=True, boxes_pool=True, boxes_pos_enc=True, d_model=d,
        num_layers=c.geometry_layers, roi_size=c.roi_size, use_act_ckpt=True, add_cls=True, add_post_encode_proj=True,
        layer=TransformerEncoderLayer(
            activation="relu", d_model=d, dim_feedforward=c.ffn_dim, dropout=0.1, pos_enc_at_attn=False, pre_norm=True,
            self_attention=_attention(c), pos_enc_at_cross_attn_queries=False, pos_enc_at_cross_attn_keys=True,
            cross_attention=_attention(c),
        ),
    )
    predictor = None
    if interactive is not None:
        from sam3.model.sam1_task_predictor import SAM3InteractiveImagePredictor

        predictor = SAM3InteractiveImagePredictor(MetaTrackerHeads(d, c.image_size, c.patch_size, **interactive),
                                                  max_hole_area=max_hole_area)
        grid = c.image_size // c.patch_size
        predictor._bb_feat_sizes = [(grid * 4, grid * 4), (grid * 2, grid * 2), (grid, grid)]
    model = Sam3Image(
        backbone=backbone, transformer=transformer, input_geometry_encoder=geometry, segmentation_head=segmentation,
        num_feature_levels=1, o2m_mask_predict=True, dot_prod_scoring=scoring, use_instance_query=False,
        multimask_output=True, inst_interactive_predictor=predictor, matcher=None,
    )
    return model.eval()


def load_meta_weights(model: nn.Module, checkpoint: str | Path) -> nn.Module:
    """Load a `sam3.pt`-layout file into Meta's image model as Meta's `_load_checkpoint` renames it
    (`detector.` dropped, `tracker.` -> `inst_interactive_predictor.model.`), but strictly: every
    parameter of the model must be in the file (Meta's loader only prints missing keys). Left out:
    the second neck when the model has no interactive predictor, and the tracker's video-memory
    tensors, which MetaTrackerHeads does not hold."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    interactive = model.inst_interactive_predictor is not None
    wanted = set(model.state_dict())
    renamed = {}
    for key, value in state.items():
        if key.startswith("detector."):
            if interactive or not key.startswith("detector.backbone.vision_backbone.sam2_convs."):
                renamed[key[len("detector."):]] = value
        elif key.startswith("tracker.") and interactive:
            name = "inst_interactive_predictor.model." + key[len("tracker."):]
            if name in wanted:
                renamed[name] = value
    model.load_state_dict(renamed, strict=True)
    return model


def with_point_projections(checkpoint: str | Path, directory: str | Path, seed: int = 3) -> Path:
    """A copy of a `sam3.pt`-layout file (and the config.json beside it) in `directory`, with Meta's
    point-prompt projections added as random tensors: transformers' layout has none, so a file
    converted from it lacks them, while Meta's geometry encoder always has them."""
    from sam.sam3 import load_sam3

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    shapes = build_meta_sam3_image(load_sam3(checkpoint).config).state_dict()
    generator = torch.Generator().manual_seed(seed)
    points = {k: v for k, v in shapes.items() if k.startswith("geometry_encoder.points_")}
    for key, value in points.items():
        scale = value[0].numel() ** -0.5 if value.ndim > 1 else 0.2
        state["model"]["detector." + key] = scale * torch.randn(value.shape, generator=generator)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / "sam3.pt")
    config = Path(checkpoint).parent / "config.json"
    if config.is_file():
        (directory / "config.json").write_text(json.dumps(json.loads(config.read_text())))
    return directory / "sam3.pt"
