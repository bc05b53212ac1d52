"""Downstream evaluation of MAE encoders: kNN, linear probe, fine-tuning, reconstructions, reports.

    rows = evaluate(model, cfg, which=("knn", "linear"), baselines=True)   # one table, same splits
    reconstruction_grid(model, images, "recon.png", mean, std)
    write_report("runs/demo")                                             # report.md + report.html
"""

from pipeline.eval.evaluate import evaluate
from pipeline.eval.reconstruct import reconstruction_grid, reconstruction_series
from pipeline.eval.report import write_report


__all__ = ["evaluate", "reconstruction_grid", "reconstruction_series", "write_report"]
