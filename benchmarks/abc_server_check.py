"""The ABC plugin on one vLLM server against transformers' eager attention: a random Llama-style reward model with
grouped-query attention served with ``ABCLlamaForSequenceClassification``, a batch of very different lengths, the
served attention rows and scores beside the ones captured from the same weights in transformers (eager attention,
``dense_rlhf.capture_reward_attention``). Prints the largest differences and exits 1 beyond the tolerance.

``benchmarks/gpu_check.sh`` runs it on a GPU in bfloat16 (CUDA graphs on, vLLM's default model runner and then
``VLLM_USE_V2_MODEL_RUNNER=0``); on the CPU backend it runs in float32 (``--device cpu``). The vLLM Python must have
dense-rlhf installed (the plugin's entry point).

Usage: ``python benchmarks/abc_server_check.py --vllm-python PY [--device cuda --dtype bfloat16]``
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

import torch

LENGTHS = (1, 7, 64, 300, 700)


def word_tokenizer(vocab_size: int):
    """A tokenizer whose token i is the word ``t<i>`` (the check sends token ids; the server wants a tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t1"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="t0", unk_token="t1")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vllm-python", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tolerance", type=float, default=None, help="largest row difference (default by dtype)")
    p.add_argument("--vllm-args", default="", help='further server flags, e.g. "--tensor-parallel-size 2"')
    args = p.parse_args(argv)
    from transformers import LlamaConfig, LlamaForSequenceClassification

    import dense_rlhf
    from dense_rlhf.integrations.vllm import ServedRewardModel, abc_hf_overrides
    from dense_rlhf.integrations.vllm_server import LocalVLLMServer

    tolerance = args.tolerance or (1e-4 if args.dtype == "float32" else 3e-2)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        num_labels=1,
        pad_token_id=0,
    )
    model = LlamaForSequenceClassification(config).eval()
    with torch.no_grad():  # attention rows far from uniform, a visible score
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
        model.score.weight.mul_(10.0)
    rows = [torch.randint(1, 1000, (n,)).tolist() for n in LENGTHS]
    flags = ["--dtype", args.dtype, "--max-model-len", "1024", "--hf-overrides", abc_hf_overrides()]
    if args.device == "cpu":
        flags += ["--enforce-eager", "--gpu-memory-utilization", "0.1", "--distributed-executor-backend", "uni"]
    else:
        flags += ["--gpu-memory-utilization", "0.2"]
    flags += shlex.split(args.vllm_args)  # after the defaults: vLLM takes a flag's last value
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "rm")
        word_tokenizer(config.vocab_size).save_pretrained(Path(tmp) / "rm")  # vLLM loads one; ids are sent
        with LocalVLLMServer(
            Path(tmp) / "rm", python=args.vllm_python, args=flags, log_path=Path(tmp) / "vllm.log"
        ) as server:
            client = ServedRewardModel(server.url, timeout=300)
            served_rows, served_scores = client.attention_rows(rows), client.prefix_scores(rows)
    reference = model.to(device=args.device, dtype=getattr(torch, args.dtype))
    reference.config._attn_implementation = "eager"
    worst_row = worst_score = 0.0
    for row, got, scores in zip(rows, served_rows, served_scores):
        ids = torch.tensor([row], device=args.device)
        with torch.no_grad(), dense_rlhf.capture_reward_attention(reference) as cap:
            out = reference(input_ids=ids)
        want = cap.rows.float().mean(1)[0].cpu()
        worst_row = max(worst_row, float((got - want).abs().max()))
        worst_score = max(worst_score, abs(float(scores[-1]) - float(out.logits[0, 0])))
        print(
            f"length {len(row)}: row max |diff| {float((got - want).abs().max()):.2e} (largest weight "
            f"{float(want.max()):.3f}), score {float(scores[-1]):.4f} vs {float(out.logits[0, 0]):.4f}"
        )
    ok = worst_row <= tolerance and worst_score <= max(tolerance * 10, 1e-4)
    print(
        f"ABC SERVER CHECK ({args.dtype}, {args.device}): rows max |diff| {worst_row:.2e}, scores {worst_score:.2e}, "
        f"tolerance {tolerance:g}: {'ok' if ok else 'FAILED'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
