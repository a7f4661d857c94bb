"""The pairing model's text tower as a trainable module, and word drop (mask / remove)."""

import warnings

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from clipit.config import LoraConfig  # noqa: E402
from clipit.models.backbones import create_backbone, get_spec  # noqa: E402
from clipit.models.clipit import ClipItModel, prepare_finetune  # noqa: E402
from clipit.pairing import encoders as models  # noqa: E402
from clipit.pairing.demo_clip import register_demo_clip  # noqa: E402
from clipit.pairing.text_tower import UNUSED_BY_TEXT, choose_dropped, corrupt, droppable, remove_tokens, text_tower_from  # noqa: E402

TEXTS = ["Invasive ductal carcinoma, grade 2, with desmoplastic stroma and no necrosis.", "Benign colonic mucosa.", ""]


@pytest.fixture(scope="module")
def demo_pairing():
    """A random-init demo CLIP (open_clip CLIP class, argmax pooling) behind the PairingModel interface."""
    arch = register_demo_clip()
    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None)
    return models.PairingModel("demo-clip", model, None, open_clip.get_tokenizer(arch), {"model": "demo"})


@pytest.fixture(scope="module")
def conch_pairing():
    """A shrunk random CoCa from conch-fork with CONCH's tokenizer (CLS pooling, appended CLS slot)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pytest.importorskip("conch.open_clip_custom")
    from pairing.fakes import shrunk_conch_config

    torch.manual_seed(0)
    coca = models._import_conch().CoCa(**shrunk_conch_config())
    return models.ConchPairingModel("conch", coca, None, models.conch_tokenizer(), {"model": "conch"})


@pytest.mark.parametrize("which", ["demo_pairing", "conch_pairing"])
def test_tower_encodes_like_the_pairing_model(which, request):
    pairing = request.getfixturevalue(which)
    tower = text_tower_from(pairing).eval()
    with torch.no_grad():
        got = tower(tower.tokenize(TEXTS))
    torch.testing.assert_close(got, pairing.encode_texts(TEXTS), rtol=0, atol=1e-5)
    assert torch.allclose(got.norm(dim=1), torch.ones(len(TEXTS)))
    assert not any(hasattr(tower.clip, a) for a in UNUSED_BY_TEXT)  # only what encode_text runs
    assert all(not p.requires_grad for p in tower.parameters())
    assert hasattr(pairing.model, "visual")  # the pairing model itself is left whole


def test_special_token_ids_come_from_the_tokenizer(demo_pairing, conch_pairing):
    demo = text_tower_from(demo_pairing)
    assert (demo.start_id, demo.end_id, demo.pad_id) == (49406, 49407, 0)
    conch = text_tower_from(conch_pairing)
    tok = models._import_conch().get_tokenizer()
    assert (conch.start_id, conch.end_id, conch.pad_id) == (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)


def test_word_drop_picks_round_k_percent_of_interior_tokens(demo_pairing):
    tower = text_tower_from(demo_pairing)
    tokens = tower.tokenize(TEXTS)
    allowed = droppable(tokens, tower.start_id, tower.end_id)
    ends = (tokens == tower.end_id).int().argmax(1)
    assert allowed.sum(1).tolist() == (ends - 1).tolist()  # everything between <start> and <end>
    for fraction in (0.1, 0.3, 0.5):
        dropped = choose_dropped(tokens, fraction, tower.start_id, tower.end_id, torch.Generator().manual_seed(0))
        assert not (dropped & ~allowed).any()
        assert dropped.sum(1).tolist() == torch.round(allowed.sum(1) * fraction).long().tolist()
    a, b, c = (
        choose_dropped(tokens, 0.3, tower.start_id, tower.end_id, torch.Generator().manual_seed(s)) for s in (1, 1, 2)
    )
    assert torch.equal(a, b) and not torch.equal(a, c)  # the run's generator decides (resumable)


def test_remove_deletes_tokens_and_keeps_order_end_and_padding(demo_pairing):
    tower = text_tower_from(demo_pairing)
    tokens = tower.tokenize(TEXTS)
    dropped = choose_dropped(tokens, 0.5, tower.start_id, tower.end_id, torch.Generator().manual_seed(0))
    out = remove_tokens(tokens, dropped, tower.pad_id)
    for row, (orig, drop) in enumerate(zip(tokens, dropped)):
        kept = orig[~drop]
        assert out[row, : len(kept)].tolist() == kept.tolist()
        assert (out[row, len(kept) :] == tower.pad_id).all()
        assert (out[row] == tower.end_id).sum() == 1


@pytest.mark.parametrize("which", ["demo_pairing", "conch_pairing"])
def test_mask_replaces_embeddings_without_touching_ids(which, request):
    tower = text_tower_from(request.getfixturevalue(which)).eval()
    tokens = tower.tokenize(TEXTS)
    gen = torch.Generator().manual_seed(0)
    same, masked = corrupt(tokens, tower, 0.3, "mask", gen)
    assert same is tokens and masked.any()
    with torch.no_grad():
        clean = tower(tokens)
        nothing = tower(tokens, torch.zeros_like(masked))
        hit = tower(tokens, masked)
    torch.testing.assert_close(nothing, clean)
    changed = (hit - clean).norm(dim=1) > 1e-4
    assert changed.tolist() == masked.any(1).tolist()  # the empty text has nothing to mask
    embedding = tower.clip.get_submodule(tower.embedding_path)
    torch.testing.assert_close(embedding.mask_vector, embedding.base.weight[tower.end_id])  # <mask> starts as <end>
    assert corrupt(tokens, tower, 0.0, "mask", gen) == (tokens, None)


@pytest.mark.parametrize("which", ["demo_pairing", "conch_pairing"])
@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_every_trainable_parameter_gets_a_gradient(which, finetune, request):
    """One module for both sides; no trainable parameter may sit unused (DDP would fail on it)."""
    pairing = request.getfixturevalue(which)
    torch.manual_seed(0)
    model = ClipItModel(create_backbone(get_spec("demo-vit-tiny")), num_classes=4, text_dim=pairing.embed_dim)
    model.text_tower = text_tower_from(pairing)
    prepare_finetune(
        model, finetune, LoraConfig(r=4, alpha=4, targets=["Linear", "Conv2d", "Embedding"]), warm_head=True
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    tower_trainable = {n for n in trainable if n.startswith("text_tower.")}
    assert tower_trainable and (finetune == "full" or all("lora_" in n for n in tower_trainable))
    if finetune == "lora":
        assert any("token_embedding.base.lora_embedding_A" in n for n in tower_trainable)
    tokens = model.text_tower.tokenize(TEXTS[:2])
    _, masked = corrupt(tokens, model.text_tower, 0.3, "mask", torch.Generator().manual_seed(0))
    out = model(torch.randn(2, 3, 64, 64), None, tokens=tokens, masked=masked)
    (out["logits"].sum() + (1 - torch.cosine_similarity(out["proj"], out["text_emb"])).sum()).backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def test_shared_reports_are_encoded_once_with_the_same_result(demo_pairing):
    tower = text_tower_from(demo_pairing).eval()
    tokens = tower.tokenize([TEXTS[0], TEXTS[1], TEXTS[0], TEXTS[0]])
    seen = []
    hook = tower.clip.transformer.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    with torch.no_grad():
        shared = tower(tokens)
        separate = torch.cat([tower(row[None]) for row in tokens])
    hook.remove()
    assert seen[0] == 2  # two distinct reports in a batch of four
    torch.testing.assert_close(shared, separate, rtol=0, atol=1e-6)
