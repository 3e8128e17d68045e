"""The SFT policy and the reward model of the sentiment task: build, train, cache.

Both are tiny GPT-2s with random initialisation (no hub): the policy a ``GPT2LMHeadModel`` fine-tuned on
roughly neutral reviews, the reward model a ``GPT2ForSequenceClassification`` (one logit, read at the
``[EOS]`` token) trained on Bradley-Terry preference pairs with trl's ``RewardTrainer``.

Trained models are cached under ``$DENSE_RLHF_CACHE`` (default ``~/.cache/dense-rlhf``) in a folder named
by a hash of their settings, so the demo and the experiment train them once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dense_rlhf.study import sentiment_task as task


@dataclass
class SetupConfig:
    """Everything that determines the trained SFT policy and reward model (their cache key)."""

    seed: int = 0
    """seeds the models' initialisation, their training data and their training"""
    completion_len: int = 20
    """completion tokens after the prompt, in the SFT data, the preference pairs and the rollouts"""
    n_embd: int = 64
    """the policy's hidden size"""
    n_layer: int = 2
    """the policy's layers"""
    n_head: int = 4
    """the policy's attention heads"""
    rm_n_embd: int = 64
    """the reward model's hidden size"""
    rm_n_layer: int = 1
    """the reward model's layers; ABC reads the last one (a 2-layer RM pools in layer 0, and its last layer's row
    carries little credit)"""
    rm_n_head: int = 4
    """the reward model's attention heads"""
    sft_texts: int = 20000
    """texts in the SFT data"""
    sft_steps: int = 1500
    """SFT optimiser steps"""
    sft_batch: int = 64
    """texts per SFT step"""
    sft_lr: float = 2e-3
    """SFT's peak learning rate (AdamW, warm-up then cosine)"""
    rm_pairs: int = 20000
    """preference pairs the reward model trains on"""
    rm_eval_pairs: int = 2000
    """held-out preference pairs the reward model is evaluated on"""
    rm_epochs: float = 2.0
    """the reward model's epochs over its pairs"""
    rm_batch: int = 64
    """pairs per reward-model step"""
    rm_lr: float = 1e-3
    """the reward model's peak learning rate (trl's RewardTrainer, cosine)"""
    bt_temperature: float = 1.0
    """the Bradley-Terry temperature of the preference labels: P(a > b) = sigmoid((s_a - s_b) / T)"""

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:12]


QUICK_SETUP = dict(sft_texts=6000, sft_steps=400, rm_pairs=6000, rm_eval_pairs=1000, rm_epochs=1.0)


