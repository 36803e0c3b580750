"""Small composable 3D building blocks (MONAI style) for the patch autoencoders and heads.

Shapes use ``N`` for the batch of patches (subjects x regions), ``C`` channels and
``(D, H, W)`` for the three spatial axes of a patch. Every block works under
``torch.autocast`` (bf16/fp16) and with parameters cast to bf16 by an engine: GroupNorm
runs in the dtype of its input with fp32 statistics (the CPU and CUDA kernels accumulate in
fp32), so a 60x64x44 feature map is never copied to fp32.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from masan.model.fastpaths import FastPaths, TakesFastPaths, resolve

AUTOCAST_DEVICE_TYPES = frozenset(t for t in ("cpu", "cuda", "xpu", "mps", "hpu") if torch.amp.is_autocast_available(t))
"""Device types with autocast, read once: ``torch.amp.is_autocast_available`` inside a forward
is a graph break for ``torch.compile`` (one per GroupNorm; docs/performance.md, "the engine's step")."""


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Switch autocast off on ``device`` (nothing to do where it does not exist, e.g. meta)."""
    if device.type in AUTOCAST_DEVICE_TYPES:
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


class Conv3d(nn.Conv3d):
    """:class:`torch.nn.Conv3d` (same parameters) that computes in fp32 on the device types of
    ``BF16_IN_FP32`` when its input, weight or autocast is bf16, and returns bf16.

    Why: oneDNN's bf16 weight gradient of a 3D convolution on AVX-512 CPUs is wrong, reads
    uninitialized memory or writes out of bounds when an axis of the map is small (a 2-voxel
    axis, 16 or more input channels; such maps are the deepest levels of the fMRI patches at
    full resolution), so a CPU run in bf16 stopped on a non-finite gradient norm or crashed
    (docs/performance.md, "Kernel faults"). fp32 is exact there and costs little on a CPU.
    """

    BF16_IN_FP32 = frozenset({"cpu"})

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        device = x.device
        if device.type not in self.BF16_IN_FP32 or not _bf16_involved(x, weight):
            return super()._conv_forward(x, weight, bias)
        with autocast_off(device):
            y = super()._conv_forward(x.float(), weight.float(), None if bias is None else bias.float())
        return y.to(torch.bfloat16)


def _bf16_involved(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Would a convolution of ``x`` by ``weight`` run in bf16 here (a bf16 operand, or bf16 autocast)?"""
    if torch.bfloat16 in (x.dtype, weight.dtype):
        return True
    kind = x.device.type
    return torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.bfloat16


def conv3d(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> Conv3d:
    """A 3D convolution with "same" padding: output size ``ceil(size / stride)`` per axis.

    For stride 2 this gives 60 -> 30 -> 15 -> 8, so odd patch sizes need no cropping.
    """
    return Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2)


def is_channels_last(x: torch.Tensor) -> bool:
    """``x (N, C, D, H, W)`` is laid out NDHWC (``torch.channels_last_3d``), and not also NCDHW
    (a tensor with one channel, or one voxel, is both)."""
    return x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d)


def voxels_last(x: torch.Tensor) -> torch.Tensor:
    """A channels-last ``x (N, C, D, H, W)`` as its contiguous view ``(N, D, H, W, C)``: the fast
    paths compute on it, so that their outputs and input gradients keep that layout (autograd
    makes each gradient contiguous in the order of the view it flows back through)."""
    return x.permute(0, 2, 3, 4, 1)


def channels_first(y: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`voxels_last`: ``(N, D, H, W, C)`` -> the ``(N, C, D, H, W)`` view."""
    return y.permute(0, 4, 1, 2, 3)


def pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
              mode: str | None = None) -> torch.Tensor:
    """A 1x1x1 convolution: ``x (N, C_in, D, H, W)``, ``weight (C_out, C_in)``, ``bias (C_out,)``
    -> ``(N, C_out, D, H, W)`` in ``x``'s layout, by ``mode`` (:attr:`FastPaths.pointwise`;
    None: the default for ``x``'s device). ``bmm``: a matrix product in the input's layout (per
    sample on the ``(C, D*H*W)`` view of NCDHW; on the ``(N*D*H*W, C)`` rows of channels-last,
    bias fused), on a contiguous or channels-last ``x``, else the conv. cuDNN/oneDNN's conv
    converts every bf16 NCDHW input, output and gradient to channels-last and back, copies of
    full-resolution maps that cost a noticeable share of a CUDA step (docs/performance.md,
    "On the target card")."""
    mode = resolve(None, x).pointwise if mode is None else mode
    if mode == "bmm" and is_channels_last(x):
        return channels_first(F.linear(voxels_last(x), weight, bias))
    if mode != "bmm" or not x.is_contiguous():
        return F.conv3d(x, weight[..., None, None, None], bias)
    n, c, *spatial = x.shape
    # bmm, not matmul: matmul folds a 2-D weight times a batch into one mm with transposing copies
    y = torch.bmm(weight.expand(n, -1, -1), x.reshape(n, c, -1))  # autocast: bf16 like the conv
    if bias is not None:
        y = y + bias.to(y.dtype)[:, None]
    return y.reshape(n, -1, *spatial)


