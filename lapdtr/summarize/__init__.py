"""Attention-based feature summarization at stage boundaries (X_sum = f(A)·X).

* :mod:`.importance`: token importance recomputed from q and k (class-token row, or attention
  received), and which module of a unit gives it (:func:`attention_source`);
* :mod:`.summarizer`: EViT top-k with one fused token, and the restore rules (shorter sequence
  with optional proportional attention, or the dense grid);
* :mod:`.wire`: wire formats fp32 / fp16 / bf16 / int8 (per-token scales) and exact bytes;
* :mod:`.codec`: :class:`BoundaryCodec`, ``encode(x, importance) -> packet`` /
  ``decode(packet) -> tensor`` for one boundary;
* :mod:`.calibrate`: keep ratios and wire formats per boundary at the fewest bytes that meet a
  fidelity target on calibration data (``calibrate_keep``);
* :mod:`.dispatch`: Triton kernel or PyTorch reference (``LAPDTR_KERNELS``).

Nothing here imports Triton until a kernel runs.
"""
from .calibrate import (CALIBRATION_KEEPS, Calibration, CalibrationRow, boundary_codecs,
                        calibrate_keep, summarized_forward)
from .codec import RESTORES, BoundaryCodec, codec_for_unit, restore_rule
from .importance import (IMPORTANCE_KINDS, SOURCE_FAMILIES, AttentionProbe, RopeAttentionProbe,
                         WindowAttentionProbe, LinearAttentionProbe, attention_importance,
                         linear_received_attention, linear_received_attention_ref, probe_for,
                         window_received_attention,
                         attention_source, cls_importance, cls_importance_ref, importance,
                         importance_kind, qk, qk_from_qkv, received_attention,
                         received_attention_ref)
from .summarizer import (LAYOUTS, Summary, check_keep, gather_fuse, gather_fuse_ref, keep_count,
                         map_to_tokens, restore_dense, restore_tokens, size_bias, summarize,
                         tokens_to_map)
from .wire import (WIRE_FORMATS, check_wire, decode_tensor, dequantize_int8, encode_tensor,
                   nbytes, packet_nbytes, parts_nbytes, quantize_int8, quantize_int8_ref,
                   wire_of_dtype)

__all__ = [
    "CALIBRATION_KEEPS", "Calibration", "CalibrationRow", "boundary_codecs", "calibrate_keep",
    "summarized_forward",
    "BoundaryCodec", "RESTORES", "codec_for_unit", "restore_rule",
    "IMPORTANCE_KINDS", "SOURCE_FAMILIES", "AttentionProbe", "RopeAttentionProbe",
    "WindowAttentionProbe", "probe_for", "window_received_attention", "LinearAttentionProbe",
    "linear_received_attention", "linear_received_attention_ref",
    "attention_importance",
    "attention_source", "cls_importance", "cls_importance_ref", "importance", "importance_kind",
    "qk", "qk_from_qkv", "received_attention", "received_attention_ref",
    "LAYOUTS", "Summary", "check_keep", "gather_fuse", "gather_fuse_ref", "keep_count",
    "map_to_tokens", "restore_dense", "restore_tokens", "size_bias", "summarize", "tokens_to_map",
    "WIRE_FORMATS", "check_wire", "decode_tensor", "dequantize_int8", "encode_tensor", "nbytes",
    "packet_nbytes", "parts_nbytes", "quantize_int8", "quantize_int8_ref", "wire_of_dtype",
]
