"""The ETA of a whole run: the shared formula (masan/train/eta.py), the steps a run still has
(fresh, resumed, capped by train.max_steps) and the training log line that shows it (no engine:
the loop's logging step on stand-ins)."""

import logging
import time
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from masan.config import load_config
from masan.distributed import DistInfo
from masan.train import loop
from masan.train.eta import ETA_INTERVALS, duration_text, eta_seconds
from masan.train.loop import TrainState, run_steps_left

N, PER_STEP = 10, 2
"""10 training subjects, 2 per optimizer step: 5 steps per epoch."""


def _cfg(*overrides: str):
    return load_config(None, ["train.pretrain_epochs=1", "train.joint_epochs=2", *overrides])


def test_eta_is_steps_left_times_the_median_of_the_recent_step_times():
    assert eta_seconds([], 10) is None
    assert eta_seconds([2.0], 10) == 20.0
    # a first interval with a compile (or a restart gap) does not set the pace: the median does
    assert eta_seconds([90.0, 2.0, 3.0, 2.0, 2.5], 10) == 25.0
    # only the last ETA_INTERVALS intervals count: an older, slower speed is forgotten
    assert eta_seconds([50.0] * 5 + [1.0] * ETA_INTERVALS, 7) == 7.0
    assert eta_seconds([2.0], -3) == 0.0


@pytest.mark.parametrize("seconds, text", [(None, "-"), (0.4, "0s"), (42, "42s"), (303, "5m03s"),
                                           (6720, "1h52m"), (3 * 86400 + 4 * 3600 + 59, "3d04h")])
def test_durations_read_in_two_units(seconds, text):
    assert duration_text(seconds) == text


def test_steps_left_of_the_whole_run_count_only_what_a_resumed_run_still_has_to_do():
    cfg = _cfg()
    assert run_steps_left(cfg, TrainState(), N, PER_STEP) == 3 * 5  # 1 pretrain + 2 joint epochs
    after_two = TrainState(phase="pretrain", consumed=2 * PER_STEP, step=2)
    assert run_steps_left(cfg, after_two, N, PER_STEP) == 3 + 2 * 5
    resumed = TrainState(phase="joint", epoch=1, consumed=3 * PER_STEP, step=13, phase_start=5, epochs_done=2)
    assert run_steps_left(cfg, resumed, N, PER_STEP) == 2  # the last joint epoch's last 2 steps
    assert run_steps_left(cfg, TrainState(phase="joint", epoch=2, step=15), N, PER_STEP) == 0
    assert run_steps_left(_cfg("train.max_steps=4"), after_two, N, PER_STEP) == 2
    assert run_steps_left(_cfg("train.max_steps=4"), resumed, N, PER_STEP) == 0
    assert run_steps_left(_cfg("train.pretrain_epochs=0"), TrainState(), N, PER_STEP) == 2 * 5  # H-FCN


class _Recorder:
    """What the loop writes to TensorBoard, by tag (last value)."""

    def __init__(self):
        self.values = {}

    def scalars(self, values, step, prefix="train"):
        self.values.update(values)

    def interval(self, per_rank, step):
        return "data wait ..."

    def progress(self, step, epochs, loss):
        self.values["progress"] = (step, epochs, loss)


def _log(cfg, state, run, seconds: float, caplog) -> tuple[str, float]:
    """The log line of an interval of ``seconds`` that just ended at ``state``, on stand-ins for
    the engine and the data."""
    engine = SimpleNamespace(lr_scheduler=SimpleNamespace(get_last_lr=lambda: [1e-3]))
    parts = SimpleNamespace(cfg=cfg, engine=engine, train_set=list(range(N)), logger=_Recorder(),
                            info=DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"),
                                          backend="gloo"))
    now = time.perf_counter()
    interval = loop._Interval(start=now - seconds, samples=2 * PER_STEP)
    caplog.clear()
    # the interval ends at ``now`` however long this process is held up before it is logged
    with caplog.at_level(logging.INFO, logger=loop.log.name), mock.patch.object(loop.time, "perf_counter",
                                                                                return_value=now):
        loop._log_interval(parts, run, state, {"total": 1.0}, None, interval)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    return line, parts.logger.values["eta_s"]


def test_the_step_line_and_tensorboard_show_the_eta_of_the_whole_run(caplog):
    cfg = _cfg()
    run = loop._Run(sampler=None, per_step=PER_STEP, last_save={}, cache=None, augment=None, weight=None)
    # 2 steps in 10 minutes: 300 s per step, 13 steps left of 15 -> 3900 s
    line, eta = _log(cfg, TrainState(phase="pretrain", consumed=2 * PER_STEP, step=2), run, 600.0, caplog)
    assert "ETA 1h05m," in line and "samples/s" in line, line
    assert eta == pytest.approx(13 * 300.0, rel=1e-3)
    # a resumed run (a fresh loop: no step times yet) late in its last epoch: only its 2 steps left
    run = loop._Run(sampler=None, per_step=PER_STEP, last_save={}, cache=None, augment=None, weight=None)
    resumed = TrainState(phase="joint", epoch=1, consumed=3 * PER_STEP, step=13, phase_start=5, epochs_done=2)
    line, eta = _log(cfg, resumed, run, 600.0, caplog)
    assert "ETA 10m00s," in line and eta == pytest.approx(600.0, rel=1e-3), line
