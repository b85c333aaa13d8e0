"""Payload format: keys, flags, the codec configuration and the per-tensor layout entry."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias, get_args

import numpy as np
from numpy.typing import NDArray

QuantMode = Literal["none", "int8", "int8-channel", "int4-channel", "ternary"]
Container = Literal["arrays", "blob"]
RoundingMode = Literal["nearest", "stochastic"]
ScaleFormat = Literal["float16", "log8"]
TopkScope = Literal["tensor", "model"]
Payload: TypeAlias = dict[str, np.ndarray]

# -- Payload layout ----------------------------------------------------------------------------
KEY_META: Final = "meta"
KEY_NAMES: Final = "names"
KEY_CODES: Final = "codes"
KEY_SCALE: Final = "scale"
KEY_VALUES: Final = "values"
KEY_SELECT: Final = "select"
KEY_MASK: Final = "mask"
KEY_BLOB: Final = "blob"
"""The single key of a payload packed into one array (``CodecConfig(container="blob")``)."""
_KEY_ORDER: Final = (KEY_META, KEY_NAMES, KEY_CODES, KEY_SCALE, KEY_VALUES, KEY_SELECT, KEY_MASK)
"""Every payload key, in the order :func:`encode` writes them."""
NAME_SEP: Final = "\n"
"""Separator of the tensor names in the ``names`` array (never part of a name)."""

FORMAT_VERSION: Final = 3
"""First entry of every ``meta`` array; bumped on any incompatible layout change (3: the
``*_RICE`` streams are a Golomb code with a non-power-of-two parameter, low-bit scales may be
deflated, the blob stores ``meta`` as varints and payloads travel as raw arrays; 2: Rice)."""
QMAX: Final = 127
"""Largest int8 code magnitude (symmetric range, ``-128`` is never produced)."""

# ``meta`` = [FORMAT_VERSION, flags, n_tensors, *per tensor [tensor_flags, n_values, ndim, *shape]]
_META_HEAD: Final = 3
_TENSOR_HEAD: Final = 3
QUANT_BITS: Final = 0b11
"""Quantization mode bits: 0 = float32 values, 1 = int8 per tensor, 2 = int8 per channel,
3 = low-bit per row (int4, or ternary with :data:`FLAG_TERNARY`)."""
_QUANT_NONE: Final = 0
_QUANT_TENSOR: Final = 1
_QUANT_CHANNEL: Final = 2
_QUANT_LOWBIT: Final = 3
QMAX4: Final = 7
"""Largest int4 code magnitude (``-8`` is never produced)."""
_QUANT_OF: Final[dict[str, int]] = {
    "none": _QUANT_NONE,
    "int8": _QUANT_TENSOR,
    "int8-channel": _QUANT_CHANNEL,
    "int4-channel": _QUANT_LOWBIT,
    "ternary": _QUANT_LOWBIT,
}
FLAG_MASKED: Final = 1 << 2
"""Tensor flag: the tensor is sparse, only entries under its mask are transmitted."""
FLAG_MASK_SENT: Final = 1 << 3
"""Tensor flag: the mask bits are in the ``mask`` stream (else the receiver supplies the mask)."""
FLAG_CODES_ZLIB: Final = 1 << 4
"""Payload flag: the ``codes`` / ``values`` stream is zlib-compressed (uint8)."""
FLAG_MASK_ZLIB: Final = 1 << 5
"""Payload flag: the ``mask`` stream is zlib-compressed."""
FLAG_SELECTED: Final = 1 << 6
"""The tensor is top-k sparsified: ``select`` holds a bit per candidate entry."""
FLAG_SELECT_ZLIB: Final = 1 << 7
"""The ``select`` stream is zlib-compressed."""
FLAG_TERNARY: Final = 1 << 8
"""Payload flag (low-bit mode): codes are signs (one bit each), not int4 nibbles."""
FLAG_SELECT_RICE: Final = 1 << 9
"""The ``select`` stream is Golomb-coded gaps (:mod:`fedprune.codec.rice`; the name is from the
Rice code, the Golomb code of a power-of-two parameter, that it was up to format version 2)."""
FLAG_MASK_RICE: Final = 1 << 10
"""The ``mask`` stream is Golomb-coded gaps."""
FLAG_SELECT_ROWS: Final = 1 << 12
"""With :data:`FLAG_SELECT_RICE`: the Golomb code has one segment per row of each tensor of
``ndim >= 2`` whose every entry is a candidate, the rows' counts first
(:func:`fedprune.codec.rice.rice_rows_encode`)."""
FLAG_MASK_ROWS: Final = 1 << 13
"""With :data:`FLAG_MASK_RICE`: the ``mask`` stream's Golomb code has one segment per row."""
SELECT_BLOCK_SHIFT: Final = 14
SELECT_BLOCK_BITS: Final = 0b1111 << SELECT_BLOCK_SHIFT
"""Payload field: ``log2`` of the selection block (``select`` has one bit per block of that many
consecutive candidates of a tensor, the last block of a tensor possibly shorter; 0: entries)."""
FLAG_SCALES_LOG8: Final = 1 << 11
"""Payload flag (low-bit mode): the ``scale`` stream is 8-bit log-scale codes (uint8), not
float16: a little-endian float32 reference ``r`` (4 bytes) then one code ``c`` per row that
carries entries, the row's step ``r * 2 ** (-c / LOG8_STEPS)`` (``c = 255``: 0). No rows: empty."""
LOG8_STEPS: Final = 16
"""Log-scale codes per octave (a step is within ``2 ** (1 / 32) - 1 = 2.2 %`` of its magnitude
when the magnitude is within 254 / 16 = 15.9 octaves below the payload's largest)."""
LOG8_ZERO: Final = 255
"""The log-scale code of a zero step."""
FLAG_SCALE_ZLIB: Final = 1 << 18
"""Payload flag (low-bit mode): the ``scale`` stream is zlib-compressed (uint8), its bytes
split into planes first (every entry's first byte, then every second byte, ...)."""
MAX_BLOCK: Final = 1 << 15
"""Largest selection block (:data:`SELECT_BLOCK_BITS` holds its ``log2``)."""
_PAYLOAD_FLAGS: Final = (
    QUANT_BITS
    | FLAG_CODES_ZLIB
    | FLAG_MASK_ZLIB
    | FLAG_SELECT_ZLIB
    | FLAG_TERNARY
    | FLAG_SELECT_RICE
    | FLAG_MASK_RICE
    | FLAG_SCALES_LOG8
    | FLAG_SCALE_ZLIB
    | FLAG_SELECT_ROWS
    | FLAG_MASK_ROWS
    | SELECT_BLOCK_BITS
)
_STREAM_FLAGS: Final[dict[str, dict[str, int]]] = {
    KEY_MASK: {
        "raw": 0,
        "zlib": FLAG_MASK_ZLIB,
        "rice": FLAG_MASK_RICE,
        "rice-rows": FLAG_MASK_RICE | FLAG_MASK_ROWS,
    },
    KEY_SELECT: {
        "raw": 0,
        "zlib": FLAG_SELECT_ZLIB,
        "rice": FLAG_SELECT_RICE,
        "rice-rows": FLAG_SELECT_RICE | FLAG_SELECT_ROWS,
    },
}
"""Payload flags of each kind of bit stream the entropy stage picks, per stream key."""
_TENSOR_FLAGS: Final = QUANT_BITS | FLAG_MASKED | FLAG_MASK_SENT | FLAG_SELECTED

