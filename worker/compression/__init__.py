"""Tensor codecs for activations, gradients and averaged pseudo-gradients.

    codec = get_codec("blockwise_4bit", block_size=64)
    encoded = codec.encode(tensor)         # Encoded(parts=[...CPU tensors], meta={...})
    tensor2 = decode_any(encoded)          # the receiver: parameters come from meta

    stream = ErrorFeedback(get_codec("topk_4bit", topk_fraction=0.01))
    encoded = stream.encode(pseudo_gradient)   # what was not sent is sent later

    codec = codec_for(CodecChoice("blockwise_8bit", block_size=128))   # configs.codecs

Names and parameters follow configs.codecs (CODECS, CodecChoice) and protos' CompressionSpec.
See base.py for the interface and what decoding checks, registry.py for the table of codecs,
and each codec's module for its wire layout, ratio and error bound.
"""

from worker.compression.base import MAX_NUMEL, Codec, CodecError, Encoded
from worker.compression.blockwise import Blockwise4Bit, Blockwise8Bit
from worker.compression.casts import BFloat16, Float16, NoCompression
from worker.compression.feedback import ErrorFeedback
from worker.compression.powersgd import PowerSGD
from worker.compression.registry import codec_for, codec_names, decode_any, get_codec
from worker.compression.topk import TopK4Bit

__all__ = [
    "MAX_NUMEL",
    "BFloat16",
    "Blockwise4Bit",
    "Blockwise8Bit",
    "Codec",
    "CodecError",
    "Encoded",
    "ErrorFeedback",
    "Float16",
    "NoCompression",
    "PowerSGD",
    "TopK4Bit",
    "codec_for",
    "codec_names",
    "decode_any",
    "get_codec",
]
