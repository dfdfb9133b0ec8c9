"""Checkpoint loading: timm / Hugging Face / vitprune / live timm model -> ViT, checked against plain references."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SHARED_DATA, SHARED_MODEL
from safetensors.torch import save_file

from vitprune.errors import VitPruneError
from vitprune.models import BlockConfig, ViT, ViTConfig, save
from vitprune.models.checkpoints import (
    from_hf_state_dict,
    from_timm_model,
    from_timm_state_dict,
    hf_preprocess,
    load_model,
)
from vitprune.models.presets import get_preset, list_presets

# ------------------------------------------------------------------------------ independent plain references


def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _attend(q, k, v, heads):
    """q, k, v (B, N, D) -> (B, N, D) multi-head softmax attention with scale 1/sqrt(head_dim)."""
    b, n, d = q.shape
    hd = d // heads
    q, k, v = (t.reshape(b, n, heads, hd).permute(0, 2, 1, 3) for t in (q, k, v))
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
    return (att @ v).permute(0, 2, 1, 3).reshape(b, n, d)


def _patchify(x, w, b):
    """Patch embedding as unfold + matmul (no conv)."""
    d, c, p, _ = w.shape
    bsz, _, hh, ww = x.shape
    patches = x.unfold(2, p, p).unfold(3, p, p)  # B, C, gh, gw, p, p
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(bsz, (hh // p) * (ww // p), c * p * p)
    return patches @ w.reshape(d, -1).T + b


def ref_timm_forward(sd, x, heads, eps=1e-6, no_embed_class=False, pool="token"):
    """timm VisionTransformer.forward written from the state dict with plain tensor ops."""
    t = _patchify(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"])
    bsz = t.shape[0]
    prefix = [sd[k].expand(bsz, -1, -1) for k in ("cls_token", "dist_token") if k in sd]
    if no_embed_class:
        t = torch.cat([*prefix, t + sd["pos_embed"]], dim=1)
    else:
        t = torch.cat([*prefix, t], dim=1) + sd["pos_embed"]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        g = lambda n, i=i: sd[f"blocks.{i}.{n}"]  # noqa: E731
        h = _ln(t, g("norm1.weight"), g("norm1.bias"), eps)
        q, k, v = (h @ g("attn.qkv.weight").T + g("attn.qkv.bias")).chunk(3, dim=-1)
        a = _attend(q, k, v, heads) @ g("attn.proj.weight").T + g("attn.proj.bias")
        if f"blocks.{i}.ls1.gamma" in sd:
            a = a * g("ls1.gamma")
        t = t + a
        h = _ln(t, g("norm2.weight"), g("norm2.bias"), eps)
        m = _gelu(h @ g("mlp.fc1.weight").T + g("mlp.fc1.bias")) @ g("mlp.fc2.weight").T + g("mlp.fc2.bias")
        if f"blocks.{i}.ls2.gamma" in sd:
            m = m * g("ls2.gamma")
        t = t + m
    t = _ln(t, sd["norm.weight"], sd["norm.bias"], eps)
    if pool == "avg":
        return t[:, len(prefix) :].mean(1) @ sd["head.weight"].T + sd["head.bias"]
    out = t[:, 0] @ sd["head.weight"].T + sd["head.bias"]
    if "head_dist.weight" in sd:
        out = (out + t[:, 1] @ sd["head_dist.weight"].T + sd["head_dist.bias"]) / 2
    return out


def ref_hf_forward(sd, cfg, x):
    """Hugging Face ViTForImageClassification / DeiTForImageClassificationWithTeacher, q, k, v separate."""
    base = "deit." if any(k.startswith("deit.") for k in sd) else "vit."
    e = base + "embeddings."
    eps, heads = cfg.get("layer_norm_eps", 1e-12), cfg["num_attention_heads"]
    t = _patchify(x, sd[e + "patch_embeddings.projection.weight"], sd[e + "patch_embeddings.projection.bias"])
    bsz = t.shape[0]
    toks = [sd[e + k].expand(bsz, -1, -1) for k in ("cls_token", "distillation_token") if e + k in sd]
    t = torch.cat([*toks, t], dim=1) + sd[e + "position_embeddings"]
    for i in range(cfg["num_hidden_layers"]):
        pre = f"{base}encoder.layer.{i}."
        g = lambda n, pre=pre: sd[pre + n]  # noqa: E731
        lin = lambda z, n, pre=pre: z @ sd[pre + n + ".weight"].T + sd[pre + n + ".bias"]  # noqa: E731
        h = _ln(t, g("layernorm_before.weight"), g("layernorm_before.bias"), eps)
        q, k, v = (lin(h, f"attention.attention.{n}") for n in ("query", "key", "value"))
        t = t + lin(_attend(q, k, v, heads), "attention.output.dense")
        h = _ln(t, g("layernorm_after.weight"), g("layernorm_after.bias"), eps)
        t = t + lin(_gelu(lin(h, "intermediate.dense")), "output.dense")
    t = _ln(t, sd[base + "layernorm.weight"], sd[base + "layernorm.bias"], eps)
    if "classifier.weight" in sd:
        return t[:, 0] @ sd["classifier.weight"].T + sd["classifier.bias"]
    cls = t[:, 0] @ sd["cls_classifier.weight"].T + sd["cls_classifier.bias"]
    dis = t[:, 1] @ sd["distillation_classifier.weight"].T + sd["distillation_classifier.bias"]
    return (cls + dis) / 2


# ------------------------------------------------------------------------------------------ synthetic inputs


def timm_sd(
    dim=32, depth=2, mlp=(48, 48), classes=5, img=32, patch=8, dist=False, cls=True, ls=False, nec=False, seed=0
):
    """A random timm-layout state dict (dense attention: qkv = 3 * dim)."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen) * 0.2  # noqa: E731
    prefix = int(cls) + int(dist)
    sd = {
        "patch_embed.proj.weight": r(dim, 3, patch, patch),
        "patch_embed.proj.bias": r(dim),
        "pos_embed": r(1, (0 if nec else prefix) + (img // patch) ** 2, dim),
        "norm.weight": 1 + r(dim),
        "norm.bias": r(dim),
        "head.weight": r(classes, dim),
        "head.bias": r(classes),
    }
    if cls:
        sd["cls_token"] = r(1, 1, dim)
    if dist:
        sd["dist_token"] = r(1, 1, dim)
        sd["head_dist.weight"], sd["head_dist.bias"] = r(classes, dim), r(classes)
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update(
            {
                b + "norm1.weight": 1 + r(dim),
                b + "norm1.bias": r(dim),
                b + "attn.qkv.weight": r(3 * dim, dim),
                b + "attn.qkv.bias": r(3 * dim),
                b + "attn.proj.weight": r(dim, dim),
                b + "attn.proj.bias": r(dim),
                b + "norm2.weight": 1 + r(dim),
                b + "norm2.bias": r(dim),
                b + "mlp.fc1.weight": r(mlp[i], dim),
                b + "mlp.fc1.bias": r(mlp[i]),
                b + "mlp.fc2.weight": r(dim, mlp[i]),
                b + "mlp.fc2.bias": r(dim),
            }
        )
        if ls:
            sd[b + "ls1.gamma"], sd[b + "ls2.gamma"] = r(dim), r(dim)
    return sd


def hf_sd_and_config(dim=32, depth=2, heads=4, inter=48, classes=5, img=32, patch=8, deit=False, seed=1):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen) * 0.2  # noqa: E731
    base = "deit." if deit else "vit."
    e = base + "embeddings."
    n_tok = 2 if deit else 1
    sd = {
        e + "cls_token": r(1, 1, dim),
        e + "position_embeddings": r(1, n_tok + (img // patch) ** 2, dim),
        e + "patch_embeddings.projection.weight": r(dim, 3, patch, patch),
        e + "patch_embeddings.projection.bias": r(dim),
        base + "layernorm.weight": 1 + r(dim),
        base + "layernorm.bias": r(dim),
    }
    if deit:
        sd[e + "distillation_token"] = r(1, 1, dim)
        for name in ("cls_classifier", "distillation_classifier"):
            sd[name + ".weight"], sd[name + ".bias"] = r(classes, dim), r(classes)
    else:
        sd["classifier.weight"], sd["classifier.bias"] = r(classes, dim), r(classes)
    for i in range(depth):
        b = f"{base}encoder.layer.{i}."
        for n, (o, k) in {
            "attention.attention.query": (dim, dim),
            "attention.attention.key": (dim, dim),
            "attention.attention.value": (dim, dim),
            "attention.output.dense": (dim, dim),
            "intermediate.dense": (inter, dim),
            "output.dense": (dim, inter),
        }.items():
            sd[b + n + ".weight"], sd[b + n + ".bias"] = r(o, k), r(o)
        for n in ("layernorm_before", "layernorm_after"):
            sd[b + n + ".weight"], sd[b + n + ".bias"] = 1 + r(dim), r(dim)
    cfg = {
        "model_type": "deit" if deit else "vit",
        "architectures": ["DeiTForImageClassificationWithTeacher" if deit else "ViTForImageClassification"],
        "hidden_size": dim,
        "num_hidden_layers": depth,
        "num_attention_heads": heads,
        "intermediate_size": inter,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "image_size": img,
        "patch_size": patch,
        "num_channels": 3,
        "qkv_bias": True,
    }
    return sd, cfg


def _x(img=32, n=2, seed=3):
    return torch.randn(n, 3, img, img, generator=torch.Generator().manual_seed(seed))


def _close(a, b, tol=1e-4):
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=tol, rtol=tol), (a - b).abs().max()


# ------------------------------------------------------------------------------------------------- presets


def test_presets_cover_required_names_and_build_configs():
    names = list_presets()
    for size in ("tiny", "small", "base"):
        for fmt in ("vit_{}_patch16_224", "deit_{}_patch16_224", "deit_{}_distilled_patch16_224"):
            assert fmt.format(size) in names
    p = get_preset("deit_small_distilled_patch16_224")
    cfg = p.config(num_classes=10)
    assert (cfg.embed_dim, cfg.depth, cfg.blocks[0].heads, cfg.blocks[0].mlp_dim) == (384, 12, 6, 1536)
    assert cfg.distilled and cfg.num_classes == 10 and cfg.preprocess == {"preset": "imagenet"}
    assert get_preset("vit_tiny_patch16_224.augreg_in21k").heads == 3
    assert get_preset("vit_tiny_patch16_224").preprocess == "inception"


def test_unknown_preset_lists_known_names():
    with pytest.raises(VitPruneError, match=r"unknown model preset 'vit_huge_x'.*deit_base_patch16_224"):
        get_preset("vit_huge_x")


# --------------------------------------------------------------------------------------- timm state dicts


@pytest.mark.parametrize(
    "kw,heads,pool",
    [
        ({}, 4, "token"),
        ({"mlp": (48, 20), "depth": 2}, 4, "token"),  # non-uniform MLP widths
        ({"dist": True}, 2, "token"),
        ({"cls": False}, 4, "avg"),
        ({"ls": True, "nec": True}, 4, "token"),  # DeiT-III: LayerScale and pos_embed without the cls row
    ],
    ids=["uniform", "ragged-mlp", "distilled", "avgpool-no-cls", "layerscale-no-embed-class"],
)
def test_timm_state_dict_matches_plain_reference(kw, heads, pool):
    sd = timm_sd(**kw)
    model = from_timm_state_dict(sd, heads=heads)
    c = model.config
    assert c.embed_dim == 32 and c.depth == 2 and c.num_classes == 5 and c.img_size == 32 and c.patch_size == 8
    assert [b.mlp_dim for b in c.blocks] == list(kw.get("mlp", (48, 48)))
    assert [b.heads for b in c.blocks] == [heads, heads]
    assert c.distilled == kw.get("dist", False) and c.class_token == kw.get("cls", True) and c.global_pool == pool
    x = _x()
    with torch.no_grad():
        ref = ref_timm_forward(sd, x, heads, no_embed_class=kw.get("nec", False), pool=pool)
        _close(model(x), ref)


def test_round_trip_of_a_pruned_model_through_timm_files(tmp_path, ragged_config):
    """Per-block heads / QK / V / MLP widths survive a .pth and a .safetensors round trip (heads given per block)."""
    torch.manual_seed(0)
    model = ViT(ragged_config).eval()
    heads = [b.heads for b in ragged_config.blocks]
    torch.save(model.state_dict(), tmp_path / "m.pth")
    save_file(model.state_dict(), str(tmp_path / "m.safetensors"))
    x = _x()
    for name in ("m.pth", "m.safetensors"):
        loaded = load_model(tmp_path / name, heads=heads)
        assert [(b.heads, b.qk_dim, b.v_dim, b.mlp_dim) for b in loaded.config.blocks] == [
            (b.heads, b.qk_dim, b.v_dim, b.mlp_dim) for b in ragged_config.blocks
        ]
        assert loaded.config.distilled
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))


