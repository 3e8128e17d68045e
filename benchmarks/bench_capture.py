"""Benchmark: reward-model forward with plain SDPA, SDPA + capture_reward_attention, and eager attention
with output_attentions=True (what the public ABC code does).

A Llama-style reward model of about 100M parameters (random weights, built from a config, no download),
B=8, L in {512, 2048}; half of the rows are right-padded by L/8 tokens so that the padding mask is used.
Every measurement runs in its own subprocess:

* time: plain SDPA and SDPA + capture alternate in one process (after one warm-up each), so that drifts in
  machine load hit both equally; median of the repetitions. Eager runs in its own process.
* memory: one process per (method, L): after building the model and inputs the kernel's peak-RSS counter
  is reset (/proc/self/clear_refs), one forward runs, and VmHWM is read: the forward's peak RSS, process
  total, including the model. The forward's own increment over the RSS before it is also reported.

Usage:  python benchmarks/bench_capture.py [--lengths 512 2048] [--reps 5] [--out benchmarks/results/cpu]

``--text-path`` measures instead what the text path costs: ``score_and_densify_text`` (decode the policy's
responses, render the reward model's chat template, tokenise with offsets, capture, project onto the policy's
tokens) against ``score_and_densify`` on the reward model's token ids of the very same input, with the same
~100M-parameter reward model, B=8, reward-model inputs of up to L tokens (half of the rows L/8 shorter). The two
tokenizers are trained here on generated text: a byte-level BPE for the policy and a SentencePiece-style BPE with
byte fallback and a chat template for the reward model. Written to ``capture_text.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

BATCH = 8
CONFIG = dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=4,
    max_position_embeddings=4096,
    pad_token_id=0,
    num_labels=1,
)
MEMORY_BUDGET_FRACTION = 0.6  # skip a run whose attention maps alone are projected above this share of RAM


def _build(attn: str, length: int, batch: int):
    _, ids, mask = _build_inputs(length, batch)
    return _model(attn), ids, mask


def _model(attn: str):
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    return LlamaForSequenceClassification(LlamaConfig(**CONFIG, attn_implementation=attn)).eval()


def _build_inputs(length: int, batch: int):
    import torch

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, CONFIG["vocab_size"], (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[::2, length - length // 8 :] = 0
    ids[mask == 0] = CONFIG["pad_token_id"]
    return None, ids, mask


def _forward(method: str, model, ids, mask):
    import torch

    import dense_rlhf

    with torch.inference_mode():
        if method == "sdpa":
            return model(input_ids=ids, attention_mask=mask).logits
        if method == "capture":
            with dense_rlhf.capture_reward_attention(model) as cap:
                logits = model(input_ids=ids, attention_mask=mask).logits
            _ = cap.rows  # reading the rows is part of what the capture costs
            return logits
        if method == "eager":
            out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
            assert len(out.attentions) == CONFIG["num_hidden_layers"]
            return out.logits
    raise ValueError(method)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def worker_time(methods: list[str], length: int, reps: int, batch: int) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    from dense_rlhf import capture

    attn = "eager" if methods == ["eager"] else "sdpa"
    model, ids, mask = _build(attn, length, batch)
    times = {m: [] for m in methods}
    cpu_times = {m: [] for m in methods}
    logits = {}
    observe_times = []  # seconds spent computing the rows inside each captured forward
    original_observe = capture.RewardAttentionCapture._observe

    def timed_observe(self, *args):
        start = time.perf_counter()
        original_observe(self, *args)
        observe_times[-1] += time.perf_counter() - start

    capture.RewardAttentionCapture._observe = timed_observe
    for m in methods:  # warm-up
        observe_times.append(0.0)
        logits[m] = _forward(m, model, ids, mask)
    observe_times.clear()
    for _ in range(reps):
        for m in methods:
            if m == "capture":
                observe_times.append(0.0)
            start, cpu_start = time.perf_counter(), time.process_time()
            _forward(m, model, ids, mask)
            times[m].append(time.perf_counter() - start)
            cpu_times[m].append(time.process_time() - cpu_start)
    capture.RewardAttentionCapture._observe = original_observe
    result = {"times_s": times, "cpu_times_s": cpu_times}
    if "capture" in methods:
        result["capture_rows_s"] = observe_times
        enter_exit = []
        for _ in range(20):
            start = time.perf_counter()
            with capture.capture_reward_attention(model):
                pass
            enter_exit.append(time.perf_counter() - start)
        result["capture_enter_exit_s"] = enter_exit
    if "sdpa" in logits and "capture" in logits:
        result["logits_identical"] = bool(torch.equal(logits["sdpa"], logits["capture"]))
    return result


def worker_memory(method: str, length: int, batch: int) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    model, ids, mask = _build("eager" if method == "eager" else "sdpa", length, batch)
    import dense_rlhf  # noqa: F401  (imported before the reset, as in the other methods)

    before = _status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    _forward(method, model, ids, mask)
    peak = _status("VmHWM")
    return {
        "rss_before_bytes": before,
        "peak_rss_bytes": peak,
        "forward_increment_bytes": peak - before,
        "peak_reset": reset,
    }


def worker_rows(length: int, batch: int) -> dict:
    """The capture's own work in isolation, on tensors of the benchmark's shapes: time of the row computation
    (1 thread and all threads) and the bytes of every tensor it creates (a bound on its extra memory)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    from dense_rlhf.capture.rows import _reward_rows

    heads, kv_heads = CONFIG["num_attention_heads"], CONFIG["num_key_value_heads"]
    dim = CONFIG["hidden_size"] // heads
    torch.manual_seed(0)
    q, k = torch.randn(batch, heads, length, dim), torch.randn(batch, kv_heads, length, dim)
    _, _, pad = _build_inputs(length, batch)
    mask = sdpa_mask(
        batch_size=batch,
        q_length=length,
        kv_length=length,
        mask_function=causal_mask_function,
        attention_mask=pad.bool(),
        allow_is_causal_skip=False,
    )
    index = (torch.arange(length) * pad).argmax(-1)

    def rows():
        return _reward_rows(
            q,
            k,
            mask,
            index,
            kind="sdpa",
            scaling=dim**-0.5,
            causal=True,
            sliding_window=None,
            softcap=None,
            position_bias=None,
        )

    created = []

    class Bytes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            shared = {a.untyped_storage().data_ptr() for a in inputs}
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in shared:
                    created.append(t.untyped_storage().nbytes())  # new storage, not a view of an input
            return out

    with Bytes():
        rows()
    result = {"created_bytes": sum(created), "rows_bytes": batch * heads * length * 4}
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        times = []
        for _ in range(25):
            start = time.perf_counter()
            rows()
            times.append(time.perf_counter() - start)
        result[f"median_s_{threads}_threads"] = statistics.median(times)
    return result


