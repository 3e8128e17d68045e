"""Served prefix-difference rewards beside ABC in verl's reward-loop worker, and beside vLLM's scalar ``/classify``.

One reward model (random-init Llama-style sequence classifier, float32), one batch of chat samples laid out as verl's
trainer hands them to its reward loop, and these paths, interleaved in rounds:

* ``ABC manager in the worker``: verl's ``RewardLoopWorker`` with ``ABCRewardManager`` (the reward model in the
  worker process, one forward for the batch: ``reward_kwargs.batch_size`` = B), ``compute_score_batch`` then
  ``assemble_rm_scores``: per-token rewards on the policy's tokens;
* ``served prefix (client)``: ``ServedRewardModel.score_and_densify(method="prefix")`` on the reward model's token ids
  of the same samples (rendered with its chat template), one ``POST /pooling`` (``token_classify``) for the batch on a
  vLLM server started with ``--pooler-config``;
* ``served /classify (scalar)``: the same token ids in one ``POST /classify`` on a second vLLM server with the model's
  default pooler (one vLLM server answers one pooling task): one score per sample, what verl's own reward loop asks.

The servers run on vLLM's CPU backend, which takes one core for the model (``VLLM_CPU_OMP_THREADS_BIND``: core 0,
core 1 reserved); this process runs torch on one thread too, so that both forwards get one core. Every path is
checked first: the served scores equal the in-process ones (1e-4). Reports samples per second (median over rounds)
and the ratios. Writes ``served.{json,md}`` into ``--out``.

Usage (verl in this environment, vLLM in another; the CPU lock is for shared machines):
``PYTHONPATH=. .venv-verl/bin/python benchmarks/bench_served.py --vllm-python .venv-vllm/bin/python``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the a movie plot was very good bad and but not it is don't it's i think acting really great awful story "
         "music ending café naïve 你好 电影 🙂").split()
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
SPECIALS = ["<|pad|>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"]


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def byte_bpe(vocab_size: int, seed: int, specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator([text(rng, 12) for _ in range(2000)], trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=specials))
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=specials[0], eos_token=specials[1])


def build(root: Path, args):
    """Policy tokenizer and reward model (with its own tokenizer and chat template) saved under ``root``."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    policy = byte_bpe(400, 1, ["<pad>", "<eos>"])
    rm_tok = byte_bpe(1000, 2, SPECIALS)
    rm_tok.chat_template = TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(rm_tok), hidden_size=args.hidden, intermediate_size=args.hidden * 2,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 64, max_position_embeddings=2048, num_labels=1,
                         pad_token_id=rm_tok.pad_token_id)
    model = LlamaForSequenceClassification(config).eval()
    policy.save_pretrained(root / "policy")
    rm_tok.save_pretrained(root / "rm")
    model.save_pretrained(root / "rm")
    return policy, rm_tok, model


def trainer_batch(policy, batch: int, response_words: int, seed: int = 0):
    """A verl DataProto as the trainer hands it to the reward loop, its chat messages and responses' text."""
    import numpy as np
    from verl import DataProto

    rng = random.Random(seed)
    messages = [[{"role": "user", "content": text(rng, 20)}] for _ in range(batch)]
    prompt_rows = [policy(m[0]["content"])["input_ids"] for m in messages]
    response_rows = [policy(" " + text(rng, rng.randint(response_words // 2, response_words)))["input_ids"]
                     for _ in range(batch)]
    P, R = max(map(len, prompt_rows)), max(map(len, response_rows))
    pad = policy.pad_token_id
    prompts = torch.full((batch, P), pad, dtype=torch.long)
    responses = torch.full((batch, R), pad, dtype=torch.long)
    prompt_mask = torch.zeros(batch, P, dtype=torch.long)
    response_mask = torch.zeros(batch, R, dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompt_rows, response_rows)):
        prompts[b, P - len(p):] = torch.tensor(p)
        prompt_mask[b, P - len(p):] = 1
        responses[b, :len(r)] = torch.tensor(r)
        response_mask[b, :len(r)] = 1
    raw_prompt = np.empty(batch, dtype=object)
    for b in range(batch):
        raw_prompt[b] = messages[b]
    data = DataProto.from_dict(
        tensors={"prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], 1),
                 "attention_mask": torch.cat([prompt_mask, response_mask], 1)},
        non_tensors={"raw_prompt": raw_prompt})
    texts = [policy.decode(r, skip_special_tokens=True) for r in response_rows]
    return data, messages, texts


def rm_inputs(rm_tok, messages, responses):
    """The reward model's [B, L] token ids of each rendered conversation (right-padded), the attention mask, and the
    completion mask: the tokens between the last ``<|assistant|>`` and the final ``<|end|>`` (special tokens, so the
    response's tokens are exactly those)."""
    assistant, end = rm_tok.convert_tokens_to_ids(["<|assistant|>", "<|end|>"])
    rows = []
    for m, r in zip(messages, responses):
        rendered = rm_tok.apply_chat_template(m + [{"role": "assistant", "content": r}], tokenize=False)
        rows.append(rm_tok(rendered, add_special_tokens=False)["input_ids"])
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), rm_tok.pad_token_id, dtype=torch.long)
    attention = torch.zeros(ids.shape, dtype=torch.long)
    completion = torch.zeros(ids.shape, dtype=torch.bool)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row)
        attention[b, :len(row)] = 1
        start = len(row) - 1 - row[::-1].index(assistant) + 1
        assert row[-1] == end
        completion[b, start:len(row) - 1] = True
    return ids, attention, completion, rows