def test_nested_prefixed_and_extension_variants(tmp_path):
    sd = timm_sd()
    ref = from_timm_state_dict(sd, heads=4)
    x = _x()
    torch.save({"model": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, tmp_path / "a.pth")
    torch.save({"state_dict": sd, "optimizer": {"lr": 0.1}}, tmp_path / "b.pt")
    torch.save({"_orig_mod." + k: v.half() for k, v in sd.items()}, tmp_path / "c.bin")
    with torch.no_grad():
        expected = ref(x)
        for name, tol in (("a.pth", 0), ("b.pt", 0), ("c.bin", 5e-2)):
            got = load_model(tmp_path / name, heads=4)(x)
            assert torch.allclose(got, expected, atol=tol, rtol=tol), name


@pytest.fixture(scope="module")
def deit_tiny_sd():
    """Random weights with the DeiT-Tiny / ViT-Tiny shapes (1000 classes)."""
    return timm_sd(dim=192, depth=12, mlp=(768,) * 12, classes=1000, img=224, patch=16)


def _same_weights(model, sd):
    own = model.state_dict()
    assert set(own) == set(sd) and all(torch.equal(own[k], sd[k]) for k in sd)


def test_preset_supplies_heads_and_safetensors_metadata_names_the_preset(tmp_path, deit_tiny_sd):
    sd = deit_tiny_sd
    save_file(sd, str(tmp_path / "m.safetensors"), metadata={"architecture": "deit_tiny_patch16_224"})
    torch.save(sd, tmp_path / "m.pth")
    by_meta = load_model(tmp_path / "m.safetensors")
    by_preset = load_model(tmp_path / "m.pth", preset="deit_tiny_patch16_224", num_classes=1000)
    for m in (by_meta, by_preset):
        assert m.config.blocks[0].heads == 3 and m.config.name == "deit_tiny_patch16_224"
        assert m.config.preprocess == {"preset": "imagenet"}  # the preset's own 1000-class head
        _same_weights(m, sd)
    # A fine-tuned head (other class count): the preset's preprocessing is not assumed.
    sd = dict(sd, **{"head.weight": sd["head.weight"][:10], "head.bias": sd["head.bias"][:10]})
    assert from_timm_state_dict(sd, preset="deit_tiny_patch16_224").config.preprocess is None
    with pytest.raises(VitPruneError, match="embed_dim is 192 in the checkpoint but 384 in the preset"):
        from_timm_state_dict(sd, preset="deit_small_patch16_224")
    with pytest.raises(VitPruneError, match="distilled is False in the checkpoint but True in the preset"):
        from_timm_state_dict(sd, preset="deit_tiny_distilled_patch16_224")


def test_timm_hub_directory_and_bare_directory(tmp_path, deit_tiny_sd):
    sd = dict(
        deit_tiny_sd, **{"head.weight": deit_tiny_sd["head.weight"][:7], "head.bias": deit_tiny_sd["head.bias"][:7]}
    )
    hub = tmp_path / "hub"
    hub.mkdir()
    save_file(sd, str(hub / "model.safetensors"))
    pcfg = {"input_size": [3, 224, 224], "crop_pct": 0.9, "interpolation": "bicubic", "mean": [0.5] * 3}
    pcfg["std"] = [0.5] * 3
    (hub / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "pretrained_cfg": pcfg}))
    loaded = load_model(hub)
    assert loaded.config.blocks[0].heads == 3 and loaded.config.num_classes == 7
    assert loaded.config.preprocess["resize"] == 248 and loaded.config.preprocess["interpolation"] == "bicubic"
    _same_weights(loaded, sd)
    bare = tmp_path / "bare"
    bare.mkdir()
    torch.save(sd, bare / "model.pth")
    _same_weights(load_model(bare, preset="vit_tiny_patch16_224"), sd)


