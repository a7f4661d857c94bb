"""transformers-format CLIPs (PLIP `vinid/plip`, a PathCLIP saved with save_pretrained, ...) behind the
open_clip interface that pairing, the text tower and the CLIP baselines use (`visual`, `encode_image`,
`encode_text`, `logit_scale`).

Registry name `hf-clip:<label>` (the label is free: plip, pathclip); its checkpoint (pairing.checkpoint,
clip.checkpoint or the weights file's `hf-clip:<label>` entry) is a local folder holding config.json and
model.safetensors (what `CLIPModel.save_pretrained` writes), or hf-hub:<repo> for a hub repository with
safetensors weights. Only safetensors are read: a folder with pytorch_model.bin alone is refused (convert
it once with `CLIPModel.from_pretrained(folder).save_pretrained(folder)` where you trust the file).
Tokenizer: the folder's own (tokenizer.json / vocab.json + merges.txt), else open_clip's copy of the
OpenAI CLIP BPE that PLIP was trained with. Image size, mean and std: the folder's
preprocessor_config.json, else the vision config's size and OpenAI CLIP's statistics.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clipit.errors import ClipitError, one_line
from clipit.io import sha256_file

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class HFClipError(ClipitError):
    """A transformers CLIP checkpoint is missing or does not load (encoders.py reports it as PairingModelError)."""


HINT = "set the checkpoint to a folder written by transformers' CLIPModel.save_pretrained (config.json + model.safetensors)"


class HFClipVisual(nn.Module):
    """The image tower: vision transformer -> pooled output -> visual projection (the `get_image_features`
    embedding); `output_dim`, `image_size`, `image_mean`, `image_std` as open_clip's `visual` has them."""

    def __init__(self, vision_model: nn.Module, projection: nn.Linear, image_size: int, mean, std):
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = projection
        self.output_dim = int(projection.out_features)
        self.image_size = int(image_size)
        self.image_mean, self.image_std = tuple(mean), tuple(std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision_model(pixel_values=images).pooler_output)


class HFClip(nn.Module):
    """A transformers CLIPModel rearranged as an open_clip CLIP (its tensors are the same objects)."""

    def __init__(self, clip: nn.Module, image_size: int, mean, std):
        super().__init__()
        self.visual = HFClipVisual(clip.vision_model, clip.visual_projection, image_size, mean, std)
        self.text_model = clip.text_model
        self.text_projection = clip.text_projection
        self.logit_scale = clip.logit_scale

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        out = self.visual(images)
        return F.normalize(out, dim=-1) if normalize else out

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        # causal attention: the pooled <end> position never sees the padding after it
        out = self.text_projection(self.text_model(input_ids=tokens).pooler_output)
        return F.normalize(out, dim=-1) if normalize else out


def vision_architecture(visual: HFClipVisual) -> dict:
    """What rebuilds the image tower without weights (an export's config.json)."""
    return {
        "family": "hf-clip",
        "vision_config": visual.vision_model.config.to_dict(),
        "projection_dim": visual.output_dim,
        "image_size": visual.image_size,
        "mean": list(visual.image_mean),
        "std": list(visual.image_std),
    }


def vision_from_architecture(arch: dict) -> HFClipVisual:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(**{k: v for k, v in arch["vision_config"].items() if k != "model_type"})
    model = CLIPVisionModel(config)
    projection = nn.Linear(config.hidden_size, int(arch["projection_dim"]), bias=False)
    return HFClipVisual(model, projection, arch["image_size"], arch["mean"], arch["std"])


def _tokenizer(folder: Path | None, context: int):
    """list[str] -> LongTensor [B, context]: the folder's HF tokenizer, else OpenAI CLIP's BPE (open_clip)."""
    if folder is not None and any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(folder))

        def tokenize(texts: list[str]) -> torch.Tensor:
            out = hf(list(texts), padding="max_length", truncation=True, max_length=context, return_tensors="pt")
            return out["input_ids"]

        return tokenize
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context)


def _image_stats(folder: Path | None, vision_size: int) -> tuple[int, tuple, tuple]:
    config = folder / "preprocessor_config.json" if folder is not None else None
    if config is None or not config.is_file():
        return vision_size, OPENAI_MEAN, OPENAI_STD
    pre = json.loads(config.read_text())
    crop = pre.get("crop_size", vision_size)
    size = crop.get("height", vision_size) if isinstance(crop, dict) else int(crop)
    return int(size), tuple(pre.get("image_mean", OPENAI_MEAN)), tuple(pre.get("image_std", OPENAI_STD))


def load_hf_clip(name: str, checkpoint) -> tuple[HFClip, object, object, dict]:
    """(model, PIL preprocess, tokenizer, identity) of the `hf-clip:<label>` pairing model (wrapped by
    clipit/pairing/encoders.py's registry)."""
    from open_clip.transform import image_transform
    from transformers import CLIPModel

    if not checkpoint:
        raise HFClipError(f"{name} needs a checkpoint (pairing.checkpoint or clip.checkpoint); {HINT}")
    source = str(checkpoint)
    folder = None
    if source.startswith("hf-hub:"):
        location = source[len("hf-hub:") :]
    else:
        folder = Path(source).expanduser()
        if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
            raise HFClipError(f"{folder}: no config.json and *.safetensors for {name}; {HINT}")
        location = str(folder)
    try:
        clip = CLIPModel.from_pretrained(location, use_safetensors=True)
    except Exception as err:  # a wrong folder, a hub error, weights that do not fit the config
        raise HFClipError(f"{source}: cannot load {name} ({one_line(err)}); {HINT}") from None
    if folder is None:  # the hub copy's folder (its tokenizer and preprocessor config)
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(location, allow_patterns=["*.json", "*.txt"]))
    size, mean, std = _image_stats(folder, int(clip.config.vision_config.image_size))
    model = HFClip(clip, size, mean, std)
    tokenizer = _tokenizer(folder, int(clip.config.text_config.max_position_embeddings))
    identity = {"model": name, "checkpoint": source}
    weights = sorted(folder.glob("*.safetensors"))
    if len(weights) == 1:
        identity["sha256"] = sha256_file(weights[0])
    return model, image_transform(size, is_train=False, mean=mean, std=std), tokenizer, identity