def cache_root(override: str | os.PathLike | None = None) -> Path:
    """The local cache folder: the argument, else $DENSE_RLHF_CACHE, else ~/.cache/dense-rlhf."""
    if override:
        return Path(override)
    env = os.environ.get("DENSE_RLHF_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "dense-rlhf"


def n_positions(cfg: SetupConfig) -> int:
    """Learned positions of both models: the reward model's [BOS] + prompt + completion + [EOS], at least 64
    (the value every completion length up to 59 has used, so that their cached models stay valid)."""
    return max(64, task.PROMPT_LEN + cfg.completion_len + 1)


def _gpt2_config(
    n_embd: int,
    n_layer: int,
    n_head: int,
    positions: int,
    *,
    vocab_size: int,
    bos_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
    **extra,
):
    """A GPT-2 config of the given size with every dropout off (the study's models are tiny and deterministic)."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        **extra,
    )


def _codec_ids(codec: task.Codec) -> dict:
    return dict(
        vocab_size=codec.vocab_size, bos_token_id=codec.bos_id, eos_token_id=codec.eos_id, pad_token_id=codec.pad_id
    )


def new_policy(codec: task.Codec, cfg: SetupConfig):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(cfg.seed)
    config = _gpt2_config(cfg.n_embd, cfg.n_layer, cfg.n_head, n_positions(cfg), **_codec_ids(codec))
    return GPT2LMHeadModel(config)


def new_reward_model(codec: task.Codec, cfg: SetupConfig):
    from transformers import GPT2ForSequenceClassification

    torch.manual_seed(cfg.seed + 1)
    config = _gpt2_config(
        cfg.rm_n_embd, cfg.rm_n_layer, cfg.rm_n_head, n_positions(cfg), **_codec_ids(codec), num_labels=1
    )
    return GPT2ForSequenceClassification(config)


def train_sft(codec: task.Codec, cfg: SetupConfig, log=print):
    """Next-token cross-entropy on fixed-length [BOS] + prompt + completion blocks.

    A plain loop rather than trl's SFTTrainer: the data are already equal-length token blocks with no EOS
    (completions have a fixed length), which SFTTrainer's text pipeline would append.
    """
    policy = new_policy(codec, cfg)
    data = codec.encode(task.sft_texts(cfg.seed, cfg.sft_texts, cfg.completion_len))
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.sft_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.sft_steps) / cfg.sft_steps))
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    policy.train()
    for step in range(cfg.sft_steps):
        idx = torch.randint(0, data.shape[0], (cfg.sft_batch,), generator=gen)
        batch = data[idx]
        loss = policy(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        sched.step()
        if log and (step % 500 == 0 or step == cfg.sft_steps - 1):
            log(f"  sft step {step:5d}  loss {loss.item():.3f}")
    policy.eval()
    return policy


def _pairs_dataset(codec: task.Codec, chosen, rejected):
    from datasets import Dataset

    c = codec.encode(chosen, eos=True).tolist()
    r = codec.encode(rejected, eos=True).tolist()
    return Dataset.from_dict({"chosen_ids": c, "rejected_ids": r})


def train_reward_model(codec: task.Codec, cfg: SetupConfig, workdir: Path, log=print):
    """Bradley-Terry reward model trained with trl's RewardTrainer on pre-tokenised pairs.

    Returns the model and a dict of held-out metrics: accuracy against the drawn labels and against the
    hidden score's ordering (ties excluded), and the correlation of the RM score with the hidden score.
    """
    model = new_reward_model(codec, cfg)
    ch, rj, _, _ = task.preference_pairs(cfg.seed + 10, cfg.rm_pairs, cfg.bt_temperature, cfg.completion_len)
    model = _fit_reward_model(model, _pairs_dataset(codec, ch, rj), codec.tokenizer, cfg, workdir)
    metrics = evaluate_reward_model(codec, model, cfg)
    _log_rm_metrics(metrics, log)
    return model, metrics


def _fit_reward_model(model, train, tokenizer, cfg: SetupConfig, workdir: Path):
    """trl's RewardTrainer with the study's settings; returns the trained model in eval mode."""
    from trl import RewardConfig, RewardTrainer

    args = RewardConfig(
        output_dir=str(workdir / "rm_trainer"),
        per_device_train_batch_size=cfg.rm_batch,
        num_train_epochs=cfg.rm_epochs,
        learning_rate=cfg.rm_lr,
        lr_scheduler_type="cosine",
        warmup_steps=20,
        weight_decay=0.01,
        logging_steps=100,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,  # trl defaults to bf16 autocast, which stays patched onto the returned model's forward
        seed=cfg.seed,
        disable_tqdm=True,
        max_length=None,
        center_rewards_coefficient=0.01,
        dataloader_num_workers=0,
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    _log_instead_of_print(trainer)
    trainer.train()
    return trainer.model.eval()


def _log_instead_of_print(trainer) -> None:
    """transformers prints every training log dict (its PrinterCallback, used when tqdm is off); send them to the
    ``dense_rlhf.study.models`` logger instead, which a command's log file collects."""
    import logging

    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    logger = logging.getLogger(__name__)

    class LogCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_local_process_zero and logs:
                logger.info("trl %s step %d: %s", type(trainer).__name__, state.global_step, logs)

    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(LogCallback())


def _log_rm_metrics(metrics: dict, log) -> None:
    if log:
        log(
            "  reward model held-out: accuracy vs drawn labels {label_accuracy:.3f}, vs hidden-score order "
            "{true_order_accuracy:.3f}, corr(RM score, hidden score) {score_correlation:.3f}".format(**metrics)
        )


@torch.no_grad()
def rm_scores(model, ids: torch.Tensor, batch: int = 512) -> torch.Tensor:
    out = []
    for i in range(0, ids.shape[0], batch):
        out.append(model(input_ids=ids[i : i + batch]).logits[:, 0].float())
    return torch.cat(out)


def evaluate_reward_model(codec: task.Codec, model, cfg: SetupConfig) -> dict:
    return _evaluate_scores(lambda texts: rm_scores(model, codec.encode(texts, eos=True)), cfg)


def _evaluate_scores(score_texts, cfg: SetupConfig) -> dict:
    """Held-out metrics of a reward model given as ``score_texts(word lists) -> [n] scores``."""
    ch, rj, sc, sr = task.preference_pairs(cfg.seed + 999, cfg.rm_eval_pairs, cfg.bt_temperature, cfg.completion_len)
    rc = score_texts(ch)
    rr = score_texts(rj)
    sc_t, sr_t = torch.tensor(sc), torch.tensor(sr)
    untied = sc_t != sr_t
    true_order = torch.where(sc_t > sr_t, rc > rr, rr > rc)
    both_rm, both_true = torch.cat([rc, rr]), torch.cat([sc_t, sr_t])
    corr = torch.corrcoef(torch.stack([both_rm, both_true]))[0, 1].item()
    return {
        "label_accuracy": (rc > rr).float().mean().item(),
        "true_order_accuracy": true_order[untied].float().mean().item(),
        "score_correlation": corr,
        "eval_pairs": cfg.rm_eval_pairs,
    }


def load_or_train(cfg: SetupConfig, cache_dir=None, log=print):
    """(codec, policy, reward_model, info) from the cache, training and saving them on a miss."""
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = cache_root(cache_dir) / f"setup-{cfg.key()}"
    info_path = folder / "info.json"
    if info_path.exists():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder / "tokenizer"))
        codec = task.Codec(tokenizer)
        policy = GPT2LMHeadModel.from_pretrained(str(folder / "sft")).eval()
        rm = GPT2ForSequenceClassification.from_pretrained(str(folder / "rm")).eval()
        info = json.loads(info_path.read_text())
        info["cached"] = True
        if log:
            log(f"reusing cached SFT policy and reward model from {folder}")
        return codec, policy, rm, info

    folder.mkdir(parents=True, exist_ok=True)
    codec = task.Codec()
    t0 = time.time()
    if log:
        log("training the SFT policy ...")
    policy = train_sft(codec, cfg, log)
    t1 = time.time()
    if log:
        log("training the reward model with trl RewardTrainer ...")
    rm, metrics = train_reward_model(codec, cfg, folder, log)
    t2 = time.time()
    codec.tokenizer.save_pretrained(str(folder / "tokenizer"))
    policy.save_pretrained(str(folder / "sft"))
    rm.save_pretrained(str(folder / "rm"))
    info = {"config": asdict(cfg), "reward_model": metrics, "sft_seconds": t1 - t0, "rm_seconds": t2 - t1}
    info_path.write_text(json.dumps(info, indent=2))
    info["cached"] = False
    return codec, policy, rm, info


