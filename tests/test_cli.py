"""The ``dense-rlhf`` command as a user meets it: unknown commands, missing extras (checked before any work) and
where each command writes by default."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest

from dense_rlhf import cli

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_command_is_named_with_the_usage_and_exit_2(capsys):
    assert cli.main(["foo"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dense-rlhf: unknown command 'foo'")
    assert "usage: dense-rlhf {demo,experiment,grpo-study,bench}" in err


def test_no_command_prints_the_usage_and_exits_2_help_exits_0(capsys):
    assert cli.main([]) == 2
    assert "usage: dense-rlhf" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: dense-rlhf" in out and "./dense-rlhf-results/<command>/" in out


def test_the_demo_extra_is_read_from_the_package_metadata():
    declared = re.search(r"^demo = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    names = [re.match(r"[A-Za-z0-9_.-]+", part.strip(' "')).group(0) for part in declared.split(",")]
    assert cli.extra_modules("demo") == names


@pytest.mark.parametrize("command", ["demo", "experiment", "grpo-study"])
def test_a_missing_extra_stops_the_command_before_any_work(command, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)  # what an install with only the [hf] extra lacks
    monkeypatch.setenv("DENSE_RLHF_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    started = time.perf_counter()
    assert cli.main([command, "--quick", "--out", str(out)]) == 1
    assert time.perf_counter() - started < 5
    err = capsys.readouterr().err
    assert f"dense-rlhf {command} needs the 'demo' extra" in err and "datasets" in err
    assert 'pip install "dense-rlhf[demo]"' in err
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_nothing_missing_when_every_module_imports():
    assert cli.missing_modules(["sys", "json"]) == []
    assert cli.missing_modules(["no_such_module_anywhere"]) == ["no_such_module_anywhere"]


def test_bench_needs_no_extra():
    assert "bench" not in cli._EXTRAS


def test_default_output_folders():
    pytest.importorskip("transformers")
    from dense_rlhf.bench import run as bench
    from dense_rlhf.study import demo, experiment, grpo_study

    assert demo.parse_args([]).out == "dense-rlhf-results/demo"
    assert experiment.parse_args([]).out == "dense-rlhf-results/experiment"
    assert grpo_study.parse_args([]).out == "dense-rlhf-results/grpo-study"
    assert bench.parse_args([]).out is None  # then dense-rlhf-results/bench/<device>
    assert demo.parse_args([]).lam == 0.8  # docs/getting-started.md says the demo runs GAE lambda 0.8


def test_make_targets_write_the_committed_results():
    makefile = (ROOT / "Makefile").read_text()
    assert "dense-rlhf experiment --out experiments/results" in makefile
    assert "dense-rlhf grpo-study --out experiments/results" in makefile
    assert "dense-rlhf bench --out benchmarks/results" in makefile
