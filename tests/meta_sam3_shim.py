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
"""

from __future__ import annotations

import contextlib
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


def build_meta_sam3_image(config) -> nn.Module:
    """Meta's `Sam3Image` (eval mode, no interactive predictor) with `config`'s sizes: the parts and
    arguments of `sam3.model_builder.build_sam3_image_model`, CPU-safe as the module docstring says."""
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
                              trunk=trunk, add_sam2_neck=False)
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
    model = Sam3Image(
        backbone=backbone, transformer=transformer, input_geometry_encoder=geometry, segmentation_head=segmentation,
        num_feature_levels=1, o2m_mask_predict=True, dot_prod_scoring=scoring, use_instance_query=False,
        multimask_output=True, inst_interactive_predictor=None, matcher=None,
    )
    return model.eval()


def load_meta_weights(model: nn.Module, checkpoint: str | Path) -> nn.Module:
    """Load the `detector.*` tensors of a `sam3.pt`-layout file into Meta's image model, strictly
    (Meta's own `_load_checkpoint` is lenient: it only prints missing keys). The tracker and the
    interactive predictor's second neck are left out, as Meta's image model without interactivity
    has neither."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    detector = {k[len("detector."):]: v for k, v in state.items()
                if k.startswith("detector.") and not k.startswith("detector.backbone.vision_backbone.sam2_convs.")}
    model.load_state_dict(detector, strict=True)
    return model
