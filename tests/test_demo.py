"""End to end: ``dense-rlhf demo --quick`` (what CI runs) and a tiny ``dense-rlhf experiment``, in temp dirs; the
demo's console and the credit shading's colours."""

import json

import pytest

for needed in ("transformers", "trl", "datasets", "matplotlib", "rich"):
    pytest.importorskip(needed)  # the demo's own dependencies (requirements-dev.txt), not the op's

from dense_rlhf import cli  # noqa: E402


@pytest.mark.slow
def test_demo_quick_then_tiny_experiment(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("DENSE_RLHF_CACHE", str(cache))
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out), "--examples", "2"]) == 0
    for name in ("credit.html", "demo.png", "demo.md", "demo.json"):
        assert (out / name).stat().st_size > 0
    console = capsys.readouterr()
    text = " ".join(console.out.split())  # rich wraps lines at the terminal's width
    # what the program has to say, each fact once; the libraries' messages in demo.log
    assert text.count("reward model held-out") == 1 and text.count("credit.html") == 1
    assert "threshold: a true score of" in text and "late spread: the standard deviation" in text
    for chatter in ("{'loss'", "'train_runtime'", "Warning", "it/s"):
        assert chatter not in console.out + console.err, chatter
    log = (out / "demo.log").read_text()
    assert "RewardTrainer" in log and "'train_runtime'" in log and "FutureWarning" in log
    data = json.loads((out / "demo.json").read_text())
    assert {r["method"] for r in data["runs"]} == {"sparse", "abc-0.8"}
    for run in data["runs"]:
        assert len(run["curves"]["gt_score"]) == len(run["curves"]["kl"]) == 12
    assert 0.5 < data["meta"]["reward_model"]["label_accuracy"] <= 1.0
    assert "<span" in (out / "credit.html").read_text()
    setups = list(cache.glob("setup-*"))
    assert len(setups) == 1  # trained once ...

    res = tmp_path / "results"
    argv = [
        "experiment",
        "--quick",
        "--steps",
        "2",
        "--seeds",
        "1",
        "--lam",
        "0.95",
        "--workers",
        "1",
        "--methods",
        "sparse,abc-0.5,prefix-1.0,uniform,abcd,bpe-abc-0.8",
        "--out",
        str(res),
    ]
    assert cli.main(argv) == 0
    assert list(cache.glob("setup-*")) == setups  # ... and reused by the experiment
    assert len(list(setups[0].glob("chat-rm-*/rm"))) == 1  # the BPE chat reward model, cached beside them
    data = json.loads((res / "experiment_lam0.95.json").read_text())
    assert len(data["runs"]) == 6
    credit = data["credit_diagnostics"]["sft_samples"]
    assert credit["uniform"]["spearman"] == 0.0 and credit["abc"]["n"] > 0 and credit["abc_aligned"]["n"] > 0
    assert credit["prefix"]["n"] == credit["abc"]["n"] and 0.0 <= credit["prefix"]["sign_agreement"] <= 1.0
    assert -1.0 <= credit["prefix_tracking"] <= 1.0
    assert 0.5 < data["meta"]["chat_reward_model"]["label_accuracy"] <= 1.0
    assert (res / "experiment.md").exists() and (res / "experiment_lam0.95.png").exists()
    assert "prefix diff. beta=1.0" in (res / "experiment_lam0.95.md").read_text()

    # the length study's whole pipeline on the length already trained (the quick setup is 20 tokens)
    argv = [
        "experiment",
        "--study",
        "length",
        "--lengths",
        "20",
        "--quick",
        "--steps",
        "3",
        "--seeds",
        "2",
        "--workers",
        "1",
        "--out",
        str(res),
    ]
    assert cli.main(argv) == 0
    assert list(cache.glob("setup-*")) == setups
    data = json.loads((res / "length_study.json").read_text())
    length = data["per_length"]["20"]
    assert {r["method"] for r in length["runs"]} == {"sparse", "abc-0.8", "prefix-0.8", "uniform"}
    assert len(length["runs"]) == 8 and data["meta"]["config"]["ppo"]["lam"] == 0.95
    for threshold in ("sparse_level", "best_threshold"):
        assert set(length[threshold]["ratios"]) == {"abc-0.8", "prefix-0.8", "uniform"}
        assert all(len(r["per_seed"]) == 2 for r in length[threshold]["ratios"].values())
    assert (res / "length_study.md").exists() and (res / "length_study.png").stat().st_size > 0

    # the oracle study's whole pipeline: both PPO settings (ours, the paper's), the oracles beside sparse and ABC
    argv = [
        "experiment",
        "--study",
        "oracle",
        "--quick",
        "--steps",
        "3",
        "--seeds",
        "2",
        "--lam",
        "0.95",
        "--methods",
        "sparse,abc-0.8,oracle-0.8,oracle-abs-0.8",
        "--workers",
        "1",
        "--out",
        str(res),
    ]
    assert cli.main(argv) == 0
    assert list(cache.glob("setup-*")) == setups
    data = json.loads((res / "oracle_study.json").read_text())
    assert [(s["setting"], s["lam"]) for s in data["sections"]] == [("ours", 0.95), ("paper", 0.95)]
    ours, paper = data["sections"]
    assert (paper["ppo"]["batch_size"], paper["ppo"]["minibatch_size"], paper["ppo"]["kl_target"]) == (16, 1, 6.0)
    assert ours["ppo"]["kl_target"] is None and all(r["curves"]["kl_coef"] == [0.05] * 3 for r in ours["runs"])
    coefs = paper["runs"][0]["curves"]["kl_coef"]
    assert len(coefs) == 3 and coefs[0] == 0.2 != coefs[1]  # the adaptive controller moved it
    assert len(paper["runs"]) == 8 and set(paper["shares"]) == {"oracle-0.8", "oracle-abs-0.8"}
    assert set(paper["sparse_level"]["ratios"]) == {"abc-0.8", "oracle-0.8", "oracle-abs-0.8"}
    credit = data["credit_diagnostics"]["sft_samples"]
    assert credit["oracle_abs"]["spearman"] == pytest.approx(1.0) and credit["oracle_abs"]["topk_overlap"] == 1.0
    assert credit["oracle"]["sign_agreement"] > credit["abc"]["sign_agreement"]
    assert -1.0 <= credit["rm_calibration"]["pearson"] <= 1.0
    text = (res / "oracle_study.md").read_text()
    assert "Share of the oracle's speed-up" in text and (res / "oracle_study.png").stat().st_size > 0

    # the frontier's whole pipeline: two KL strengths per setting, resumed from its partial file
    argv = [
        "experiment",
        "--study",
        "frontier",
        "--quick",
        "--steps",
        "2",
        "--seeds",
        "1",
        "--kl-coefs",
        "0.05,0.2",
        "--methods",
        "sparse,abc-0.8",
        "--workers",
        "1",
        "--out",
        str(res),
    ]
    assert cli.main(argv) == 0
    assert list(cache.glob("setup-*")) == setups and not (res / "frontier.partial.jsonl").exists()
    data = json.loads((res / "frontier.json").read_text())
    assert [s["setting"] for s in data["sections"]] == ["paper", "ours"]  # the order they ran in, slowest first
    for sec in data["sections"]:
        assert len(sec["runs"]) == 4 and {len(p) for p in sec["points"].values()} == {2}
        assert {r["curves"]["kl_coef"][0] for r in sec["runs"]} == {0.05, 0.2}
    assert (
        data["meta"]["missing"] is None
        and "At matched KL" in (res / "frontier.md").read_text()
        or all(s["span"] is None for s in data["sections"])
    )
    ours = data["sections"][1]
    first = ours["runs"][0]
    with (res / "frontier.partial.jsonl").open("w") as f:  # an interrupted study: one run already done ...
        key = json.dumps(
            [
                first["method"],
                first["seed"],
                data["meta"]["setup"],
                ours["ppo"] | {"kl_coef": 0.05},
                [["setting", "ours"], ["kl", 0.05]],
            ],
            sort_keys=True,
        )
        f.write(json.dumps({"key": key, "result": first | {"seconds": -1.0}}) + "\n")
    assert cli.main(argv) == 0  # ... is not run again
    again = json.loads((res / "frontier.json").read_text())
    assert [r["seconds"] for r in again["sections"][1]["runs"]].count(-1.0) == 1
    assert (res / "frontier.png").stat().st_size > 0


