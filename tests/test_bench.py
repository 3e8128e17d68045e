"""dense-rlhf bench: the tiny grid runs end to end, writes its reports, and every method agrees with the reference.

No timing is asserted: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import json

import pytest

from dense_rlhf import _native
from dense_rlhf.bench import baselines, cases, run
from dense_rlhf.bench.timers import CpuTimer

pytestmark = pytest.mark.skipif(not _native.has_kernel("cpu"), reason="native CPU op not built")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = run.main(["--tiny", "--device", "cpu", "--rounds", "1", "--out", str(out), "--name", "tiny"])
    assert code == 0
    return out, json.loads((out / "tiny.json").read_text())


def test_writes_json_markdown_and_plot(report):
    out, _ = report
    assert (out / "tiny.md").read_text().startswith("# dense_rewards microbenchmark")
    pytest.importorskip("matplotlib")
    assert (out / "tiny.png").stat().st_size > 0


def test_structure(report):
    _, data = report
    assert {"command", "meta", "settings", "cases", "targets", "notes"} <= set(data)
    assert data["meta"]["device"] == "cpu"
    assert len(data["cases"]) == len(cases.tiny_grid("cpu"))
    for case in data["cases"]:
        assert case["skipped"] is None
        assert set(case["methods"]) == set(baselines.METHODS)
        assert set(case["speedup"]) == set(baselines.ALTERNATIVES)
        assert case["bytes_to_move"] > 0
        for result in case["methods"].values():
            assert result["median_s"] > 0 and result["reps"] >= 1 and result["gbps"] > 0


def test_every_method_agrees_with_the_reference(report):
    _, data = report
    for case in data["cases"]:
        for name, result in case["methods"].items():
            assert result["agrees"], (case["label"], name, result["max_error"])
            assert result["max_error"] <= result["tolerance"]


def test_bytes_to_move_counts_completion_values_mask_score_and_outputs():
    case = cases.Case("maps", "fp32", batch=2, heads=3, length=16)
    inputs = cases.make_inputs(case, "cpu", seed=0)
    spans = cases.spans_for(2, 16)
    assert spans == [(2, 14), (2, 12)]
    assert inputs.mask.sum().item() == 26
    assert cases.bytes_to_move(case, inputs) == 3 * 26 * 4 + 2 * 16 + 2 * 4 + 2 * 16 * 4 + 2 * 4


def test_official_loop_matches_reference_on_rows_and_maps():
    for layout in ("maps", "rows"):
        inputs = cases.make_inputs(cases.Case(layout, "fp32", 4, 5, 24), "cpu", seed=1)
        expected = baselines.reference_method(inputs)
        assert baselines.agreement(baselines.official_method(inputs), expected, inputs.score) < 1e-5


def test_case_over_memory_budget_is_skipped_with_a_reason():
    args = run.parse_args(["--device", "cpu", "--max-gib", "0.001"])
    args.max_input_bytes, args.copy_gbps = int(args.max_gib * 2**30), None
    record = run.run_case(cases.Case("maps", "fp32", 8, 12, 512), "cpu", args, CpuTimer(), None)
    assert record["skipped"].startswith("needs ~")
    assert record["methods"] == {}
