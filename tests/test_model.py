"""The MAE model: patchify, masking, encoder cost, loss, norm-pix, presets, init."""

import pytest
import torch

from pipeline.config import ConfigError, ModelConfig
from pipeline.model import MAE, PRESETS, build_mae, patchify, unpatchify
from pipeline.model.mae import num_kept


def small(**kw) -> MAE:
    torch.manual_seed(0)
    args = dict(preset="tiny", img_size=32, patch_size=4, in_chans=3) | kw
    return build_mae(ModelConfig(**args))


@pytest.mark.parametrize("channels,p,size", [(1, 4, 32), (3, 16, 64), (3, 14, 56)])
def test_patchify_unpatchify_inverse(channels, p, size):
    imgs = torch.randn(2, channels, size, size)
    x = patchify(imgs, p)
    assert x.shape == (2, (size // p) ** 2, p * p * channels)
    assert torch.equal(unpatchify(x, p, channels), imgs)
    # patch 1 (row 0, col 1) holds exactly the pixels of that square
    assert torch.equal(x[0, 1].reshape(p, p, channels), imgs[0, :, :p, p:2 * p].permute(1, 2, 0))


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_masking_keeps_round_count_and_restores_order(ratio):
    model = small()
    L = model.num_patches
    noise = torch.rand(5, L)
    ids_keep, mask, ids_restore = model.random_masking(5, ratio, noise)
    keep = round(L * (1 - ratio))
    assert num_kept(L, ratio) == keep
    assert ids_keep.shape == (5, keep)
    assert torch.equal(mask.sum(1), torch.full((5,), float(L - keep)))
    ids_shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(L).expand(5, L))
    # the kept patches are exactly the unmasked ones
    for b in range(5):
        assert set(ids_keep[b].tolist()) == set(torch.nonzero(mask[b] == 0).flatten().tolist())


def test_given_noise_makes_masking_reproducible():
    model = small()
    noise = torch.rand(2, model.num_patches)
    assert torch.equal(model.random_masking(2, 0.75, noise)[1], model.random_masking(2, 0.75, noise.clone())[1])


def test_loss_ignores_visible_patches():
    model = small(norm_pix_loss=False).eval()
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, model.num_patches)
    latent, mask, ids_restore = model.forward_encoder(imgs, 0.75, noise)
    pred = model.forward_decoder(latent, ids_restore)
    base = model.forward_loss(imgs, pred, mask)
    # change the target of a visible patch (not what the encoder saw: only the loss's target)
    visible = int(torch.nonzero(mask[0] == 0)[0])
    target = model.patchify(imgs)
    target[0, visible] += 10.0
    changed = model.forward_loss(model.unpatchify(target), pred, mask)
    assert torch.allclose(base, changed)
    masked = int(torch.nonzero(mask[0] == 1)[0])
    target[0, masked] += 10.0
    assert not torch.allclose(base, model.forward_loss(model.unpatchify(target), pred, mask))


def test_encoder_cost_scales_with_visible_tokens():
    model = small()
    seen = []
    model.encoder.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    imgs = torch.randn(2, 3, 32, 32)
    for ratio in (0.0, 0.75, 0.9):
        model(imgs, mask_ratio=ratio)
    L = model.num_patches
    assert seen == [1 + L, 1 + round(L * 0.25), 1 + round(L * 0.1)]


def test_norm_pix_target_matches_direct_computation():
    model = small(norm_pix_loss=True)
    imgs = torch.randn(2, 3, 32, 32)
    target = model.target(imgs)
    for b, l in [(0, 0), (1, 17), (1, 63)]:
        patch = model.patchify(imgs)[b, l]
        direct = (patch - patch.mean()) / torch.sqrt(patch.var(unbiased=True) + 1e-6)
        assert torch.allclose(target[b, l], direct, atol=1e-5)


def count(module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


@pytest.mark.parametrize("preset,millions", [("base", 86), ("large", 304)])
def test_presets_have_published_encoder_sizes(preset, millions):
    model = build_mae(ModelConfig(preset=preset))
    assert abs(count(model.encoder) - millions) / millions < 0.01
    assert model.decoder_blocks[0].attn.qkv.in_features == 512 and len(model.decoder_blocks) == 8


def test_decoder_shape_overrides_the_preset():
    model = small(decoder_depth=8, decoder_embed_dim=64)
    assert len(model.decoder_blocks) == 8 and model.decoder_blocks[0].attn.qkv.in_features == 64
    assert model.decoder_embed.out_features == 64 and model.mask_token.shape == (1, 1, 64)
    assert small(decoder_embed_dim=64).encoder.blocks[0].attn.qkv.in_features == 192  # encoder untouched


def test_huge_uses_patch_14():
    assert PRESETS["huge"].patch_size == 14 and PRESETS["huge"].embed_dim == 1280 and PRESETS["huge"].depth == 32
    ModelConfig(preset="huge", img_size=210).check()  # 15 x 14: the config checks against the preset's patch
    with pytest.raises(ConfigError, match=r"model\.img_size=210.*patch_size=16"):
        ModelConfig(preset="large", img_size=210).check()


def test_init_follows_the_paper():
    model = small()
    assert abs(model.mask_token.std().item() - 0.02) < 0.01
    assert torch.all(model.decoder_embed.bias == 0)
    w = model.encoder.blocks[0].attn.qkv.weight
    bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5  # xavier_uniform
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert not any("pos_embed" in n for n, _ in model.named_parameters())  # fixed, not learned


def test_forward_shapes_grayscale():
    model = small(in_chans=1)
    loss, pred, mask = model(torch.randn(3, 1, 32, 32))
    assert loss.ndim == 0 and pred.shape == (3, 64, 16) and mask.shape == (3, 64)
    loss.backward()
    assert model.encoder.patch_embed.proj.weight.grad is not None