# ------------------------------------------------------------------------------------------------------------
# A reward model with its own tokenizer and chat template (the study's "ABC through alignment")
# ------------------------------------------------------------------------------------------------------------

RM_BPE_VOCAB = 800  # byte-level: 1.16 tokens per word; 32 of the 70 sentiment words split into 2-4 pieces
RM_SPECIAL_TOKENS = ["<|pad|>", "<|user|>", "<|assistant|>", "<|end|>"]
RM_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] | trim }}<|end|>"
    "{% if not loop.last %}\n{% endif %}{% endfor %}"
)


def build_rm_tokenizer(seed: int, vocab_size: int = RM_BPE_VOCAB):
    """A byte-level BPE (as GPT-2, Llama-3 or Qwen) trained on the task's text, with a chat template that trims
    the message content, as Llama-3's does. The reward model reads its score at the final ``<|end|>``."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed + 20)
    texts = [" ".join(task.sample_words(rng, task.Style.random_for_preferences(rng))) for _ in range(20000)]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=RM_SPECIAL_TOKENS,
            show_progress=False,
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|pad|>", eos_token="<|end|>")
    tokenizer.chat_template = RM_CHAT_TEMPLATE
    return tokenizer


def rm_chat(prompt: list[str], completion: list[str] | None = None) -> list[dict]:
    """The task's prompt (and completion) as chat messages for the reward model's template."""
    messages = [{"role": "user", "content": " ".join(prompt)}]
    if completion is not None:
        messages.append({"role": "assistant", "content": " ".join(completion)})
    return messages


def _chat_ids(tokenizer, texts: list[list[str]]) -> list[list[int]]:
    rendered = [tokenizer.apply_chat_template(rm_chat(*task.split_prompt(t)), tokenize=False) for t in texts]
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def chat_rm_scores(model, tokenizer, texts: list[list[str]], batch: int = 512) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), batch):
        enc = tokenizer.pad({"input_ids": _chat_ids(tokenizer, texts[i : i + batch])}, return_tensors="pt")
        out.append(model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, 0].float())
    return torch.cat(out)


def new_chat_reward_model(tokenizer, cfg: SetupConfig):
    """The same GPT-2 reward model as ``new_reward_model``, sized for the BPE tokenizer's vocabulary and lengths."""
    from transformers import GPT2ForSequenceClassification

    torch.manual_seed(cfg.seed + 1)
    config = _gpt2_config(
        cfg.rm_n_embd,
        cfg.rm_n_layer,
        cfg.rm_n_head,
        256,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=1,
    )
    return GPT2ForSequenceClassification(config)