def test_vitprune_directory(tmp_path, tiny_model):
    save(tiny_model, tmp_path / "m")
    loaded = load_model(tmp_path / "m", preset="deit_base_patch16_224")  # preset ignored: config is recorded
    x = _x()
    with torch.no_grad():
        assert torch.equal(loaded(x), tiny_model(x))
    with pytest.raises(VitPruneError, match="head has 10 classes but num_classes=3"):
        load_model(tmp_path / "m", num_classes=3)


def test_gates_in_a_state_dict_are_attached(tmp_path, tiny_model):
    from vitprune.models import attach_gate

    attach_gate(tiny_model.blocks[1].attn, "head_gate", torch.tensor([1.0, 0.0, 1.0, 1.0]))
    attach_gate(tiny_model.blocks[0].mlp, "gate", (torch.arange(64) % 3 != 0).float())
    torch.save(tiny_model.state_dict(), tmp_path / "g.pth")
    loaded = load_model(tmp_path / "g.pth", heads=4)
    x = _x()
    with torch.no_grad():
        assert torch.equal(loaded(x), tiny_model(x))


# ------------------------------------------------------------------------------------------ live timm model


class _FakeTimmViT(torch.nn.Module):
    """Stands in for timm.models.VisionTransformer: same parameter names and the attributes we read."""

    def __init__(self, sd, heads, act=None):
        super().__init__()
        self.inner = from_timm_state_dict(sd, heads=heads)
        for blk in self.inner.blocks:
            blk.attn.num_heads = heads
            if act is not None:
                blk.mlp.act = act
        self.global_pool = "token"
        self.no_embed_class = False

    @property
    def blocks(self):
        return self.inner.blocks

    @property
    def norm(self):
        return self.inner.norm

    def state_dict(self, *args, **kwargs):
        return self.inner.state_dict()


