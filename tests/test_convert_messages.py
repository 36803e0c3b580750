"""The conversion tools' messages name what is wrong and the fix that works: split sessions,
a --bids that is no folder, the voxel size --spacing chose, classes left out by --classes, the
defaults in --help, manifest headers in another case."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_tool import load_tool
from masan.convert.cohort import _chosen_spacing
from masan.convert.options import ConvertOptions
from masan.convert.sources import (
    DEFAULT_CLASSES,
    ConvertError,
    Job,
    SubjectSource,
    check_sources,
    discover_bids,
    parse_label_map,
    read_manifest,
)
from test_data_convert import _synth, to_zarr


def _failures(bids: Path, **kw) -> dict[str, str]:
    _, failed = check_sources(discover_bids(bids, **kw), parse_label_map(None, DEFAULT_CLASSES), ("t1", "fmri"))
    return {f.subject: f.error for f in failed}


def test_a_modality_in_another_session_is_named_with_the_fix_that_works(tmp_path):
    bids = _synth(tmp_path, n=1)
    subjects = sorted(p for p in bids.glob("sub-*"))
    for sub in subjects:  # the T1 at baseline, the BOLD six months later
        (sub / "ses-bl").mkdir()
        (sub / "ses-m06").mkdir()
        (sub / "anat").rename(sub / "ses-bl" / "anat")
        (sub / "func").rename(sub / "ses-m06" / "func")
    first = subjects[0]
    shutil.copytree(first / "ses-bl" / "anat", first / "ses-m06" / "anat")  # one subject has both in ses-m06
    auto = _failures(bids)
    assert first.name not in auto
    for sub in subjects[1:]:
        assert "has no fmri file in ses-bl (its fmri is in ses-m06, and no session holds both" in auto[sub.name]
    chosen = _failures(bids, session="bl")
    assert ("has no fmri file in ses-bl (its fmri is in ses-m06; ses-m06 holds both: pick it with --session m06)"
            in chosen[first.name])
    assert "its fmri is in ses-m06, and no session holds both" in chosen[subjects[1].name]


def test_a_bids_path_that_is_no_folder_says_so_first(tmp_path):
    with pytest.raises(ConvertError, match=r"^--bids \S+nowhere does not exist; pass the BIDS folder"):
        discover_bids(tmp_path / "nowhere")
    table = tmp_path / "participants.tsv"
    table.write_text("participant_id\tdiagnosis\n")
    with pytest.raises(ConvertError) as e:
        discover_bids(table)
    assert str(e.value) == f"--bids {table} is a file, not the BIDS folder; pass its folder: --bids {tmp_path}"


def _fmri(path: Path, voxel: tuple[float, float, float]) -> str:
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.diag([*voxel, 1.0])), path)
    return str(path)


def test_spacing_says_an_anisotropic_size_gave_its_finest_axis(tmp_path):
    jobs = [Job(f"s{i}", "AD", {"fmri": _fmri(tmp_path / f"s{i}.nii.gz", voxel)})
            for i, voxel in enumerate([(3.0, 3.2, 2.2)] * 2 + [(2.0, 2.0, 2.0)])]
    opts, notes = _chosen_spacing(ConvertOptions(spacing=(1.0, 0.0)), jobs)
    assert opts.spacing == (1.0, 2.2)
    assert notes == ["--spacing: fmri resampled to 2.2 mm isotropic voxels, the finest axis of the cohort's most "
                     "common voxel size 3x3.2x2.2 mm (2 of 3 files have it, 2 different sizes)"]


def test_a_class_left_out_by_classes_is_offered_back(tmp_path):
    def error(label: str, classes: tuple[str, ...]) -> str:
        source = SubjectSource("s1", label, tmp_path / "t1.nii", tmp_path / "bold.nii", "m.csv row 2")
        return check_sources([source], parse_label_map(None, classes), ("t1", "fmri"))[1][0].error

    assert error("EMCI", ("NC", "AD")).endswith(
        "add EMCI to --classes to keep it as a class, map it with --label-map RAW=CLASS, or fix the table")
    assert "add NC to --classes" in error("CN", ("EMCI", "AD"))  # ADNI's spelling of a class left out
    assert error("Dementia", DEFAULT_CLASSES).endswith("; map it with --label-map RAW=CLASS or fix the table")


@pytest.mark.parametrize(("tool", "options"), [("to_zarr", ("--workers", "--codec", "--shuffle")),
                                               ("synth_cohort", ("--tr", "--seed"))])
def test_help_gives_every_default(tool, options, capsys):
    with pytest.raises(SystemExit):
        (to_zarr.parse_args if tool == "to_zarr" else load_tool(tool).main)(["--help"])
    shown = capsys.readouterr().out
    for option in options:  # its entry: from its line in the option list to the next option's
        entry = re.search(rf"^ +{option} .*?(?=^ +-)", shown, re.DOTALL | re.MULTILINE)
        assert entry and "default" in entry.group(), (option, entry)


def test_manifest_columns_match_in_any_case_and_spacing(tmp_path):
    man = tmp_path / "m.csv"
    man.write_text("Subject, T1 ,fMRI,LABEL\ns1,t1.nii,bold.nii,AD\n")
    (source,) = read_manifest(man)
    assert (source.subject, source.t1, source.fmri, source.label) == ("s1", tmp_path / "t1.nii",
                                                                      tmp_path / "bold.nii", "AD")
    man.write_text("subject,t1,fmri,Label,label\ns1,t1.nii,,AD,NC\n")
    with pytest.raises(ConvertError, match=r"has the column 'label' more than once \(as \['Label', 'label'\]"):
        read_manifest(man)