def verl_config(policy_dir: Path, rm_dir: Path, batch: int):
    import verl
    from hydra import compose, initialize_config_dir

    from dense_rlhf.integrations.verl import MODULE_PATH

    overrides = ["reward.reward_manager.source=importlib", f"reward.reward_manager.module.path={MODULE_PATH}",
                 "reward.reward_manager.name=ABCRewardManager", f"reward.custom_reward_function.path={MODULE_PATH}",
                 "reward.custom_reward_function.name=compute_score", "reward.reward_model.enable=True",
                 "reward.reward_model.enable_resource_pool=False", f"reward.reward_model.model_path={rm_dir}",
                 "reward.reward_model.rollout.name=vllm", f"+reward.reward_kwargs.batch_size={batch}",
                 f"actor_rollout_ref.model.path={policy_dir}"]
    with initialize_config_dir(config_dir=os.path.join(os.path.dirname(verl.__file__), "trainer", "config"),
                               version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)


async def classify(url: str, model: str, rows):
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/classify", json={"model": model, "input": rows, "use_activation": False}) as r:
            reply = await r.json()
            if r.status != 200:
                raise RuntimeError(f"/classify answered {r.status}: {reply}")
    return torch.tensor([item["probs"][0] for item in sorted(reply["data"], key=lambda d: d["index"])])


