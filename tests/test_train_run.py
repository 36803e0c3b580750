"""Real training runs (DeepSpeed on the CPU, gloo, the real store/dataset/model) through
launch/train_local.py: two ranks and both phases, stop and resume, a different number of
ranks, kill -9 and a bit-identical deterministic resume, damaged checkpoints, a refused
config, TensorBoard steps after a resume; DeepSpeed's own collectives held to the run's
timeout.

Uses the session's tiny converted cohort (tests/conftest.py: 5 NC + 5 AD phantom subjects,
T1 32^3, fMRI 16^3 x 6 frames, patch grid 2x2x2). The first DeepSpeed engine on a machine
JIT-builds DeepSpeed's shm comm op with g++ (about a minute, cached afterwards).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from masan.train.checkpoint import MARKER, POINTER, CheckpointManager
from masan.train.revision import TRAINING_REVISION

pytestmark = pytest.mark.slow  # every test trains real DeepSpeed runs

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch" / "train_local.py"
RUN_TIMEOUT_S = 420

TINY = yaml.safe_load((REPO / "hpc" / "configs" / "tiny.yaml").read_text())
TRAIN_CONFIG = {
    "seed": 7,
    "data": {**TINY["data"], "num_workers": 1},
    "model": {**TINY["model"], "dropout": 0.2},
    "optim": {"micro_batch": 1, "warmup_steps": 2},
    "train": {"pretrain_epochs": 1, "joint_epochs": 2, "precision": "fp32", "device": "cpu"},
    "checkpoint": {"every_steps": 2, "every_minutes": 0, "keep": 3},
    "log": {"every_steps": 1, "eval_every_epochs": 1},
}
"""7 training subjects, micro-batch 1: 7 steps per epoch on one rank, 3 on two (one subject rotates out)."""


@pytest.fixture(scope="module")
def train_config(tmp_path_factory, tiny_store) -> Path:
    path = tmp_path_factory.mktemp("train_config") / "train.yaml"
    path.write_text(yaml.safe_dump({**TRAIN_CONFIG, "data": {**TRAIN_CONFIG["data"], "store": str(tiny_store)}}))
    return path


def launch(config: Path, run_dir: Path, *overrides: str, nproc: int = 1) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(LAUNCH), "--config", str(config), "--nproc", str(nproc), f"run_dir={run_dir}",
           *overrides]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False, cwd=REPO)
    res.log = res.stdout + res.stderr
    return res


def ok(res: subprocess.CompletedProcess, status: str) -> str:
    assert res.returncode == 0, res.log[-4000:]
    assert f"status: {status}" in res.stdout, res.log[-4000:]
    return res.log


def manifests(run_dir: Path) -> list[dict]:
    """Manifests of the complete checkpoints, oldest first."""
    mgr = CheckpointManager(run_dir, keep=100)
    return [mgr.manifest(t) for t in reversed(mgr.complete_tags())]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    mgr = CheckpointManager(run_dir, keep=100)
    tag = mgr.complete_tags()[0]
    return torch.load(run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                      weights_only=False)["module"]


def scalar_steps(run_dir: Path) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_monotonic(run_dir: Path) -> dict[str, list[int]]:
    steps = scalar_steps(run_dir)
    assert steps, "no TensorBoard scalars"
    for tag, s in steps.items():
        assert all(a < b for a, b in zip(s, s[1:])), f"{tag}: steps not strictly increasing: {s}"
    return steps


def test_without_epoch_end_saves_only_cadence_and_phase_ends_are_saved(tmp_path, train_config):
    run = tmp_path / "run"
    ok(launch(train_config, run, "checkpoint.at_epoch_end=false", "checkpoint.every_steps=5",
              "checkpoint.keep=100", "log.eval_every_epochs=0"), "completed")
    # 7 steps per epoch: pretrain 1 epoch (steps 1-7), joint 2 epochs (steps 8-21)
    assert [m["step"] for m in manifests(run)] == [5, 7, 12, 17, 21]


def test_two_ranks_stop_resume_and_resize(tmp_path, train_config):
    """With the ordinal head and the expected-stage decision, so both meet a 2-rank engine."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "STOP").touch()  # every rank must stop after the first step, and save together
    ordinal = ("model.head=ordinal", "data.decision=expected_stage")
    log = ok(launch(train_config, run, *ordinal, nproc=2), "stopped at step 1")
    assert not (run / "STOP").exists(), "the consumed STOP file must be removed"
    assert json.loads((run / "STOPPED").read_text())["step"] == 1  # status tells this stop from a crash
    [first] = manifests(run)
    assert first["step"] == 1 and first["state"]["dp_world_size"] == 2
    assert first["state"]["training_revision"] == TRAINING_REVISION, "what a later version's resume compares"
    assert (run / "checkpoints" / POINTER).read_text().strip() == first["tag"]
    assert any("zero_pp_rank_1" in f for f in first["files"]), "rank 1 wrote no optimizer shard"

    log = ok(launch(train_config, run, *ordinal, nproc=2), "completed")
    assert "resumed step_000001" in log and not (run / "STOPPED").exists()
    assert "FutureWarning" not in log  # torch's deprecation of DeepSpeed's ZeRO all-gather, once per rank
    for f in ("DONE", "predictions.csv", "metrics.json", "region_weights.npy", "config.yaml", "split.json"):
        assert (run / f).is_file(), f
    states = [m["state"] for m in manifests(run)]
    assert states[-1]["phase"] == "joint" and states[-1]["epochs_done"] == 3 and states[-1]["step"] == 9
    steps = assert_monotonic(run)
    assert steps["train/recon_t1"][0] == 1 and steps["train/ce"][-1] == 9
    assert not any(t.startswith("monitor_test") for t in steps)  # the test part is only for the final evaluation
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n"] == 3 and metrics["decision"] == "expected_stage"

    # one more joint epoch on ONE rank: weights and position carry over, Adam moments restart
    log = ok(launch(train_config, run, "train.joint_epochs=3", *ordinal, nproc=1), "completed")
    assert "written by 2 data-parallel ranks on 1" in log and "RESET Adam" in log, log[-3000:]
    assert "the LR curve goes on from 100% of its decay" in log  # not warmed up or raised again
    last = manifests(run)[-1]["state"]
    assert last["step"] == 9 + 7 and last["epochs_done"] == 4 and last["dp_world_size"] == 1
    assert_monotonic(run)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, train_config) -> Path:
    """An uninterrupted deterministic single-process run (21 steps over both phases)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    ok(launch(train_config, run, "deterministic=true"), "completed")
    return run


def test_kill9_then_resume_ends_with_identical_weights(tmp_path, train_config, reference_run):
    run = tmp_path / "run"
    cmd = [sys.executable, str(LAUNCH), "--config", str(train_config), f"run_dir={run}", "deterministic=true"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    pointer = run / "checkpoints" / POINTER
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not pointer.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 1.0))  # a random step (possibly mid-save)
    assert proc.poll() is None and not (run / "DONE").exists(), "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = CheckpointManager(run, 100).complete_tags()[0]

    log = ok(launch(train_config, run, "deterministic=true"), "completed")
    assert "resumed " in log and "no complete checkpoint" not in log
    resumed_tag = log.split("resumed ")[1].split(":")[0]
    assert resumed_tag >= killed_at  # the newest complete one (a save in flight may have completed)

    ref, got = final_weights(reference_run), final_weights(run)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), f"{k} differs after kill -9 + resume"
    assert_monotonic(run)


def test_damaged_checkpoints_are_skipped(tmp_path, train_config, reference_run):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    # a finished run started again returns at once
    log = ok(launch(train_config, run, "deterministic=true"), "completed")
    assert "is finished" in log

    mgr = CheckpointManager(run, keep=100)
    newest, second, third = mgr.complete_tags()[:3]
    shard = next(f for f in sorted((run / "checkpoints" / newest).iterdir()) if f.suffix == ".pt")
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)  # a half-written file
    (run / "checkpoints" / second / MARKER).unlink()  # a save that never finished
    assert "truncated" in mgr.problem(newest) and "no COMPLETE marker" in mgr.problem(second)
    assert mgr.problem(third) is None

    log = ok(launch(train_config, run, "deterministic=true", "train.joint_epochs=3"), "completed")
    assert f"skipping damaged checkpoint {run / 'checkpoints' / newest}" in log
    assert f"skipping damaged checkpoint {run / 'checkpoints' / second}" in log
    assert f"resumed {third}" in log
    assert_monotonic(run)


def test_incompatible_config_is_refused(tmp_path, train_config, reference_run):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    before = (run / "config.yaml").read_text()
    res = launch(train_config, run, "deterministic=true", "optim.lr=0.005")
    assert res.returncode == 2, res.log[-3000:]
    assert "optim.lr: 0.001 -> 0.005" in res.stderr and "new run directory" in res.stderr, res.stderr[-3000:]
    assert (run / "config.yaml").read_text() == before, "a refused start must not rewrite config.yaml"


def test_predict_reproduces_the_runs_test_predictions_from_its_directory(tmp_path, reference_run):
    """External-validation entry on the run's own test part: the same subjects, probabilities
    and region weights as the run's final evaluation (weights + fitted standardisers from the
    checkpoint alone)."""
    import numpy as np

    from masan.predictions import load_predictions

    res = subprocess.run([sys.executable, "-m", "masan.predict", str(reference_run), "--out", str(tmp_path / "p")],
                         capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    (ref, names), (got, got_names) = load_predictions(reference_run), load_predictions(tmp_path / "p")
    assert got_names == names and got.subjects == ref.subjects
    assert np.allclose(got.probs, ref.probs, atol=1e-6) and np.allclose(got.region_weights, ref.region_weights,
                                                                         atol=1e-6)
    std = final_weights(reference_run)["attention.norm.std"]
    assert std.dtype == torch.float32 and not torch.all(std == 1)  # fitted, kept in fp32 in the checkpoint
    bad = subprocess.run([sys.executable, "-m", "masan.predict", str(tmp_path), "--out", str(tmp_path / "q")],
                         capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert bad.returncode == 2 and "not a training run directory" in bad.stderr


def test_compiled_modality_modules_train_like_eager_and_save_the_same_checkpoint(tmp_path, train_config,
                                                                                 reference_run):
    """``model.compile`` (here the aot_eager backend: traced, no code generated) runs both phases,
    the standardiser fits and the test evaluation; its checkpoints have the eager model's keys
    and its weights follow the eager run's to rounding. Compiled kernels go to the run
    directory's cache, not node-local /tmp."""
    run = tmp_path / "run"
    log = ok(launch(train_config, run, "deterministic=true", "model.compile=true", "model.compile_backend=aot_eager"),
             "completed")
    assert "model.compile: spm, fpm compiled" in log
    assert f"kernels cached in {run / 'compile_cache'}" in log  # restarts and other nodes reuse them
    compiled, eager = final_weights(run), final_weights(reference_run)
    assert compiled.keys() == eager.keys()
    for k, v in eager.items():
        torch.testing.assert_close(compiled[k], v, rtol=1e-3, atol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


def test_a_run_from_the_host_cache_ends_with_the_store_runs_weights(tmp_path, train_config, reference_run):
    """``data.cache=host`` (each epoch's first batches prepared during the previous epoch, across
    the change of phase) feeds the same batches in the same order as the store's DataLoader:
    the deterministic run ends with the same weights."""
    run, shm = tmp_path / "run", tmp_path / "shm"
    shm.mkdir()
    ok(launch(train_config, run, "deterministic=true", "data.cache=host", f"data.cache_dir={shm}"), "completed")
    cached, eager = final_weights(run), final_weights(reference_run)
    for k, v in eager.items():
        assert torch.equal(cached[k], v), k


def _stalling_rank(rank: int, world: int, port: int, out: str, timeout_s: float) -> None:
    """Rank 1 stops answering before the step; rank 0 steps and waits in DeepSpeed's collective.

    Both leave by ``os._exit``: after a failed collective, a process whose DeepSpeed groups
    outlive ``destroy_process_group`` (the engine still referenced) may abort in gloo's
    teardown (SIGABRT), which is not what this test is about.
    """
    from masan.config import load_config
    from masan.distributed import init_distributed
    from masan.train.engine import LRSchedule, build_engine

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    cfg = load_config(None, [f"train.dist_timeout_minutes={timeout_s / 60}", "train.device=cpu",
                             "train.precision=fp32"])
    init_distributed(cfg.train)
    model = torch.nn.Linear(4, 2)
    engine = build_engine(model, cfg, world, LRSchedule(cfg.optim))
    if rank == 1:  # silent until rank 0 is done, or long past the timeout (rank 0 then steps late)
        deadline = time.monotonic() + 4 * timeout_s
        while not Path(f"{out}0").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        os._exit(0)
    start = time.monotonic()
    try:
        engine.backward(engine(torch.ones(1, 4)).sum())
        engine.step()
        outcome = "stepped"
    except RuntimeError as e:
        outcome = f"raised {e}"
    Path(f"{out}{rank}.part").write_text(f"{time.monotonic() - start:.1f} {outcome}")
    Path(f"{out}{rank}.part").rename(f"{out}{rank}")
    os._exit(0)


def test_deepspeeds_own_collectives_time_out_at_the_runs_timeout(tmp_path):
    """DeepSpeed reduces gradients on a process group of its own, which torch gives its default
    timeout (30 min on gloo); the engine must hold it to train.dist_timeout_minutes, or a rank
    that stops answering keeps the others in their step that long."""
    import torch.multiprocessing as mp

    timeout_s = 5.0
    from masan.distributed import free_port

    mp.spawn(_stalling_rank, args=(2, free_port(), str(tmp_path / "rank"), timeout_s), nprocs=2)
    took, outcome = (tmp_path / "rank0").read_text().split(" ", 1)
    assert outcome.startswith("raised") and float(took) < 2 * timeout_s, (took, outcome)


def _resaving_rank(rank: int, port: int, run: str) -> None:
    """Saves of one step again, on a real single-rank engine: cut short after DeepSpeed wrote its
    files, stopped between the two renames, then whole; the checkpoint's epoch after each."""
    from masan.config import config_hash, load_config
    from masan.distributed import init_distributed
    from masan.train.checkpoint import REPLACED
    from masan.train.engine import LRSchedule, build_engine
    from masan.train.loop import TrainState

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cfg = load_config(None, ["train.device=cpu", "train.precision=fp32"])
    init_distributed(cfg.train)
    engine = build_engine(torch.nn.Linear(4, 2), cfg, 1, LRSchedule(cfg.optim))
    mgr, seen, chash = CheckpointManager(run, keep=1), {}, config_hash(cfg)

    def state(epoch: int) -> dict:
        return {**TrainState(epoch=epoch, step=7).to_dict(), "dp_world_size": 1, "config_hash": chash}

    def epoch() -> int:
        return mgr.manifest("step_000007")["state"]["epoch"]

    mgr.save(engine, 7, state(0), cfg)
    real = engine.save_checkpoint

    def killed_after_deepspeed(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt  # stands for kill -9: nothing after it runs

    engine.save_checkpoint = killed_after_deepspeed
    try:
        mgr.save(engine, 7, state(1), cfg)
    except KeyboardInterrupt:
        pass
    seen["cut_short"] = [mgr.complete_tags(), epoch()]
    engine.save_checkpoint = real
    mgr._install = lambda saved, tag: (mgr.dir / tag).rename(mgr.dir / (tag + REPLACED))  # stopped there
    mgr._prune = lambda: None
    mgr.save(engine, 7, state(2), cfg)
    seen["between_renames"] = sorted(p.name for p in mgr.dir.glob("step_*"))
    CheckpointManager(run, keep=1).resume(engine, cfg, chash)  # the next start finishes the replacement
    seen["recovered"] = [mgr.complete_tags(), epoch()]
    mgr = CheckpointManager(run, keep=1)
    mgr.save(engine, 7, state(3), cfg)
    seen["whole"] = [sorted(p.name for p in mgr.dir.glob("step_*")), epoch()]
    Path(run, "seen.json").write_text(json.dumps(seen))
    os._exit(0)


def test_saving_a_step_again_never_loses_the_complete_checkpoint_of_that_step(tmp_path):
    """A run stopped at an epoch's last step resumes with no step of that epoch left and saves
    the same step again at the epoch's end: a kill during that save must leave the checkpoint it
    resumed from (with keep=1 it is the only one)."""
    import torch.multiprocessing as mp

    from masan.distributed import free_port

    run = tmp_path / "run"
    mp.spawn(_resaving_rank, args=(free_port(), str(run)), nprocs=1)
    seen = json.loads((run / "seen.json").read_text())
    assert seen["cut_short"] == [["step_000007"], 0]
    assert seen["between_renames"] == ["step_000007.replaced", "step_000007.saving"]
    assert seen["recovered"] == [["step_000007"], 2]
    assert seen["whole"] == [["step_000007"], 3]  # and no leftover beside it


def test_a_run_continues_with_its_own_config_when_no_config_is_given(tmp_path, reference_run):
    """`train_local.py run_dir=R train.joint_epochs=N` extends a run: without --config the run's
    own config.yaml applies (the built-in defaults would name another store and model)."""
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    res = subprocess.run([sys.executable, str(LAUNCH), f"run_dir={run}", "train.joint_epochs=3"], capture_output=True,
                         text=True, timeout=RUN_TIMEOUT_S, check=False, cwd=REPO)
    res.log = res.stdout + res.stderr
    log = ok(res, "completed")
    assert f"no --config: continuing with the run's own {run / 'config.yaml'}" in log
    assert "resumed step_000021" in log and manifests(run)[-1]["step"] == 28  # one more epoch of 7 steps
    assert "settings changed since it was written: " in log and "train.joint_epochs: 2 -> 3" in log, log[-4000:]
    assert "holds other data" not in log


def test_resuming_on_other_data_under_the_same_subject_ids_is_warned(tmp_path, reference_run, train_config):
    """A store reconverted, relabelled or swapped for another cohort with the same ids passes the
    split's checks; the run goes on, but says its model has now seen both."""
    from masan.convert.cohort import ConvertOptions, convert_cohort, discover_bids
    from masan.synth.phantom import synthesize_cohort

    bids = synthesize_cohort(tmp_path / "bids", n_per_class=5, classes=("NC", "AD"), frames=6, seed=1)
    other = tmp_path / "other.zarr"
    assert not convert_cohort(discover_bids(bids), other, ConvertOptions(patch_grid=(2, 2, 2)),
                              classes=("NC", "AD"), progress=False).failed
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    log = ok(launch(train_config, run, f"data.store={other}", "train.joint_epochs=3", "deterministic=true"),
             "completed")
    assert f"the store data.store={other} holds other data than step_000021 was trained on for 10 of 10 " \
           "subjects (sub-" in log, log[-3000:]


def test_a_resume_past_train_max_steps_takes_no_step(tmp_path, reference_run, train_config):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    log = ok(launch(train_config, run, "train.max_steps=5", "deterministic=true"), "completed")
    assert "status: completed at step 21" in log and manifests(run)[-1]["step"] == 21, log[-3000:]


def test_the_logged_lr_is_the_one_each_step_used_and_each_epoch_logs_its_mean_loss(reference_run):
    """train/lr was read after the step had moved the schedule on: one step ahead, and each phase's
    first warm-up rate never appeared; the epoch line gave its last step's loss as the epoch's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(reference_run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    values = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    cfg = yaml.safe_load((reference_run / "config.yaml").read_text())
    lr, warmup = cfg["optim"]["lr"], cfg["optim"]["warmup_steps"]
    per_epoch = 7  # steps of an epoch here (TRAIN_CONFIG)
    for first in (1, per_epoch + 1):  # each phase starts its warm-up: step 1 of it uses lr / warmup
        assert values["train/lr"][first] == pytest.approx(lr / warmup, rel=1e-6), (first, values["train/lr"])
    assert values["train/lr"][warmup] == pytest.approx(lr, rel=1e-6)
    ends = sorted(values["train/epoch_loss"])
    assert ends == [per_epoch * k for k in (1, 2, 3)]
    for end in ends:
        losses = [values["train/total"][s] for s in range(end - per_epoch + 1, end + 1)]
        assert values["train/epoch_loss"][end] == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_a_start_from_scratch_over_a_killed_starts_events_logs_no_step_twice(tmp_path, train_config, reference_run):
    """A run killed before its first checkpoint left events; the next start, from scratch, logged
    its steps again beside them (steps 1, 2, 1, 2, 3, ... in TensorBoard)."""
    run = tmp_path / "run"
    shutil.copytree(reference_run / "tb", run / "tb")  # what such a run leaves: events, no checkpoint
    ok(launch(train_config, run, "deterministic=true", "train.max_steps=3"), "max_steps")
    steps = assert_monotonic(run)
    assert steps["train/total"] == [1, 2, 3]