def test_from_timm_model_reads_heads_and_eps():
    sd = timm_sd()
    fake = _FakeTimmViT(sd, heads=4)
    model = from_timm_model(fake)
    assert model.config.blocks[0].heads == 4 and model.config.norm_eps == 1e-6
    x = _x()
    with torch.no_grad():
        _close(model(x), ref_timm_forward(sd, x, 4))
    with pytest.raises(VitPruneError, match="exact GELU required"):
        from_timm_model(_FakeTimmViT(sd, heads=4, act=torch.nn.GELU(approximate="tanh")))
    with pytest.raises(VitPruneError, match="not a timm VisionTransformer"):
        from_timm_model(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------- Hugging Face


@pytest.mark.parametrize("deit", [False, True], ids=["vit", "deit-with-teacher"])
def test_hf_directory_matches_plain_hf_reference(tmp_path, deit):
    sd, cfg = hf_sd_and_config(deit=deit)
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    pp = {"do_resize": True, "size": {"height": 32, "width": 32}, "resample": 2, "image_mean": [0.5] * 3}
    pp["image_std"] = [0.5] * 3
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(pp))
    model = load_model(tmp_path)
    assert model.config.norm_eps == 1e-12 and model.config.blocks[0].heads == 4 and model.config.distilled == deit
    assert model.config.preprocess["resize"] == (32, 32) and model.config.preprocess["interpolation"] == "bilinear"
    x = _x()
    with torch.no_grad():
        _close(model(x), ref_hf_forward(sd, cfg, x))
    # pytorch_model.bin works the same; the raw .bin without config needs heads.
    (tmp_path / "model.safetensors").unlink()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with torch.no_grad():
        _close(load_model(tmp_path)(x), ref_hf_forward(sd, cfg, x))
        _close(load_model(tmp_path / "pytorch_model.bin", heads=4)(x), ref_hf_forward(dict(sd), cfg, x), tol=1e-3)