ZLIB_LEVEL: Final = 6
"""zlib compression level of the entropy stage."""
_F32_TINY: Final = np.float32(np.finfo(np.float32).tiny)
_F32_QMAX: Final = np.float32(QMAX)
_F32_ONE: Final = np.float32(1.0)


def _largest_scale() -> np.float32:
    """Return the largest float32 step whose code 127 still decodes to a finite float32."""
    scale = np.float32(np.finfo(np.float32).max) / _F32_QMAX
    with np.errstate(over="ignore"):
        while not np.isfinite(scale * _F32_QMAX):
            scale = np.nextafter(scale, np.float32(0))
    return np.float32(scale)


_MAX_SCALE: Final = _largest_scale()
_VALUES_DTYPE: Final = np.dtype("<f4")
_BLOCK: Final = 1 << 17
"""Entries per block of the blocked encode kernels (their temporaries stay in L2 cache)."""
"""Byte layout of compressed ``values`` streams (little-endian float32)."""

# -- Flower 1.42 serialization constants (flwr.common.constant, flwr.supercore.constant) ------
FLWR_CHUNK_SIZE_ENV: Final = "FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE"
FLWR_DEFAULT_CHUNK_SIZE: Final = 5 * 1024 * 1024
_OBJECT_ID_LEN: Final = 64  # sha256 hex digest


