"""masan/model/heads.py: the ordinal head is a proper distribution over ordered stages, learns an
ordered task with the unchanged cross-entropy, and both heads are selected by model.head."""

import pytest
import torch
import torch.nn.functional as F

from masan.config import ConfigError, LossConfig, load_config
from masan.model import build_model, masan_loss, small_model_config
from masan.model.heads import MLPClassifier, OrdinalClassifier, build_classifier


@pytest.mark.parametrize("classes", [2, 4])
def test_ordinal_logits_are_log_probabilities_ordered_by_the_score(classes):
    torch.manual_seed(0)
    head = OrdinalClassifier(6, 8, classes, dropout=0.0)
    logits = head(torch.randn(16, 6))
    assert logits.shape == (16, classes) and logits.dtype == torch.float32
    probs = logits.exp()
    assert torch.allclose(probs.sum(1), torch.ones(16), atol=1e-6)
    assert torch.allclose(torch.softmax(logits, 1), probs, atol=1e-6)  # every reader's softmax gives them back
    cuts = head.cut_points()
    assert (cuts.diff() > 0).all() and cuts.shape == (classes - 1,)
    x = torch.randn(16, 6)
    before = head(x).exp()
    with torch.no_grad():  # a higher score moves probability to later stages: P(y > k) rises for every k
        head.net[-1].bias += 2.0
    after = head(x).exp()

    def above(p):
        return p.flip(1).cumsum(1).flip(1)[:, 1:]  # P(y >= k + 1), k = 0..C-2

    assert (above(after) > above(before)).all()
    with pytest.raises(ValueError, match="at least 2"):
        OrdinalClassifier(6, 8, 1, dropout=0.0)


def test_ordinal_head_learns_ordered_stages_with_the_cross_entropy():
    """Four stages along one hidden direction: the head, trained by F.cross_entropy on its logits
    (the training loss unchanged), calls the stages and keeps its cut-points in order."""
    torch.manual_seed(0)
    stage = torch.arange(4).repeat(64)
    x = torch.randn(256, 10) * 0.3
    x[:, 0] += stage.float()
    head = OrdinalClassifier(10, 16, 4, dropout=0.0)
    opt = torch.optim.Adam(head.parameters(), lr=0.02)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(head(x), stage).backward()
        opt.step()
    assert (head(x).argmax(1) == stage).float().mean() > 0.9
    assert (head.cut_points().diff() > 0).all()


def test_model_head_selects_the_head_of_both_architectures():
    assert isinstance(build_classifier("softmax", 4, 8, 3, 0.1), MLPClassifier)
    with pytest.raises(ValueError, match="model.head"):
        build_classifier("coral", 4, 8, 3, 0.1)
    for arch, attr in (("masan", "classifier"), ("hfcn", "subject_level")):
        model = build_model(small_model_config(arch=arch, head="ordinal"), 4)
        assert isinstance(getattr(model, attr), OrdinalClassifier)
        t1 = torch.randn(2, 1, 32, 32, 32)
        out = model.eval()(t1=t1, fmri=torch.randn(2, 6, 16, 16, 16))
        assert torch.allclose(out["logits"].exp().sum(1), torch.ones(2), atol=1e-5)


def test_mlp_hidden_0_is_one_fully_connected_layer():
    """Sec. 3.2's "a fully connected layer" (Sec. 2.3's MLP is the default): one Linear after the
    dropout, for either head and either architecture."""
    head = build_classifier("softmax", 12, 0, 4, 0.2)
    assert [type(m) for m in head.net] == [torch.nn.Dropout, torch.nn.Linear] and head.net[1].in_features == 12
    assert head.eval()(torch.randn(3, 12)).shape == (3, 4)
    for arch in ("masan", "hfcn"):
        model = build_model(small_model_config(arch=arch, head="ordinal", mlp_hidden=0), 4)
        out = model.eval()(t1=torch.randn(2, 1, 32, 32, 32), fmri=torch.randn(2, 6, 16, 16, 16))
        assert torch.allclose(out["logits"].exp().sum(1), torch.ones(2), atol=1e-5)
    load_config(None, ["model.mlp_hidden=0"])  # a config may ask for it


def test_label_smoothing_keeps_a_confident_head_off_zero_loss_with_either_head():
    batch = {"label": torch.tensor([0, 3])}
    confident = torch.log(torch.tensor([[0.999, 0.0005, 0.0003, 0.0002], [0.0002, 0.0003, 0.0005, 0.999]]))
    plain = masan_loss({"logits": confident}, batch, LossConfig())["ce"]
    smoothed = masan_loss({"logits": confident}, batch, LossConfig(label_smoothing=0.1))["ce"]
    assert plain < 0.01 and smoothed > 0.5  # an over-confident call still costs something
    torch.manual_seed(0)
    head = OrdinalClassifier(6, 8, 4, dropout=0.0)
    logits = head(torch.randn(2, 6))  # log-probabilities: the smoothing sees the head's own distribution
    ce = masan_loss({"logits": logits}, batch, LossConfig(label_smoothing=0.2))["ce"]
    p = logits.exp()
    target = torch.full((2, 4), 0.05) + 0.8 * F.one_hot(batch["label"], 4)
    assert torch.isclose(ce, -(target * p.log()).sum(1).mean(), rtol=1e-5)
    with pytest.raises(ConfigError, match="label_smoothing"):
        load_config(None, ["loss.label_smoothing=1.0"])
