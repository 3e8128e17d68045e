"""The verl integration against verl's own classes (CPU): the configuration of docs/verl.md resolves to our reward
manager, verl's reward-loop worker routes each sample to it, its rm_scores equal score_and_densify_text on the same
batch, and they pass through verl's KL-penalty step and GAE. Skipped where verl is not installed (`make test-verl`
runs it in an environment with the `verl` extra)."""

from __future__ import annotations

import asyncio
import inspect
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("verl", reason="the verl extra is not installed (make test-verl)")
pytestmark = pytest.mark.verl

import verl  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402
from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.experimental.reward_loop import RewardLoopWorker  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.trainer.ppo.core_algos import AdvantageEstimator  # noqa: E402
from verl.trainer.ppo.ray_trainer import apply_kl_penalty, compute_advantage  # noqa: E402
from verl.trainer.ppo.reward import resolve_reward_manager_cls  # noqa: E402

from dense_rlhf.align import score_and_densify_text  # noqa: E402
from dense_rlhf.integrations import verl as abc_verl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RM_PATH_IN_DOCS = "/path/to/reward-model"

WORDS = [
    "the",
    "film",
    "was",
    "great",
    "terrible",
    "plot",
    "acting",
    "café",
    "naïve",
    "日本",
    "映画",
    "🙂",
    "very",
    "not",
    "quite",
    "boring",
    "lovely",
    "ending",
    "a",
    "and",
]


def _corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) + rng.choice([".", "!", ""]) for _ in range(n)]