def test_hf_preprocess_center_crop_and_bad_hf_inputs():
    pp = {"do_resize": True, "size": {"shortest_edge": 256}, "do_center_crop": True, "crop_size": {"height": 224}}
    pp["crop_size"]["width"] = 224
    out = hf_preprocess(dict(pp, resample=3))
    assert out["resize"] == (256, 256) and out["img_size"] == 224 and out["interpolation"] == "bicubic"
    sd, cfg = hf_sd_and_config()
    with pytest.raises(VitPruneError, match="unsupported hidden_act 'gelu_new'"):
        from_hf_state_dict(sd, dict(cfg, hidden_act="gelu_new"))
    with pytest.raises(VitPruneError, match=r"missing key vit\.encoder\.layer\.1\.attention\.attention\.key\.weight"):
        from_hf_state_dict({k: v for k, v in sd.items() if "1.attention.attention.key.weight" not in k}, cfg)
    with pytest.raises(VitPruneError, match=r"unexpected key vit\.encoder\.layer\.0\.extra\.weight"):
        from_hf_state_dict(dict(sd, **{"vit.encoder.layer.0.extra.weight": torch.zeros(1)}), cfg)
    with pytest.raises(VitPruneError, match="head has 5 classes but num_classes=9"):
        from_hf_state_dict(sd, cfg, num_classes=9)


