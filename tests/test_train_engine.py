"""The derived DeepSpeed config, the LR schedule and the data order of the training engine
(no training here: see test_train_run.py for real engines)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from masan.config import ConfigError, load_config
from masan.train.engine import (
    README_COMMAND,
    README_WORLD_SIZE,
    LRSchedule,
    check_config,
    deepspeed_config,
    main,
    readme_markdown,
)
from masan.train.gradients import check_grad_norm, term_grad_norms
from masan.train.loop import ResumableSampler, steps_left

REPO = Path(__file__).resolve().parents[1]


def test_deepspeed_config_follows_the_run_config():
    cfg = load_config(REPO / "hpc/configs/paper.yaml", ["optim.micro_batch=2", "optim.grad_accum=4",
                                                        "optim.grad_clip=0.5", "train.zero_stage=2"])
    ds = deepspeed_config(cfg, world_size=8)
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 2 * 4 * 8  # DeepSpeed checks this identity at initialize
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    # bf16 steps without DeepSpeed's per-tensor inf/NaN scan (the loop checks the norm instead)
    assert ds["bf16"]["check_grad_overflow"] is False
    fp32 = deepspeed_config(load_config(None, ["train.precision=fp32"]), 1)
    assert not fp32["bf16"]["enabled"] and not fp32["fp16"]["enabled"]
    fp16 = deepspeed_config(load_config(None, ["train.precision=fp16"]), 1)
    assert fp16["fp16"] == {"enabled": True, "loss_scale": 0}  # the loss scaler keeps its overflow scan
    assert "check_grad_overflow" not in fp16["bf16"]


class _Stepped:
    """What :func:`check_grad_norm` reads of an engine after its optimizer step."""

    def __init__(self, norm, applied: bool = True):
        self.norm, self.applied = norm, applied

    def get_global_grad_norm(self):
        return self.norm

    def was_step_applied(self) -> bool:
        return self.applied


def test_a_non_finite_gradient_norm_stops_the_run_naming_step_rank_and_fixes():
    assert check_grad_norm(_Stepped(torch.tensor(2.5)), 9, "joint", 0) == 2.5
    assert check_grad_norm(_Stepped(None), 9, "joint", 0) is None  # no clipping: DeepSpeed computed none
    assert check_grad_norm(_Stepped(math.inf, applied=False), 9, "joint", 0) == math.inf  # fp16: skipped, not lost
    with pytest.raises(FloatingPointError, match=r"joint gradient norm is nan at step 10 on rank 3.*optim.lr"):
        check_grad_norm(_Stepped(torch.tensor(float("nan"))), 9, "joint", 3)


def test_logging_the_gradient_norms_leaves_the_dropout_stream_alone():
    """log.grad_norm_every_steps is plumbing: its side pass (a train-mode forward with dropout)
    must not move the random stream the training's own dropout masks come from."""
    from masan.config import LossConfig
    from masan.model import build_model, small_model_config

    torch.manual_seed(0)
    cfg = small_model_config(dropout=0.5)
    model = build_model(cfg, 2).train()
    batch = {"t1": torch.randn(2, 1, *cfg.t1_shape), "fmri": torch.randn(2, cfg.fmri_frames, *cfg.fmri_shape),
             "label": torch.tensor([0, 1])}
    before = torch.get_rng_state()
    norms = term_grad_norms(model, batch, LossConfig(), "joint")
    assert norms["grad_norm_ce"] > 0 and torch.equal(torch.get_rng_state(), before)


def test_zero_buckets_capped_at_model_size_and_aligned():
    cfg = load_config(None, ["train.zero_bucket_elements=1000000"])
    assert deepspeed_config(cfg, 1)["zero_optimization"]["reduce_bucket_size"] == 1_000_000
    small = deepspeed_config(cfg, 1, num_params=60_535)["zero_optimization"]
    assert small["reduce_bucket_size"] == small["allgather_bucket_size"]
    assert 60_535 <= small["reduce_bucket_size"] < 60_535 + 1024 and small["reduce_bucket_size"] % 4 == 0


@pytest.mark.parametrize("override, fragment", [
    ("train.zero_stage=3", "train.zero_stage=3"),
    ("optim.grad_accum=0", "at least 1"),
])
def test_unrunnable_settings_are_refused(override, fragment):
    with pytest.raises(ConfigError, match=fragment):  # on every device: when the config loads
        load_config(None, [override])
    cfg = load_config(None, ["train.precision=fp16"])
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):  # on the device the run meets
        check_config(cfg, "cpu")
    check_config(cfg, None)  # a login node cannot tell yet


def test_readme_is_generated_from_the_code():
    """hpc/deepspeed/README.md must be the current output of its generating command."""
    cfg = load_config(REPO / "hpc/configs/paper.yaml")
    expected = readme_markdown(cfg, README_WORLD_SIZE, README_COMMAND)
    assert (REPO / "hpc/deepspeed/README.md").read_text() == expected, f"regenerate it: {README_COMMAND}"
    assert json.dumps(deepspeed_config(cfg, README_WORLD_SIZE), indent=2) in expected