def _policy_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 / Llama-3 / Qwen style) with pad and EOS."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        _corpus(),
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def _rm_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece-style Metaspace BPE (Llama-2 / Mistral style) with a chat template that trims the content."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    alphabet = sorted({c for line in _corpus() for c in line})
    tok.train_from_iterator(
        _corpus(seed=1),
        trainers.BpeTrainer(
            vocab_size=200,
            special_tokens=["<unk>", "<pad>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)],
            initial_alphabet=alphabet,
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = "{% for m in messages %}[{{ m['role'] }}]: {{ m['content'] | trim }}\n{% endfor %}"
    return fast


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """A policy tokenizer directory (verl's actor_rollout_ref.model.path) and a reward-model directory (random-init
    Llama-style sequence classifier with GQA and its own tokenizer)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("verl")
    policy_dir, rm_dir = root / "policy", root / "reward-model"
    _policy_tokenizer().save_pretrained(policy_dir)
    rm_tok = _rm_tokenizer()
    rm_tok.save_pretrained(rm_dir)
    config = LlamaConfig(
        vocab_size=len(rm_tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        num_labels=1,
        pad_token_id=rm_tok.pad_token_id,
    )
    LlamaForSequenceClassification(config).eval().save_pretrained(rm_dir)
    return str(policy_dir), str(rm_dir)


def documented_overrides() -> list[str]:
    """The Hydra overrides of the documentation's command for ABCRewardManager (docs/verl.md), in the order written."""
    text = (ROOT / "docs" / "verl.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "=ABCRewardManager" in b)
    return re.findall(r"(?:^|\s)(\+?reward\.[\w.]+=\S+)", block)


def verl_config(policy_dir: str, rm_dir: str, extra: tuple[str, ...] = ()):
    """verl's own PPO trainer configuration (its Hydra files) with the documented overrides."""
    overrides = [o.replace(RM_PATH_IN_DOCS, rm_dir) for o in documented_overrides()]
    overrides += [f"actor_rollout_ref.model.path={policy_dir}", *extra]
    with initialize_config_dir(
        config_dir=os.path.join(os.path.dirname(verl.__file__), "trainer", "config"), version_base=None
    ):
        return compose(config_name="ppo_trainer", overrides=overrides)


def trainer_batch(
    policy_tok, prompt_padding: str = "left", seed: int = 0, responses: list[str] | None = None
) -> tuple[DataProto, list, torch.Tensor]:
    """A batch laid out as verl's trainers hand it to the reward loop: prompt ids padded to one width (left-padded
    by the agent loop in the v0 trainer, right-padded by the v1 trainer's reward step), responses right-padded,
    attention_mask over [prompts | responses], raw_prompt the chat messages. Some responses end in EOS.
    ``responses``: the four response texts (default: generated, one of them cut short)."""
    rng = np.random.default_rng(seed)
    texts = _corpus(n=8, seed=10 + seed)
    if responses is not None:
        texts[4:] = responses
    messages = [[{"role": "user", "content": texts[i]}] for i in range(4)]
    prompt_rows = [policy_tok(m[0]["content"])["input_ids"] for m in messages]
    response_rows = [
        policy_tok(" " + texts[4 + i])["input_ids"] + ([policy_tok.eos_token_id] if i % 2 else []) for i in range(4)
    ]
    if responses is None:
        response_rows[2] = response_rows[2][:3]  # a short one
    P, R, B = max(map(len, prompt_rows)) + 2, max(map(len, response_rows)) + 3, len(messages)
    pad = policy_tok.pad_token_id
    prompts = torch.full((B, P), pad, dtype=torch.long)
    prompt_mask = torch.zeros(B, P, dtype=torch.long)
    responses = torch.full((B, R), pad, dtype=torch.long)
    response_mask = torch.zeros(B, R, dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompt_rows, response_rows)):
        start = P - len(p) if prompt_padding == "left" else 0
        prompts[b, start : start + len(p)] = torch.tensor(p)
        prompt_mask[b, start : start + len(p)] = 1
        responses[b, : len(r)] = torch.tensor(r)
        response_mask[b, : len(r)] = 1
    raw_prompt = np.empty(B, dtype=object)
    for b in range(B):
        raw_prompt[b] = messages[b]
    del rng
    data = DataProto.from_dict(
        tensors={
            "prompts": prompts,
            "responses": responses,
            "input_ids": torch.cat([prompts, responses], 1),
            "attention_mask": torch.cat([prompt_mask, response_mask], 1),
        },
        non_tensors={"raw_prompt": raw_prompt},
    )
    return data, messages, response_mask.bool()


def worker_rm_scores(worker: RewardLoopWorker, config, data: DataProto):
    """What verl's RewardLoopManager.compute_rm_score does with its workers' results, on one in-process worker."""
    outputs = asyncio.run(worker.compute_score_batch(data))
    rm_scores = resolve_reward_manager_cls(config).assemble_rm_scores(data, [o["reward_score"] for o in outputs])
    return rm_scores, outputs


def test_the_documented_configuration_resolves_to_the_abc_manager(paths):
    overrides = documented_overrides()
    assert "reward.reward_manager.name=ABCRewardManager" in overrides and len(overrides) >= 8
    config = verl_config(*paths)
    assert resolve_reward_manager_cls(config) is abc_verl.ABCRewardManager
    abc_verl.check_routing(config)


@pytest.mark.parametrize("prompt_padding", ["left", "right"])
@pytest.mark.parametrize(
    "extra",
    [(), ("reward.reward_kwargs.beta=0.3", "reward.reward_kwargs.layer=0")],
    ids=["documented", "beta0.3-layer0"],
)
def test_worker_rm_scores_equal_score_and_densify_text(paths, prompt_padding, extra):
    config = verl_config(*paths, extra=extra)
    worker = RewardLoopWorker(config)
    manager = worker.reward_manager
    assert isinstance(manager, abc_verl.ABCRewardManager)
    data, messages, response_mask = trainer_batch(worker.input_tokenizer, prompt_padding)

    rm_scores, outputs = worker_rm_scores(worker, config, data)

    settings = manager.settings
    scores, expected = score_and_densify_text(
        manager.reward_model,
        manager.reward_model_tokenizer,
        messages,
        data.batch["responses"],
        policy_tokenizer=worker.input_tokenizer,
        response_mask=response_mask,
        beta=settings.beta,
        layer=settings.layer,
    )
    assert rm_scores.shape == data.batch["responses"].shape and rm_scores.dtype == torch.float32
    assert torch.all(rm_scores[~response_mask] == 0)
    torch.testing.assert_close(rm_scores.sum(1), scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rm_scores, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.tensor([o["reward_extra_info"]["abc_score"] for o in outputs]), scores)
    last = response_mask.sum(1) - 1
    sparse = rm_scores[torch.arange(len(last)), last]
    assert torch.all(sparse.abs() >= (1 - settings.beta) * scores.abs() - 1e-5)
    if extra:
        assert settings.beta == 0.3 and settings.layer == 0


def test_rm_scores_through_verl_reward_loop_manager_and_ray_workers(paths):
    """verl's RewardLoopManager.compute_rm_score with real Ray reward-loop workers, which import the manager from the
    configuration in their own processes. Only its __init__ is bypassed: with reward.reward_model.enable=True it
    would first start a vLLM or SGLang server for the reward model, which needs a GPU."""
    import ray
    from verl.experimental.reward_loop import RewardLoopManager

    config = verl_config(*paths, extra=("reward.num_workers=2",))
    data, messages, response_mask = trainer_batch(_policy_tokenizer())
    expected, _ = worker_rm_scores(RewardLoopWorker(config), config, data)
    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}}
    )
    try:
        manager = object.__new__(RewardLoopManager)
        manager.config, manager.reward_model_manager, manager.reward_router_address = config, None, None
        manager.reward_loop_workers_class = ray.remote(RewardLoopWorker)
        manager.reward_manager_cls = resolve_reward_manager_cls(config)
        manager._init_reward_loop_workers()
        output = manager.compute_rm_score(data)
    finally:
        ray.shutdown()
    rm_scores = output.batch["rm_scores"]
    assert rm_scores.shape == data.batch["responses"].shape and rm_scores.dtype == torch.float32
    torch.testing.assert_close(rm_scores, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(
        torch.as_tensor(output.non_tensor_batch["abc_score"].astype(np.float32)), rm_scores.sum(1), atol=1e-5, rtol=1e-5
    )
    assert output.meta_info["reward_extra_keys"] == ["abc_score", "abc_fallback"]
    assert output.non_tensor_batch["abc_fallback"].tolist() == [0] * len(rm_scores)


def test_reward_model_without_chat_template_reads_the_decoded_prompt(paths):
    config = verl_config(*paths)
    worker = RewardLoopWorker(config)
    manager = worker.reward_manager
    manager.reward_model_tokenizer.chat_template = None
    data, _, response_mask = trainer_batch(worker.input_tokenizer, "left")
    rm_scores, _ = worker_rm_scores(worker, config, data)
    prompts = data.batch["prompts"]
    prompt_mask = data.batch["attention_mask"][:, : prompts.shape[1]].bool()
    texts = [
        worker.input_tokenizer.decode(prompts[b][prompt_mask[b]], skip_special_tokens=True) for b in range(len(prompts))
    ]
    _, expected = score_and_densify_text(
        manager.reward_model,
        manager.reward_model_tokenizer,
        texts,
        data.batch["responses"],
        policy_tokenizer=worker.input_tokenizer,
        response_mask=response_mask,
        beta=0.8,
    )
    torch.testing.assert_close(rm_scores, expected, atol=1e-6, rtol=1e-5)


def test_one_sample_at_a_time_gives_the_same_rows(paths):
    """Batched forwards (the worker's micro-batches) and single-sample calls agree."""
    config = verl_config(*paths, extra=("+reward.reward_kwargs.batch_size=1",))
    worker = RewardLoopWorker(config)
    data, _, _ = trainer_batch(worker.input_tokenizer)
    single, _ = worker_rm_scores(worker, config, data)
    batched, _ = worker_rm_scores(RewardLoopWorker(verl_config(*paths)), config, data)
    torch.testing.assert_close(single, batched, atol=1e-5, rtol=1e-5)


def test_reward_model_is_loaded_once_per_process(paths, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    monkeypatch.setattr(abc_verl, "_MODELS", {})
    loads = []
    original = AutoModelForSequenceClassification.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args[0])
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", classmethod(counting))
    config = verl_config(*paths)
    first, second = RewardLoopWorker(config), RewardLoopWorker(config)
    data, _, _ = trainer_batch(first.input_tokenizer)
    worker_rm_scores(first, config, data)
    worker_rm_scores(second, config, data)
    assert loads == [paths[1]]
    assert first.reward_manager.reward_model is second.reward_manager.reward_model


def test_rm_scores_through_verl_kl_penalty_and_gae(paths):
    config = verl_config(*paths)
    worker = RewardLoopWorker(config)
    data, _, response_mask = trainer_batch(worker.input_tokenizer)
    rm_scores, _ = worker_rm_scores(worker, config, data)
    B, R = rm_scores.shape
    g = torch.Generator().manual_seed(0)
    old_log_probs, ref_log_prob = -torch.rand(B, R, generator=g), -torch.rand(B, R, generator=g)
    batch = DataProto.from_dict(
        tensors={
            "token_level_scores": rm_scores,
            "response_mask": response_mask.long(),
            "old_log_probs": old_log_probs,
            "ref_log_prob": ref_log_prob,
            "values": torch.zeros(B, R),
            "responses": data.batch["responses"],
            "attention_mask": data.batch["attention_mask"],
        }
    )

    batch, _ = apply_kl_penalty(batch, kl_ctrl=core_algos.FixedKLController(kl_coef=0.1), kl_penalty="kl")
    rewards = batch.batch["token_level_rewards"]
    assert rewards.shape == (B, R)
    torch.testing.assert_close(rewards, rm_scores - 0.1 * (old_log_probs - ref_log_prob) * response_mask)

    # the trainer's advantage step (both of verl's trainers call it for GAE), then verl's GAE directly
    batch = compute_advantage(batch, adv_estimator=AdvantageEstimator.GAE, gamma=1.0, lam=1.0, config=config.algorithm)
    advantages, returns = core_algos.compute_gae_advantage_return(
        rewards, torch.zeros(B, R), response_mask.long(), gamma=1.0, lam=1.0
    )
    assert batch.batch["advantages"].shape == (B, R) and returns.shape == (B, R)
    torch.testing.assert_close(batch.batch["returns"], returns)
    torch.testing.assert_close(batch.batch["advantages"], advantages)  # whitened by verl; its losses mask padding
    # gamma = lambda = 1 and zero values: the first token's return is the row's whole reward, ABC's score included
    torch.testing.assert_close(returns[:, 0], rewards.sum(1), atol=1e-5, rtol=1e-5)
    assert torch.all(returns[~response_mask] == 0)


def test_configurations_that_never_reach_the_manager_are_refused(paths):
    default_rm = verl_config(*paths, extra=("reward.reward_model.enable=False",))
    with pytest.raises(ValueError, match=r"reward\.reward_model\.enable=True"):
        abc_verl.check_routing(default_rm)
    standalone = verl_config(*paths, extra=("reward.reward_model.enable_resource_pool=True",))
    with pytest.raises(ValueError, match="enable_resource_pool=False"):
        RewardLoopWorker(standalone)
    no_path = verl_config(*paths, extra=("reward.custom_reward_function.path=null",))
    with pytest.raises(ValueError, match=r"reward\.custom_reward_function\.path"):
        abc_verl.check_routing(no_path)
    typo = verl_config(*paths, extra=("+reward.reward_kwargs.betta=0.5",))
    with pytest.raises(ValueError, match="betta"):
        abc_verl.ABCSettings.from_config(typo)
    with pytest.raises(ValueError, match=r"reward_kwargs.beta must be a number in \[0, 1\]"):
        abc_verl.ABCSettings.from_config(verl_config(*paths, extra=("reward.reward_kwargs.beta=1.5",)))
    with pytest.raises(RuntimeError, match="routes"):
        abc_verl.compute_score(data_source="x", solution_str="y", ground_truth=None, extra_info={})


@pytest.mark.parametrize(
    "settings, key, value, error, match",
    [
        ("ABCSettings", "layer", "last", TypeError, "layer must be an integer, got str 'last'"),
        ("ABCSettings", "layer", 1.5, TypeError, "layer must be an integer, got float"),
        ("ABCSettings", "batch_size", 0, ValueError, "batch_size must be at least 1, got 0"),
        ("ABCSettings", "batch_size", "eight", TypeError, "batch_size must be an integer, got str"),
        ("ABCSettings", "num_threads", 0, ValueError, "num_threads must be at least 1, got 0"),
        ("ABCSettings", "num_threads", True, TypeError, "num_threads must be an integer or null, got bool"),
        ("ABCSettings", "max_length", 0, ValueError, "max_length must be at least 1, got 0"),
        ("ABCSettings", "max_length", "512", TypeError, "max_length must be an integer or null, got str"),
        ("ABCSettings", "dtype", 32, ValueError, "dtype must name a torch dtype, got 32"),
        ("ServedSettings", "timeout", 0, ValueError, "timeout must be a finite number above 0.0, got 0"),
        ("ServedSettings", "timeout", "60", TypeError, "timeout must be a number, got str"),
        ("ServedSettings", "max_retries", -1, ValueError, "max_retries must be at least 0, got -1"),
        ("ServedSettings", "max_retries", 2.5, TypeError, "max_retries must be an integer, got float"),
        ("ServedSettings", "backoff", -0.5, ValueError, "backoff must be a finite number at least 0.0"),
        ("ServedSettings", "backoff", float("inf"), ValueError, "backoff must be a finite number"),
        ("ServedSettings", "batch_size", 0, ValueError, "batch_size must be at least 1, got 0"),
        ("ServedSettings", "max_length", -3, ValueError, "max_length must be at least 1, got -3"),
        ("ServedSettings", "model", "", TypeError, "model must be the served model's name or null"),
    ],
)
def test_settings_of_the_wrong_type_or_range_are_refused_with_their_full_key(settings, key, value, error, match):
    from omegaconf import OmegaConf

    config = OmegaConf.create({"reward": {"reward_model": {"model_path": "/rm"}, "reward_kwargs": {key: value}}})
    with pytest.raises(error, match=re.escape(f"reward.reward_kwargs.{match}")):
        getattr(abc_verl, settings).from_config(config)
    good = OmegaConf.create({"reward": {"reward_model": {"model_path": "/rm"}, "reward_kwargs": {}}})
    assert getattr(abc_verl, settings).from_config(good) == getattr(abc_verl, settings)(
        **({"model_path": "/rm"} if settings == "ABCSettings" else {})
    )


def test_a_layer_the_reward_model_does_not_have_and_a_gamma_that_is_no_number_are_refused_when_built(paths):
    with pytest.raises(ValueError, match=r"reward\.reward_kwargs\.layer=7: .*out of range"):
        RewardLoopWorker(verl_config(*paths, extra=("reward.reward_kwargs.layer=7",)))
    with pytest.raises(TypeError, match=r"algorithm\.gamma must be a number .*'one'"):
        RewardLoopWorker(verl_config(*paths, extra=("algorithm.gamma=one",)))


def test_assemble_rm_scores_refuses_scalars_and_wrong_lengths(paths):
    data, _, response_mask = trainer_batch(_policy_tokenizer())
    n = response_mask.sum(1).tolist()
    with pytest.raises(ValueError, match="scalar"):
        abc_verl.ABCRewardManager.assemble_rm_scores(data, [1.0] * len(n))
    rows = [[0.0] * k for k in n]
    rows[1].append(0.0)
    with pytest.raises(ValueError, match="sample 1"):
        abc_verl.ABCRewardManager.assemble_rm_scores(data, rows)


# ----------------------------------------------------------------------------------------- advantage estimators


def _run_estimator(name: str, rewards: torch.Tensor, mask: torch.Tensor, algorithm) -> torch.Tensor:
    """verl's registered estimator ``name`` on token-level rewards, with every input the estimators read."""
    fn = core_algos.get_adv_estimator_fn(name)
    B, R = rewards.shape
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        token_level_rewards=rewards,
        response_mask=mask,
        index=np.array(["a", "a", "b", "b"][:B]),
        values=torch.zeros(B, R),
        gamma=1.0,
        lam=1.0,
        config=algorithm,
        reward_baselines=torch.zeros(B),
        old_log_probs=-torch.rand(B, R, generator=g),
        sum_pi_squared=torch.rand(B, R, generator=g) * 0.5,
    )
    parameters = inspect.signature(fn).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        inputs = {k: v for k, v in inputs.items() if k in parameters}
    advantages, _ = fn(**inputs)
    return advantages


