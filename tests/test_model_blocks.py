"""The fast paths of the model's blocks compute what the plain PyTorch operators compute:
the T1 output conv (:class:`NarrowConv3d`) and its fold before upsampling (:class:`OutputStage`),
trilinear upsampling as matrix products, the equal-block average and max pooling and the
one-projection occlusion of the region head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from masan.model import blocks
from masan.model.attention import RegionSelfAttention
from masan.model.blocks import Conv3d, NarrowConv3d, OutputStage, PointwiseConv3d, trilinear
from masan.model.fastpaths import FastPaths, use_fast_paths
from masan.model.regions import _pool, pool_volume

CUDA_PATHS = FastPaths.for_device("cuda")
"""Every fast path on: taken on the CPU, the tests check what CUDA runs."""


@pytest.mark.parametrize("strategy", ["taps", "channels_last", "plain"])
@pytest.mark.parametrize("out_channels", [1, 2])
def test_narrow_conv_matches_conv3d_with_gradients(strategy, out_channels):
    torch.manual_seed(0)
    conv = use_fast_paths(NarrowConv3d(6, out_channels).double(), FastPaths(outconv=strategy))
    x = torch.randn(2, 6, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    ref = F.conv3d(x, conv.weight, conv.bias, padding=1)
    grad = torch.randn_like(ref)
    want = torch.autograd.grad(ref, [x, conv.weight, conv.bias], grad)
    out = conv(x)
    got = torch.autograd.grad(out, [x, conv.weight, conv.bias], grad)
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-12)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-10)
    assert set(conv.state_dict()) == {"weight", "bias"}  # checkpoints are those of a Conv3d


@pytest.mark.parametrize(("spatial", "stride", "autocast"), [((2, 2, 2), 1, False), ((2, 3, 2), 1, False),
                                                          ((2, 5, 4), 2, False), ((2, 2, 2), 1, True)])
def test_bf16_conv_on_the_cpu_has_the_exact_weight_gradient(spatial, stride, autocast):
    """A bf16 3D conv on the CPU gives the weight gradient of fp64 to bf16's precision, on maps
    with a 2-voxel axis (the deepest fMRI levels at full resolution), where oneDNN's bf16 weight
    gradient on AVX-512 CPUs was not finite or plainly wrong; bf16 parameters (the engine's) or
    fp32 ones under bf16 autocast."""
    torch.manual_seed(0)
    dtype = torch.float32 if autocast else torch.bfloat16
    conv = Conv3d(16, 16, 3, stride=stride, padding=1).to(dtype)
    for _ in range(5):  # the faulty kernel's result depended on what memory it was given
        x = torch.randn(2, 16, *spatial, dtype=dtype, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = conv(x)
        assert out.dtype == torch.bfloat16
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, conv.weight, grad)[0]
        w64 = conv.weight.detach().to(torch.bfloat16).double().requires_grad_()
        ref = F.conv3d(x.detach().to(torch.bfloat16).double(), w64, conv.bias.detach().to(torch.bfloat16).double(),
                       stride=stride, padding=1)
        want = torch.autograd.grad(ref, w64, grad.double())[0]
        assert torch.isfinite(got).all()
        assert (got.double() - want).norm() <= 0.02 * want.norm()


@pytest.mark.parametrize(("size_in", "size_out"), [((8, 8, 6), (15, 16, 11)), ((15, 16, 11), (30, 32, 22)),
                                                   ((2, 2, 2), (3, 4, 3)), ((4, 4, 4), (8, 8, 8))])
def test_trilinear_matches_interpolate(size_in, size_out):
    x = torch.randn(2, 3, *size_in, dtype=torch.float64, requires_grad=True)
    ref = F.interpolate(x, size=size_out, mode="trilinear", align_corners=False)
    out = trilinear(x, size_out)
    grad = torch.randn_like(ref)
    assert torch.allclose(out, ref, atol=1e-12)
    assert torch.allclose(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(ref, x, grad)[0], atol=1e-12)


@pytest.mark.parametrize(("size_in", "size_out"), [((15, 16, 11), (2, 2, 2)), ((15, 12, 11), (8, 8, 8)),
                                                   ((2, 2, 2), (8, 8, 8)), ((7, 5, 3), (3, 2, 3))])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_unequal_bins_are_averaged_as_adaptive_average_pooling_does(size_in, size_out, layout):
    """On CUDA (``FastPaths.separable_mean``) a mean onto unequal bins is three matrix products: the values
    and gradients of ``adaptive_avg_pool3d`` (whose backward scatters with atomic adds)."""
    x = torch.randn(2, 3, *size_in, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_()
    ref = F.adaptive_avg_pool3d(x, size_out)
    out = _pool(x, size_out, "avg", FastPaths(separable_mean=True))
    grad = torch.randn_like(ref)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(ref, x, grad)[0],
                               rtol=0, atol=1e-12)


def test_region_pooling_bins_are_those_of_adaptive_pooling():
    x = torch.randn(2, 3, 8, 12, 4)
    pooled = pool_volume(x, (2, 2, 2), 2, ["avg", "max"])
    ref = torch.cat([F.adaptive_avg_pool3d(x, (4, 4, 4)), F.adaptive_max_pool3d(x, (4, 4, 4))], dim=1)
    assert torch.allclose(pooled, ref, atol=1e-6)
    assert torch.allclose(_pool(x, (4, 4, 4), "avg", CUDA_PATHS), ref[:, :3], atol=1e-6)  # the CUDA path
    x.requires_grad_(True)
    got, want = _pool(x, (4, 4, 4), "max", CUDA_PATHS), F.adaptive_max_pool3d(x, (4, 4, 4))
    grad = torch.randn_like(want)
    assert torch.equal(got, want)  # and the gradient goes to the same arg-max voxel of each block
    assert torch.equal(torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(want, x, grad)[0])


def test_block_max_by_amax_gives_the_index_max_values_and_gradients_without_ties():
    """``FastPaths.block_max=False`` (the profile's A/B of the index backward) is ``amax``: the
    same maxima, and without ties the same gradient."""
    x = torch.randn(2, 3, 8, 12, 4, dtype=torch.float64, requires_grad=True)
    got = _pool(x, (4, 4, 4), "max", FastPaths(reshaped_pool=True, block_max=False))
    want = _pool(x, (4, 4, 4), "max", CUDA_PATHS)
    grad = torch.randn_like(want)
    assert torch.equal(got, want)
    assert torch.equal(torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(want, x, grad)[0])


def test_a_model_without_fast_paths_takes_each_inputs_device_default():
    from masan.model import build_model, small_model_config
    from masan.model.fastpaths import TakesFastPaths, resolve

    model = build_model(small_model_config(), 2)
    choosers = [m for m in model.modules() if isinstance(m, TakesFastPaths)]
    assert choosers and all(m.fast_paths is None for m in choosers)
    assert resolve(None, torch.zeros(1)) == FastPaths(outconv="taps")  # the CPU: only the output conv's taps
    assert resolve(None, torch.zeros(1, device="meta")) == FastPaths()
    assert CUDA_PATHS == FastPaths("taps", "bmm", fold=True, reshaped_pool=True, separable_mean=True)
    with pytest.raises(ValueError, match="pointwise"):
        FastPaths(pointwise="matmul")


def test_pointwise_conv_as_a_matrix_product_matches_conv3d():
    torch.manual_seed(0)
    conv = PointwiseConv3d(5, 3).double()
    x = torch.randn(2, 5, 3, 4, 6, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 3, 3, 4, 6, dtype=torch.float64)
    results = []
    for mode in ("conv", "bmm"):
        out = use_fast_paths(conv, FastPaths(pointwise=mode))(x)
        results.append((out, torch.autograd.grad(out, [x, conv.weight, conv.bias], grad)))
    (ref, ref_grads), (got, got_grads) = results
    assert torch.allclose(got, ref, atol=1e-12)
    for g, w in zip(got_grads, ref_grads):
        assert torch.allclose(g, w, atol=1e-10)
    assert set(conv.state_dict()) == {"weight", "bias"}  # checkpoints are those of a Conv3d


@pytest.mark.parametrize("pointwise", ["conv", "bmm"])
@pytest.mark.parametrize("mode", ["trilinear", "nearest"])
@pytest.mark.parametrize("out_channels", [1, 3])
def test_output_stage_folded_before_upsampling_matches_the_plain_stage(mode, out_channels, pointwise):
    torch.manual_seed(0)
    stage = OutputStage(5, 4, out_channels, mode=mode).double()
    x = torch.randn(2, 5, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    skip = torch.randn(2, 4, 5, 8, 6, dtype=torch.float64, requires_grad=True)
    params = [x, skip, *stage.parameters()]
    results = {}
    for fold in (False, True):
        use_fast_paths(stage, FastPaths(outconv="taps", pointwise=pointwise, fold=fold))
        out = stage(x, skip)
        grad = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)
        results[fold] = (out, torch.autograd.grad(out, params, grad))
    (ref, ref_grads), (got, got_grads) = results[False], results[True]
    assert got.shape == ref.shape == (2, out_channels, 5, 8, 6) and torch.allclose(got, ref, atol=1e-12)
    for g, w in zip(got_grads, ref_grads):
        assert torch.allclose(g, w, atol=1e-10)


def test_occlusion_from_one_projection_equals_projecting_every_occluded_copy():
    torch.manual_seed(0)
    attention = RegionSelfAttention(40, 8, 6, 8, norm="layer", std_floor=0.1)
    regions = torch.randn(3, 8, 40)
    b, r, d = regions.shape
    occluded = (regions[:, None] * (1 - torch.eye(r))[None, :, :, None]).reshape(b * r, r, d)
    want, _ = attention.attend(occluded)
    assert torch.allclose(attention.attend_occluded(regions), want, atol=1e-6)


def test_encoders_only_gives_the_same_logits_and_region_weights_without_reconstructions():
    from masan.model import build_model, small_model_config
    from masan.model.autoencoder import encoders_only

    torch.manual_seed(0)
    cfg = small_model_config()
    model = build_model(cfg, 2).eval()
    t1, fmri = torch.randn(2, 1, *cfg.t1_shape), torch.randn(2, cfg.fmri_frames, *cfg.fmri_shape)
    with torch.no_grad():
        full = model(t1=t1, fmri=fmri)
        with encoders_only(model):
            fast = model(t1=t1, fmri=fmri)
        again = model(t1=t1, fmri=fmri)
    assert "t1_recon" in full and "t1_recon" not in fast and "fmri_recon" not in fast
    assert "t1_recon" in again  # the decoders are back after the block
    for key in ("logits", "region_weights"):
        assert torch.equal(full[key], fast[key]), key


@pytest.mark.parametrize("paths", ["cpu", "cuda", "cuda channels_last"])
def test_modality_modules_compile_to_one_graph_each(paths):
    """``model.compile`` pays only if sPM and fPM each trace to one graph: a graph break per
    GroupNorm (torch 2.11 could not trace ``torch.amp.is_autocast_available``) made the compile
    of the full model outlast a GPU check's time limit. Checked on the CPU's paths and on the CUDA fast
    paths (1x1 convs as bmm, the folded output conv, reshaped pooling with the index max, the
    separable mean), also with channels-last activations, under bf16 autocast as the GPU's
    step runs."""
    from masan.model import build_model, small_model_config

    cfg = small_model_config(fusion_cells=2, channels_last=paths.endswith("channels_last"))
    model = build_model(cfg, 2, CUDA_PATHS if paths.startswith("cuda") else None).train()
    t1 = torch.randn(1, 1, *cfg.t1_shape)
    fmri = torch.randn(1, cfg.fmri_frames, *cfg.fmri_shape)
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for module, x in ((model.spm, t1), (model.fpm, fmri)):
            explained = torch._dynamo.explain(module)(x)
            assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.slow  # torch.compile traces the model
def test_compiled_modality_modules_give_the_eager_values_and_gradients():
    """:func:`masan.model.compile_modality_modules` compiles in place: the same parameters and
    ``state_dict`` keys, the same outputs and gradients (fp64, the aot_eager backend)."""
    import copy

    from masan.config import LossConfig
    from masan.model import build_model, compile_modality_modules, masan_loss, small_model_config

    cfg = small_model_config(fusion_cells=2)
    torch.manual_seed(0)
    eager = build_model(cfg, 2).double().train()
    compiled = copy.deepcopy(eager)
    assert compile_modality_modules(compiled, "aot_eager") == ["spm", "fpm"]
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    data = {"label": torch.tensor([1]), "t1": torch.randn(1, 1, *cfg.t1_shape, dtype=torch.float64),
            "fmri": torch.randn(1, cfg.fmri_frames, *cfg.fmri_shape, dtype=torch.float64)}
    torch._dynamo.reset()
    losses = [masan_loss(model(t1=data["t1"], fmri=data["fmri"]), data, LossConfig(), "joint")["total"]
              for model in (eager, compiled)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-12, atol=0)
    for loss in losses:
        loss.backward()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


def test_passes_without_gradients_run_the_modules_eager_where_cuda_graphs_replay():
    """With model.compile_mode=reduce-overhead each compiled call without a pending backward
    starts a new CUDA-graph generation: fPM's replay would overwrite sPM's outputs before the
    fusion reads them. Predictions, monitoring and standardiser fits therefore run sPM and fPM
    eager (nothing is compiled for them), with the eager values."""
    import copy

    from masan.model import build_model, compile_modality_modules, small_model_config

    cfg = small_model_config(fusion_cells=2)
    torch.manual_seed(0)
    eager = build_model(cfg, 2).eval()
    compiled = copy.deepcopy(eager)
    compile_modality_modules(compiled, "inductor", "reduce-overhead")
    assert compiled.graphs_replayed
    other = copy.deepcopy(eager)
    compile_modality_modules(other, "inductor", "default")
    assert not other.graphs_replayed
    x = {"t1": torch.randn(1, 1, *cfg.t1_shape), "fmri": torch.randn(1, cfg.fmri_frames, *cfg.fmri_shape)}
    torch._dynamo.reset()
    frames = torch._dynamo.utils.counters["frames"]["total"]
    with torch.no_grad():
        got, want = compiled(**x), eager(**x)
    assert torch._dynamo.utils.counters["frames"]["total"] == frames  # no compile: eager
    torch.testing.assert_close(got["logits"], want["logits"], rtol=0, atol=0)


def _layout_cases():
    """Each fast path as ``(name, fn(x, skip) -> y, whether y is a feature map)``: pooled cells
    only go to the region features (one gathering copy) and the reconstruction to the loss
    (NCDHW, as its target), so for those only the input gradients count."""
    torch.manual_seed(0)
    conv, narrow = PointwiseConv3d(6, 5).double(), NarrowConv3d(6, 1).double()
    folded = OutputStage(6, 6, 3).double()
    for module in (conv, narrow, folded):
        use_fast_paths(module, CUDA_PATHS)
    return [
        ("pointwise", lambda x, skip: conv(x), True),
        ("trilinear", lambda x, skip: trilinear(x, (7, 10, 12)), True),
        ("block mean", lambda x, skip: _pool(x, (2, 2, 2), "avg", CUDA_PATHS), False),
        ("block max", lambda x, skip: _pool(x, (2, 2, 2), "max", CUDA_PATHS), False),
        ("unequal bins mean", lambda x, skip: _pool(x, (3, 4, 3), "avg", CUDA_PATHS), False),
        ("narrow conv taps", lambda x, skip: narrow(x), False),
        ("folded output stage", lambda x, skip: folded(x, skip), False),
    ]


@pytest.mark.parametrize("case", range(7))
def test_fast_paths_keep_a_channels_last_input_channels_last(case):
    """With ``model.channels_last`` the step pays only if nothing converts back to NCDHW between
    the 3x3x3 convs (cuDNN runs those natively in channels-last; inductor's GroupNorm follows
    the layout): each fast path, on the CUDA settings, gives the NCDHW values and gradients,
    its output feature map channels-last (where it has several channels) and its input
    gradient too."""
    name, fn, feature_map = _layout_cases()[case]
    results = {}
    for layout in (torch.contiguous_format, torch.channels_last_3d):
        torch.manual_seed(1)
        x = torch.randn(2, 6, 4, 6, 8, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_()
        skip = torch.randn(2, 6, 7, 10, 12, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_()
        out = fn(x, skip)
        grad = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)
        results[layout] = (out, torch.autograd.grad(out, [x, skip], grad, allow_unused=True))
    (ref, ref_grads), (got, got_grads) = results.values()
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12, msg=lambda m: f"{name}: {m}")
    if feature_map and got.shape[1] > 1:
        assert blocks.is_channels_last(got), f"{name}: output {got.stride()} is not channels-last"
    for g, w in zip(got_grads, ref_grads):
        if w is not None:
            torch.testing.assert_close(g, w, rtol=0, atol=1e-10, msg=lambda m: f"{name}: {m}")
            assert blocks.is_channels_last(g), f"{name}: input gradient {g.stride()} is not channels-last"