# ----------------------------------------------------------------------------------------- the text path

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] | trim }}<|end|>\n{% endfor %}"


def _text_corpus(seed: int, n: int) -> list[str]:
    """Generated prose: made-up words of two to four syllables, some accented, CJK or emoji words, punctuation."""
    import random

    rng = random.Random(seed)
    syllables = ["ka", "lo", "ven", "tri", "mar", "so", "qui", "ber", "na", "dol", "esh", "ump", "ri", "ta", "gon"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(3000)]
    words += ["café", "naïve", "über", "façade", "déjà", "señor", "你好", "世界", "电影", "🙂", "🚀", "👍🏽"]
    out = []
    for _ in range(n):
        sentence = [rng.choice(words) for _ in range(rng.randint(6, 18))]
        out.append(" ".join(sentence) + rng.choice([".", ",", "!", "?"]))
    return out


def _text_tokenizers():
    """(policy tokenizer, reward-model tokenizer), both fast tokenizers trained here on generated text."""
    import json as json_

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = _text_corpus(0, 20000)
    policy = Tokenizer(models.BPE())
    policy.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    policy.decoder = decoders.ByteLevel()
    policy.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=8000,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=["<|pad|>", "<|endoftext|>"],
            show_progress=False,
        ),
    )
    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    base.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=6000,
            special_tokens=["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"],
            show_progress=False,
        ),
    )
    state = json_.loads(base.to_str())
    for byte in range(256):
        state["model"]["vocab"].setdefault(f"<0x{byte:02X}>", len(state["model"]["vocab"]))
    state["model"]["byte_fallback"] = True
    rm = Tokenizer.from_str(json_.dumps(state))
    rm.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    rm.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", rm.token_to_id("<s>"))])
    policy_tok = PreTrainedTokenizerFast(tokenizer_object=policy, pad_token="<|pad|>", eos_token="<|endoftext|>")
    rm_tok = PreTrainedTokenizerFast(
        tokenizer_object=rm, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    rm_tok.chat_template = CHAT_TEMPLATE
    assert len(rm_tok) <= CONFIG["vocab_size"] and rm_tok.pad_token_id == CONFIG["pad_token_id"]
    return policy_tok, rm_tok


def _text_batch(policy_tok, rm_tok, length: int, batch: int):
    """Chat prompts and the policy's [B, R] response ids (EOS included), sized so that the reward model's input
    is ``length`` tokens for even rows and about ``length - length // 8`` for odd rows; and the same batch as the
    reward model's token ids with a completion mask (its tokens that overlap the response), for the ids path."""
    import torch

    texts = iter(_text_corpus(1, 100000))
    prompts, responses = [], []
    for b in range(batch):
        target = length - (length // 8 if b % 2 else 0)
        prompt = " ".join(next(texts) for _ in range(3))
        messages = [{"role": "user", "content": prompt}]
        response = ""
        while True:
            candidate = (response + " " + next(texts)).strip()
            rendered = rm_tok.apply_chat_template(
                messages + [{"role": "assistant", "content": candidate}], tokenize=False
            )
            if len(rm_tok(rendered, add_special_tokens=False)["input_ids"]) > target:
                break
            response = candidate
        prompts.append(messages)
        responses.append(response)
    rows = [policy_tok(r, add_special_tokens=False)["input_ids"] + [policy_tok.eos_token_id] for r in responses]
    width = max(map(len, rows))
    response_ids = torch.full((batch, width), policy_tok.pad_token_id, dtype=torch.long)
    for b, row in enumerate(rows):
        response_ids[b, : len(row)] = torch.tensor(row)

    rendered = [
        rm_tok.apply_chat_template(p + [{"role": "assistant", "content": r}], tokenize=False)
        for p, r in zip(prompts, responses)
    ]
    encoded = rm_tok(rendered, add_special_tokens=False, return_offsets_mapping=True, padding=True, return_tensors="pt")
    completion = torch.zeros(encoded["input_ids"].shape, dtype=torch.bool)
    for b, (text, response) in enumerate(zip(rendered, responses)):
        start = text.rindex(response)
        offsets = encoded["offset_mapping"][b]
        completion[b] = (offsets[:, 0] < start + len(response)) & (offsets[:, 1] > start)
    return prompts, response_ids, encoded["input_ids"], encoded["attention_mask"], completion


def worker_text(length: int, reps: int, batch: int) -> dict:
    """Alternating score_and_densify (ids) and score_and_densify_text on the same reward-model input; the forward's
    own time inside each call is taken with hooks, so the rest is each path's own work."""
    import torch

    import dense_rlhf

    torch.set_num_threads(os.cpu_count() or 1)
    model = _model("sdpa")
    policy_tok, rm_tok = _text_tokenizers()
    prompts, response_ids, ids, mask, completion = _text_batch(policy_tok, rm_tok, length, batch)
    forward = []
    model.register_forward_pre_hook(lambda *a: forward.append(-time.perf_counter()))
    model.register_forward_hook(lambda *a: forward.__setitem__(-1, forward[-1] + time.perf_counter()))

    def ids_path():
        return dense_rlhf.score_and_densify(model, ids, mask, completion)

    def text_path():
        return dense_rlhf.score_and_densify_text(model, rm_tok, prompts, response_ids, policy_tokenizer=policy_tok)

    scores_ids, rewards_ids = ids_path()  # warm-up, and the two paths read the same input
    scores_text, rewards_text = text_path()
    result = {
        "rm_lengths": mask.sum(1).tolist(),
        "response_tokens": (response_ids != policy_tok.pad_token_id).sum(1).tolist(),
        "scores_identical": bool(torch.equal(scores_ids, scores_text)),
        "rows_sum_to_score": bool(torch.allclose(rewards_text.sum(1), scores_text, atol=1e-5)),
        "times_s": {"ids": [], "text": []},
        "forward_s": {"ids": [], "text": []},
    }
    for _ in range(reps):
        for name, call in (("ids", ids_path), ("text", text_path)):
            forward.clear()
            start = time.perf_counter()
            with torch.inference_mode():
                call()
            result["times_s"][name].append(time.perf_counter() - start)
            result["forward_s"][name].append(sum(forward))
    # each path's work outside the model's forward: for the text path decode, render, tokenise, project
    for name in ("ids", "text"):
        result[f"{name}_own_s"] = [t - f for t, f in zip(result["times_s"][name], result["forward_s"][name])]
    return result


def _write_text(results: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "capture_text.json"), "w") as f:
        json.dump(results, f, indent=2)
    m = results["machine"]
    lines = [
        "# Text path: score_and_densify_text against score_and_densify on token ids (CPU)",
        "",
        f"Reward model: the Llama-style ~100M-parameter config of `capture.md` (random weights), B={BATCH}. The text "
        "path decodes the policy's responses (byte-level BPE, EOS included), renders the reward model's chat "
        "template (SentencePiece-style BPE with byte fallback, trained here on generated text), tokenises with "
        "offsets, runs the model inside the capture, projects its row onto the policy's tokens and calls "
        "dense_rewards; the ids path is score_and_densify on the reward model's ids of the same rendered text. "
        f"Machine: {m['cpus']} CPUs (shared), torch {m['torch']}, transformers {m['transformers']}.",
        "",
        f"Command: `{results['command'].strip()}`",
        "",
        "| L (max RM tokens) | ids path median (s) | text path median (s) | text / ids, paired median | "
        "text path's extra work outside the forward (ms) | of the ids call |",
        "|---|---|---|---|---|---|",
    ]
    notes = []
    for row in results["runs"]:
        data = row["text_path"]
        if "error" in data:
            lines.append(f"| {row['L']} | error: {data['error']} | | | | |")
            continue
        t_ids, t_text = statistics.median(data["times_s"]["ids"]), statistics.median(data["times_s"]["text"])
        ratios = [t / i for i, t in zip(data["times_s"]["ids"], data["times_s"]["text"])]
        own = statistics.median(data["text_own_s"]) - statistics.median(data["ids_own_s"])
        lines.append(
            f"| {row['L']} | {t_ids:.2f} | {t_text:.2f} | {statistics.median(ratios):.3f} | "
            f"{own * 1e3:.1f} | {own / t_ids * 100:.2f}% |"
        )
        notes.append(
            f"- L={row['L']}: paired ratios {', '.join(f'{r:.3f}' for r in ratios)}; reward-model input "
            f"lengths {data['rm_lengths']}, policy response tokens {data['response_tokens']}; scores "
            f"identical on both paths: {data['scores_identical']}; text-path rows sum to the score: "
            f"{data['rows_sum_to_score']}; forward medians inside the calls "
            f"{statistics.median(data['forward_s']['ids']):.2f} s (ids) and "
            f"{statistics.median(data['forward_s']['text']):.2f} s (text)"
        )
    lines += ["", "Target: the text path adds at most 5% to the call.", ""]
    for row in results["runs"]:
        data = row["text_path"]
        if "error" not in data:
            own = (
                (statistics.median(data["text_own_s"]) - statistics.median(data["ids_own_s"]))
                / statistics.median(data["times_s"]["ids"])
                * 100
            )
            ratio = statistics.median(t / i for i, t in zip(data["times_s"]["ids"], data["times_s"]["text"]))
            verdict = "met" if own <= 5 and ratio <= 1.05 else "NOT met"
            lines.append(
                f"- L={row['L']}: extra work {own:.2f}% of the ids call, paired wall-time ratio {ratio:.3f}: {verdict}"
            )
    lines += ["", "Details:", ""] + notes
    with open(os.path.join(out, "capture_text.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _run_worker(args: list[str], timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", *args]
    env = dict(os.environ)
    if args[0] == "mem":
        # A fixed mmap threshold: glibc then serves every allocation of 64 KiB or more with mmap and unmaps it
        # on free, so RSS follows the live tensors instead of heap fragmentation and its dynamic threshold.
        env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-800:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median_memory(runs: list[dict]) -> dict:
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[0]
    return {
        key: statistics.median(r[key] for r in good)
        for key in ("rss_before_bytes", "peak_rss_bytes", "forward_increment_bytes")
    }


def _portable(arg: str) -> str:
    """Command-line arguments as paths relative to the repository, so that results name no machine paths."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isabs(arg) and os.path.abspath(arg).startswith(root + os.sep):
        return os.path.relpath(arg, root)
    return arg


def _eager_projection_bytes(length: int, batch: int) -> int:
    maps = CONFIG["num_hidden_layers"] * batch * CONFIG["num_attention_heads"] * length * length * 4
    return maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions for L <= 512")
    parser.add_argument("--reps-long", type=int, default=3, help="timed repetitions for L > 512")
    parser.add_argument("--eager-reps-long", type=int, default=1)
    parser.add_argument("--memory-reps", type=int, default=2, help="peak-RSS processes per (method, L)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu"))
    parser.add_argument("--worker", nargs="*")
    parser.add_argument("--render", action="store_true", help="only rewrite capture.md from capture.json in --out")
    parser.add_argument(
        "--text-path",
        action="store_true",
        help="measure score_and_densify_text against score_and_densify instead (capture_text.*)",
    )
    args = parser.parse_args()

    if args.render:
        with open(os.path.join(args.out, "capture.json")) as f:
            _write(json.load(f), args.out)
        return

    if args.worker is not None:
        kind, *rest = args.worker
        if kind == "time":
            methods, length, reps, batch = rest[0].split(","), int(rest[1]), int(rest[2]), int(rest[3])
            print(json.dumps(worker_time(methods, length, reps, batch)))
        elif kind == "rows":
            print(json.dumps(worker_rows(int(rest[0]), int(rest[1]))))
        elif kind == "text":
            print(json.dumps(worker_text(int(rest[0]), int(rest[1]), int(rest[2]))))
        else:
            print(json.dumps(worker_memory(rest[0], int(rest[1]), int(rest[2]))))
        return

    import torch
    import transformers

    total_ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    results = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "ram_bytes": total_ram,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "config": {**CONFIG, "batch": BATCH, "padding": "rows 0,2,4,6 right-padded by L/8"},
        "command": "python benchmarks/bench_capture.py " + " ".join(_portable(a) for a in sys.argv[1:]),
        "notes": [],
        "runs": [],
    }
    if args.text_path:
        for length in args.lengths:
            print(
                f"L={length}: timing score_and_densify vs score_and_densify_text ({args.reps} reps, alternating)",
                flush=True,
            )
            results["runs"].append(
                {
                    "L": length,
                    "batch": BATCH,
                    "text_path": _run_worker(["text", str(length), str(args.reps), str(BATCH)], 3600),
                }
            )
            _write_text(results, args.out)
        return
    for length in args.lengths:
        reps = args.reps if length <= 512 else args.reps_long
        row = {"L": length, "batch": BATCH}
        print(f"L={length}: the capture's row computation in isolation", flush=True)
        row["rows_isolated"] = _run_worker(["rows", str(length), str(BATCH)], 600)
        print(f"L={length}: timing sdpa vs capture ({reps} reps, alternating)", flush=True)
        row["time_sdpa_capture"] = _run_worker(["time", "sdpa,capture", str(length), str(reps), str(BATCH)], 3600)
        for repeat in range(args.memory_reps):  # interleaved, one process each
            for method in ("sdpa", "capture"):
                print(f"L={length}: memory {method} ({repeat + 1}/{args.memory_reps})", flush=True)
                row.setdefault(f"memory_{method}_all", []).append(
                    _run_worker(["mem", method, str(length), str(BATCH)], 1800)
                )
        for method in ("sdpa", "capture"):
            row[f"memory_{method}"] = _median_memory(row[f"memory_{method}_all"])

        projected = _eager_projection_bytes(length, BATCH)
        if projected > MEMORY_BUDGET_FRACTION * total_ram:
            note = (
                f"L={length}: eager + output_attentions at B={BATCH} skipped: its attention maps alone would take "
                f"{projected / 2**30:.1f} GiB of {total_ram / 2**30:.1f} GiB RAM; measured at B=1 instead, "
                "the maps scale linearly in B"
            )
            results["notes"].append(note)
            print(note, flush=True)
            eager_batch, eager_reps = 1, args.eager_reps_long
        else:
            eager_batch, eager_reps = BATCH, (reps if length <= 512 else args.eager_reps_long)
        if eager_reps < reps:
            results["notes"].append(f"L={length}: eager timed with {eager_reps} repetition(s), to keep the run short")
        row["eager_batch"] = eager_batch
        print(f"L={length}: timing eager (B={eager_batch}, {eager_reps} reps)", flush=True)
        row["time_eager"] = _run_worker(["time", "eager", str(length), str(eager_reps), str(eager_batch)], 3600)
        print(f"L={length}: memory eager (B={eager_batch})", flush=True)
        row["memory_eager"] = _run_worker(["mem", "eager", str(length), str(eager_batch)], 3600)
        results["runs"].append(row)
        _write(results, args.out)
    _write(results, args.out)


def _median(row, key, method, field="times_s"):
    data = row.get(key, {})
    times = data.get(field, {}).get(method)
    return statistics.median(times) if times else None


def _rel(value, base, percent_digits=1):
    return f"{(value / base - 1) * 100:+.{percent_digits}f}%" if value and base else "n/a"


def _write(results: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "capture.json"), "w") as f:
        json.dump(results, f, indent=2)
    gib = 2**30
    m = results["machine"]
    lines = [
        "# Reward-position attention capture: CPU benchmark",
        "",
        f"Reward-model forward, Llama-style config of ~100M parameters (12 layers, hidden 768, 12 query heads, "
        f"4 kv heads, random weights), B={BATCH}, half of the rows right-padded by L/8. Machine: {m['cpus']} CPUs, "
        f"{m['ram_bytes'] / gib:.0f} GiB RAM (shared with other jobs while measuring), torch {m['torch']}, "
        f"transformers {m['transformers']}.",
        "",
        f"Command: `{results['command'].strip()}`",
        "",
        "Time: median wall and CPU (process) seconds per forward; plain SDPA and SDPA+capture alternate in one "
        "process. Peak RSS: VmHWM of a separate process per (method, L), reset just before the forward "
        "(process total, model included; median over the processes, glibc's mmap threshold fixed at 64 KiB); "
        "'forward +' is the peak minus the RSS before the forward.",
        "",
        "| L | method | B | wall median (s) | wall vs SDPA | CPU median (s) | CPU vs SDPA | peak RSS (GiB) "
        "| peak vs SDPA | forward + (GiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["runs"]:
        base_t = _median(row, "time_sdpa_capture", "sdpa")
        base_c = _median(row, "time_sdpa_capture", "sdpa", "cpu_times_s")
        base_m = row.get("memory_sdpa", {}).get("peak_rss_bytes")
        for method, tkey, label in (
            ("sdpa", "time_sdpa_capture", "SDPA"),
            ("capture", "time_sdpa_capture", "SDPA + capture"),
            ("eager", "time_eager", "eager + output_attentions"),
        ):
            batch = row["eager_batch"] if method == "eager" else row["batch"]
            same_batch = batch == row["batch"]
            t = _median(row, tkey, method)
            c = _median(row, tkey, method, "cpu_times_s")
            mem = row.get(f"memory_{method}", {})
            peak, inc = mem.get("peak_rss_bytes"), mem.get("forward_increment_bytes")
            err = row.get(tkey, {}).get("error") or mem.get("error")
            if err or not t or not peak:
                lines.append(f"| {row['L']} | {label} | {batch} | error: {err} | | | | | | |")
                continue
            lines.append(
                f"| {row['L']} | {label} | {batch} | {t:.2f} | {_rel(t, base_t) if same_batch else 'n/a'} | "
                f"{c:.2f} | {_rel(c, base_c) if same_batch else 'n/a'} | {peak / gib:.3f} | "
                f"{_rel(peak, base_m, 2) if same_batch else 'n/a'} | {inc / gib:.3f} |"
            )
    lines += ["", "Target: SDPA + capture at most 3% time and 2% peak memory over plain SDPA.", ""]
    for row in results["runs"]:
        t, base_t = _median(row, "time_sdpa_capture", "capture"), _median(row, "time_sdpa_capture", "sdpa")
        peak = row.get("memory_capture", {}).get("peak_rss_bytes")
        base_m = row.get("memory_sdpa", {}).get("peak_rss_bytes")
        if t and base_t and peak and base_m:
            dt, dm = (t / base_t - 1) * 100, (peak / base_m - 1) * 100
            verdict = "met" if dt <= 3 and dm <= 2 else "NOT met"
            lines.append(f"- L={row['L']}: time {dt:+.1f}%, peak RSS {dm:+.2f}%: {verdict}")
    lines += ["", "Paired comparison (each capture run against the SDPA run just before it, same load):", ""]
    for row in results["runs"]:
        times = row.get("time_sdpa_capture", {}).get("times_s", {})
        if times.get("sdpa") and times.get("capture"):
            ratios = [c / p for p, c in zip(times["sdpa"], times["capture"])]
            lines.append(
                f"- L={row['L']}: median capture/SDPA wall-time ratio {statistics.median(ratios):.3f} "
                f"(pairs: {', '.join(f'{r:.2f}' for r in ratios)})"
            )
    lines += ["", "The capture's own work:", ""]
    for row in results["runs"]:
        data = row.get("time_sdpa_capture", {})
        rows_s, enter_exit = data.get("capture_rows_s"), data.get("capture_enter_exit_s")
        iso = row.get("rows_isolated", {})
        base_t = _median(row, "time_sdpa_capture", "sdpa")
        if not (rows_s and enter_exit and base_t):
            continue
        line = (
            f"- L={row['L']}: inside the captured forwards the row computation took "
            f"{statistics.median(rows_s) * 1e3:.1f} ms (median) and enter+exit "
            f"{statistics.median(enter_exit) * 1e3:.2f} ms, together "
            f"{(statistics.median(rows_s) + statistics.median(enter_exit)) / base_t * 100:.2f}% of the SDPA forward"
        )
        single = iso.get("median_s_1_threads")
        if single is not None:
            others = {k: v for k, v in iso.items() if k.startswith("median_s_") and k != "median_s_1_threads"}
            line += (
                f"; in isolation on the same shapes {single * 1e3:.2f} ms with 1 thread"
                + "".join(f", {v * 1e3:.2f} ms with {k.split('_')[2]} threads" for k, v in others.items())
                + f". Tensors it creates: {iso['created_bytes'] / 2**20:.2f} MiB in all (the rows themselves "
                f"{iso['rows_bytes'] / 2**20:.2f} MiB), "
                f"{iso['created_bytes'] / row['memory_sdpa']['peak_rss_bytes'] * 100:.3f}% of SDPA's peak RSS"
            )
        lines.append(line + f"; logits identical with and without capture: {data.get('logits_identical')}")
    lines += ["", "Raw wall times (s):", ""]
    for row in results["runs"]:
        for key in ("time_sdpa_capture", "time_eager"):
            for method, times in row.get(key, {}).get("times_s", {}).items():
                lines.append(f"- L={row['L']} {method}: " + ", ".join(f"{x:.2f}" for x in times))
    if results["notes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in results["notes"]]
    with open(os.path.join(out, "capture.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