def test_every_verl_estimator_is_classified_by_what_it_does_with_per_token_rewards(paths):
    """Run each estimator verl registers on dense rows and on sparse rows with the same sums: those whose advantages
    cannot tell them apart reduce rows to sums and must be refused, the others accepted. A new estimator in verl
    fails here until it is read and classified (and the manager refuses it meanwhile)."""
    config = verl_config(*paths)
    algorithm = config.algorithm
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(4, 6)
    mask[1, 4:] = 0
    mask[3, 5:] = 0
    dense = torch.rand(4, 6, generator=g) * mask
    last = mask.sum(1).long() - 1
    sparse = torch.zeros(4, 6)
    sparse[torch.arange(4), last] = dense.sum(1)
    registered = set(core_algos.ADV_ESTIMATOR_REGISTRY)
    assert registered == abc_verl.SEQUENCE_SUM_ESTIMATORS | abc_verl.TOKEN_LEVEL_ESTIMATORS
    assert not abc_verl.SEQUENCE_SUM_ESTIMATORS & abc_verl.TOKEN_LEVEL_ESTIMATORS
    for name in sorted(registered):
        blind = torch.allclose(
            _run_estimator(name, dense, mask, algorithm), _run_estimator(name, sparse, mask, algorithm), atol=1e-5
        )
        assert blind == (name in abc_verl.SEQUENCE_SUM_ESTIMATORS), name
        config.algorithm.adv_estimator = name
        if blind:
            with pytest.raises(ValueError, match=rf"adv_estimator={name} reduces each row .*adv_estimator=gae"):
                abc_verl.check_algorithm(config)
        else:
            abc_verl.check_algorithm(config)


