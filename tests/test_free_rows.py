"""The label-free candidate rows of ``dense_rlhf.study.candidate_rows`` against references computed another way: ABC's
row from the capture, the value and output norms from the layers' own modules, and the direct score, which with the
MLP switched off adds up with the residual path to the reward model's score exactly."""

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from transformers import GPT2Config, GPT2ForSequenceClassification  # noqa: E402

from dense_rlhf.capture import capture_reward_attention  # noqa: E402
from dense_rlhf.study.candidate_rows import CANDIDATES, candidate_rows  # noqa: E402


def _rm(layers: int, seed: int = 0) -> GPT2ForSequenceClassification:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=50,
        n_positions=32,
        n_embd=16,
        n_layer=layers,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        num_labels=1,
        pad_token_id=0,
    )
    rm = GPT2ForSequenceClassification(cfg).eval()
    with torch.no_grad():  # random init is small: give the layer norms and biases something to do
        for name, p in rm.named_parameters():
            if "ln" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return rm


@pytest.mark.parametrize("layers", [1, 2])
def test_rows_match_the_capture_and_the_modules(layers):
    rm = _rm(layers)
    ids = torch.randint(1, 50, (3, 11))
    score, rows = candidate_rows(rm, ids)
    assert set(rows) == set(CANDIDATES) and all(r.shape == (3, 11) for r in rows.values())
    assert torch.allclose(score, rm(input_ids=ids).logits[:, 0], atol=1e-5)
    with capture_reward_attention(rm, layer=-1) as cap:
        rm(input_ids=ids)
    assert torch.allclose(rows["abc"], cap.rows.mean(1), atol=1e-5)
    per_layer = []
    for layer in range(layers):
        with capture_reward_attention(rm, layer=layer) as c:
            rm(input_ids=ids)
        per_layer.append(c.rows.mean(1))
    assert torch.allclose(rows["layer-mean"], torch.stack(per_layer).mean(0), atol=1e-5)
    # value vectors and the output projection, recomputed from the last block's input in a plain loop
    hidden = rm(input_ids=ids, output_hidden_states=True).hidden_states[-2]
    block = rm.transformer.h[-1]
    qkv = block.attn.c_attn(block.ln_1(hidden))
    v = qkv[..., 32:]
    attn = cap.rows  # [B, H, L]
    value_norm = torch.zeros(3, 11)
    output_norm = torch.zeros(3, 11)
    summed = torch.zeros(3, 11, 16)
    for b in range(3):
        for h in range(4):
            for t in range(11):
                vec = v[b, t, 4 * h : 4 * h + 4]
                out = vec @ block.attn.c_proj.weight[4 * h : 4 * h + 4]
                value_norm[b, t] += attn[b, h, t] * vec.norm() / 4
                output_norm[b, t] += attn[b, h, t] * out.norm() / 4
                summed[b, t] += attn[b, h, t] * out
    assert torch.allclose(rows["value-norm"], value_norm, atol=1e-5)
    assert torch.allclose(rows["output-norm"], output_norm, atol=1e-5)
    assert torch.allclose(rows["summed-output-norm"], summed.norm(dim=-1), atol=1e-5)
    conf = attn.amax(-1)  # [B, H]
    assert torch.allclose(rows["head-confidence"], (attn * conf[..., None]).sum(1) / conf.sum(1, keepdim=True))


def test_direct_score_adds_up_to_the_score_without_the_mlp():
    """With the MLP's output zeroed, the scoring token's final hidden state is its residual input, the attention's
    output bias and the heads' contributions of every token: the direct scores plus the other two terms, through
    the final norm and the score head, are the score."""
    rm = _rm(1, seed=3)
    with torch.no_grad():
        rm.transformer.h[0].mlp.c_proj.weight.zero_()
        rm.transformer.h[0].mlp.c_proj.bias.zero_()
    ids = torch.randint(1, 50, (4, 9))
    score, rows = candidate_rows(rm, ids)
    out = rm(input_ids=ids, output_hidden_states=True)
    residual = out.hidden_states[0][:, -1]  # the block's input at the scoring token
    ln, head = rm.transformer.ln_f, rm.score.weight[0]
    final_in = residual + rm.transformer.h[0].attn(rm.transformer.h[0].ln_1(out.hidden_states[0]))[0][:, -1]
    sigma = (final_in.var(-1, unbiased=False) + ln.eps).sqrt()

    def through(vec):
        return ((vec - vec.mean(-1, keepdim=True)) * ln.weight * head).sum(-1) / sigma

    rest = through(residual + rm.transformer.h[0].attn.c_proj.bias) + (ln.bias * head).sum()
    assert torch.allclose(rows["direct-score"].sum(1) + rest, score, atol=1e-4)


def test_norm_method_hands_ppo_abcs_formula_with_the_norm_row():
    """``norm-0.8``: per completion token beta * score * (its share of the row over the completion), the rest of
    the score on the last token, written out by hand from the candidate row."""
    import random

    from dense_rlhf.rl.ppo import PolicyWithValue, rollout
    from dense_rlhf.study import methods as M
    from dense_rlhf.study import sentiment_task as task
    from dense_rlhf.study.models import SetupConfig, new_policy, new_reward_model

    torch.manual_seed(0)
    codec = task.Codec()
    cfg = SetupConfig(n_embd=32, rm_n_embd=32, n_layer=1, rm_n_layer=1, n_head=2, rm_n_head=2)
    lm, rm = new_policy(codec, cfg).eval(), new_reward_model(codec, cfg).eval()
    prompts = codec.encode(task.sample_prompts(random.Random(3), 6))
    ro = rollout(PolicyWithValue(lm, codec.special_ids), lm, prompts, 10, torch.Generator().manual_seed(3), 1.0)
    rewards, stats = M.make_score_fn("norm-0.8", rm, codec)(ro)
    ids, _ = M.rm_inputs(codec, ro.seq)
    score, rows = candidate_rows(rm, ids)
    p = task.PROMPT_LEN
    share = rows["summed-output-norm"][:, p : p + 10]
    expected = 0.8 * score[:, None] * share / share.sum(1, keepdim=True)
    expected[:, -1] += 0.2 * score
    torch.testing.assert_close(rewards, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rewards.sum(1), score, atol=1e-5, rtol=1e-5)
    assert stats["rm_score"] == pytest.approx(score.mean().item())