def measure(args, root: Path) -> tuple[list[dict], dict]:
    from verl.experimental.reward_loop import RewardLoopWorker
    from verl.trainer.ppo.reward import resolve_reward_manager_cls

    from dense_rlhf.integrations.vllm import ServedRewardModel
    from dense_rlhf.integrations.vllm_server import CPU_ARGS, LocalVLLMServer

    policy, rm_tok, model = build(root, args)
    flags = [*CPU_ARGS[:2], "--max-model-len", "2048", *CPU_ARGS[4:]]
    servers = [LocalVLLMServer(root / "rm", python=args.vllm_python, token_classify=flag, args=flags,
                               log_path=root / f"vllm-{name}.log")
               for flag, name in ((True, "token"), (False, "plain"))]
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait()
        print(f"servers answered after {servers[0].started_s:.0f} s and {servers[1].started_s:.0f} s", flush=True)
        config = verl_config(root / "policy", root / "rm", args.batch)
        worker = RewardLoopWorker(config)
        manager_cls = resolve_reward_manager_cls(config)
        data, messages, responses = trainer_batch(worker.input_tokenizer, args.batch, args.response_words)
        ids, attention, completion, rows = rm_inputs(rm_tok, messages, responses)
        client = ServedRewardModel(servers[0].url, timeout=600)
        model_name = str(root / "rm")

        def abc_manager():
            outputs = asyncio.run(worker.compute_score_batch(data))
            return manager_cls.assemble_rm_scores(data, [o["reward_score"] for o in outputs])

        paths = {
            "ABC manager in the worker": abc_manager,
            "served prefix (client)": lambda: client.score_and_densify(ids, attention, completion, method="prefix"),
            "served /classify (scalar)": lambda: asyncio.run(classify(servers[1].url, model_name, rows)),
        }
        # every path once, checked: the same scores from the same weights
        rm_scores = paths["ABC manager in the worker"]()
        served_scores, served = paths["served prefix (client)"]()
        scalar = paths["served /classify (scalar)"]()
        torch.testing.assert_close(served.sum(1), served_scores, atol=1e-4, rtol=0)
        torch.testing.assert_close(served_scores, rm_scores.sum(1), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(scalar, served_scores, atol=1e-4, rtol=1e-4)
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(args.rounds):
            for name, fn in paths.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        response_mask = data.batch["attention_mask"][:, -data.batch["responses"].shape[1]:]
        meta = {"rm_tokens_per_sample": round(float(attention.sum(1).float().mean()), 1),
                "response_tokens_per_sample": round(float(response_mask.sum(1).float().mean()), 1),
                "params": sum(p.numel() for p in model.parameters()),
                "server_start_s": [round(s.started_s, 1) for s in servers]}
    finally:
        for server in servers:
            server.stop()
    rows_out = []
    base = statistics.median(times["ABC manager in the worker"])
    for name, ts in times.items():
        median = statistics.median(ts)
        rows_out.append({"path": name, "median_s": median, "samples_per_s": args.batch / median, "rounds": len(ts),
                         "speed_vs_abc_manager": base / median})
    return rows_out, meta


def markdown(rows: list[dict], meta: dict) -> str:
    by = {r["path"]: r for r in rows}
    served, abc, scalar = by["served prefix (client)"], by["ABC manager in the worker"], by["served /classify (scalar)"]
    lines = [
        "# Served prefix-difference rewards beside ABC in verl's worker and beside /classify (CPU)",
        "",
        f"Command: `{meta['command']}`. {meta['machine']}; torch {meta['torch']} (1 thread here, 1 core for the vLLM "
        f"engine), vLLM {meta['vllm']}. Reward model: Llama-style, {meta['params'] / 1e6:.1f}M parameters, float32; "
        f"batch of {meta['batch']} chat samples, {meta['response_tokens_per_sample']} policy response tokens and "
        f"{meta['rm_tokens_per_sample']} reward-model tokens per sample on average. Median over {meta['rounds']} "
        "rounds, paths interleaved; the servers started in " + " and ".join(f"{s} s" for s in meta["server_start_s"])
        + ".",
        "",
        "| path | median per batch (ms) | samples/s | speed vs ABC manager |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['path']} | {r['median_s'] * 1e3:.1f} | {r['samples_per_s']:.1f} | "
                     f"{r['speed_vs_abc_manager']:.2f} |")
    lines += ["", "Served prefix rewards over the in-worker ABC manager: "
              f"{served['samples_per_s'] / abc['samples_per_s']:.2f}x samples per second; served prefix call "
              "(per-token scores) over the scalar /classify call on the same ids: "
              f"{served['samples_per_s'] / scalar['samples_per_s']:.2f}x."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vllm-python", required=True, help="a Python with vLLM (e.g. .venv-vllm/bin/python)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--response-words", type=int, default=120, help="longest response, in words (shortest: half)")
    p.add_argument("--hidden", type=int, default=256, help="reward model width (heads of 64)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", default="benchmarks/results/cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    probe = ("import importlib.metadata as m\nfor d in ('vllm', 'vllm-cpu'):\n    try:\n        print(m.version(d))\n"
             "        break\n    except m.PackageNotFoundError:\n        pass")
    vllm = subprocess.run([args.vllm_python, "-c", probe], capture_output=True, text=True).stdout.strip() or "?"
    with tempfile.TemporaryDirectory() as tmp:
        rows, meta = measure(args, Path(tmp))
    command = "python benchmarks/bench_served.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta.update(command=command.rstrip(), machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
                torch=torch.__version__, vllm=vllm, batch=args.batch, rounds=args.rounds)
    for r in rows:
        print(f"{r['path']}: {r['median_s'] * 1e3:.1f} ms per batch, {r['samples_per_s']:.1f} samples/s, "
              f"{r['speed_vs_abc_manager']:.2f}x the ABC manager", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "served.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "served.md").write_text(markdown(rows, meta))
    print(f"wrote {out / 'served.md'}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