def test_the_manager_refuses_sum_estimators_unknown_estimators_and_discounting(paths, monkeypatch):
    with pytest.raises(ValueError, match="adv_estimator=grpo reduces each row"):
        RewardLoopWorker(verl_config(*paths, extra=("algorithm.adv_estimator=grpo",)))
    with pytest.raises(ValueError, match=r"algorithm\.gamma=0\.99: .*set algorithm\.gamma=1\.0"):
        RewardLoopWorker(verl_config(*paths, extra=("algorithm.gamma=0.99",)))
    config = verl_config(*paths)
    monkeypatch.setitem(core_algos.ADV_ESTIMATOR_REGISTRY, "my_estimator", lambda **kwargs: None)
    config.algorithm.adv_estimator = "my_estimator"
    with pytest.raises(ValueError, match="adv_estimator=my_estimator is not one of the estimators dense-rlhf has"):
        abc_verl.check_algorithm(config)


# ----------------------------------------------------------------------------------------- one bad sample


REWRITING_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}]: {{ m['content'] | replace('🙂', ':)') | trim }}\n{% endfor %}"
)
RAISING_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' and 'boring' in m['content'] %}"
    "{{ raise_exception('no boring answers') }}{% endif %}[{{ m['role'] }}]: {{ m['content'] | trim }}"
    "\n{% endfor %}"
)
RESPONSES = ["the film was great", "a lovely ending 🙂", "not quite", "very boring plot"]


