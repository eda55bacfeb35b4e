"""A tiny real ``transformers.Trainer`` run for tests/test_hf_trainer.py (built from a config: nothing downloads)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")


class TokenData(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """24 random token sequences; the Trainer shuffles them (a seedable random sampler)."""

    def __init__(self, n: int = 24, length: int = 12) -> None:
        self.x = torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(7))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def tiny_model() -> Any:
    """GPT-2 with one layer and 16-wide embeddings; dropout on (0.1 everywhere), same weights each call."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def args(out: Path, *, max_steps: int = 10, save_steps: int = 4, **kw: Any) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        str(out),
        max_steps=max_steps,
        save_steps=save_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        warmup_steps=2,
        report_to=[],
        use_cpu=True,
        logging_steps=1000,
        seed=3,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **kw,
    )


def trainer(cls: type, out: Path, **kw: Any) -> Any:
    return cls(model=tiny_model(), args=args(out, **kw), train_dataset=TokenData())
