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


def test_every_setting_is_written_once_with_a_one_line_doc():
    """The configurations and the commands' options: every field has its doc under it, and the commands' --help
    shows those docs with the fields' defaults."""
    pytest.importorskip("transformers")
    from dataclasses import fields

    from dense_rlhf.rl.grpo import GRPOConfig
    from dense_rlhf.rl.ppo import PPOConfig
    from dense_rlhf.study import config, demo, grpo_study, options
    from dense_rlhf.study.models import SetupConfig
    from dense_rlhf.study.runs import Run

    for cls in (
        PPOConfig,
        GRPOConfig,
        SetupConfig,
        config.ExperimentOptions,
        grpo_study.GRPOStudyOptions,
        demo.DemoOptions,
        Run,
    ):
        docs = options.field_docs(cls)
        assert set(docs) == {f.name for f in fields(cls)}, cls
        assert all(docs.values()), cls


@pytest.mark.parametrize("command", ["demo", "experiment", "grpo-study"])
def test_the_help_is_the_fields_docs(command, capsys):
    pytest.importorskip("transformers")
    import importlib

    from dense_rlhf.rl.grpo import GRPOConfig
    from dense_rlhf.rl.ppo import PPOConfig
    from dense_rlhf.study import options

    module = importlib.import_module(cli._COMMANDS[command][0])
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    expected = {
        "demo": [
            "--lam FLOAT GAE lambda (at 0.95 ABC's lead is small, see experiments/README.md) (default 0.8)",
            "--quick tiny, fast version (smoke test)",
            "--examples INT completions to show (default 4)",
        ],
        "experiment": [
            f"--lr FLOAT {options.field_docs(PPOConfig)['lr']} (default: ours 0.0003, paper 0.0003)",
            "--seeds INT PPO seeds per method (default 5)",
            "--study {methods,length,oracle,frontier,rows}",
            "--rm-layers INT the reward model's layers; ABC reads the last one",
        ],
        "grpo-study": [
            f"--kl-coef FLOAT {options.field_docs(GRPOConfig)['kl_coef']} where a method has no "
            "@kl suffix (default 0.05)",
            "--group-size INT G, completions per prompt",
        ],
    }[command]
    for part in expected:
        assert part in text, part


def test_options_set_the_fields_they_name():
    pytest.importorskip("transformers")
    from dense_rlhf.study import config, demo, experiment, grpo_study

    assert experiment.parse_args([]) == config.ExperimentOptions()
    args = experiment.parse_args(
        ["--study", "length", "--rm-layers", "2", "--whiten-rewards", "--lr", "1e-3", "--quick", "--lam", "0.9"]
    )
    assert (args.study, args.quick, args.lam) == ("length", True, "0.9")
    assert args.setup_overrides == {"rm_n_layer": 2}
    assert args.ppo_overrides == {"whiten_rewards": True, "lr": 1e-3}
    with pytest.raises(SystemExit):
        experiment.parse_args(["--study", "lengths"])  # choices from the Literal
    assert grpo_study.parse_args(["--steps", "3", "--group-size", "8"]).grpo_overrides == {"steps": 3, "group_size": 8}
    assert grpo_study.parse_args([]).grpo_overrides == {}
    assert demo.parse_args(["--seeds", "2"]) == demo.DemoOptions(seeds=2)
