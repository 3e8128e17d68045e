"""Served prefix-difference rewards beside ABC in verl's reward-loop worker, and beside vLLM's scalar ``/classify``.

One reward model (random-init Llama-style sequence classifier, float32), one batch of chat samples laid out as verl's
trainer hands them to its reward loop, and four paths, interleaved in rounds:

* ``ABC manager (reward model in the worker)``: verl's ``RewardLoopWorker`` with ``ABCRewardManager``, the reward
  model in the worker's process, one forward for the batch (``reward_kwargs.batch_size`` = B);
* ``served prefix manager``: verl's ``RewardLoopWorker`` with ``ServedPrefixRewardManager``, which renders and
  tokenises the samples, sends the batch in one ``POST /pooling`` (``token_classify``) to a vLLM server started with
  ``--pooler-config`` and maps the score changes onto the policy's tokens;
  both: ``compute_score_batch`` then ``assemble_rm_scores``, per-token rewards on the policy's tokens (``rm_scores``);
* ``served prefix call``: the client's ``prefix_scores`` on the reward model's token ids of the same samples: the
  request alone, per-token scores back;
* ``/classify call``: the same token ids in one ``POST /classify`` to a second vLLM server with the model's default
  pooler (one vLLM server answers one pooling task): one score per sample, what verl's own reward loop asks for.

The servers run on vLLM's CPU backend, which takes one core for the model (``VLLM_CPU_OMP_THREADS_BIND``: core 0,
core 1 reserved); this process runs torch on one thread, so that both forwards get one core. Every path is checked
first: the served scores equal the in-process ones (1e-4). Reports samples per second (median over rounds) and the
ratios. Writes ``served.{json,md}`` into ``--out``.

Usage (verl in this environment, vLLM in another):
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
WORDS = (
    "the a movie plot was very good bad and but not it is don't it's i think acting really great awful story "
    "music ending café naïve 你好 电影 🙂"
).split()
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
    core.train_from_iterator(
        [text(rng, 12) for _ in range(2000)],
        trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=specials
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=specials[0], eos_token=specials[1])


def build(root: Path, args):
    """Policy tokenizer and reward model (with its own tokenizer and chat template) saved under ``root``."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    policy = byte_bpe(400, 1, ["<pad>", "<eos>"])
    rm_tok = byte_bpe(1000, 2, SPECIALS)
    rm_tok.chat_template = TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(rm_tok),
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=getattr(args, "kv_heads", args.hidden // 64),
        max_position_embeddings=2048,
        num_labels=1,
        pad_token_id=rm_tok.pad_token_id,
    )
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
    response_rows = [
        policy(" " + text(rng, rng.randint(response_words // 2, response_words)))["input_ids"] for _ in range(batch)
    ]
    P, R = max(map(len, prompt_rows)), max(map(len, response_rows))
    pad = policy.pad_token_id
    prompts = torch.full((batch, P), pad, dtype=torch.long)
    responses = torch.full((batch, R), pad, dtype=torch.long)
    prompt_mask = torch.zeros(batch, P, dtype=torch.long)
    response_mask = torch.zeros(batch, R, dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompt_rows, response_rows)):
        prompts[b, P - len(p) :] = torch.tensor(p)
        prompt_mask[b, P - len(p) :] = 1
        responses[b, : len(r)] = torch.tensor(r)
        response_mask[b, : len(r)] = 1
    raw_prompt = np.empty(batch, dtype=object)
    for b in range(batch):
        raw_prompt[b] = messages[b]
    data = DataProto.from_dict(
        tensors={
            "prompts": prompts,
            "responses": responses,
            "input_ids": torch.cat([prompts, responses], 1),
            "attention_mask": torch.cat([prompt_mask, response_mask], 1),
        },
        non_tensors={"raw_prompt": raw_prompt},
    )
    texts = [policy.decode(r, skip_special_tokens=True) for r in response_rows]
    return data, messages, texts


def rm_rows(rm_tok, messages, responses):
    """The reward model's token ids of each rendered conversation, as the managers build them."""
    from dense_rlhf.align import render_and_tokenize

    return [row["input_ids"] for row in render_and_tokenize(rm_tok, messages, responses).rows]


def verl_config(policy_dir: Path, rm_dir: Path, batch: int, manager: str):
    import verl
    from hydra import compose, initialize_config_dir

    from dense_rlhf.integrations.verl import MODULE_PATH

    overrides = [
        "reward.reward_manager.source=importlib",
        f"reward.reward_manager.module.path={MODULE_PATH}",
        f"reward.reward_manager.name={manager}",
        f"reward.custom_reward_function.path={MODULE_PATH}",
        "reward.custom_reward_function.name=compute_score",
        "reward.reward_model.enable=True",
        "reward.reward_model.enable_resource_pool=False",
        f"reward.reward_model.model_path={rm_dir}",
        "reward.reward_model.rollout.name=vllm",
        f"+reward.reward_kwargs.batch_size={batch}",
        f"actor_rollout_ref.model.path={policy_dir}",
    ]
    if manager.startswith("Served"):
        overrides.append(
            "+reward.reward_model.rollout.engine_kwargs.vllm.pooler_config={task:token_classify,use_activation:false}"
        )
    if manager == "ServedABCRewardManager":
        overrides.append(
            "+reward.reward_model.rollout.engine_kwargs.vllm.hf_overrides={architectures:[ABCLlamaForSequenceClassification]}"
        )
    with initialize_config_dir(
        config_dir=os.path.join(os.path.dirname(verl.__file__), "trainer", "config"), version_base=None
    ):
        return compose(config_name="ppo_trainer", overrides=overrides)


async def classify(url: str, model: str, rows):
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/classify", json={"model": model, "input": rows, "use_activation": False}) as r:
            reply = await r.json()
            if r.status != 200:
                raise RuntimeError(f"/classify answered {r.status}: {reply}")
    return torch.tensor([item["probs"][0] for item in sorted(reply["data"], key=lambda d: d["index"])])


ABC, SERVED, CALL, CLASSIFY = (
    "ABC manager (reward model in the worker)",
    "served prefix manager",
    "served prefix call",
    "/classify call",
)


def measure(args, root: Path) -> tuple[list[dict], dict]:
    from verl.experimental.reward_loop import RewardLoopWorker

    from dense_rlhf.integrations.vllm import ServedRewardModel
    from dense_rlhf.integrations.vllm_server import CPU_ARGS, LocalVLLMServer

    policy, rm_tok, model = build(root, args)
    # no prefix cache: every round scores new samples, as training does; a cache would let /classify (which needs
    # only the last position's hidden state) skip what an earlier identical request computed
    flags = [*CPU_ARGS[:2], "--max-model-len", "2048", *CPU_ARGS[4:], "--no-enable-prefix-caching"]
    servers = [
        LocalVLLMServer(
            root / "rm", python=args.vllm_python, token_classify=flag, args=flags, log_path=root / f"vllm-{name}.log"
        )
        for flag, name in ((True, "token"), (False, "plain"))
    ]
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait()
        print(f"servers answered after {servers[0].started_s:.0f} s and {servers[1].started_s:.0f} s", flush=True)
        abc = RewardLoopWorker(verl_config(root / "policy", root / "rm", args.batch, "ABCRewardManager"))
        served = RewardLoopWorker(
            verl_config(root / "policy", root / "rm", args.batch, "ServedPrefixRewardManager"),
            servers[0].url.removeprefix("http://"),
        )
        batches = []  # a new batch of samples for every round (and one for the check)
        for seed in range(args.rounds + 1):
            data, messages, responses = trainer_batch(abc.input_tokenizer, args.batch, args.response_words, seed)
            batches.append((data, rm_rows(rm_tok, messages, responses)))
        client = ServedRewardModel(servers[0].url, timeout=600)
        model_name = str(root / "rm")

        def manager(worker, data):
            outputs = asyncio.run(worker.compute_score_batch(data))
            return type(worker.reward_manager).assemble_rm_scores(data, [o["reward_score"] for o in outputs])

        paths = {
            ABC: lambda data, rows: manager(abc, data),
            SERVED: lambda data, rows: manager(served, data),
            CALL: lambda data, rows: client.prefix_scores(rows),
            CLASSIFY: lambda data, rows: asyncio.run(classify(servers[1].url, model_name, rows)),
        }
        # every path once, checked: the same scores from the same weights
        data, rows = batches[0]
        abc_scores, served_scores = paths[ABC](data, rows).sum(1), paths[SERVED](data, rows).sum(1)
        call_scores = torch.stack([row[-1] for row in paths[CALL](data, rows)])
        scalar = paths[CLASSIFY](data, rows)
        for got in (served_scores, call_scores, scalar):
            torch.testing.assert_close(got, abc_scores, atol=1e-4, rtol=1e-4)
        times: dict[str, list[float]] = {name: [] for name in paths}
        for data, rows in batches[1:]:
            for name, fn in paths.items():
                start = time.perf_counter()
                fn(data, rows)
                times[name].append(time.perf_counter() - start)
        response_tokens = [
            float(d.batch["attention_mask"][:, -d.batch["responses"].shape[1] :].sum(1).float().mean())
            for d, _ in batches[1:]
        ]
        every = [row for _, batch_rows in batches[1:] for row in batch_rows]
        meta = {
            "rm_tokens_per_sample": round(sum(map(len, every)) / len(every), 1),
            "response_tokens_per_sample": round(statistics.mean(response_tokens), 1),
            "params": sum(p.numel() for p in model.parameters()),
            "server_start_s": [round(s.started_s, 1) for s in servers],
        }
    finally:
        for server in servers:
            server.stop()
    out = []
    for name, ts in times.items():
        median = statistics.median(ts)
        out.append({"path": name, "median_s": median, "samples_per_s": args.batch / median, "times_s": ts})
    return out, meta


def round_ratios(rows: list[dict], fast: str, slow: str) -> list[float]:
    """Per round, how many times faster ``fast`` ran than ``slow`` (the same batch, one after the other)."""
    times = {r["path"]: r["times_s"] for r in rows}
    return [s / f for f, s in zip(times[fast], times[slow])]


def markdown(rows: list[dict], meta: dict) -> str:
    speed = {r["path"]: r["samples_per_s"] for r in rows}
    lines = [
        "# Served prefix-difference rewards beside ABC in verl's worker and beside /classify (CPU)",
        "",
        f"Command: `{meta['command']}`. {meta['machine']}; torch {meta['torch']} (1 thread here, 1 core for the vLLM "
        f"engine), vLLM {meta['vllm']}. Reward model: Llama-style, {meta['params'] / 1e6:.1f}M parameters, float32; "
        f"a batch of {meta['batch']} chat samples, {meta['response_tokens_per_sample']} policy response tokens and "
        f"{meta['rm_tokens_per_sample']} reward-model tokens per sample on average. Median over {meta['rounds']} "
        "rounds, a new batch each round, paths interleaved; the servers run without a prefix cache and started in "
        + " and ".join(f"{s} s" for s in meta["server_start_s"])
        + ".",
        "",
        "| path | median per batch (ms) | samples/s |",
        "|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['path']} | {r['median_s'] * 1e3:.1f} | {r['samples_per_s']:.1f} |")
    served, call = round_ratios(rows, SERVED, ABC), round_ratios(rows, CALL, CLASSIFY)
    lines += [
        "",
        f"Served prefix manager over the ABC manager (reward model in the worker): "
        f"{speed[SERVED] / speed[ABC]:.2f}x samples per second (per round {min(served):.2f}-{max(served):.2f}x). "
        "Served prefix call (per-token scores) over the /classify call (one score per sample) on the same ids: "
        f"{speed[CALL] / speed[CLASSIFY]:.2f}x (per round {min(call):.2f}-{max(call):.2f}x).",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vllm-python", required=True, help="a Python with vLLM (e.g. .venv-vllm/bin/python)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--response-words", type=int, default=120, help="longest response, in words (shortest: half)")
    p.add_argument("--hidden", type=int, default=512, help="reward model width (heads of 64)")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", default="benchmarks/results/cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    probe = (
        "import importlib.metadata as m\nfor d in ('vllm', 'vllm-cpu'):\n    try:\n        print(m.version(d))\n"
        "        break\n    except m.PackageNotFoundError:\n        pass"
    )
    vllm = subprocess.run([args.vllm_python, "-c", probe], capture_output=True, text=True).stdout.strip() or "?"
    with tempfile.TemporaryDirectory() as tmp:
        rows, meta = measure(args, Path(tmp))
    command = "python benchmarks/bench_served.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta.update(
        command=command.rstrip(),
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
        torch=torch.__version__,
        vllm=vllm,
        batch=args.batch,
        rounds=args.rounds,
    )
    for r in rows:
        print(f"{r['path']}: {r['median_s'] * 1e3:.1f} ms per batch, {r['samples_per_s']:.1f} samples/s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "served.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "served.md").write_text(markdown(rows, meta))
    print(f"wrote {out / 'served.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
