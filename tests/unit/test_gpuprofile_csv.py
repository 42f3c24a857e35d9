"""daemons.gpuprofile_csv: the GPU layer profile's format, written and read back (no torch, no GPU); one test
runs the profiler's tiny CPU smoke grid end to end where torch is installed."""

from __future__ import annotations

import ast
import dataclasses
import sys
from pathlib import Path

import pytest

from daemons import gpuprofile_csv as pcsv
from daemons.gpuprofile_csv import HEADER, MAGIC, ProfileRow, read_profile, write_profile

ROWS = [
    ProfileRow("gpu", "gemm_bf16", "calib", 0, 0, 0, 0, 8192, 1.41, 1.40, 1.43, 20, 0, "tflops=778.1;bf16 torch.mm"),
    ProfileRow("qwen32b", "attention", "prefill", 5, 32721, 429, 1, 2145, 3.25, 3.2, 3.3, 20, 0,
               "sdpa-flash-lowerright-gqa-loop5;mem=2.1GiB"),
    ProfileRow("ds660b", "experts", "decode", 32, 32768, 1, 32, 256, 0.125, 0.12, 0.13, 20, 1,
               "fp8,with a comma;alt=loop:0.2ms"),
]
PROVENANCE = {"gpu": "NVIDIA H200", "sm_count": 132, "hbm_gib": "139.8", "torch": "2.11.0+cu130",
              "command": "python3 -m daemons.gpuprofile --out x.csv", "skipped": ["ds27b/indexer decode B=1: Err: x"]}


def test_round_trip_of_a_written_file(tmp_path):
    path = tmp_path / "p.csv"
    write_profile(path, PROVENANCE, ROWS)
    provenance, rows = read_profile(path)
    assert rows == ROWS
    assert provenance["gpu"] == "NVIDIA H200" and provenance["sm_count"] == "132"
    assert provenance["skipped"] == ["ds27b/indexer decode B=1: Err: x"]
    text = path.read_text().splitlines()
    assert text[0] == MAGIC and ",".join(HEADER) in text
    assert not (tmp_path / "p.csv.tmp").exists()


def test_provenance_parsed_and_no_skips_is_an_empty_list(tmp_path):
    path = tmp_path / "p.csv"
    write_profile(path, {"gpu": "X\nY", "date": "2026-01-01T00:00:00+00:00"}, [])
    provenance, rows = read_profile(path)
    assert rows == []
    assert provenance == {"skipped": [], "gpu": "X Y", "date": "2026-01-01T00:00:00+00:00"}
    assert "# skipped: none" in path.read_text()


@pytest.mark.parametrize("index, old, new, needle", [
    (-1, ",20,1,", ",twenty,1,", "reps"),
    (-1, ",20,1,", ",20,1,x,", "fields"),
    (-2, ",prefill,", ",warmup,", "phase"),
    (-2, ",3.25,", ",nan,", "time_ms"),
    (-1, ",20,1,", ",20,2,", "graph"),
])
def test_a_malformed_row_names_its_line(tmp_path, index, old, new, needle):
    path = tmp_path / "p.csv"
    write_profile(path, PROVENANCE, ROWS)
    lines = path.read_text().splitlines()
    assert old in lines[index]
    lines[index] = lines[index].replace(old, new)
    path.write_text("\n".join(lines) + "\n")
    lineno = len(lines) + index + 1
    with pytest.raises(ValueError, match=rf"p\.csv:{lineno}: .*{needle}"):
        read_profile(path)


@pytest.mark.parametrize("text, message", [
    ("model,op\n", r":1: not a dpemu gpu profile"),
    (f"{MAGIC}\n# gpu: X\nmodel,op\n", r":3: header"),
    (f"{MAGIC}\n# no colon here\n", r":2: provenance"),
    (f"{MAGIC}\n# gpu: X\n# gpu: Y\n", r":3: .*repeated"),
    (f"{MAGIC}\n{','.join(HEADER)}\n# late: comment\n", r":3: comment after the header"),
    (f"{MAGIC}\n# gpu: X\n", r":2: no header"),
])
def test_malformed_headers_and_comments_name_their_line(tmp_path, text, message):
    path = tmp_path / "p.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_profile(path)


def test_rows_refuse_impossible_values():
    with pytest.raises(ValueError):
        dataclasses.replace(ROWS[0], batch=-1)
    with pytest.raises(ValueError):
        dataclasses.replace(ROWS[0], time_ms=float("inf"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        ROWS[0].time_ms = 2.0


def test_format_module_and_profiler_import_without_torch():
    for module in ("gpuprofile_csv", "gpuprofile"):
        tree = ast.parse((Path(pcsv.__file__).parent / f"{module}.py").read_text())
        top = {a.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for a in node.names}
        top |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
        assert "torch" not in top and "numpy" not in top, module
        assert top <= set(sys.stdlib_module_names) | {"__future__", "daemons"}, (module, top)


def test_profiler_grid_is_the_briefed_one():
    from daemons import gpuprofile
    full = gpuprofile.grid("full")
    prefill = [p for p in full if p.phase == "prefill"]
    assert len(prefill) == 24 and len(full) - len(prefill) == 20
    assert {p.batch for p in prefill if p.new == 4096} == {1, 2}
    assert all(p.new == 1 for p in full if p.phase == "decode")
    assert len(gpuprofile.grid("smoke")) == 3


def test_tiny_cpu_smoke_grid_end_to_end(tmp_path):
    pytest.importorskip("torch")
    from daemons import gpuprofile
    out = tmp_path / "tiny.csv"
    assert gpuprofile.main(["--device", "cpu", "--tiny", "--grid", "smoke", "--out", str(out)]) == 0
    provenance, rows = read_profile(out)
    assert provenance["status"] == "complete" and provenance["device"] == "cpu"
    ops = {(r.model, r.op) for r in rows}
    for model, model_ops in (("qwen32b", ("linear", "attention", "layer")),
                             ("ds660b", ("mla_proj", "indexer", "attention", "experts", "dense_ffn")),
                             ("ds27b", ("mla_proj", "indexer", "attention", "experts", "dense_ffn"))):
        assert {(model, op) for op in model_ops} <= ops
    assert all(r.reps >= 1 and r.time_ms > 0 for r in rows)
    assert [s for s in provenance["skipped"] if not s.startswith("gpu/gemm_fp8")] == []


COMMITTED = Path(__file__).resolve().parents[2] / "daemons" / "profiles" / "h200.csv"


def test_the_committed_h200_profile_is_complete_and_of_todays_model_shapes():
    """The profile measured on a real H200 reads back whole, and each model's shape it was measured with is the
    shape the cost model has now (a changed ModelSpec makes the profile stale: measure it again)."""
    from daemons.gpuprofile import PROFILED_MODELS, _describe

    provenance, rows = read_profile(COMMITTED)
    assert provenance["gpu"] == "NVIDIA H200" and provenance["status"] == "complete"
    assert provenance["skipped"] == []
    for model in PROFILED_MODELS:
        assert provenance[f"spec.{model}"] == _describe(model, tiny=False), model
        assert {r.phase for r in rows if r.model == model} == {"prefill", "decode"}
    assert {r.op for r in rows if r.model == "qwen32b"} == {"linear", "attention", "layer"}
    assert {r.op for r in rows if r.model == "ds660b"} == {"mla_proj", "indexer", "attention", "experts",
                                                           "dense_ffn"}
    assert all(r.time_ms > 0 and r.p10_ms <= r.time_ms <= r.p90_ms for r in rows)
