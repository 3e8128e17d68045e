import random

import pytest
import torch

pytest.importorskip("transformers")

from dense_rlhf.study import sentiment_task as task
from dense_rlhf.study.diagnostics import credit_diagnostics


def words(text):
    return text.split()


@pytest.mark.parametrize(
    "text, score",
    [
        ("the plot was good", 1.0),
        ("the plot was great", 2.0),
        ("the plot was very good", 2.0),
        ("the plot was slightly bad", -0.5),
        ("the plot was not good", -0.5),
        ("the plot was not terrible", 1.0),
        ("the plot was not very good", -1.0),
        ("the plot was not . it was good", 1.0),  # negation closes at a clause boundary
        ("very the plot was good", 1.0),  # an intensifier only touches the next word
        ("a truly awful script and a lovely ending", -3.0),
        ("the theatre was full", 0.0),
    ],
)
def test_ground_truth_rules(text, score):
    assert task.true_score(words(text)) == pytest.approx(score)


def test_leave_one_out_credit_gives_modifiers_their_share():
    credit = task.true_credit(words("the plot was"), words("not very good and it was nice"))
    # not very good = -1; dropping "not" -> +2 (credit -3), "very" -> -0.5 (credit -0.5), "good" -> 0 (credit -1)
    assert credit[:3] == pytest.approx([-3.0, -0.5, -1.0])
    assert credit[3:6] == [0.0, 0.0, 0.0]
    assert credit[6] == pytest.approx(1.0)


def test_vocabulary_and_tokenizer_round_trip():
    codec = task.Codec()
    assert len(task.VOCAB) == len(set(task.VOCAB)) == codec.vocab_size
    assert 150 <= codec.vocab_size <= 400
    rng = random.Random(0)
    texts = [task.sample_words(rng, task.Style()) for _ in range(50)]
    ids = codec.encode(texts, eos=True)
    assert ids.shape == (50, task.PROMPT_LEN + task.COMPLETION_LEN + 1)
    assert (ids[:, 0] == codec.bos_id).all() and (ids[:, -1] == codec.eos_id).all()
    unk = codec.tokenizer.convert_tokens_to_ids(task.UNK)
    assert not (ids == unk).any()
    assert codec.decode(ids[:, 1:-1]) == texts


def test_prompts_carry_no_sentiment_and_texts_have_fixed_length():
    rng = random.Random(1)
    marked = set(task.SENTIMENT) | set(task.NEGATIONS) | set(task.INTENSIFIERS) | set(task.DOWNTONERS)
    for prompt in task.sample_prompts(rng, 300):
        assert len(prompt) == task.PROMPT_WORDS
        assert not marked & set(prompt)
    for n in (12, 20):
        assert all(len(t) == task.PROMPT_WORDS + n for t in task.sft_texts(0, 20, n))


def test_sft_data_is_roughly_neutral_and_deterministic():
    scores = [task.true_score(t) for t in task.sft_texts(3, 2000)]
    assert abs(sum(scores) / len(scores)) < 0.4
    assert task.sft_texts(3, 5) == task.sft_texts(3, 5)


def test_preference_labels_follow_bradley_terry():
    ch, rj, sc, sr = task.preference_pairs(0, 3000)
    untied = [(a, b) for a, b in zip(sc, sr) if a != b]
    agree = sum(a > b for a, b in untied) / len(untied)
    assert 0.75 < agree < 0.97  # mostly the higher score wins, but labels are noisy draws
    assert all(task.true_score(c) == s for c, s in zip(ch[:50], sc[:50]))


def test_scores_and_credits_of_token_batches():
    codec = task.Codec()
    texts = [
        words("i think the plot was very good and a dull ending while it"),
        words("the cast was not bad , it was dreadful"),
    ]
    texts = [t + ["the"] * (task.PROMPT_WORDS + task.COMPLETION_LEN - len(t)) for t in texts]
    seq = codec.encode(texts)
    assert task.scores_of(codec, seq).tolist() == [1.0, -1.5]
    credit = task.credits_of(codec, seq)
    assert credit.shape == (2, task.COMPLETION_LEN)


def test_credit_diagnostics_perfect_uniform_and_reversed():
    credit = torch.tensor([[0.0, 2.0, 0.0, -1.0, 0.0, 0.0]] * 4)
    perfect = credit_diagnostics(credit.abs() + 0.01, credit)
    assert perfect["spearman"] == pytest.approx(1.0)
    assert perfect["topk_overlap"] == 1.0
    uniform = credit_diagnostics(torch.ones(4, 6), credit)
    assert uniform["spearman"] == 0.0
    assert uniform["mass_on_credited"] == pytest.approx(2 / 6)
    reversed_ = credit_diagnostics(1.0 / (credit.abs() + 0.5), credit)
    assert reversed_["spearman"] < -0.9 and reversed_["topk_overlap"] == 0.0


def test_length_study_ratios_pair_seeds_and_count_never_as_the_run_length():
    from dense_rlhf.study.stats import ratios, sparse_level, steps_to

    steps = {
        "sparse": {"steps": 40, "per_seed": [40, None, 50]},
        "abc-0.8": {"steps": 20, "per_seed": [10, 30, None]},
        "uniform": {"steps": None, "per_seed": [None, None, None]},
    }
    out = ratios(steps, ["sparse", "abc-0.8", "uniform"], n_steps=100)
    abc = out["abc-0.8"]
    assert abc["mean_curve_ratio"] == 0.5 and abc["text"] == "0.50"
    assert abc["per_seed"] == [0.25, 0.3, 2.0] and abc["per_seed_censored"] == [False, True, True]
    assert abc["per_seed_median"] == 0.3
    assert out["uniform"]["mean_curve_ratio"] is None and out["uniform"]["text"] == "never"
    steps["sparse"]["steps"] = None
    assert ratios(steps, ["sparse", "abc-0.8"], n_steps=100)["abc-0.8"]["text"] == "< 0.20 (sparse never)"

    curve = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    runs = [{"method": "sparse", "seed": s, "curves": {"gt_score": [x * (s + 1) for x in curve]}} for s in (1, 0)]
    summary = {
        "steps": 8,
        "sft_score": 0.0,
        "methods": {"sparse": {"mean_curve": [x * 1.5 for x in curve], "final_mean": 10.0}},
    }
    assert sparse_level(summary) == 8.0
    found = steps_to(summary, runs, 3.0)["sparse"]
    # moving averages: seed 0 reaches 3.0 at step 5 (mean of 1..5), seed 1 (doubled) at step 3, the mean (x1.5) at 4
    assert found == {"steps": 4, "per_seed": [5, 3]}


def test_running_scores_score_every_prefix():
    codec = task.Codec()
    words = [["the", "plot", "was", "not", "very", "good", "and", "a", "great", "cast"]]
    seq = codec.encode(words)
    running = task.running_scores_of(codec, seq)
    n = len(words[0]) - task.PROMPT_WORDS
    # not (open) very good -> -0.5 * 2 * 1 = -1 at "good"; "great" adds +2
    assert running.tolist() == [[0.0, 0.0, -1.0, -1.0, -1.0, 1.0, 1.0]] and running.shape == (1, n)
    torch.testing.assert_close(running[:, -1], task.scores_of(codec, seq))