def test_credit_shading_never_looks_like_the_sign_colours():
    """The shading of ABC's share must not be read as the green or red of the true credit's sign, also where
    rich reduces it to the 16 standard colours (where orange became the legend's red)."""
    from rich.color import Color, ColorSystem

    from dense_rlhf.study.credit_view import _shade

    signs = {Color.parse(name).number for name in ("red", "green", "bright_red", "bright_green")}
    for i in range(101):
        r, g, b = _shade(i / 100)
        assert b >= max(r, g)  # white to blue
        assert Color.from_rgb(r, g, b).downgrade(ColorSystem.STANDARD).number not in signs
    assert Color.from_rgb(*_shade(1.0)).downgrade(ColorSystem.STANDARD).number == Color.parse("bright_blue").number


def test_runs_come_back_in_the_order_asked_from_any_number_of_workers():
    """``runs.map_jobs`` (every study's pool): the results in the order of the arguments, whether the jobs run here or
    in spawned worker processes that finish in any order; ``progress`` sees each result once."""
    from dense_rlhf.study.runs import map_jobs

    args = [-3, 1, -2, 5, 0, -7, 4]
    for workers in (1, 2):
        seen = []
        assert map_jobs(abs, args, workers, seen.append) == [3, 1, 2, 5, 0, 7, 4]
        assert sorted(seen) == sorted(map(abs, args))
