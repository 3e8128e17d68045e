"""ABCGRPOTrainer: two real trl GRPO steps on tiny random models; the per-token advantages that trl's loss
receives must equal the schemes' formulas, recomputed here from eager attention maps and plain loops."""

import statistics

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from datasets import Dataset
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerFast
from trl import GRPOConfig

from dense_rlhf.integrations.trl import ABCGRPOTrainer

SPECIALS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
WORDS = [f"w{i}" for i in range(24)]
G = 4
CREDIT_BETA, ABC_BETA = 0.3, 0.8


def tokenizer():
    core = Tokenizer(WordLevel({w: i for i, w in enumerate(SPECIALS + WORDS)}, unk_token="[UNK]"))
    core.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]"
    )


def gpt2_config(tok, **extra):
    return GPT2Config(
        vocab_size=len(tok),
        n_positions=32,
        n_embd=16,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **extra,
    )


def make_trainer(tmp_path, scheme, **config):
    tok = tokenizer()
    torch.manual_seed(0)
    policy = GPT2LMHeadModel(gpt2_config(tok))
    rm = GPT2ForSequenceClassification(gpt2_config(tok, num_labels=1)).eval()
    prompts = Dataset.from_dict({"prompt": [f"w{i} w{i + 1} w{i + 2}" for i in range(0, 16, 2)]})
    args = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        num_generations=G,
        max_completion_length=5,
        max_steps=2,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        bf16=False,
        dataloader_num_workers=0,
        **config,
    )
    trainer = ABCGRPOTrainer(
        model=policy,
        reward_model=rm,
        args=args,
        train_dataset=prompts,
        processing_class=tok,
        scheme=scheme,
        credit_beta=CREDIT_BETA,
        abc_beta=ABC_BETA,
    )
    return trainer, rm


def record_loss_inputs(trainer):
    """Wrap trl's _compute_loss: keep the batch it computes the loss on."""
    seen, compute_loss = [], trainer._compute_loss

    def spy(model, inputs):
        seen.append(
            {
                k: inputs[k].detach().clone()
                for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")
            }
        )
        return compute_loss(model, inputs)

    trainer._compute_loss = spy
    return seen


@torch.no_grad()
def score_and_alpha_eager(rm, prompt, completion):
    """Score and ABC's alpha of one unpadded sequence, from the eager attention maps of the last layer. The
    random policy may sample [PAD]; the reward model scores the last token that is not [PAD]."""
    seq = prompt + completion
    scored = max(i for i, tok in enumerate(seq) if tok != rm.config.pad_token_id)
    rm.config._attn_implementation = "eager"
    try:
        out = rm(input_ids=torch.tensor([seq]), output_attentions=True)
    finally:
        rm.config._attn_implementation = "sdpa"
    row = out.attentions[-1][0].mean(0)[scored].tolist()  # heads averaged, from the scored token
    att = row[len(prompt) : len(prompt) + len(completion)]
    return out.logits[0, 0].item(), [a / sum(att) for a in att]


def expected_advantages(batch, rm, scheme, scale="group"):
    rows = []
    for i in range(batch["completion_ids"].shape[0]):
        prompt = batch["prompt_ids"][i][batch["prompt_mask"][i].bool()].tolist()
        completion = batch["completion_ids"][i][batch["completion_mask"][i].bool()].tolist()
        rows.append((tuple(prompt), completion, *score_and_alpha_eager(rm, prompt, completion)))
    groups = {}
    for i, row in enumerate(rows):
        groups.setdefault(row[0], []).append(i)
    assert sorted(len(g) for g in groups.values()) == [G] * (len(rows) // G)  # whole groups, shuffled by trl
    width = batch["completion_ids"].shape[1]
    want = torch.zeros(len(rows), width)
    for members in groups.values():
        scores = [rows[j][2] for j in members]
        std = statistics.stdev(scores) + 1e-4 if scale == "group" else 1.0
        if scheme == "credit":
            for j in members:
                adv = (rows[j][2] - statistics.fmean(scores)) / std
                n = len(rows[j][1])
                for t, a in enumerate(rows[j][3]):
                    want[j, t] = adv * n * (CREDIT_BETA * a + (1 - CREDIT_BETA) / n)
        else:  # dense returns of ABC's rewards
            returns = {}
            for j in members:
                score, alpha, n = rows[j][2], rows[j][3], len(rows[j][1])
                r = [ABC_BETA * score * a + (1 - ABC_BETA) * score * (t == n - 1) for t, a in enumerate(alpha)]
                returns[j] = [sum(r[t:]) for t in range(n)]
            for j in members:
                for t in range(len(returns[j])):
                    active = [returns[k][t] for k in members if t < len(returns[k])]
                    want[j, t] = (returns[j][t] - statistics.fmean(active)) / std
    return want


@pytest.mark.parametrize("scheme,scale", [("credit", "group"), ("dense", "group"), ("dense", "none")])
def test_two_trl_steps_use_the_schemes_token_advantages(tmp_path, scheme, scale):
    torch.set_num_threads(1)
    trainer, rm = make_trainer(tmp_path, scheme, scale_rewards=scale)
    seen = record_loss_inputs(trainer)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert len(seen) == 2  # two optimiser steps, one loss batch each
    for batch in seen:
        adv = batch["advantages"]
        assert adv.shape == batch["completion_ids"].shape  # per token, not per completion
        want = expected_advantages(batch, rm, scheme, scale)
        assert torch.allclose(adv, want, atol=1e-4), (adv, want)
        assert (adv[~batch["completion_mask"].bool()] == 0).all()
        if scheme == "credit":  # the completion mean is trl's own A_i, which it logged for the batch
            assert not torch.allclose(adv, adv[:, :1].expand_as(adv) * batch["completion_mask"])
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_plain_scheme_reproduces_trl_sequence_advantages(tmp_path):
    trainer, rm = make_trainer(tmp_path, "plain")
    seen = record_loss_inputs(trainer)
    trainer.train()
    for batch in seen:
        mask = batch["completion_mask"].bool()
        adv = batch["advantages"]
        per_row = adv[:, 0]
        assert torch.allclose(adv, per_row[:, None] * mask)
        want = expected_advantages(batch, rm, "credit")  # credit with beta 0 would be A_i; recompute A_i here
        n = mask.sum(1)
        assert torch.allclose(per_row, want.sum(1) / n, atol=1e-4)  # scheme 2 keeps each completion's mean A_i


def test_constructor_rejects_what_it_cannot_honour(tmp_path):
    tok = tokenizer()
    policy = GPT2LMHeadModel(gpt2_config(tok))
    rm = GPT2ForSequenceClassification(gpt2_config(tok, num_labels=1))
    with pytest.raises(TypeError, match="reward_funcs"):
        ABCGRPOTrainer(model=policy, reward_model=rm, reward_funcs=[lambda **k: [0.0]])
    with pytest.raises(ValueError, match="tools"):
        ABCGRPOTrainer(model=policy, reward_model=rm, tools=[len])
    with pytest.raises(ValueError, match="scheme"):
        ABCGRPOTrainer(model=policy, reward_model=rm, scheme="oracle")
    with pytest.raises(ValueError, match="credit_beta"):
        ABCGRPOTrainer(model=policy, reward_model=rm, credit_beta=2.0)
    args = GRPOConfig(output_dir=str(tmp_path), reward_weights=[2.0], use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="reward_weights"):
        ABCGRPOTrainer(model=policy, reward_model=rm, args=args)
