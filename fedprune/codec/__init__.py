"""Payload codec: int8 quantization, bit-packed pruning masks, sparse payloads, wire size.

A *payload* is a flat ``dict[str, np.ndarray]`` that maps 1:1 onto a Flower ``ArrayRecord``
(wrap each value in ``Array``). It holds a **fixed, small set of arrays whatever the number of
tensors**: one array per field, the tensors' data concatenated in tensor order. Flower frames
every array with a few hundred bytes (npy header, ``Array`` and ``ArrayChunk`` objects with
64-hex ids, an ``ArrayRecord`` entry), so one array per tensor and field would cost 10-25 % of a
sparse int8 payload of a small model. The keys, in this order:

``meta`` (int64, always)
    ``[FORMAT_VERSION, flags, n_tensors]`` followed, per tensor, by
    ``[tensor_flags, n_values, ndim, *shape]``. ``flags`` holds the payload's quantization mode
    (``flags & QUANT_BITS``: the :class:`CodecConfig` ``quant``) and the entropy-stage bits
    :data:`FLAG_CODES_ZLIB` / :data:`FLAG_MASK_ZLIB`; ``tensor_flags`` holds the mode actually
    used for the tensor (:data:`QUANT_BITS`) and :data:`FLAG_MASKED` /
    :data:`FLAG_MASK_SENT`; ``n_values`` is the number of transmitted entries (the mask
    popcount for a sparse tensor, else the tensor size).
``names`` (uint8, always)
    The UTF-8 tensor names joined by a newline (:data:`NAME_SEP`; names may not contain it):
    exactly ``n_tensors`` distinct names, validated against ``meta`` on decode.
``codes`` (int8, or uint8 when zlib-compressed; int8 modes)
    All tensors' codes of the kept entries, each tensor in C order, concatenated; in
    ``[-127, 127]``; ``decode = code * scale``.
``scale`` (float32; int8 modes)
    All step sizes concatenated, finite and ``> 0``: one per output channel (axis 0) in
    ``"int8-channel"`` mode for tensors with ``ndim >= 2``, else one for the whole tensor. 0-d
    and 1-D tensors (biases, norm parameters) are therefore quantized per tensor in
    ``"int8-channel"`` mode; their ``tensor_flags`` record that. A channel with no kept entry or
    only zeros has scale ``1.0``. Low-bit modes (``int4-channel``, ``ternary``): one step per
    row that carries entries, float16, or uint8 log-scale codes after a float32 reference
    (:data:`FLAG_SCALES_LOG8`); with the entropy stage, zlib-compressed as byte planes where
    that is smaller (:data:`FLAG_SCALE_ZLIB`).
``values`` (float32, or uint8 when zlib-compressed; ``quant="none"``)
    All tensors' kept entries themselves, concatenated.
``select`` (uint8; only with ``CodecConfig.topk < 1``)
    Top-k update sparsification: for every tensor, a bit per *candidate* entry (its kept entries
    if masked, else all entries) saying whether it is transmitted; the tensor's entry in
    ``meta`` then ends with the candidate count and carries :data:`FLAG_SELECTED`. Bits are
    concatenated like the mask bits, possibly zlib-compressed (:data:`FLAG_SELECT_ZLIB`).
``mask`` (uint8; only when at least one tensor has :data:`FLAG_MASK_SENT`)
    ``np.packbits`` of the concatenation of the flattened (C order) boolean masks of the sparse
    tensors encoded with ``send_masks=True``, in tensor order (bits are not byte-aligned per
    tensor; the last byte is zero padded), possibly zlib-compressed.

For one :class:`CodecConfig`, one set of masked tensor names and one ``send_masks`` flag every
encoder produces the same key set, whatever the values: ``meta``, ``names``, then ``codes`` and
``scale`` (int8 modes) or ``values``, then ``select`` iff ``topk < 1``, then ``mask`` iff a
masked tensor is sent with its bits
(only dtypes and lengths of the streams may differ, e.g. compressed vs not). The entropy stage
compresses the whole code/value stream and the whole mask stream with zlib and keeps each result
only when that stream's serialized size shrinks.

A payload travels as a Flower ``ArrayRecord`` of *raw* arrays (:mod:`~fedprune.codec.raw`:
the arrays' bytes without an npy header), and :func:`wire_size` reproduces the byte count of
Flower 1.42's serialization of that record without importing Flower. This module is pure numpy
and never imports ``flwr``.

The package's modules: :mod:`~fedprune.codec.format` (keys, flags, :class:`CodecConfig`),
:mod:`~fedprune.codec.quant` (quantization kernels), :mod:`~fedprune.codec.bits` (bit packing),
:mod:`~fedprune.codec.entropy` (zlib stage), :mod:`~fedprune.codec.encode`,
:mod:`~fedprune.codec.decode`, :mod:`~fedprune.codec.sparse` (decoded entries without their
zeros), :mod:`~fedprune.codec.raw` (arrays in a Flower ``Array``) and
:mod:`~fedprune.codec.wire` (Flower wire size).
"""

