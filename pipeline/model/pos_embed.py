"""Fixed 2-D sine-cosine position embeddings (MAE/MoCo v3): half the channels encode the row, half the column."""

import torch


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """positions (M,) -> (M, dim): sin of dim/2 frequencies, then cos of the same."""
    assert dim % 2 == 0, "embedding dim must be even"
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid: int, cls_token: bool = True) -> torch.Tensor:
    """(grid*grid [+1], dim) float32; row 0 is zeros for the [cls] token when cls_token."""
    assert dim % 4 == 0, "embedding dim must be divisible by 4 for 2-D sin-cos"
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()
