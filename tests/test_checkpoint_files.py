"""Which checkpoints a run keeps and which one it resumes from (masan/train/checkpoint.py), on
files alone: a stand-in engine writes a model file and a ZeRO shard per save, the real
CheckpointManager does the rest (the DeepSpeed engines themselves: test_train_reliability.py)."""

from __future__ import annotations

import contextlib
import errno
import json
import os

import pytest
import torch

from disks import fill, small_disk
from masan.config import config_hash, load_config
from masan.train.checkpoint import MARKER, POINTER, CheckpointManager


class _FakeEngine:
    """What CheckpointManager asks of a DeepSpeed engine, on files: a model-states file and one
    ZeRO shard per save; load returns the saved client state."""

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        folder = os.path.join(save_dir, tag)
        os.makedirs(folder, exist_ok=True)
        torch.save({"client": client_state}, f"{folder}/mp_rank_00_model_states.pt")
        with open(f"{folder}/zero_pp_rank_0_mp_rank_00_optim_states.pt", "wb") as f:
            f.write(bytes(range(256)) * 4)

    def load_checkpoint(self, load_dir, tag, **_):
        path = f"{load_dir}/{tag}/mp_rank_00_model_states.pt"
        return path, torch.load(path, weights_only=False)["client"]


def _saved(tmp_path, steps, keep):
    cfg = load_config(None, ["train.device=cpu", "train.precision=fp32"])
    chash = config_hash(cfg)
    mgr = CheckpointManager(tmp_path / "run", keep=keep)
    for s in steps:
        state = {"phase": "pretrain", "epoch": 0, "consumed": s, "step": s, "dp_world_size": 1, "config_hash": chash}
        mgr.save(_FakeEngine(), s, state, cfg)
    return mgr, cfg, chash


def test_keep_k_keeps_exactly_the_newest_k_complete_checkpoints(tmp_path):
    mgr, _, _ = _saved(tmp_path, [1, 2, 3, 4, 5], keep=2)
    assert mgr.tags() == ["step_000005", "step_000004"]
    assert (mgr.dir / POINTER).read_text().strip() == "step_000005"
    mgr, _, _ = _saved(tmp_path / "one", [1, 2, 3], keep=1)
    assert mgr.tags() == ["step_000003"]


def test_resume_takes_the_newest_complete_intact_checkpoint(tmp_path):
    """Newest without its marker, the next damaged in place (same size), the next truncated:
    the one before them loads."""
    mgr, cfg, chash = _saved(tmp_path, [1, 2, 3, 4, 5], keep=10)
    assert mgr.complete_tags() == [f"step_00000{s}" for s in (5, 4, 3, 2, 1)]
    assert mgr.resume(_FakeEngine(), cfg, chash).tag == "step_000005"
    (mgr.dir / "step_000005" / MARKER).unlink()
    shard = mgr.dir / "step_000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert mgr.problem("step_000004") is None and "damaged in place" in mgr.damage("step_000004")
    shard = mgr.dir / "step_000003" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:100])
    assert "truncated" in mgr.problem("step_000003")
    got = mgr.resume(_FakeEngine(), cfg, chash)
    assert got.tag == "step_000002" and got.state["step"] == 2


class _FullDiskEngine(_FakeEngine):
    """Writes part of a save, then fails as a full disk makes torch's zip writer fail (``error``)."""

    def __init__(self, error: Exception):
        self.error = error

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        os.makedirs(f"{save_dir}/{tag}", exist_ok=True)
        with contextlib.suppress(OSError), open(f"{save_dir}/{tag}/mp_rank_00_model_states.pt", "wb") as f:
            f.write(b"\0" * 1000)  # what fits (torch's writer keeps the errno of what does not to itself)
        raise self.error


def test_a_save_on_a_full_disk_says_so_keeps_the_last_checkpoint_and_the_next_start_frees_it(tmp_path):
    def state(step):
        return {"phase": "pretrain", "epoch": 0, "consumed": step, "step": step, "dp_world_size": 1,
                "config_hash": chash}

    mgr, cfg, chash = _saved(tmp_path, [1], keep=3)
    cut = mgr.dir / "step_000002.saving"
    enospc = OSError(errno.ENOSPC, "No space left on device", str(cut / "mp_rank_00_model_states.pt"))
    with pytest.raises(OSError) as e:
        mgr.save(_FullDiskEngine(enospc), 2, state(2), cfg)
    assert e.value.errno == errno.ENOSPC and mgr.complete_tags() == ["step_000001"]
    mgr._recover()  # the next start gives the cut-short save's space back
    assert not cut.exists()

    # torch's zip writer says a full disk without an error number: the disk is asked
    torch_says = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 15168 vs 15060")
    with pytest.raises(RuntimeError, match="unexpected pos"):  # a disk with room: another failure, as it was
        mgr.save(_FullDiskEngine(torch_says), 2, state(2), cfg)
    assert cut.exists()
    mgr._recover()  # the next start removes a save cut short
    assert not cut.exists() and mgr.complete_tags() == ["step_000001"]

    with small_disk(tmp_path / "disk", "1m") as disk:
        mgr, cfg, chash = _saved(disk, [1], keep=3)
        fill(disk, 0)
        with pytest.raises(OSError) as e:
            mgr.save(_FullDiskEngine(torch_says), 2, state(2), cfg)
        cut = mgr.dir / "step_000002.saving"
        assert e.value.errno == errno.ENOSPC and "unexpected pos" in str(e.value) and e.value.filename == str(cut)
        assert mgr.complete_tags() == ["step_000001"] and (mgr.dir / POINTER).read_text().strip() == "step_000001"
        mgr._recover()
        assert not cut.exists()


def test_a_checkpoint_records_the_environment_that_wrote_it_and_a_resume_names_a_change(tmp_path):
    mgr, cfg, chash = _saved(tmp_path, [1], keep=3)
    manifest = mgr.manifest("step_000001")
    assert manifest["environment"]["torch"] == torch.__version__ and "deepspeed" in manifest["environment"]
    assert manifest["environment"]["cpu_threads"] == torch.get_num_threads()
    assert "another environment" not in mgr.resume(_FakeEngine(), cfg, chash).note
    manifest["environment"].update(torch="2.0.0", cpu_threads=torch.get_num_threads() + 1)  # as on another node
    (mgr.dir / "step_000001" / MARKER).write_text(json.dumps(manifest))
    note = mgr.resume(_FakeEngine(), cfg, chash).note
    assert (f"written under another environment: cpu_threads {torch.get_num_threads() + 1} -> "
            f"{torch.get_num_threads()}, torch 2.0.0 -> {torch.__version__}") in note, note