def test_cli_prints_the_json(capsys):
    assert main(["--config", str(REPO / "hpc/configs/demo.yaml"), "--world-size", "2", "optim.grad_accum=3"]) == 0
    ds = json.loads(capsys.readouterr().out)
    assert ds["gradient_accumulation_steps"] == 3
    with pytest.raises(SystemExit) as exit_:
        main(["optim.nope=1"])
    assert exit_.value.code == 2
    assert "unknown config key" in capsys.readouterr().err


def test_paper_config_matches_the_paper():
    cfg = load_config(REPO / "hpc/configs/paper.yaml")
    assert cfg.train.pretrain_epochs + cfg.train.joint_epochs == 800
    assert cfg.optim.lr == 1e-3 and cfg.loss.alpha == 0.5 and cfg.loss.beta == 0.5
    # checkpointing off: 88 ms and 10.2 GiB per sample fit an 80 GB GPU (docs/performance.md)
    assert cfg.train.precision == "bf16" and cfg.train.zero_stage == 1 and not cfg.model.activation_checkpointing
    assert cfg.model.t1_shape == [240, 256, 176] and cfg.model.fmri_shape == [60, 64, 44]


def test_lr_warmup_then_cosine_per_phase():
    cfg = load_config(None, ["optim.warmup_steps=4", "optim.min_lr_ratio=0.1"]).optim
    s = LRSchedule(cfg)
    s.set_phase(0, 20)
    f = [s.factor(i) for i in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(f[3:], f[4:]))  # decays after warmup
    assert f[19] == pytest.approx(0.1)  # reaches lr * min_lr_ratio at the phase's last step
    s.set_phase(20, 10)  # the joint phase starts its own curve
    assert s.factor(20) == 0.25 and s.factor(23) == 1.0 and s.factor(29) == pytest.approx(0.1)
    const = LRSchedule(load_config(None, ["optim.schedule=constant"]).optim)
    const.set_phase(0, 5)
    assert {const.factor(i) for i in range(5)} == {1.0}


def test_lr_curve_goes_on_from_where_it_was_when_the_steps_left_change():
    """A resume on another number of ranks plans the rest of the phase in another number of
    steps: the cosine continues from the progress it had (no jump) and still ends at the floor."""
    cfg = load_config(None, ["optim.warmup_steps=4", "optim.min_lr_ratio=0.1"]).optim
    before = LRSchedule(cfg)
    before.set_phase(10, 40)  # 40 steps planned; stopped after step 25
    after = LRSchedule(cfg)
    after.set_phase(10, 70, anchor=(25, before.progress(25)))  # 70 at the new number of ranks
    assert after.factor(25) == pytest.approx(before.factor(25)) and 0 < before.progress(25) < 1
    f = [after.factor(i) for i in range(25, 80)]
    assert all(a >= b for a, b in zip(f, f[1:])) and f[-1] == pytest.approx(0.1)
    plain = LRSchedule(cfg)
    plain.set_phase(10, 70)  # re-planned from the phase start instead: the LR would jump back up
    assert plain.factor(25) > 1.15 * before.factor(25)


class _Items:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def _epoch(n, world, seed=3, epoch=2, start=0):
    out = []
    for rank in range(world):
        s = ResumableSampler(_Items(n), world, rank, shuffle=True, seed=seed)
        s.set_epoch(epoch, start=start)
        out.append(list(s))
        assert len(s) == len(out[-1])
    return out


def test_sampler_resumes_mid_epoch_without_repeats_or_gaps():
    n = 12
    full = _epoch(n, world=2)
    assert sorted(full[0] + full[1]) == list(range(n))  # an epoch is every subject once
    consumed = 4  # two steps of one sample per rank
    resumed = _epoch(n, world=2, start=consumed)
    assert resumed[0] == full[0][2:] and resumed[1] == full[1][2:]
    # on three ranks the rest of the epoch is re-dealt: still each remaining subject once
    seen = full[0][:2] + full[1][:2]
    rest = _epoch(n, world=3, start=consumed)
    assert sorted(seen + [i for r in rest for i in r]) == list(range(n))
    assert _epoch(n, 2, epoch=3) != full  # a new order each epoch


def test_steps_left_counts_whole_steps_and_never_repeats_a_subject():
    assert steps_left(11, 0, per_step=4) == 2  # 8 of 11 subjects; 3 rotate out, none is seen twice
    assert steps_left(11, 8, per_step=4) == 0
    assert steps_left(5, 0, per_step=8) == 0
    assert steps_left(144, 0, per_step=32) == 4  # the paper cohort on 32 ranks: 128 seen, 16 rotate out
    assert math.isclose(steps_left(10, 0, 2), 5)
    for n, world in ((11, 2), (144, 32), (7, 3)):  # the samples of an epoch's steps are distinct subjects
        used = [i for r in range(world) for i in list(ResumableSampler(_Items(n), world, r, True, 0))
                [: steps_left(n, 0, world)]]
        assert len(used) == len(set(used)) == steps_left(n, 0, world) * world


def test_train_local_help():
    res = subprocess.run([sys.executable, str(REPO / "launch/train_local.py"), "--help"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0 and "--nproc" in res.stdout and "STOP" in res.stdout