def test_a_sample_whose_credit_cannot_be_mapped_gets_the_sparse_reward(paths, caplog):
    """The reward model's template rewrites sample 1's response: that sample gets its score on its last token,
    abc_fallback 1 and a warning with the reason; the others are what score_and_densify_text gives them."""
    config = verl_config(*paths)
    worker = RewardLoopWorker(config)
    manager = worker.reward_manager
    manager.reward_model_tokenizer.chat_template = REWRITING_TEMPLATE
    data, messages, response_mask = trainer_batch(worker.input_tokenizer, responses=RESPONSES)
    with caplog.at_level("WARNING", logger=abc_verl.__name__):
        rm_scores, outputs = worker_rm_scores(worker, config, data)
    assert [o["reward_extra_info"]["abc_fallback"] for o in outputs] == [0, 1, 0, 0]
    assert len(caplog.records) == 1 and "changes the response beyond trimming whitespace" in caplog.text
    scores = torch.tensor([o["reward_extra_info"]["abc_score"] for o in outputs])
    torch.testing.assert_close(rm_scores.sum(1), scores, atol=1e-5, rtol=1e-5)
    last = int(response_mask[1].sum()) - 1
    assert torch.count_nonzero(rm_scores[1]) == 1 and float(rm_scores[1, last]) == float(scores[1])
    kept = [0, 2, 3]
    expected_scores, expected = score_and_densify_text(
        manager.reward_model,
        manager.reward_model_tokenizer,
        [messages[i] for i in kept],
        data.batch["responses"][kept],
        policy_tokenizer=worker.input_tokenizer,
        response_mask=response_mask[kept],
    )
    torch.testing.assert_close(rm_scores[kept], expected, atol=1e-6, rtol=1e-5)
    # the fallback's score is the reward model's score of the text it read
    response = worker.input_tokenizer.decode(data.batch["responses"][1][response_mask[1]], skip_special_tokens=True)
    text = manager.reward_model_tokenizer.apply_chat_template(
        messages[1] + [{"role": "assistant", "content": response}], tokenize=False
    )
    ids = manager.reward_model_tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(manager.reward_model(input_ids=ids).logits[0, 0], scores[1], atol=1e-5, rtol=1e-5)


