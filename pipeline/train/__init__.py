"""Training: launch-agnostic distribution, the DeepSpeed engine, the loop, checkpoints and export."""
