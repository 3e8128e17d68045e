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
    """Everything that determines the trained SFT policy and reward model."""

    seed: int = 0
    completion_len: int = 20
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    rm_n_embd: int = 64
    rm_n_layer: int = 1  # a 2-layer RM pools in layer 0; its last layer's row carries little credit
    rm_n_head: int = 4
    sft_texts: int = 20000
    sft_steps: int = 1500
    sft_batch: int = 64
    sft_lr: float = 2e-3
    rm_pairs: int = 20000
    rm_eval_pairs: int = 2000
    rm_epochs: float = 2.0
    rm_batch: int = 64
    rm_lr: float = 1e-3
    bt_temperature: float = 1.0

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


def _gpt2_config(codec: task.Codec, n_embd: int, n_layer: int, n_head: int, positions: int, **extra):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=codec.vocab_size,
        n_positions=positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=codec.bos_id,
        eos_token_id=codec.eos_id,
        pad_token_id=codec.pad_id,
        **extra,
    )


def new_policy(codec: task.Codec, cfg: SetupConfig):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(cfg.seed)
    config = _gpt2_config(codec, cfg.n_embd, cfg.n_layer, cfg.n_head, n_positions(cfg))
    return GPT2LMHeadModel(config)


def new_reward_model(codec: task.Codec, cfg: SetupConfig):
    from transformers import GPT2ForSequenceClassification

    torch.manual_seed(cfg.seed + 1)
    config = _gpt2_config(codec, cfg.rm_n_embd, cfg.rm_n_layer, cfg.rm_n_head, n_positions(cfg), num_labels=1)
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
    from trl import RewardConfig, RewardTrainer

    model = new_reward_model(codec, cfg)
    ch, rj, _, _ = task.preference_pairs(cfg.seed + 10, cfg.rm_pairs, cfg.bt_temperature, cfg.completion_len)
    train = _pairs_dataset(codec, ch, rj)
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
    trainer = RewardTrainer(model=model, args=args, train_dataset=train, processing_class=codec.tokenizer)
    trainer.train()
    model = trainer.model.eval()
    metrics = evaluate_reward_model(codec, model, cfg)
    if log:
        log(
            "  reward model held-out: accuracy vs drawn labels {label_accuracy:.3f}, vs hidden-score order "
            "{true_order_accuracy:.3f}, corr(RM, hidden score) {score_correlation:.3f}".format(**metrics)
        )
    return model, metrics


@torch.no_grad()
def rm_scores(model, ids: torch.Tensor, batch: int = 512) -> torch.Tensor:
    out = []
    for i in range(0, ids.shape[0], batch):
        out.append(model(input_ids=ids[i : i + batch]).logits[:, 0].float())
    return torch.cat(out)


def evaluate_reward_model(codec: task.Codec, model, cfg: SetupConfig) -> dict:
    ch, rj, sc, sr = task.preference_pairs(cfg.seed + 999, cfg.rm_eval_pairs, cfg.bt_temperature, cfg.completion_len)
    rc = rm_scores(model, codec.encode(ch, eos=True))
    rr = rm_scores(model, codec.encode(rj, eos=True))
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