# --------------------------------------------------------------------------------------------- bad inputs


def _one_line_error(fn, match):
    with pytest.raises(VitPruneError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)


def test_bad_inputs_give_one_line_errors(tmp_path):
    sd = timm_sd()
    torch.save(sd, tmp_path / "ok.pth")
    _one_line_error(lambda: load_model(tmp_path / "nope.pth"), "model path not found")
    (tmp_path / "w.txt").write_text("x")
    _one_line_error(lambda: load_model(tmp_path / "w.txt"), "unsupported checkpoint extension '.txt'")
    _one_line_error(lambda: load_model(tmp_path / "ok.pth"), "number of attention heads cannot be inferred")
    _one_line_error(lambda: load_model(tmp_path / "ok.pth", preset="nope"), "unknown model preset 'nope'")
    _one_line_error(lambda: load_model(tmp_path / "ok.pth", heads=5), "not divisible by 5 heads")
    _one_line_error(lambda: load_model(tmp_path / "ok.pth", heads=[4]), "got 1 head counts for 2 blocks")
    _one_line_error(
        lambda: load_model(tmp_path / "ok.pth", heads=4, num_classes=1000),
        "checkpoint head has 5 classes but num_classes=1000",
    )
    missing = {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"}
    _one_line_error(lambda: from_timm_state_dict(missing, heads=4), "missing keys: blocks.1.mlp.fc2.bias")
    no_block = {k: v for k, v in sd.items() if not k.startswith("blocks.0.")}
    _one_line_error(lambda: from_timm_state_dict(no_block, heads=4), "missing keys for block 0")
    extra = dict(sd, **{"blocks.0.attn.extra": torch.zeros(2)})
    _one_line_error(lambda: from_timm_state_dict(extra, heads=4), "unexpected keys: blocks.0.attn.extra")
    wrong = dict(sd, **{"blocks.0.norm1.weight": torch.zeros(31)})
    _one_line_error(
        lambda: from_timm_state_dict(wrong, heads=4), r"shape mismatch for blocks.0.norm1.weight: checkpoint \(31,\)"
    )
    bad_pos = dict(sd, pos_embed=torch.zeros(1, 18, 32))
    _one_line_error(lambda: from_timm_state_dict(bad_pos, heads=4), "pos_embed has 18 rows")
    fc_norm = dict(sd, **{"fc_norm.weight": torch.ones(32)})
    _one_line_error(lambda: from_timm_state_dict(fc_norm, heads=4), r"unsupported architecture feature.*fc_norm")
    # A pickle holding an arbitrary object is refused (weights_only), not executed.
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")
    _one_line_error(
        lambda: load_model(tmp_path / "module.pth", heads=4),
        "is not a plain state dict: it pickles torch.nn.modules.linear.Linear",
    )
    torch.save({"a": 1, "b": "x"}, tmp_path / "nodict.pt")
    _one_line_error(lambda: load_model(tmp_path / "nodict.pt", heads=4), "not a state dict")
    (tmp_path / "junk.pth").write_bytes(b"\x00garbage" * 10)
    _one_line_error(lambda: load_model(tmp_path / "junk.pth", heads=4), "cannot read checkpoint")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00garbage" * 10)
    _one_line_error(lambda: load_model(tmp_path / "junk.safetensors", heads=4), "cannot read safetensors file")
    empty = tmp_path / "emptydir"
    empty.mkdir()
    _one_line_error(lambda: load_model(empty), "no model weights found")
    (empty / "config.json").write_text(json.dumps({"foo": 1}))
    _one_line_error(lambda: load_model(empty), "not a vitprune, timm or Hugging Face ViT config")


def test_config_blocks_are_inferred_for_zero_width_branches():
    cfg = ViTConfig(embed_dim=16, blocks=[BlockConfig(0, 0, 0, 8), BlockConfig(2, 4, 4, 0)], num_classes=3, img_size=16)
    torch.manual_seed(0)
    model = ViT(cfg).eval()
    loaded = from_timm_state_dict(model.state_dict(), heads=[0, 2])
    assert [(b.heads, b.mlp_dim) for b in loaded.config.blocks] == [(0, 8), (2, 0)]
    x = _x(img=16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


# ---------------------------------------------------------------------------------- the real shared model


def _shared_val_images(n_classes=2):
    from vitprune.data import build_eval_transform
    from vitprune.data.imagefolder import ImageFolderDataset

    ds = ImageFolderDataset(SHARED_DATA / "val", build_eval_transform("shared"), SHARED_MODEL / "classes.txt", 1)
    return torch.stack([ds[i * 50][0] for i in range(n_classes)])


@pytest.mark.shared
def test_shared_model_matches_plain_functional_reference():
    from safetensors.torch import load_file

    model = load_model(SHARED_MODEL)  # the directory: model.safetensors + classes.txt, heads from the metadata
    assert model.config.norm_eps == 1e-6 and model.config.blocks[0].heads == 3 and model.config.num_classes == 200
    assert sum(p.numel() for p in model.parameters()) == 5_563_016
    sd = load_file(str(SHARED_MODEL / "model.safetensors"))
    x = _shared_val_images(2)
    with torch.no_grad():
        _close(model(x), ref_timm_forward(sd, x, heads=3, eps=1e-6), tol=1e-4)