def load_or_train_chat_rm(cfg: SetupConfig, cache_dir=None, log=print):
    """(rm_tokenizer, reward_model, info): a reward model with the BPE tokenizer and chat template, trained
    exactly as the word-level one (same pairs, seed, trl RewardTrainer settings), cached beside it."""
    from datasets import Dataset
    from transformers import GPT2ForSequenceClassification, PreTrainedTokenizerFast

    folder = cache_root(cache_dir) / f"setup-{cfg.key()}" / f"chat-rm-bpe{RM_BPE_VOCAB}"
    info_path = folder / "info.json"
    if info_path.exists():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder / "tokenizer"))
        rm = GPT2ForSequenceClassification.from_pretrained(str(folder / "rm")).eval()
        info = json.loads(info_path.read_text())
        info["cached"] = True
        return tokenizer, rm, info
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tokenizer = build_rm_tokenizer(cfg.seed)
    if log:
        log("training the reward model with its own BPE tokenizer and chat template (trl RewardTrainer) ...")
    ch, rj, _, _ = task.preference_pairs(cfg.seed + 10, cfg.rm_pairs, cfg.bt_temperature, cfg.completion_len)
    train = Dataset.from_dict({"chosen_ids": _chat_ids(tokenizer, ch), "rejected_ids": _chat_ids(tokenizer, rj)})
    rm = _fit_reward_model(new_chat_reward_model(tokenizer, cfg), train, tokenizer, cfg, folder)
    metrics = _evaluate_scores(lambda texts: chat_rm_scores(rm, tokenizer, texts), cfg)
    _log_rm_metrics(metrics, log)
    words = [w for t in ch[:2000] for w in t]
    pieces = tokenizer([" ".join(t) for t in ch[:2000]], add_special_tokens=False)["input_ids"]
    metrics["tokens_per_word"] = sum(map(len, pieces)) / len(words)
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    rm.save_pretrained(str(folder / "rm"))
    info = {"reward_model": metrics, "vocab_size": len(tokenizer), "rm_seconds": time.time() - t0}
    info_path.write_text(json.dumps(info, indent=2))
    info["cached"] = False
    return tokenizer, rm, info
