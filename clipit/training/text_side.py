"""The text side of a training step (methods.<m>.text_encoder).

cached  the fp16 report embedding stored with each sample in the shards (frozen text side; fast)
tower   the pairing model's text tower inside the model: each sample's `report_index` selects its
        tokens from a table tokenized once from the shards' texts.jsonl; in training steps k% of them
        are corrupted when word_drop is set (the generator is the run's, so a resumed run drops the
        same tokens an uninterrupted one would)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from clipit.config import ConfigError, TrainConfig
from clipit.shards.manifest import ShardError, load_texts


def cached_text(batch: dict, device: torch.device, train: bool = False, generator=None) -> dict:
    return {"text_emb": batch["text_emb"].to(device, non_blocking=True)}


class TextInputs:
    """Keyword inputs of the model for one batch: text_emb, plus tokens (and mask positions) for a tower."""

    def __init__(
        self, model: nn.Module, tcfg: TrainConfig, shard_dir: str | Path, manifest: dict, device: torch.device
    ):
        # prompt_ft's tower encodes class prompts itself: report tokens only for text_encoder: tower
        self.tower = getattr(model, "text_tower", None) if tcfg.text_encoder == "tower" else None
        self.word_drop, self.mode = tcfg.word_drop, tcfg.word_drop_mode
        self.tokens = None
        if self.tower is not None:
            tokens = self.tower.tokenize(load_texts(shard_dir, manifest))
            if self.word_drop and (
                self.tower.start_id == self.tower.end_id or not (tokens[:, 0] == self.tower.start_id).all()
            ):
                raise ConfigError(
                    f"{self.tower.name}: its tokenizer marks no start of text, so word_drop cannot tell "
                    "words from special tokens; set methods.<name>.word_drop: 0 for this pairing model"
                )
            self.tokens = tokens.to(device)

    def __call__(
        self, batch: dict, device: torch.device, train: bool = False, generator: torch.Generator | None = None
    ) -> dict:
        inputs = cached_text(batch, device)
        if self.tokens is None:
            return inputs
        from clipit.pairing.text_tower import corrupt

        index = batch["report_index"]
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= len(self.tokens)):
            raise ShardError(
                f"{batch['keys'][0]}: sample without a valid report_index (texts.jsonl holds "
                f"{len(self.tokens)}); rebuild the shards with `clipit shard build`"
            )
        tokens = self.tokens[index.to(device)]
        masked = None
        if train:
            tokens, masked = corrupt(tokens, self.tower, self.word_drop, self.mode, generator)
        return inputs | {"tokens": tokens, "masked": masked}