@dataclass(frozen=True)
class CodecConfig:
    """How tensors are encoded.

    Parameters
    ----------
    quant : {"int8-channel", "int8", "none", "int4-channel", "ternary"}
        ``"int8-channel"``: symmetric int8 with one float32 step size per output channel
        (axis 0) for tensors with ``ndim >= 2`` and per tensor otherwise; ``"int8"``: one
        step size per tensor; ``"none"``: float32 values pass through (still sparse);
        ``"int4-channel"``: codes in ``[-7, 7]`` (two per byte) with one float16 step per row
        (axis 0; a 0-d or 1-D tensor is one row) *that carries entries*; ``"ternary"``: the
        sign of each transmitted entry (one bit) times one float16 magnitude per such row (the
        mean ``|x|`` of its transmitted entries, the least-squares magnitude of a sign code).
    scales : {"float16", "log8"}
        Step sizes of the low-bit modes: float16, or one byte per row on a log scale below
        the payload's largest step (:data:`FLAG_SCALES_LOG8`; ``"log8"`` needs a low-bit
        ``quant``). Codes are computed against the rounded step either way.
    rounding : {"nearest", "stochastic"}
        Round to nearest (error ``<= scale / 2`` up to float32 rounding) or unbiased stochastic
        rounding (``E[decode] == x``; needs an ``rng`` in :func:`encode`).
    entropy : bool
        Run the lossless stage: zlib on the code (or value) stream; zlib or a Golomb code of
        the gaps (:mod:`fedprune.codec.rice`) on the mask and select streams, whichever is
        smallest on the wire (raw when neither shrinks it).
    container : {"arrays", "blob"}
        ``"arrays"``: one array per stream; ``"blob"``: the whole payload in one uint8 array
        under :data:`KEY_BLOB` (one Flower ``Array`` per message instead of five or six).
    topk : float
        Fraction in ``(0, 1]`` of each tensor's candidate entries (its kept entries if masked,
        else all) that is transmitted: the ``ceil(topk * n)`` largest in magnitude, the rest
        decodes as ``0.0``. For updates, with error feedback (:func:`residual`) carrying what
        was not sent; ``1.0`` sends every candidate and adds no ``select`` stream.
    topk_block : int
        Select blocks of this many consecutive candidates (a power of two up to 2**15; C order
        within each tensor, the last block of a tensor possibly shorter) by their summed
        ``|x|``, and send one ``select`` bit per block: a block's positions cost a block's
        share, its values as many as it holds. ``1``: single entries.
    topk_scope : {"tensor", "model"}
        Where the top-k is taken: ``"tensor"``, the ``topk`` fraction of each tensor's
        candidates; ``"model"``, the ``ceil(topk * n)`` largest magnitudes over all candidates
        of all tensors together (a tensor whose entries are larger gets more of the budget;
        among equal magnitudes the earlier tensor and lower index win). The payload records
        each tensor's count either way: the receiver does not need to know.
    """

    quant: QuantMode = "int8-channel"
    rounding: RoundingMode = "nearest"
    entropy: bool = False
    topk: float = 1.0
    container: Container = "arrays"
    scales: ScaleFormat = "float16"
    topk_scope: TopkScope = "tensor"
    topk_block: int = 1

    def __post_init__(self) -> None:
        if self.quant not in get_args(QuantMode):
            raise ValueError(f"quant must be one of {get_args(QuantMode)}, got {self.quant!r}")
        if self.rounding not in get_args(RoundingMode):
            raise ValueError(
                f"rounding must be one of {get_args(RoundingMode)}, got {self.rounding!r}"
            )
        if not isinstance(self.entropy, bool):
            raise ValueError(f"entropy must be a bool, got {self.entropy!r}")
        if not (isinstance(self.topk, (int, float)) and 0.0 < self.topk <= 1.0):
            raise ValueError(f"topk must be in (0, 1], got {self.topk!r}")
        if self.container not in get_args(Container):
            raise ValueError(
                f"container must be one of {get_args(Container)}, got {self.container!r}"
            )
        block = self.topk_block
        if not (
            isinstance(block, int) and not isinstance(block, bool) and 1 <= block <= MAX_BLOCK
        ) or (block & (block - 1)):
            raise ValueError(
                f"topk_block must be a power of two in [1, {MAX_BLOCK}], got {block!r}"
            )
        if self.topk_scope not in get_args(TopkScope):
            raise ValueError(
                f"topk_scope must be one of {get_args(TopkScope)}, got {self.topk_scope!r}"
            )
        if self.scales not in get_args(ScaleFormat):
            raise ValueError(f"scales must be one of {get_args(ScaleFormat)}, got {self.scales!r}")
        if self.scales == "log8" and self.quant not in ("int4-channel", "ternary"):
            raise ValueError(
                f"log8 scales need quant 'int4-channel' or 'ternary', not {self.quant!r}"
            )
        if self.quant == "ternary" and self.rounding == "stochastic":
            raise ValueError("ternary codes are signs: stochastic rounding does not apply")


