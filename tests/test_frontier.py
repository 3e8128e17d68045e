"""The frontier study's statistics (``dense_rlhf.study.frontier``): interpolation along a method's points, the
KLs every method spans, and the score and steps at matched KL, against values worked out by hand."""

import json

import pytest

pytest.importorskip("transformers")

from dense_rlhf.study import frontier  # noqa: E402


def test_interpolate_is_piecewise_linear_and_undefined_outside():
    xs, ys = [1.0, 3.0, 7.0], [2.0, 6.0, 4.0]
    assert frontier.interpolate(xs, ys, 2.0) == pytest.approx(4.0)
    assert frontier.interpolate(xs, ys, 5.0) == pytest.approx(5.0)
    assert frontier.interpolate(xs, ys, 1.0) == 2.0 and frontier.interpolate(xs, ys, 7.0) == 4.0
    assert frontier.interpolate(xs, ys, 0.5) is None and frontier.interpolate(xs, ys, 7.5) is None
    assert frontier.interpolate(xs, [2.0, None, 4.0], 2.0) is None  # a neighbour never reached: undefined
    assert frontier.interpolate(xs, [2.0, None, 4.0], 1.0) == 2.0
    assert frontier.interpolate([4.0], [9.0], 4.0) == 9.0


def _run(method, kl_coef, seed, scores, kls):
    return {
        "method": method,
        "kl": kl_coef,
        "seed": seed,
        "setting": "ours",
        "seconds": 1.0,
        "curves": {"gt_score": scores, "kl": kls, "kl_coef": [kl_coef] * len(scores)},
    }


def test_points_span_and_matched_scores_by_hand():
    # two methods, two strengths each, two seeds; 12 steps, the last 10 of which are the final window
    def curve(final):
        return [0.0, 0.0] + [final] * 10

    results = []
    for method, table in {
        "sparse": {0.1: (2.0, 4.0), 0.05: (4.0, 8.0)},  # final score, final KL per strength (both seeds +-1 around)
        "abc-0.8": {0.1: (3.0, 6.0), 0.05: (5.0, 12.0)},
    }.items():
        for coef, (score, kl) in table.items():
            for seed, d in ((0, -1.0), (1, 1.0)):
                results.append(_run(method, coef, seed, curve(score + d), [0.0, 0.0] + [kl + d] * 10))
    points = frontier.frontier_points(results, ["sparse", "abc-0.8"], [0.05, 0.1])
    assert [p["kl_strength"] for p in points["sparse"]] == [0.1, 0.05]  # ordered by final KL
    p = points["abc-0.8"][1]
    assert (p["score_mean"], p["kl_mean"], p["final_scores"]) == (5.0, 12.0, [4.0, 6.0])
    assert p["score_std"] == pytest.approx(2**0.5) and p["kl_coef_end"] == 0.05
    assert frontier.common_span(points) == (6.0, 8.0)
    rows = frontier.matched(points, sft_score=0.0, n=3)
    assert [r["kl"] for r in rows] == [6.0, 7.0, 8.0]
    # sparse: 2 + (k - 4) / 2; ABC: 3 + (k - 6) / 3
    assert rows[0]["score"]["sparse"] == pytest.approx(3.0) and rows[0]["score"]["abc-0.8"] == pytest.approx(3.0)
    assert rows[2]["score"]["sparse"] == pytest.approx(4.0) and rows[2]["score"]["abc-0.8"] == pytest.approx(3 + 2 / 3)
    # sparse's level at k = 8: 0.8 * 4 = 3.2. Seed-mean curves: 0, 0, then the final score: the 5-step moving
    # average reaches 3.2 when (n - 2) * final / 5 >= 3.2 (or, before 5 steps, over the steps so far)
    assert rows[2]["sparse_level"] == pytest.approx(3.2)
    assert rows[2]["steps"]["sparse"] == 5.0  # sparse at 0.05 (final 4): MA at step 5 = 4 * 4 / 5 = 3.2
    # ABC at KL 8 lies between its KL-6 point (final 3, never reaches 3.2) and its KL-12 point: undefined
    assert rows[2]["steps"]["abc-0.8"] is None and rows[2]["ratio"]["abc-0.8"] is None


def test_no_overlap_no_matched_kl():
    pts = {
        "sparse": [{"kl_mean": 1.0, "score_mean": 1.0, "score_std": 0.0, "mean_curve": [1.0]}],
        "abc-0.8": [{"kl_mean": 2.0, "score_mean": 1.0, "score_std": 0.0, "mean_curve": [1.0]}],
    }
    assert frontier.common_span(pts) is None and frontier.matched(pts, 0.0) == []


def test_a_finished_study_is_extended_not_repeated(tmp_path):
    from dataclasses import asdict, replace

    from dense_rlhf.rl.ppo import PPOConfig
    from dense_rlhf.study import runs
    from dense_rlhf.study.models import SetupConfig

    setup, settings = SetupConfig(), {"ours": PPOConfig()}
    jobs = [
        runs.Run(m, s, setup, replace(settings["ours"], kl_coef=c), tags=(("setting", "ours"), ("kl", c)))
        for c in (0.05, 0.1)
        for m in ("sparse", "abc-0.8")
        for s in (0, 1, 2)
    ]
    earlier = [_run(m, c, s, [0.0], [0.0]) for c in (0.05, 0.1) for m in ("sparse", "abc-0.8") for s in (0, 1)]
    earlier.append(_run("sparse", 0.2, 0, [0.0], [0.0]))  # a strength this command does not ask for
    path = tmp_path / "frontier.json"

    def write(setup_dict, setting_dict):
        meta = {"setup": setup_dict, "settings": {"ours": setting_dict}}
        path.write_text(json.dumps({"meta": meta, "sections": [{"setting": "ours", "runs": earlier}]}))

    write(asdict(setup), asdict(settings["ours"]))
    done = frontier._earlier_results(path, jobs, setup, settings)
    keys = {frontier._key(j): j for j in jobs}
    assert len(done) == 8 and all(k in keys for k in done)
    assert {(keys[k].method, keys[k].seed) for k in done} == {(m, s) for m in ("sparse", "abc-0.8") for s in (0, 1)}
    assert all(done[k]["method"] == keys[k].method and done[k]["seed"] == keys[k].seed for k in done)
    # runs of another setup or other PPO settings are not this study's
    write(asdict(replace(setup, sft_steps=setup.sft_steps + 1)), asdict(settings["ours"]))
    assert frontier._earlier_results(path, jobs, setup, settings) == {}
    write(asdict(setup), asdict(replace(settings["ours"], lam=0.5)))
    assert frontier._earlier_results(path, jobs, setup, settings) == {}
    assert frontier._earlier_results(tmp_path / "absent.json", jobs, setup, settings) == {}


def test_a_study_s_methods_are_checked_before_any_run():
    from dense_rlhf.study import methods

    assert methods.against_sparse(None, ("sparse", "abc-0.8"), "frontier") == ["sparse", "abc-0.8"]
    assert methods.against_sparse(" sparse, norm-0.8 ,", (), "frontier") == ["sparse", "norm-0.8"]
    with pytest.raises(SystemExit, match="unknown method 'abc-9x' for --study oracle"):
        methods.against_sparse("sparse,abc-9x", (), "oracle")
    with pytest.raises(SystemExit, match="unknown method 'bpe-abc-0.8'"):  # scores text, not the policy's tokens
        methods.against_sparse("sparse,bpe-abc-0.8", (), "length")
    with pytest.raises(SystemExit, match="the length study compares against sparse"):
        methods.against_sparse("abc-0.8", (), "length")
