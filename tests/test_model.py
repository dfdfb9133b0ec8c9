import math

import pytest
import torch
import torch.nn.functional as F

from vitprune import VitPruneError
from vitprune.models import BlockConfig, ViT, ViTConfig, load, save


def reference_attention(x, qkv_w, qkv_b, proj_w, proj_b, heads, dq, dv, scale):
    """Plain per-head attention written without SDPA."""
    qkv = x @ qkv_w.T + qkv_b
    q, k, v = qkv.split([heads * dq, heads * dq, heads * dv], -1)
    outs = []
    for h in range(heads):
        qh, kh, vh = q[..., h * dq : (h + 1) * dq], k[..., h * dq : (h + 1) * dq], v[..., h * dv : (h + 1) * dv]
        att = torch.softmax(qh @ kh.transpose(-1, -2) * scale, -1)
        outs.append(att @ vh)
    return torch.cat(outs, -1) @ proj_w.T + proj_b


def test_attention_matches_plain_reference():
    torch.manual_seed(0)
    cfg = ViTConfig(
        embed_dim=16, blocks=[BlockConfig(3, 5, 7, 20, scale=0.3)], num_classes=2, img_size=16, patch_size=8
    )
    attn = ViT(cfg).blocks[0].attn
    x = torch.randn(2, 5, 16)
    ref = reference_attention(x, attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias, 3, 5, 7, 0.3)
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dq,dv", [(5, 7), (7, 5), (6, 6)])
def test_padded_attention_equals_the_unpadded_one_with_its_gradients(dq, dv):
    """The CPU path pads the narrower of QK / V to reach the fused kernel: same values, same gradients."""
    from vitprune.models.vit import attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, d, dtype=torch.float64, requires_grad=True) for d in (dq, dq, dv))
    out = attention(q, k, v, 0.3)
    ref = torch.softmax(q @ k.transpose(-1, -2) * 0.3, -1) @ v
    assert out.shape == ref.shape == (2, 3, 9, dv)
    w = torch.randn_like(ref)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)


def test_attention_does_not_pad_while_exporting(monkeypatch):
    """ONNX Runtime runs unequal widths itself: no pad in an exported graph."""
    from vitprune.models import vit

    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    monkeypatch.setattr(vit.F, "pad", lambda *a, **k: pytest.fail("padded while exporting"))
    q, k, v = torch.randn(1, 2, 4, 3), torch.randn(1, 2, 4, 3), torch.randn(1, 2, 4, 5)
    ref = torch.softmax(q @ k.transpose(-1, -2) * 0.5, -1) @ v
    torch.testing.assert_close(vit.attention(q, k, v, 0.5), ref)


def test_scale_is_stored_not_derived():
    b = BlockConfig(3, 64, 64, 768)
    assert b.scale == pytest.approx(64**-0.5)
    pruned = BlockConfig(3, 40, 64, 768, scale=b.scale)
    assert pruned.scale == pytest.approx(1 / 8)
    assert ViTConfig.from_json(ViTConfig(embed_dim=8, blocks=[pruned]).to_json()).blocks[0].scale == pruned.scale


def test_ragged_save_reload_identical_logits(ragged_config, tmp_path):
    torch.manual_seed(1)
    model = ViT(ragged_config).eval()
    x = torch.randn(3, 3, 32, 32)
    save(model, tmp_path / "m")
    again = load(tmp_path / "m").eval()
    assert again.config == model.config
    assert torch.equal(again(x), model(x))


def test_save_refuses_existing_output(tiny_model, tmp_path):
    save(tiny_model, tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    with pytest.raises(VitPruneError, match="exists"):
        save(tiny_model, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    save(tiny_model, tmp_path / "m", overwrite=True)


def test_empty_branches_add_only_bias():
    cfg = ViTConfig(embed_dim=8, blocks=[BlockConfig(0, 0, 0, 0)], num_classes=3, img_size=16, patch_size=8)
    model = ViT(cfg)
    blk = model.blocks[0]
    x = torch.randn(2, 5, 8)
    expected = x + blk.attn.proj.bias
    expected = expected + blk.mlp.fc2.bias
    torch.testing.assert_close(blk(x), expected)


def test_pos_embed_interpolation_other_size(tiny_model):
    out = tiny_model(torch.randn(1, 3, 48, 48))
    assert out.shape == (1, 10)
    torch.testing.assert_close(tiny_model._pos_embed(4, 4), tiny_model.pos_embed)


def test_emb_mask_equals_narrower_layer_norm():
    torch.manual_seed(0)
    ln = torch.nn.LayerNorm(6)
    ln.weight.data.normal_()
    ln.bias.data.normal_()
    keep = torch.tensor([1, 0, 1, 1, 0, 1.0])
    x = torch.randn(4, 6) * keep
    from vitprune.models.vit import masked_layer_norm

    out = masked_layer_norm(x, ln, keep)
    idx = keep.bool()
    ref = F.layer_norm(x[:, idx], (4,), ln.weight[idx], ln.bias[idx], ln.eps)
    torch.testing.assert_close(out[:, idx], ref)
    assert out[:, ~idx].abs().max() == 0


@pytest.mark.parametrize("bad", [dict(embed_dim=0), dict(img_size=30), dict(global_pool="max")])
def test_bad_config_rejected(bad):
    kwargs = dict(embed_dim=8, blocks=[BlockConfig(1, 8, 8, 8)], img_size=32, patch_size=8) | bad
    with pytest.raises(VitPruneError):
        ViTConfig(**kwargs)


def test_unknown_config_key_named():
    with pytest.raises(VitPruneError, match="bogus"):
        ViTConfig.from_dict({"embed_dim": 8, "blocks": [], "bogus": 1})


def test_load_missing_dir(tmp_path):
    with pytest.raises(VitPruneError, match="not found"):
        load(tmp_path / "nope")


def test_distilled_average_of_heads(ragged_config):
    model = ViT(ragged_config).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    expected = (model.head(feats[:, 0]) + model.head_dist(feats[:, 1])) / 2
    torch.testing.assert_close(model(x), expected)
    assert math.isfinite(model(x).sum().item())
