"""Values no run can use are refused before a run starts, naming the key: when the config loads
(masan.config.validation), when the model is built from the resolved config
(masan.model.checks.check_model), and when the cohort is split (masan.data.splits)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from masan.config import ConfigError, SplitConfig, load_config, unused_inputs, validate_for_training
from masan.config.validation import REGION_POOL_MODES
from masan.data.splits import SplitError, make_split
from masan.model import small_model_config
from masan.model.checks import check_model, meta_model
from masan.model.regions import POOL_MODES
from masan.model.summary import summarize

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "hpc" / "configs").glob("*.yaml"))
TINY = REPO / "hpc" / "configs" / "tiny.yaml"


REFUSED = [  # (overrides, what the message must name)
    (["model.attn_dim=0"], ["model.attn_dim=0"]),
    (["model.value_dim=-1"], ["model.value_dim=-1"]),
    (["model.mlp_hidden=-1"], ["model.mlp_hidden=-1"]),
    (["model.temporal_features=0"], ["model.temporal_features=0"]),
    (["model.temporal_kernel=0"], ["model.temporal_kernel=0"]),
    (["model.temporal_stride=0"], ["model.temporal_stride=0"]),
    (["model.temporal_chunk=-1"], ["model.temporal_chunk=-1"]),
    (["model.channel_reduction=0"], ["model.channel_reduction=0"]),
    (["model.fusion_cells=0"], ["model.fusion_cells=0"]),
    (["model.hfcn_features=0"], ["model.hfcn_features=0"]),
    (["model.hfcn_region_group=0"], ["model.hfcn_region_group=0"]),
    (["model.patch_chunk=-1"], ["model.patch_chunk=-1"]),
    (["model.spatial_kernel=-1"], ["model.spatial_kernel=-1"]),
    (["model.region_pool=[foo]"], ["model.region_pool=['foo']", "avg"]),
    (["model.region_pool=[]"], ["model.region_pool=[]"]),
    (["model.region_pool=[max, max]"], ["model.region_pool=['max', 'max']"]),
    (["train.zero_stage=3"], ["train.zero_stage=3", "0, 1 or 2"]),
    (["train.zero_stage=-1"], ["train.zero_stage=-1"]),
    (["train.zero_bucket_elements=1"], ["train.zero_bucket_elements=1", "multiple of 2"]),
    (["model.groups=3"], ["model.groups=3", "model.channels=[32, 64, 128, 128]", "model.groups=2"]),
    (["model.modalities=fmri", "model.fmri_channels=[8, 12, 24, 24]"], ["model.groups=8", "model.fmri_channels"]),
    (["split.seed=-5"], ["split.seed=-5", "from 0 to 4294967295"]),
    (["split.seed=4294967295", "split.repeat=1"], ["split.seed=4294967295 + split.repeat=1", "lower split.seed"]),
    (["data.use_t1=false"], ["model.modalities=both reads the t1 images", "data.use_t1=false"]),
    (["model.arch=hfcn", "data.use_t1=false"], ["model.arch=hfcn reads the t1 images"]),
    (["model.modalities=fmri", "data.use_fmri=false"], ["model.modalities=fmri reads the fmri images"]),
]


@pytest.mark.parametrize("overrides, named", REFUSED, ids=[" ".join(o) for o, _ in REFUSED])
def test_a_value_no_run_can_use_is_refused_when_the_config_loads_naming_the_key(overrides, named):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    message = str(e.value)
    assert "\n" not in message
    for fragment in named:
        assert fragment in message, (fragment, message)


NOT_TO_TRAIN = [  # loadable (a finished run's config.yaml may hold them), refused at a start
    (["model.spatial_kernel=4"], ["model.spatial_kernel=4", "odd"]),
    (["split.test_fraction=0.8", "split.val_fraction=0.5"],
     ["split.test_fraction=0.8", "split.val_fraction=0.5", "10%"]),
    (["loss.alpha=0", "loss.beta=0", "loss.sparsity=0"], ["loss.alpha=0.0", "loss.beta=0.0", "identically 0"]),
    (["loss.alpha=0", "loss.beta=0", "train.pretrain_epochs=0"], ["loss.alpha=0.0", "never learn"]),
    (["loss.alpha=0"], ["loss.alpha=0.0 weighs the t1 autoencoder", "never learn"]),  # sPM would stay random
    (["loss.beta=0"], ["loss.beta=0.0 weighs the fmri autoencoder", "never learn"]),
    (["model.modalities=t1", "loss.alpha=0"], ["loss.alpha=0.0", "identically 0"]),  # fMRI's beta weighs nothing
    (["model.arch=hfcn", "loss.alpha=0"], ["loss.alpha=0.0", "identically 0"]),  # the H-FCN reconstructs T1 only
    (["data.cache_dir="], ["data.cache_dir=''", "/dev/shm"]),
    (["data.cache_reserve_gib=-5"], ["data.cache_reserve_gib=-5.0", "0 or more GiB"]),
    (["train.precision=fp16", "data.normalize=false"], ["data.normalize=false", "65504", "bf16"]),
]


@pytest.mark.parametrize("overrides, named", NOT_TO_TRAIN, ids=[" ".join(o) for o, _ in NOT_TO_TRAIN])
def test_what_no_training_should_start_with_loads_but_is_refused_at_a_start(overrides, named):
    """A run that finished under an earlier version with one of these must stay readable by
    evaluate, predict and status: the rules apply when a training starts."""
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError) as e:
        validate_for_training(cfg)
    message = str(e.value)
    assert "\n" not in message
    for fragment in named:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("overrides", [
    ["model.patch_chunk=0", "model.temporal_chunk=0"],  # 0: all at once
    ["model.spatial_kernel=5", "model.region_pool=[max]", "train.zero_stage=0", "train.zero_bucket_elements=1024"],
    ["model.channels=[4, 16, 16, 16]", "model.fmri_channels=[12, 16, 32, 32]", "model.groups=16"],  # InitConv: no norm
    ["model.modalities=t1", "model.fmri_channels=[8, 12, 24, 24]"],  # fPM is not built
    ["loss.alpha=0", "model.head_grad_to_encoders=1"],  # sPM learns from the classifier
    ["model.modalities=t1", "loss.beta=0"],
    ["loss.alpha=0", "loss.beta=0", "train.pretrain_epochs=0", "model.head_grad_to_encoders=1"],  # end to end
    ["split.test_fraction=0.5", "split.val_fraction=0.5"],  # a quarter trains
    ["model.modalities=t1", "data.use_fmri=false"], ["model.arch=hfcn", "data.use_fmri=false"],
    ["model.modalities=fmri", "data.use_t1=false"], ["data.cache_reserve_gib=0"],
    ["train.precision=fp16"], ["train.precision=bf16", "data.normalize=false"],
], ids=" ".join)
def test_the_legitimate_neighbours_of_a_refused_value_still_load(overrides):
    validate_for_training(load_config(None, overrides))


def test_images_the_model_never_reads_are_named_at_the_start():
    """Loaded for nothing: the start warns (store_contract) with the key that stops it."""
    assert unused_inputs(load_config(None, [])) == []
    (note,) = unused_inputs(load_config(None, ["model.arch=hfcn"]))
    assert note.startswith("data.use_fmri=true, but model.arch=hfcn never reads the fmri images") and \
        note.endswith("set data.use_fmri=false")
    assert unused_inputs(load_config(None, ["model.modalities=fmri"]))[0].startswith("data.use_t1=true")
    assert unused_inputs(load_config(None, ["model.arch=hfcn", "data.use_fmri=false"])) == []
    # connectivity pairs asked of a model without fMRI (an ablation keeping the preset's settings)
    pairs = ["model.connectivity_cells=3", "model.connectivity_keep=5"]
    for choice in (["model.arch=hfcn"], ["model.modalities=t1"]):
        notes = unused_inputs(load_config(None, [*choice, "data.use_fmri=false", *pairs]))
        assert notes == [f"model.connectivity_cells=3 is ignored: {choice[0]} reads no fMRI, so the model has no "
                         "connectivity pairs; set model.connectivity_cells=0"], notes
    assert unused_inputs(load_config(None, pairs)) == []


@pytest.mark.parametrize("channels, groups", [
    ([4, 8, 8, 8], 4), ([4, 8, 8, 8], 8), ([4, 8, 8, 8], 3), ([6, 12, 24, 24], 4), ([6, 12, 24, 24], 12),
])
def test_the_groups_rule_refuses_exactly_the_widths_the_model_cannot_normalise(channels, groups):
    overrides = [f"model.channels={channels}", f"model.fmri_channels={channels}", f"model.groups={groups}"]
    try:
        load_config(TINY, overrides)
        loads = True
    except ConfigError:
        loads = False
    try:
        meta_model(small_model_config(channels=channels, fmri_channels=channels, groups=groups), 2)
        builds = True
    except ConfigError:
        builds = False
    assert loads == builds


def test_the_region_pool_modes_of_the_config_are_the_models():
    assert set(REGION_POOL_MODES) == set(POOL_MODES)


@pytest.mark.parametrize("path", [None, *SHIPPED], ids=lambda p: p.name if p else "defaults")
def test_the_defaults_and_every_shipped_config_load_and_pass_the_model_check(path):
    check_model(load_config(path))


def test_the_paper_exact_config_writes_out_every_setting_of_the_method():
    """Its claim: a changed default can never change the paper's model unnoticed. Every key a
    resume may not change (the method's, not the run's plumbing) is in the file."""
    import yaml

    from masan.config import RESUMABLE, SAME_METHOD, config_to_dict, flagged_keys

    def keys(tree: dict, prefix: str = "") -> set[str]:
        return {k for name, v in tree.items()
                for k in (keys(v, f"{prefix}{name}.") if isinstance(v, dict) and v else {f"{prefix}{name}"})}

    written = keys(yaml.safe_load((REPO / "hpc" / "configs" / "paper-exact.yaml").read_text()))
    free = flagged_keys(RESUMABLE) + flagged_keys(SAME_METHOD)
    method = {k for k in keys(config_to_dict(load_config(None)))
              if not any(k == f or k.startswith(f"{f}.") for f in free)}
    assert not method - written, f"hpc/configs/paper-exact.yaml leaves out {sorted(method - written)}"


def _tiny(**model_changes):
    """The tiny config with model values set past the load-time rules, as a resolved config
    would hold them if those rules missed one."""
    cfg = load_config(TINY)
    cfg.model = dataclasses.replace(cfg.model, **model_changes)
    return cfg


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # torch's, for attn_dim=0 on meta
def test_check_model_turns_a_model_that_cannot_be_built_into_one_line_naming_the_key():
    with pytest.raises(ConfigError, match=r"^GroupNorm: 8 channels cannot be split into 3 groups; set model.groups"):
        check_model(_tiny(groups=3))
    with pytest.raises(ConfigError, match=r"model.hfcn_region_group=3 must divide every axis of model.patch_grid"):
        check_model(_tiny(arch="hfcn", hfcn_region_group=3))
    with pytest.raises(ConfigError, match=r"model.arch=masan model of this config cannot be built"):
        check_model(_tiny(attn_dim=0))
    with pytest.raises(ConfigError, match="^GroupNorm.*model.groups") as e:  # the summary builds it the same way
        summarize(small_model_config(groups=3), 2)
    assert "\n" not in str(e.value)


def test_check_model_refuses_an_occlusion_pass_too_large_for_memory_and_names_the_fixes():
    cfg = load_config(None, ["model.patch_grid=[16, 16, 16]"])
    with pytest.raises(ConfigError) as e:
        check_model(cfg)
    message = str(e.value)
    for fragment in ("model.region_weights=occlusion", "model.patch_grid=[16, 16, 16]", "4096 regions", "GiB",
                     "model.region_weights=attention", "at most 729 regions"):
        assert fragment in message, (fragment, message)
    cfg.model.region_weights = "attention"
    check_model(cfg)
    fits = load_config(None, ["model.patch_grid=[8, 8, 8]"])
    check_model(fits)  # 1.25 GiB per subject
    fits.optim.micro_batch = 4
    with pytest.raises(ConfigError, match=r"optim.micro_batch \(now 4\).*raise model.occlusion_limit_gib"):
        check_model(fits)
    fits.model.occlusion_limit_gib = 6  # a card with room: 5 GiB for 4 subjects
    check_model(fits)


def test_check_model_refuses_a_temporal_kernel_longer_than_the_run():
    with pytest.raises(ConfigError, match=r"model.temporal_kernel=8 is longer than the model.fmri_frames=6"):
        check_model(_tiny(fmri_time="temporal_conv", temporal_kernel=8))
    check_model(_tiny(fmri_time="temporal_conv", temporal_kernel=6))


def test_check_model_refuses_an_unknown_compile_backend_only_when_compiling():
    check_model(_tiny(compile_backend="no_such_backend"))  # never used
    with pytest.raises(ConfigError, match=r"model.compile_backend='no_such_backend' is not a torch.compile backend"):
        check_model(_tiny(compile=True, compile_backend="no_such_backend"))
    for backend in ("inductor", "aot_eager"):
        check_model(_tiny(compile=True, compile_backend=backend))


def test_check_model_needs_the_resolved_frame_count():
    with pytest.raises(ValueError, match="resolve_inputs"):
        check_model(_tiny(fmri_frames=None))


def _cohort(per_class: int, classes: int = 2):
    subjects = [f"sub-{c}{i:02d}" for c in range(classes) for i in range(per_class)]
    return subjects, [c for c in range(classes) for _ in range(per_class)]


def test_split_fractions_too_large_for_the_cohort_are_a_split_error_with_the_classes_and_the_fix():
    subjects, labels = _cohort(4)
    with pytest.raises(SplitError) as e:  # 4 of 8 train; the validation part would take 3 of them
        make_split(subjects, labels, SplitConfig(test_fraction=0.5, val_fraction=0.7), class_names=["NC", "AD"])
    message = str(e.value)
    for fragment in ("split.val_fraction=0.7", "'AD': 2, 'NC': 2", "for the training part", "lower split.val_fraction"):
        assert fragment in message, (fragment, message)
    assert "train_size" not in message  # scikit-learn's words
    assert make_split(subjects, labels, SplitConfig(test_fraction=0.5, val_fraction=0.2)).val


def test_split_errors_name_classes_by_name_when_the_names_are_given():
    subjects, labels = _cohort(10)
    subjects, labels = subjects + ["sub-2x", "sub-2y"], labels + [2, 2]
    with pytest.raises(SplitError, match=r"class\(es\) 'MCI': 2 subject"):
        make_split(subjects, labels, SplitConfig(), class_names=["NC", "AD", "MCI"])
    with pytest.raises(SplitError, match=r"class\(es\) 2: 2 subject"):  # indices without names
        make_split(subjects, labels, SplitConfig())


@pytest.mark.parametrize("arch", ["masan", "hfcn"])
def test_check_model_refuses_a_screening_that_keeps_every_feature(arch):
    """More features kept than the region features there are: silently no screening."""
    with pytest.raises(ConfigError, match=r"model.screen_features=100000 keeps all \d+ region features there are"):
        check_model(_tiny(arch=arch, region_norm="cohort", screen_features=100000))
    check_model(_tiny(arch=arch, region_norm="cohort", screen_features=4))