@dataclass(frozen=True)
class _Entry:
    """One tensor of a payload: its ``meta`` entry and where its data lies in the streams."""

    name: str
    flags: int
    n_values: int
    shape: tuple[int, ...]
    value_start: int
    """Offset of the tensor's codes (or values) in the code (or value) stream."""
    scale_start: int
    """Offset of the tensor's step sizes in the ``scale`` stream."""
    bit_start: int
    """Bit offset of the tensor's mask in the ``mask`` stream (if its bits are sent)."""
    n_candidates: int = 0
    """Entries the selection chose from (only with :data:`FLAG_SELECTED`)."""
    select_start: int = 0
    """Bit offset of the tensor's selection in the ``select`` stream."""
    block: int = 1
    """Candidates per ``select`` bit (:data:`SELECT_BLOCK_BITS`)."""

    @property
    def mode(self) -> int:
        return self.flags & QUANT_BITS

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def n_scales(self) -> int:
        return _n_scales(self.mode, self.shape)

    @property
    def n_bits(self) -> int:
        return self.size if self.flags & FLAG_MASK_SENT else 0

    @property
    def n_select_bits(self) -> int:
        return -(-self.n_candidates // self.block) if self.flags & FLAG_SELECTED else 0

    @property
    def n_select_ones(self) -> int:
        """Blocks selected: ``n_values`` over whole blocks, plus a short last block if any."""
        return -(-self.n_values // self.block)

    @property
    def meta(self) -> list[int]:
        """Return the tensor's entry in ``meta``."""
        tail = [self.n_candidates] if self.flags & FLAG_SELECTED else []
        return [self.flags, self.n_values, len(self.shape), *self.shape, *tail]


def _check_name(name: object) -> str:
    if not isinstance(name, str):
        raise ValueError(f"tensor names must be str, got {name!r}")
    if NAME_SEP in name:
        raise ValueError(f"tensor name {name!r} contains the name separator {NAME_SEP!r}")
    return name


def _names_array(names: list[str]) -> NDArray[np.uint8]:
    try:
        blob = NAME_SEP.join(names).encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"tensor names must be valid UTF-8 text: {err}") from err
    return np.frombuffer(bytearray(blob), dtype=np.uint8)  # writable, owns its memory


def _effective_quant(quant: int, ndim: int) -> int:
    """Mode used for a tensor of ``ndim`` dimensions under the payload mode ``quant``."""
    if quant == _QUANT_CHANNEL and ndim < 2:
        return _QUANT_TENSOR
    return quant


def _n_scales(mode: int, shape: tuple[int, ...]) -> int:
    """Return the number of step sizes of a tensor in ``mode`` (none for float32 values)."""
    if mode in (_QUANT_NONE, _QUANT_LOWBIT):
        return 0  # low-bit scales: one per row with entries, counted once positions are known
    return shape[0] if mode == _QUANT_CHANNEL else 1


def _as_float32(name: str, x: object) -> NDArray[np.float32]:
    arr = np.asarray(x)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"tensor {name!r} must be a real numeric array, got dtype {arr.dtype}")
    return arr.astype(np.float32, copy=False)


def _label(key: str) -> str:
    return f"payload key {key!r}"


def _check_mask(name: str, mask: object, shape: tuple[int, ...]) -> NDArray[np.bool_]:
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
        got = getattr(mask, "dtype", type(mask).__name__)
        raise ValueError(f"mask of {name!r} must be a bool array, got {got}")
    if mask.shape != shape:
        raise ValueError(f"mask of {name!r} has shape {mask.shape}, the tensor has {shape}")
    return mask


def _position_counts(entries: list[_Entry], key: str) -> list[tuple[int, int]]:
    """Return ``(set bits, bits)`` per tensor segment of the ``mask`` or ``select`` stream."""
    if key == KEY_SELECT:
        return [(e.n_select_ones, e.n_select_bits) for e in entries]
    return [
        (e.n_candidates if e.flags & FLAG_SELECTED else e.n_values, e.size)
        for e in entries
        if e.flags & FLAG_MASK_SENT
    ]


def _position_rows(entries: list[_Entry], key: str) -> list[int]:
    """Return the rows each tensor segment of a bit stream splits into for row-segmented codes.

    A segment splits into its tensor's rows (axis 0) when the tensor has ``ndim >= 2`` and the
    segment holds a bit for each of its entries (always for ``mask``; for ``select`` when the
    tensor is dense); else it stays whole (1).
    """
    segments = [e for e in entries if key == KEY_SELECT or e.flags & FLAG_MASK_SENT]
    n_bits = [n for _, n in _position_counts(entries, key)]
    return [
        e.shape[0] if len(e.shape) >= 2 and e.shape[0] > 1 and bits == e.size else 1
        for e, bits in zip(segments, n_bits, strict=True)
    ]


def _block_of(flags: int) -> int:
    """Return the selection block a payload's flags declare."""
    return 1 << ((flags & SELECT_BLOCK_BITS) >> SELECT_BLOCK_SHIFT)


def _block_flags(block: int) -> int:
    """Return the payload flag field of a selection block (a power of two)."""
    return (block.bit_length() - 1) << SELECT_BLOCK_SHIFT