def test_a_sample_that_cannot_be_scored_raises_with_its_index(paths):
    config = verl_config(*paths)
    worker = RewardLoopWorker(config)
    worker.reward_manager.reward_model_tokenizer.chat_template = RAISING_TEMPLATE
    data, _, _ = trainer_batch(worker.input_tokenizer, responses=RESPONSES)
    outputs = asyncio.run(worker.compute_score_batch(data))  # the other samples are scored
    assert [isinstance(o["reward_score"], list) for o in outputs] == [True, True, True, False]
    with pytest.raises(
        ValueError, match="sample 3 of the batch could not be scored: .*chat template failed.*no boring"
    ):
        resolve_reward_manager_cls(config).assemble_rm_scores(data, [o["reward_score"] for o in outputs])


def test_the_extra_info_is_what_verls_validation_metrics_read(paths):
    """docs/verl.md says where abc_score and abc_fallback show up: verl's legacy trainer turns reward_extra_info into
    validation metrics with process_validation_metrics (val-aux/<data_source>/<key>/mean@N)."""
    from verl.trainer.ppo.metric_utils import process_validation_metrics

    config = verl_config(*paths)
    worker = RewardLoopWorker(config)
    worker.reward_manager.reward_model_tokenizer.chat_template = REWRITING_TEMPLATE
    data, _, _ = trainer_batch(worker.input_tokenizer, responses=RESPONSES)
    rm_scores, outputs = worker_rm_scores(worker, config, data)
    infos = {key: [o["reward_extra_info"][key] for o in outputs] for key in ("abc_score", "abc_fallback")}
    metrics = process_validation_metrics(["src"] * 4, ["u0", "u1", "u2", "u3"], infos)["src"]
    assert metrics["abc_fallback"]["mean@1"] == 0.25
    assert metrics["abc_score"]["mean@1"] == pytest.approx(float(rm_scores.sum(1).mean()), abs=1e-5)