from fedprune.codec.bits import pack_mask, unpack_mask
from fedprune.codec.breakdown import BREAKDOWN_KEYS, bits_breakdown
from fedprune.codec.decode import _parse_layout as _parse_layout  # tests read the layout
from fedprune.codec.decode import decode, decode_sparse, payload_masks, residual
from fedprune.codec.digest import weights_digest
from fedprune.codec.encode import encode
from fedprune.codec.format import (
    FLAG_CODES_ZLIB,
    FLAG_MASK_RICE,
    FLAG_MASK_ROWS,
    FLAG_MASK_SENT,
    FLAG_MASK_ZLIB,
    FLAG_MASKED,
    FLAG_SCALE_ZLIB,
    FLAG_SCALES_LOG8,
    FLAG_SELECT_RICE,
    FLAG_SELECT_ROWS,
    FLAG_SELECT_ZLIB,
    FLAG_SELECTED,
    FLAG_TERNARY,
    FLWR_CHUNK_SIZE_ENV,
    FLWR_DEFAULT_CHUNK_SIZE,
    FORMAT_VERSION,
    KEY_BLOB,
    KEY_CODES,
    KEY_MASK,
    KEY_META,
    KEY_NAMES,
    KEY_SCALE,
    KEY_SELECT,
    KEY_VALUES,
    LOG8_STEPS,
    LOG8_ZERO,
    MAX_BLOCK,
    NAME_SEP,
    QMAX,
    QMAX4,
    QUANT_BITS,
    SELECT_BLOCK_SHIFT,
    ZLIB_LEVEL,
    CodecConfig,
    Container,
    Payload,
    QuantMode,
    RoundingMode,
    ScaleFormat,
    TopkScope,
)
from fedprune.codec.quant import dequantize_int8, quantize_int8
from fedprune.codec.raw import RAW_DTYPES, STYPE_RAW, from_raw, raw_fields
from fedprune.codec.sparse import SparseTensor
from fedprune.codec.wire import wire_size

__all__ = [
    "BREAKDOWN_KEYS",
    "FLAG_CODES_ZLIB",
    "FLAG_MASKED",
    "FLAG_MASK_RICE",
    "FLAG_MASK_ROWS",
    "FLAG_MASK_SENT",
    "FLAG_MASK_ZLIB",
    "FLAG_SCALES_LOG8",
    "FLAG_SCALE_ZLIB",
    "FLAG_SELECTED",
    "FLAG_SELECT_RICE",
    "FLAG_SELECT_ROWS",
    "FLAG_SELECT_ZLIB",
    "FLAG_TERNARY",
    "FLWR_CHUNK_SIZE_ENV",
    "FLWR_DEFAULT_CHUNK_SIZE",
    "FORMAT_VERSION",
    "KEY_BLOB",
    "KEY_CODES",
    "KEY_MASK",
    "KEY_META",
    "KEY_NAMES",
    "KEY_SCALE",
    "KEY_SELECT",
    "KEY_VALUES",
    "LOG8_STEPS",
    "LOG8_ZERO",
    "MAX_BLOCK",
    "NAME_SEP",
    "QMAX",
    "QMAX4",
    "QUANT_BITS",
    "RAW_DTYPES",
    "SELECT_BLOCK_SHIFT",
    "STYPE_RAW",
    "ZLIB_LEVEL",
    "CodecConfig",
    "Container",
    "Payload",
    "QuantMode",
    "RoundingMode",
    "ScaleFormat",
    "SparseTensor",
    "TopkScope",
    "bits_breakdown",
    "decode",
    "decode_sparse",
    "dequantize_int8",
    "encode",
    "from_raw",
    "pack_mask",
    "payload_masks",
    "quantize_int8",
    "raw_fields",
    "residual",
    "unpack_mask",
    "weights_digest",
    "wire_size",
]
