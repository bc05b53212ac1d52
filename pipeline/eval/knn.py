"""Weighted kNN on frozen features, as in DINO's evaluation (Caron et al. 2021, eval_knn.py protocol).

Features are L2-normalized; each test sample's k most cosine-similar training samples vote for
their label with weight exp(similarity / T); the class with the largest total wins.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, num_classes: int,
                k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """train_x (N, D), train_y (N,), test_x (M, D) -> predicted labels (M,)."""
    train = F.normalize(train_x.float(), dim=1)
    k = min(k, len(train))
    preds = []
    for start in range(0, len(test_x), chunk):  # (chunk, N) similarities at a time bounds memory
        test = F.normalize(test_x[start:start + chunk].float(), dim=1)
        sim, idx = (test @ train.T).topk(k, dim=1)  # (b, k)
        weights = (sim / temperature).exp()
        votes = torch.zeros(len(test), num_classes).scatter_add_(1, train_y[idx], weights)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_accuracy(train_x, train_y, test_x, test_y, num_classes: int, k: int = 20, temperature: float = 0.07) -> float:
    pred = knn_predict(train_x, train_y, test_x, num_classes, k, temperature)
    return (pred == test_y).float().mean().item()
