"""What training relies on: gradients everywhere, loss terms, checkpointing, mixed precision."""

import copy

import pytest
import torch

from masan.config import LossConfig
from masan.model import build_model, masan_loss, small_model_config

LOSS = LossConfig(sparsity=1e-2)


def _batch(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"t1": torch.randn(batch, 1, 32, 32, 32, generator=g),
            "fmri": torch.randn(batch, 6, 16, 16, 16, generator=g),
            "label": torch.tensor([0, 1] * (batch // 2), dtype=torch.int64)}


def _step(model, batch, phase="joint"):
    model.zero_grad(set_to_none=True)
    terms = masan_loss(model(t1=batch["t1"], fmri=batch["fmri"]), batch, LOSS, phase)
    terms["total"].backward()
    return terms


@pytest.mark.parametrize("phase", ["joint", "pretrain"])
@pytest.mark.parametrize("changes", [{}, {"fusion": "add"}, {"fmri_time": "temporal_conv"}, {"arch": "hfcn"},
                                     {"modalities": "fmri", "fmri_layout": "patches"}], ids=str)
def test_every_parameter_gets_a_gradient(changes, phase):
    torch.manual_seed(0)
    model = build_model(small_model_config(**changes), 2)
    _step(model, _batch(), phase)
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} is outside the autograd graph in phase {phase}"
        assert torch.isfinite(p.grad).all(), name
    if phase == "joint":
        assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith("classifier"))


def test_pretrain_trains_the_autoencoders_only():
    torch.manual_seed(0)
    model = build_model(small_model_config(), 2)
    _step(model, _batch(), "pretrain")
    grads = {n: p.grad.abs().sum().item() for n, p in model.named_parameters()}
    assert all(v == 0 for n, v in grads.items() if n.split(".")[0] in ("fusion", "attention", "classifier"))
    assert all(v > 0 for n, v in grads.items() if n.startswith("spm.autoencoder.encoder"))


def test_loss_terms_follow_eq_8():
    torch.manual_seed(0)
    model = build_model(small_model_config(), 4)
    batch = _batch()
    out = model(t1=batch["t1"], fmri=batch["fmri"])
    joint, pretrain = masan_loss(out, batch, LOSS, "joint"), masan_loss(out, batch, LOSS, "pretrain")
    assert set(joint) == {"total", "recon_t1", "recon_fmri", "sparsity_t1", "sparsity_fmri", "ce"}
    assert all(t.dim() == 0 and t.dtype == torch.float32 for t in joint.values())
    ls = joint["recon_t1"] + joint["sparsity_t1"]
    lf = joint["recon_fmri"] + joint["sparsity_fmri"]
    assert torch.allclose(joint["total"], 0.5 * ls + 0.5 * lf + joint["ce"])
    assert torch.allclose(pretrain["total"], 0.5 * ls + 0.5 * lf)
    assert torch.allclose(joint["sparsity_t1"], 1e-2 * out["t1_code"].abs().mean())
    assert torch.allclose(joint["recon_t1"], ((out["t1_recon"] - batch["t1"]) ** 2).mean())
    with pytest.raises(ValueError, match="phase"):
        masan_loss(out, batch, LOSS, "finetune")


def test_hfcn_loss_trains_its_autoencoder_like_spm():
    """H-FCN's patch encoder is MASAN's sPM: its reconstruction enters eq. 8 as Ls, no fMRI terms."""
    batch = _batch()
    out = build_model(small_model_config(arch="hfcn"), 2)(t1=batch["t1"])
    terms = masan_loss(out, {"t1": batch["t1"], "label": batch["label"]}, LOSS, "joint")
    assert terms["recon_t1"] > 0 and terms["sparsity_t1"] > 0
    assert terms["recon_fmri"] == 0 and terms["sparsity_fmri"] == 0
    assert torch.allclose(terms["total"], 0.5 * (terms["recon_t1"] + terms["sparsity_t1"]) + terms["ce"])


@pytest.mark.parametrize("changes", [{}, {"fmri_time": "temporal_conv", "patch_chunk": 3, "dropout": 0.3}], ids=str)
def test_checkpointing_gives_the_same_loss_and_gradients(changes):
    torch.manual_seed(0)
    plain = build_model(small_model_config(**changes), 2)
    checkpointed = build_model(small_model_config(activation_checkpointing=True, **changes), 2)
    checkpointed.load_state_dict(copy.deepcopy(plain.state_dict()))
    batch = _batch()
    torch.manual_seed(7)
    a = _step(plain, batch)
    torch.manual_seed(7)
    b = _step(checkpointed, batch)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7), k
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("changes", [{"activation_checkpointing": True}, {"arch": "hfcn"}], ids=str)
def test_autocast_forward_backward_is_finite(dtype, changes):
    torch.manual_seed(0)
    model = build_model(small_model_config(**changes), 4)
    batch = _batch()
    with torch.autocast("cpu", dtype=dtype):
        out = model(t1=batch["t1"], fmri=batch["fmri"])
        terms = masan_loss(out, batch, LOSS, "joint")
    terms["total"].backward()
    if "t1_recon" in out:
        assert out["t1_recon"].dtype == dtype  # the convolutions really ran in low precision
    assert all(torch.isfinite(t) for t in terms.values())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_model_cast_to_bf16_accepts_fp32_batches():
    # DeepSpeed's bf16 mode casts the parameters, not the batch
    model = build_model(small_model_config(), 2).to(torch.bfloat16)
    terms = _step(model, _batch())
    assert torch.isfinite(terms["total"])
    assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize("arch", ["masan", "hfcn"])
def test_classifier_gradient_reaches_the_encoders_only_when_asked(arch):
    """model.head_grad_to_encoders: at 0 (default) the cross-entropy trains the head and leaves
    the encoders to the reconstruction terms (H-FCN's encoder is sPM's, trained the same way);
    at 1 it trains them."""
    batch = _batch()
    encoder = "patches.autoencoder.encoder" if arch == "hfcn" else "spm.autoencoder.encoder"
    for scale, reached in ((0.0, False), (1.0, True)):
        torch.manual_seed(0)
        model = build_model(small_model_config(arch=arch, head_grad_to_encoders=scale), 2)
        model.zero_grad(set_to_none=True)
        out = model(t1=batch["t1"], fmri=batch["fmri"])
        torch.nn.functional.cross_entropy(out["logits"], batch["label"]).backward()
        enc = [p.grad for n, p in model.named_parameters() if n.startswith(encoder)]
        assert enc and all(g is not None for g in enc)
        assert any(g.abs().sum() > 0 for g in enc) == reached, (arch, scale)
        heads = ("subject_level",) if arch == "hfcn" else ("classifier", "fusion")  # the fusion learns too
        for head in heads:
            grads = [p.grad for n, p in model.named_parameters() if n.startswith(head)]
            assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), (arch, scale, head)