class PointwiseConv3d(TakesFastPaths, nn.Conv3d):
    """A 1x1x1 :class:`torch.nn.Conv3d` computed by :func:`pointwise` (``fast_paths.pointwise``):
    the same parameters. Input ``(N, C_in, D, H, W)`` -> ``(N, C_out, D, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pointwise(x, self.weight.flatten(1), self.bias, resolve(self.fast_paths, x).pointwise)


class _ShiftSum(torch.autograd.Function):
    """``(N, C_out * k^3, D, H, W)`` one map per (output, kernel tap) -> ``(N, C_out, D, H, W)``:
    each tap's map shifted to its kernel offset (zero outside) and summed per output, which is
    a "same"-padded cross-correlation with one-hot kernels; the backward shifts back. Slices
    and adds only: the one-hot convolution that does the same costs more than the work."""

    @staticmethod
    def forward(ctx, per_tap: torch.Tensor, out_channels: int, kernel: int) -> torch.Tensor:
        n, _, d, h, w = per_tap.shape
        p = kernel // 2
        padded = F.pad(per_tap, (p,) * 6)
        out = per_tap.new_zeros(n, out_channels, d, h, w)
        for i, (o, a, b, c) in enumerate(itertools.product(range(out_channels), *[range(kernel)] * 3)):
            out[:, o] += padded[:, i, a:a + d, b:b + h, c:c + w]
        ctx.kernel, ctx.out_channels = kernel, out_channels
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        k = ctx.kernel
        d, h, w = grad.shape[2:]
        e = 2 * (k // 2)  # output voxel x took tap (a, b, c) from x + (a, b, c) - k // 2
        padded = F.pad(grad, (k // 2,) * 6)
        parts = [padded[:, o, e - a:e - a + d, e - b:e - b + h, e - c:e - c + w]
                 for o, a, b, c in itertools.product(range(ctx.out_channels), *[range(k)] * 3)]
        return torch.stack(parts, dim=1), None, None


class NarrowConv3d(TakesFastPaths, Conv3d):
    """A "same"-padded 3D convolution to very few output channels (the T1 reconstruction,
    ``64 -> 1``), computed where its kernels are not pathological; same parameters and result
    as :class:`torch.nn.Conv3d`.

    cuDNN's kernel for the weight gradient of one output channel is pathological: it was the
    largest single cost of a full-resolution step, and padding the weight to 8 output channels
    made it slower still. ``taps`` turns that gradient into a matrix product, which is cheap on
    CUDA and also beats oneDNN's plain or channels_last conv on the CPU (figures: docs/performance.md,
    "Where the step went").
    ``fast_paths.outconv`` (:class:`~masan.model.fastpaths.FastPaths`):

    * ``taps``: a 1x1x1 conv to one map per (output, kernel tap) (a matrix product, whose
      weight gradient is cheap), then each map shifted to its offset and summed (:class:`_ShiftSum`);
    * ``channels_last``: the input in channels_last_3d;
    * ``plain``: as :class:`torch.nn.Conv3d`.

    Input ``(N, C_in, D, H, W)`` -> ``(N, C_out, D, H, W)``.
    """

    MAX_OUT = 4
    """Wider convolutions always run plain."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)

    def strategy(self, paths: FastPaths) -> str:
        """How this conv runs with ``paths`` (``paths.outconv``; wider convolutions always ``plain``)."""
        return paths.outconv if self.out_channels <= self.MAX_OUT else "plain"

    def pointwise_taps(self) -> torch.Tensor:
        """The weight as one 1x1x1 map per (output, kernel tap): ``(C_out * k^3, C_in)``, map
        ``i = (o, a, b, c)`` in C order."""
        out, cin = self.weight.shape[:2]
        return self.weight.reshape(out, cin, -1).transpose(1, 2).reshape(-1, cin)

    def sum_taps(self, per_tap: torch.Tensor) -> torch.Tensor:
        """``(N, C_out * k^3, D, H, W)`` per-tap maps -> the convolution's output ``(N, C_out, D, H, W)``
        (NCDHW: each tap's map is shifted as one plane; a channels-last input is made NCDHW
        first, one copy, where its 27 strided slices would each read the whole map)."""
        y = _ShiftSum.apply(per_tap.contiguous(), self.out_channels, self.kernel_size[0])
        # the bias in the maps' dtype, as a conv under autocast adds it (no fp32 promotion)
        return y if self.bias is None else y + self.bias.to(y.dtype).view(1, -1, 1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        paths = resolve(self.fast_paths, x)
        strategy = self.strategy(paths)
        if strategy == "taps":
            return self.sum_taps(pointwise(x, self.pointwise_taps(), mode=paths.pointwise))
        if strategy == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return super().forward(x)


class GroupNorm3d(nn.GroupNorm):
    """GroupNorm that keeps its input dtype under autocast (fp32 statistics inside the kernel).

    Autocast would up-cast the whole feature map to fp32 (a 2x larger saved activation);
    the native bf16/fp16 kernels already accumulate mean and variance in fp32.

    Input/output: ``(N, C, D, H, W)``, any floating dtype.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5):
        if num_channels % num_groups:
            raise ValueError(
                f"GroupNorm: {num_channels} channels cannot be split into {num_groups} groups; "
                f"set model.groups to a divisor of every width in model.channels/fmri_channels"
            )
        super().__init__(num_groups, num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast_off(x.device):
            return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class ResidualBlock(nn.Module):
    """``[GroupNorm, ReLU, Conv3x3] x 2 + identity`` (Table 1's EncoderBlock, "AddId").

    Input/output: ``(N, C, D, H, W)``, same shape.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm1 = GroupNorm3d(groups, channels)
        self.conv1 = conv3d(channels, channels)
        self.norm2 = GroupNorm3d(groups, channels)
        self.conv2 = conv3d(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.relu(self.norm1(x)))
        y = self.conv2(F.relu(self.norm2(y)))
        return x + y


class DownStage(nn.Module):
    """One encoder level: ``Conv3x3 stride 2`` (EncoderDown) then a :class:`ResidualBlock`.

    Input ``(N, C_in, D, H, W)`` -> output ``(N, C_out, ceil(D/2), ceil(H/2), ceil(W/2))``.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.down = conv3d(in_channels, out_channels, stride=2)
        self.block = ResidualBlock(out_channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.down(x))


UPSAMPLE_MODES = ("trilinear", "nearest")


@functools.lru_cache(maxsize=128)
def _axis_weights(kind: str, n_in: int, n_out: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(n_out, n_in)`` matrix of one axis of a separable resampling: ``linear``: 1D linear
    interpolation, ``align_corners=False``, as :func:`torch.nn.functional.interpolate` computes
    it for an explicit output size; ``mean``: the mean over adaptive pooling's bin
    ``[floor(i * n_in / n_out), ceil((i + 1) * n_in / n_out))``."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    if kind == "linear":
        src = ((rows.double() + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
        lo = src.floor().long().clamp_max(n_in - 1)
        hi = (lo + 1).clamp_max(n_in - 1)
        frac = src - lo
        m[rows, lo] += 1 - frac
        m[rows, hi] += frac
    elif kind == "mean":
        for i in range(n_out):
            lo, hi = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
            m[i, lo:hi] = 1.0 / (hi - lo)
    else:
        raise ValueError(f"axis weights: unknown kind {kind!r}")
    return m.to(dtype=dtype, device=device)


def axis_weights(kind: str, n_in: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
    """:func:`_axis_weights` in ``like``'s dtype and device, reused from a cache in eager mode
    (torch.compile traces the matrix's construction into its graph, as a constant there)."""
    build = _axis_weights.__wrapped__ if torch.compiler.is_compiling() else _axis_weights
    return build(kind, n_in, n_out, like.dtype, like.device)


def separable(x: torch.Tensor, kind: str, size: tuple[int, int, int]) -> torch.Tensor:
    """A linear resampling that acts on each spatial axis alone (:func:`_axis_weights` ``kind``),
    as three matrix products: ``(N, C, d, h, w)`` -> ``(N, C, *size)``, in ``x``'s layout (NCDHW
    or channels-last). Its backward is matrix products too, where the resampling operators'
    own backwards scatter with atomic adds."""
    n, c, d, h, w = x.shape
    big_d, big_h, big_w = size
    m_d, m_h, m_w = (axis_weights(kind, a, b, x) for a, b in ((d, big_d), (h, big_h), (w, big_w)))
    if is_channels_last(x):  # on the (N, d, h, w, C) view: each axis a matrix times (axis, rest) blocks
        y = torch.matmul(m_w, voxels_last(x).reshape(n * d * h, w, c))  # (N*d*h, W, C)
        y = torch.matmul(m_h, y.reshape(n * d, h, big_w * c))  # (N*d, H, W*C)
        y = torch.matmul(m_d, y.reshape(n, d, big_h * big_w * c))  # (N, D, H*W*C)
        return channels_first(y.reshape(n, big_d, big_h, big_w, c))
    y = torch.matmul(x, m_w.T)  # (N, C, d, h, W)
    y = torch.matmul(m_h, y)  # (N, C, d, H, W)
    y = torch.matmul(m_d, y.reshape(n, c, d, big_h * big_w))
    return y.reshape(n, c, big_d, big_h, big_w)


def trilinear(x: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Trilinear upsampling (``align_corners=False``) by :func:`separable`: the values of
    ``F.interpolate(x, size, mode="trilinear")`` (to rounding), but a backward of matrix
    products instead of its scattered atomic adds, which are slow at full resolution on CUDA
    and on the CPU (docs/performance.md, "Where the step went").
    ``(N, C, d, h, w)`` -> ``(N, C, *size)``, in ``x``'s layout.
    """
    return separable(x, "linear", size)


class UpConcat(nn.Module):
    """Decoder upsampling: 1x1 conv to the skip's width, upsampling (``mode``: trilinear or
    nearest) to the skip's exact size (so odd sizes round-trip: 8 -> 15), then concatenation
    with the skip.

    With ``use_skip=False`` the skip gives only its size: the 1x1 conv makes all ``2*C_skip``
    channels from ``x``, so the decoder must rebuild this level from the coarser code.
    The 1x1 conv runs before upsampling, at the coarse resolution, where it is 8x cheaper.
    Inputs ``x (N, C_in, d, h, w)``, ``skip (N, C_skip, D, H, W)`` -> ``(N, 2*C_skip, D, H, W)``.
    """

    def __init__(self, in_channels: int, skip_channels: int, use_skip: bool = True, mode: str = "trilinear"):
        super().__init__()
        if mode not in UPSAMPLE_MODES:
            raise ValueError(f"model.upsample={mode!r}: use one of {list(UPSAMPLE_MODES)}")
        self.use_skip, self.mode = use_skip, mode
        self.proj = PointwiseConv3d(in_channels, skip_channels * (1 if use_skip else 2))

    def upsample(self, x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        """``(N, C, d, h, w)`` -> ``(N, C, *size)`` by ``mode``; channel-wise and linear, with
        weights that sum to 1 per output voxel (so it commutes with a 1x1 conv and its bias)."""
        return trilinear(x, size) if self.mode == "trilinear" else F.interpolate(x, size=size, mode="nearest")

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.upsample(self.proj(x), tuple(skip.shape[2:]))
        return torch.cat([up, skip.to(up.dtype)], dim=1) if self.use_skip else up


class UpStage(nn.Module):
    """One decoder level, mirror of :class:`DownStage`: :class:`UpConcat`, a 1x1 conv that
    merges the concatenation back to ``C_out`` channels, then a :class:`ResidualBlock`.

    Inputs ``x (N, C_in, d, h, w)``, ``skip (N, C_skip, D, H, W)`` -> ``(N, C_out, D, H, W)``.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, groups: int, use_skip: bool = True,
                 mode: str = "trilinear"):
        super().__init__()
        self.up = UpConcat(in_channels, skip_channels, use_skip, mode)
        self.merge = PointwiseConv3d(2 * skip_channels, out_channels)
        self.block = ResidualBlock(out_channels, groups)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(self.merge(self.up(x, skip)))


class OutputStage(TakesFastPaths, nn.Module):
    """Last decoder level, mirror of InitConv: :class:`UpConcat` then a 3x3 conv to the
    reconstructed channels (1 for T1, T frames for fMRI). No residual block at full
    resolution, as the encoder has none there (Table 1).

    Where the conv runs as per-tap maps (:class:`NarrowConv3d` ``taps``) and ``fast_paths.fold``
    is on (by default on CUDA, where it saves time and memory per sample: docs/performance.md,
    "On the target card"; the CPU keeps the unfolded stage, so its results stay comparable with
    the CPU figures there),
    the taps' 1x1 conv of the upsampled half is folded into ``UpConcat``'s 1x1 conv and applied
    *before* upsampling (both are linear and channel-wise, and the upsampling weights sum to 1,
    so the bias folds too): the same parameters and result to rounding, but the full-resolution
    concatenation (2 x C_skip channels) and its 1x1 conv are never made. The skip half gets its
    own 1x1 conv at full resolution and the two per-tap maps are added.

    Inputs ``x (N, C_in, d, h, w)``, ``skip (N, C_skip, D, H, W)`` -> ``(N, C_out, D, H, W)``.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, use_skip: bool = True,
                 mode: str = "trilinear"):
        super().__init__()
        self.up = UpConcat(in_channels, skip_channels, use_skip, mode)
        self.conv = NarrowConv3d(2 * skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        paths = resolve(self.fast_paths, x)
        if paths.fold and self.up.use_skip and self.conv.strategy(paths) == "taps":
            return self._folded(x, skip, paths.pointwise)
        return self.conv(self.up(x, skip))

    def _folded(self, x: torch.Tensor, skip: torch.Tensor, mode: str) -> torch.Tensor:
        taps = self.conv.pointwise_taps()  # (C_out * k^3, 2 * C_skip): [upsampled | skip] channels
        c_skip = skip.shape[1]
        proj = self.up.proj
        w_up = taps[:, :c_skip] @ proj.weight.flatten(1).to(taps.dtype)  # (C_out * k^3, C_in)
        b_up = taps[:, :c_skip] @ proj.bias.to(taps.dtype)
        per_tap = self.up.upsample(pointwise(x, w_up, b_up, mode), tuple(skip.shape[2:]))
        per_tap = per_tap + pointwise(skip.to(per_tap.dtype), taps[:, c_skip:].to(per_tap.dtype), mode=mode)
        return self.conv.sum_taps(per_tap)


class TemporalConv(nn.Module):
    """Per-voxel 1D convolution over time, ReLU, then the mean over time.

    Gives ``features`` shift-invariant temporal descriptors per voxel, whatever the number of
    frames: resting-state runs are not time-locked across subjects, so frame ``t`` of one run
    means nothing for frame ``t`` of another.
    Input ``(B, T, X, Y, Z)`` with ``T >= kernel`` -> output ``(B, features, X, Y, Z)``.

    ``voxel_chunk`` > 0 processes that many voxels per checkpointed piece, so the
    ``(voxels, features, T')`` response never exists whole (about ``features / stride`` times
    the size of the fMRI input); 0 processes all voxels at once.
    """

    def __init__(self, features: int, kernel: int, stride: int, voxel_chunk: int = 0):
        super().__init__()
        self.conv = nn.Conv1d(1, features, kernel_size=kernel, stride=stride)
        self.voxel_chunk = voxel_chunk

    def _respond(self, series: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(series)).mean(dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, *spatial = x.shape
        if t < self.conv.kernel_size[0]:
            raise ValueError(
                f"fMRI has {t} frames, fewer than model.temporal_kernel={self.conv.kernel_size[0]}; "
                "lower temporal_kernel or feed more frames"
            )
        series = x.reshape(b, t, -1).transpose(1, 2).reshape(-1, 1, t)  # (B*V, 1, T)
        if self.voxel_chunk > 0 and torch.is_grad_enabled():
            pieces = [checkpoint(self._respond, s, use_reentrant=False) for s in series.split(self.voxel_chunk)]
            feats = torch.cat(pieces)
        else:
            feats = self._respond(series)
        return feats.reshape(b, -1, feats.shape[1]).transpose(1, 2).reshape(b, -1, *spatial)


def run_block(fn: Callable[..., torch.Tensor], *args: torch.Tensor, checkpointed: bool) -> torch.Tensor:
    """Call ``fn(*args)``; with ``checkpointed`` (and gradients on) keep only the inputs and
    recompute the block in backward (non-reentrant, RNG state preserved)."""
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def param_dtype(module: nn.Module) -> torch.dtype:
    """Dtype of a module's first parameter (fp32, or bf16/fp16 when an engine cast the model)."""
    return next(module.parameters()).dtype


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward; the gradient flowing back through ``x`` is multiplied by ``scale``
    (1: unchanged, 0: ``x`` is a constant for everything downstream)."""
    return x if scale == 1.0 else _ScaleGrad.apply(x, scale)
