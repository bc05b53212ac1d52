"""kNN, linear probe, fine-tuning and reconstructions on synthetic data and small Fashion-MNIST shards."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from pipeline.config import RunConfig
from pipeline.eval.evaluate import evaluate
from pipeline.eval.features import Features
from pipeline.eval.finetune import Classifier, freeze_for_partial, param_groups
from pipeline.eval.knn import knn_accuracy
from pipeline.eval.linear import LinearProbe, linear_probe_accuracy, probe_head
from pipeline.eval.reconstruct import reconstruct, reconstruction_grid, reconstruction_series, unnormalize_pred
from pipeline.model.mae import MAE
from tests.helpers import write_small_dataset


def small_mae(norm_pix: bool = True, seed: int = 0) -> MAE:
    torch.manual_seed(seed)
    return MAE(img_size=32, patch_size=8, in_chans=1, embed_dim=32, depth=2, num_heads=2,
               decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, norm_pix_loss=norm_pix)


def separable(n: int, dim: int = 16, classes: int = 4, seed: int = 0) -> tuple[Features, Features]:
    """Gaussian blobs around well separated random centres (plus a shared offset, so that the
    probe's BatchNorm and kNN's cosine have something to normalize away)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 4

    def draw(m):
        y = torch.randint(0, classes, (m,), generator=g)
        return Features(centres[y] + torch.randn(m, dim, generator=g) + 10, y, 0.0)

    return draw(n), draw(n // 2)


def test_knn_recovers_labels_of_separable_set():
    train, test = separable(400)
    assert knn_accuracy(train.x, train.y, test.x, test.y, 4, k=20, temperature=0.07) > 0.97
    # shuffled training labels carry no information: near chance
    perm = train.y[torch.randperm(len(train.y), generator=torch.Generator().manual_seed(1))]
    assert knn_accuracy(train.x, perm, test.x, test.y, 4) < 0.5


def test_linear_probe_recovers_labels_of_separable_set():
    cfg = RunConfig().eval
    cfg.linear_epochs, cfg.linear_batch = 10, 64
    train, test = separable(400)
    assert linear_probe_accuracy(train, test, 4, cfg) > 0.97


def test_probe_batchnorm_has_no_affine_parameters():
    head = probe_head(24, 10)
    bn = head[0]
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine
    assert bn.weight is None and bn.bias is None
    assert [n for n, _ in head.named_parameters()] == ["1.weight", "1.bias"]


def test_only_the_head_gets_gradients_in_linear_probing():
    model = small_mae()
    probe = LinearProbe(model.encoder, num_classes=10, pool="cls")
    probe.train()
    assert not probe.encoder.training  # frozen encoder stays in eval mode
    imgs, labels = torch.randn(8, 1, 32, 32), torch.randint(0, 10, (8,))
    torch.nn.functional.cross_entropy(probe(imgs), labels).backward()
    for name, p in probe.named_parameters():
        if name.startswith("head."):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


@pytest.mark.parametrize("norm_pix", [True, False])
def test_unnormalize_inverts_target_normalization(norm_pix):
    model = small_mae(norm_pix)
    imgs = torch.randn(3, 1, 32, 32) * 2 + 0.5
    back = unnormalize_pred(model, imgs, model.target(imgs))
    torch.testing.assert_close(back, model.patchify(imgs), rtol=1e-4, atol=1e-4)


def test_reconstruction_views_keep_visible_patches():
    model = small_mae()
    imgs = torch.randn(2, 1, 32, 32)
    views = reconstruct(model, imgs, seed=3)
    hidden = (views["masked"] == 0).float()
    # visible pixels of the pasted view are the original's; masked ones the reconstruction's
    torch.testing.assert_close(views["reconstruction + visible"] * (1 - hidden), imgs * (1 - hidden))
    torch.testing.assert_close(views["reconstruction + visible"] * hidden, views["reconstruction"] * hidden)
    assert 0.6 < hidden.mean().item() < 0.9  # 75% of the patches hidden


def test_reconstruction_pngs(tmp_path):
    model, later = small_mae(seed=0), small_mae(seed=1)
    imgs = torch.randn(3, 1, 32, 32)
    grid = Image.open(reconstruction_grid(model, imgs, str(tmp_path / "g.png"), [0.5], [0.25]))
    assert grid.size[0] > 4 * 96 and grid.size[1] > 3 * 96
    series = Image.open(reconstruction_series([("step 1", model), ("step 2", later)], imgs,
                                              str(tmp_path / "s.png"), [0.5], [0.25]))
    assert series.size[1] > 4 * 96  # original, masked, two checkpoints


def test_partial_finetune_trains_only_last_blocks_and_head():
    model = Classifier(small_mae().encoder, 10)
    freeze_for_partial(model, 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("encoder.blocks.1.", "encoder.norm.", "head.")) for n in trainable)
    groups = param_groups(model, 1.0, 0.05, 0.5)
    scales = {g["lr_scale"] for g in groups}
    assert scales == {1.0, 0.5}  # head/norm at full lr, the last block one decay step lower


def fmnist_cfg(tmp_path) -> RunConfig:
    cfg = RunConfig()
    cfg.data.manifest = write_small_dataset(str(tmp_path / "shards"), {"train": [150, 150], "val": [100]})
    cfg.data.mean, cfg.data.std, cfg.data.num_workers = [0.286], [0.353], 0
    cfg.model.img_size, cfg.model.patch_size, cfg.model.in_chans = 32, 8, 1
    cfg.eval.batch_size, cfg.eval.linear_epochs, cfg.eval.finetune_epochs = 64, 5, 1
    cfg.eval.linear_batch = 64
    return cfg


def test_evaluate_table_with_baselines_on_fashion_mnist(tmp_path):
    cfg = fmnist_cfg(tmp_path)
    model = small_mae().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = evaluate(model, cfg, which=("knn", "linear", "finetune"), baselines=True)
    # the caller's model is untouched: same weights, still trainable, still in train mode
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and all(p.requires_grad for p in model.parameters())
    got = {(r["encoder"], r["protocol"].split()[0]) for r in rows}
    assert got == {(e, p) for e in ("mae", "raw_pixels", "random_init") for p in ("knn", "linear")} | {
        ("mae", "finetune"), ("scratch", "finetune")}
    for r in rows:
        assert r["test_samples"] == 100 and r["test_split"] == "val" and 0 <= r["top1"] <= 1
        assert r["train_samples"] == 300
    raw = {r["protocol"].split()[0]: r["top1"] for r in rows if r["encoder"] == "raw_pixels"}
    assert raw["knn"] > 0.5 and raw["linear"] > 0.5  # 10 classes: pixels alone are far above chance


def test_evaluate_caps_train_samples(tmp_path):
    cfg = fmnist_cfg(tmp_path)
    cfg.eval.max_train_samples = 100
    rows = evaluate(None, cfg, which=("knn",), baselines=True)
    assert [r["encoder"] for r in rows] == ["raw_pixels", "random_init"]
    assert all(r["train_samples"] == 100 for r in rows)
