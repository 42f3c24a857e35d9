"""The teaching labs' framework and graders (scenarios/labs*.py), without root: lookup, the predictions' checks,
and each lab's grading of a real recorded run (tests/unit/fixtures/labs, record.py there says how) against a
correct and a wrong predictions file. The correct predictions are computed here from the paper's formulas and
the run's own cluster, the way a student reasons, never copied from the run's measured values."""

from __future__ import annotations

import json
import shutil
from fractions import Fraction
from pathlib import Path

import pytest
import yaml

from emulator.errors import ConfigError
from scenarios import cli, labs, labs_region, labs_storage, runner

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "labs"


def words(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def lab1_run(tmp_path) -> Path:
    """A copy of the recorded lab 1 run (grading writes into the directory it grades)."""
    return Path(shutil.copytree(FIXTURES / "lab1", tmp_path / "lab1"))


@pytest.fixture
def lab2_sweep(tmp_path) -> Path:
    return Path(shutil.copytree(FIXTURES / "lab2", tmp_path / "lab2"))


def write(tmp_path: Path, data: dict, name: str = "predictions.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


# -- what a student who reasons right predicts ----------------------------------------------------------------
def lab1_correct(run: Path) -> dict:
    cl = yaml.safe_load((run / "scenario.yaml").read_text())["cluster"]
    p, d = cl["prefill_nodes"], cl["decode_nodes"]
    jct = {m: v["jct_s"] for m, v in json.loads((run / "summary.json").read_text())["modes"].items()}
    return {"basic_usable_snics": p, "dualpath_usable_snics": p + d, "speedup_bound": (p + d) / p,
            "basic_snic_util_pe": 1.0,  # storage-bound: saturated
            "basic_snic_util_de": 0.0,  # never reads
            "dualpath_de_read_share": f"{d}/{p + d}",  # balanced over every SNIC, written as a fraction
            "speedup": min((p + d) / p, jct["basic"] / jct["oracle"])}  # the handout's estimate


def lab2_correct() -> dict:
    g, s = 1, Fraction(50, 400)  # the lab's cluster: 1 GPU, SNIC 50 Gbit/s, CNIC 400 Gbit/s
    lower = s / (g - s)  # PE CNIC write
    upper = min((g - 2 * s) / s, (g - s) / (2 * s), Fraction(10 - 3, 2))  # DE read, DE write, DE DRAM
    p_over_d = 4
    de_write = p_over_d * s / g + (1 + p_over_d) * s / g  # wire (PE path into the DE) + the copies
    return {"lower_bound": str(lower), "upper_bound": float(upper), "first_link_below": "pe_down",
            "first_link_above": "de_down", "de_write_load_at_4": float(de_write),
            "de_read_share_at_4": 1 / (1 + p_over_d)}


# -- lookup -----------------------------------------------------------------------------------------------------
def test_a_lab_is_found_by_number_or_name():
    assert labs.find("1").name == "1-storage-bottleneck"
    assert labs.find("2-congestion-free-region").number == 2
    with pytest.raises(ConfigError, match="no such lab.*1-storage-bottleneck, 2-congestion-free-region"):
        labs.find("9")


def test_every_lab_of_predictions_ships_its_files_and_a_template_with_every_key_null():
    for lab_dir in map(labs.find, ("1", "2")):
        for name in ("README.md", "scenario.yaml", "predictions.yaml", "TEACHER.md"):
            assert (lab_dir.path / name).is_file(), f"{lab_dir.name} lacks {name}"
        template = yaml.safe_load(lab_dir.predictions.read_text())
        assert template == {k.name: None for k in lab_dir.rules().keys}
        with pytest.raises(ConfigError) as exc:  # the template as shipped: every key named as not filled in
            labs.read_predictions(lab_dir.rules(), lab_dir.predictions)
        assert all(f"{k.name}: not filled in" in str(exc.value) for k in lab_dir.rules().keys)


def test_the_lab_scenarios_are_valid_and_a_lab_sweep_is_a_sweep():
    from scenarios import schema
    assert len(schema.sweep_points(str(labs.find("1").scenario))) == 1
    points = schema.sweep_points(str(labs.find("2").scenario))
    assert [p.values["cluster.prefill_nodes"] / p.values["cluster.decode_nodes"] for p in points] == [
        1 / 8, 1 / 4, 1, 2, 4]


def test_lab_list(capsys):
    assert cli.main(["lab", "list"]) == 0
    out = capsys.readouterr().out
    assert "1-storage-bottleneck" in out and "Lab 1: the storage bottleneck" in out
    assert "2-congestion-free-region" in out


# -- predictions ------------------------------------------------------------------------------------------------
def test_numbers_and_fractions():
    assert labs.number(3) == 3.0 and labs.number("1/7") == pytest.approx(1 / 7) and labs.number(" 2 / 3 ") == 2 / 3
    for bad in (True, None, "abc", "1/0", float("nan"), [1]):
        with pytest.raises(ValueError):
            labs.number(bad)


def test_every_problem_of_a_predictions_file_is_named(tmp_path):
    bad = {**lab1_correct(FIXTURES / "lab1"), "speedup": None, "basic_snic_util_pe": "high", "speedups": 2}
    del bad["basic_usable_snics"]
    with pytest.raises(ConfigError) as exc:
        labs.read_predictions(labs_storage.LAB, write(tmp_path, bad))
    msg = str(exc.value)
    assert "4 problem(s)" in msg
    assert "basic_usable_snics: missing (it is a count" in msg
    assert "speedup: not filled in (null" in msg
    assert "basic_snic_util_pe: 'high' is not a number" in msg
    assert "speedups: not a prediction of this lab" in msg


def test_a_choice_must_be_one_of_its_names(tmp_path):
    with pytest.raises(ConfigError, match="first_link_above: 'de_cnic_write' is not one of pe_up, pe_down"):
        labs.read_predictions(labs_region.LAB, write(tmp_path, {**lab2_correct(), "first_link_above": "de_cnic_write"}))


def test_a_predictions_file_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        labs.read_predictions(labs_storage.LAB, path)


def test_bad_predictions_stop_the_check_before_anything_runs(tmp_path, monkeypatch, capsys):
    def forbidden(*_a, **_k):
        raise AssertionError("ran the experiment with bad predictions")

    monkeypatch.setattr(runner, "run", forbidden)
    monkeypatch.setattr(runner, "run_group", forbidden)
    path = write(tmp_path, {"basic_usable_snics": "two"})
    assert cli.main(["lab", "check", "1", "--predictions", str(path), "--runs", str(tmp_path / "r")]) == 1
    err = words(capsys.readouterr().err)
    assert "basic_usable_snics: 'two' is not a number" in err
    assert "speedup: missing" in err and "dualpath_de_read_share: missing" in err
    assert not (tmp_path / "r").exists()


# -- lab 1 ------------------------------------------------------------------------------------------------------
def test_lab1_correct_predictions_pass_and_the_grade_is_written(lab1_run, tmp_path, capsys):
    path = write(tmp_path, lab1_correct(lab1_run))
    code = cli.main(["lab", "check", "1", "--results", str(lab1_run), "--predictions", str(path)])
    out = capsys.readouterr().out
    grade = json.loads((lab1_run / "grade.json").read_text())
    assert [r["key"] for r in grade["rows"] if not r["ok"]] == []
    assert grade["passed"] == grade["total"] == 7
    assert code == (0 if grade["trustworthy"] else 3)
    assert "7 of 7 predictions passed" in out and "grade:" in out
    assert (lab1_run / "grade.md").read_text().count("| pass |") == 7
    assert grade["picture"] == "snic_over_time.png" and (lab1_run / "snic_over_time.png").stat().st_size > 10_000
    rows = {r["key"]: r for r in grade["rows"]}
    assert rows["speedup_bound"]["expected"] == 3.0 and rows["speedup_bound"]["source"] == "formula"
    summary = json.loads((lab1_run / "summary.json").read_text())
    assert rows["basic_snic_util_pe"]["expected"] == summary["modes"]["basic"]["snic_util"]["pe"]
    assert rows["speedup"]["expected"] == summary["speedup"]["dualpath_vs_basic"]


@pytest.mark.parametrize("key, wrong, why", [
    ("basic_usable_snics", 6, "Basic reads only through the P = 2 prefill nodes' SNICs"),
    ("dualpath_usable_snics", 4, "P + D = 2 + 4"),
    ("speedup_bound", 1.5, "(P + D) / P = 6/2 = 3.00"),  # (P + D) / D: the wrong side counted
    ("basic_snic_util_pe", 0.33, "storage-bound"),  # reads spread over all six SNICs
    ("basic_snic_util_de", 0.5, "never reads on the decode side"),
    ("dualpath_de_read_share", 0.5, "D / (P + D) = 0.67"),
    ("speedup", 3.0, "Oracle, which loads nothing, is only"),  # the storage-only bound taken for the result
])
def test_lab1_each_wrong_prediction_fails_for_its_reason(lab1_run, tmp_path, key, wrong, why):
    pred = labs.read_predictions(labs_storage.LAB, write(tmp_path, {**lab1_correct(lab1_run), key: wrong}))
    rows = {r.key: r for r in labs_storage.grade(lab1_run, pred)}
    assert [k for k, r in rows.items() if not r.ok] == [key]
    assert why in rows[key].why


def test_lab1_a_failed_prediction_exits_5_and_the_grade_says_fail(lab1_run, tmp_path, capsys):
    trust = json.loads((lab1_run / "summary.json").read_text())
    trust["fidelity"] = {**trust["fidelity"], "ok": True, "reasons": []}  # grade a trusted copy of the run
    (lab1_run / "summary.json").write_text(json.dumps(trust))
    path = write(tmp_path, {**lab1_correct(lab1_run), "speedup": 3.0})
    out_dir = tmp_path / "grade"
    assert cli.main(["lab", "check", "1", "--results", str(lab1_run), "--predictions", str(path),
                     "--out", str(out_dir)]) == labs.EXIT_FAILED_PREDICTION
    assert "6 of 7 predictions passed" in capsys.readouterr().out
    assert "| speedup | 3 |" in (out_dir / "grade.md").read_text() and "**FAIL**" in (out_dir / "grade.md").read_text()
    assert not (lab1_run / "grade.json").exists()  # --out: the run directory is left as it was


def test_lab1_an_untrusted_run_is_graded_and_marked(lab1_run, tmp_path, capsys):
    s = json.loads((lab1_run / "summary.json").read_text())
    s["fidelity"] = {**s["fidelity"], "ok": False, "reasons": ["CPU reached 99% (limit 85%)"]}
    (lab1_run / "summary.json").write_text(json.dumps(s))
    path = write(tmp_path, lab1_correct(lab1_run))
    assert cli.main(["lab", "check", "1", "--results", str(lab1_run), "--predictions", str(path)]) == 3
    assert "NOT TRUSTWORTHY: CPU reached 99%" in capsys.readouterr().out
    assert "NOT TRUSTWORTHY" in (lab1_run / "grade.md").read_text()


def test_lab1_grades_a_run_not_a_sweep(lab2_sweep, tmp_path, capsys):
    path = write(tmp_path, lab1_correct(FIXTURES / "lab1"))
    assert cli.main(["lab", "check", "1", "--results", str(lab2_sweep), "--predictions", str(path)]) == 1
    assert "lab 1-storage-bottleneck grades a run directory" in words(capsys.readouterr().err)


# -- lab 2 ------------------------------------------------------------------------------------------------------
def test_lab2_correct_predictions_pass(lab2_sweep, tmp_path, capsys):
    path = write(tmp_path, lab2_correct())
    code = cli.main(["lab", "check", "2", "--results", str(lab2_sweep), "--predictions", str(path)])
    grade = json.loads((lab2_sweep / "grade.json").read_text())
    assert [r["key"] for r in grade["rows"] if not r["ok"]] == []
    assert code == (0 if grade["trustworthy"] else 3)
    rows = {r["key"]: r for r in grade["rows"]}
    assert rows["lower_bound"]["expected"] == pytest.approx(1 / 7, abs=1e-4)
    assert rows["upper_bound"]["expected"] == 3.5
    assert rows["first_link_above"]["expected"] == "de_down or de_dram"  # the paper's tie at 7/2
    assert grade["picture"] == "fabric.png" and (lab2_sweep / "fabric.png").is_file()
    assert "at P/D = 1/8 the run's reads load PE down most" in rows["first_link_below"]["why"]


def test_lab2_either_link_of_a_tie_passes(lab2_sweep, tmp_path):
    pred = labs.read_predictions(labs_region.LAB, write(tmp_path, {**lab2_correct(), "first_link_above": "de_dram"}))
    assert all(r.ok for r in labs_region.grade(lab2_sweep, pred))


@pytest.mark.parametrize("key, wrong, why", [
    ("lower_bound", "1/8", "P/D >= s/(g - s) = 1/7"),  # the wire-only range s/g, copies forgotten
    ("upper_bound", 6, "DE CNIC write (g - s)/(2s) = 3.5"),  # the DE CNIC read's bound, not the tightest
    ("first_link_below", "pe_up", "PE down sets the lower bound"),
    ("first_link_above", "de_up", "DE down and DE DRAM set the upper bound"),
    ("de_write_load_at_4", 0.5, "+ (1 + P/D)(s/g) of buffer -> HBM copies"),  # the wire alone
    ("de_read_share_at_4", 0.5, "D / (P + D) = 0.20"),
])
def test_lab2_each_wrong_prediction_fails_for_its_reason(lab2_sweep, tmp_path, key, wrong, why):
    pred = labs.read_predictions(labs_region.LAB, write(tmp_path, {**lab2_correct(), key: wrong}))
    rows = {r.key: r for r in labs_region.grade(lab2_sweep, pred)}
    assert [k for k, r in rows.items() if not r.ok] == [key]
    assert why in rows[key].why


def test_lab2_grades_a_sweep_not_a_run(lab1_run, tmp_path, capsys):
    path = write(tmp_path, lab2_correct())
    assert cli.main(["lab", "check", "2", "--results", str(lab1_run), "--predictions", str(path)]) == 1
    assert "grades a sweep directory (sweep.json); this is a run directory" in words(capsys.readouterr().err)


def test_lab2_without_a_point_at_4_fails_that_key_and_says_why(lab2_sweep, tmp_path):
    index = json.loads((lab2_sweep / "sweep.json").read_text())
    index["points"] = [p for p in index["points"] if not p["label"].startswith("prefill_nodes=4,")]
    (lab2_sweep / "sweep.json").write_text(json.dumps(index))
    pred = labs.read_predictions(labs_region.LAB, write(tmp_path, lab2_correct()))
    rows = {r.key: r for r in labs_region.grade(lab2_sweep, pred)}
    assert not rows["de_read_share_at_4"].ok and "no point at P/D = 4" in rows["de_read_share_at_4"].why
    assert rows["de_write_load_at_4"].ok  # a formula: the run is not needed for it
