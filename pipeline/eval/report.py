"""RUN/report.md and a self-contained RUN/report.html: config, curves, throughput, evals, pictures.

The report is built once as a list of blocks and rendered twice: markdown links the pictures in
RUN/report/, HTML embeds them (base64), so the .html can be mailed or attached alone.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import statistics
import time

from data_shards import storage
from pipeline.eval.runs import EVALS, read_json, read_jsonl

log = logging.getLogger(__name__)
MAX_SERIES = 6


def _curves_png(metrics: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax1.plot(steps, [m["loss"] for m in metrics])
    ax1.set(xlabel="step", ylabel="loss (masked patches)", title="training loss")
    ax2.plot(steps, [m["lr"] for m in metrics], color="tab:orange")
    ax2.set(xlabel="step", ylabel="lr", title="learning rate")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def throughput(metrics: list[dict]) -> list[tuple[str, str]]:
    rates = [m["images_per_s"] for m in metrics if "images_per_s" in m]
    out = [("steps logged", str(metrics[-1]["step"]))]
    if rates:
        out.append(("images/s (median of intervals)", f"{statistics.median(rates):.1f}"))
    waits = [m["data_wait_frac"] for m in metrics if "data_wait_frac" in m]
    if waits:
        out.append(("time waiting for data (mean fraction)", f"{statistics.fmean(waits):.3f}"))
    times = [m["time"] for m in metrics if "time" in m]
    if len(times) > 1:
        out.append(("wall time between first and last log line", f"{(times[-1] - times[0]) / 60:.1f} min"))
    out.append(("final loss", f"{metrics[-1]['loss']:.4f}"))
    return out


def eval_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["step", "encoder", "protocol", "top-1 %", "train (split, n)", "test (split, n)", "wall s"]
    body = []
    for r in sorted(rows, key=lambda r: (r.get("step") or 0, r["protocol"].split()[0], r["encoder"])):
        body.append([str(r.get("step", "")), r["encoder"], r["protocol"], f"{100 * r['top1']:.2f}",
                     f"{r['train_split']}, {r['train_samples']}", f"{r['test_split']}, {r['test_samples']}",
                     f"{r['wall_s'] + r.get('feature_s', 0):.0f}"])
    return header, body


def _pictures(run: str, cfg_dict: dict, data: str, samples: int) -> list[tuple]:
    """Reconstruction grid of the newest checkpoint and a series over up to MAX_SERIES checkpoints."""
    from pipeline.config import config_from_dict
    from pipeline.eval.features import split_loader
    from pipeline.eval.reconstruct import reconstruction_grid, reconstruction_series
    from pipeline.train.checkpoint import complete_tags, load_pretrained

    tags = complete_tags(storage.join(run, "checkpoints"))
    if not tags:
        return [("p", "No complete checkpoint in this run yet: no reconstructions.")]
    cfg = config_from_dict(cfg_dict)
    if data:
        cfg.data.manifest = data
    cfg.eval.batch_size = samples
    batch = next(iter(split_loader(cfg, cfg.eval.split_test, samples).epoch_batches()))
    images, mean, std = batch["image"], cfg.data.mean, cfg.data.std
    pick = [tags[round(i * (len(tags) - 1) / (MAX_SERIES - 1))] for i in range(MAX_SERIES)] if len(tags) > MAX_SERIES else tags
    pick = list(dict.fromkeys(pick))
    models = [(f"step {int(t.split('-')[1])}", load_pretrained(storage.join(run, "checkpoints", t))[0]) for t in pick]
    grid = reconstruction_grid(models[-1][1], images, storage.join(run, "report", "reconstruction.png"), mean, std)
    blocks = [("p", f"Newest checkpoint ({models[-1][0]}), {samples} images of split "
                    f"'{cfg.eval.split_test}', mask ratio {models[-1][1].mask_ratio}:"),
              ("img", "report/reconstruction.png", storage.read_bytes(grid), "reconstructions")]
    if len(models) > 1:
        series = reconstruction_series(models, images, storage.join(run, "report", "reconstruction_series.png"), mean, std)
        blocks += [("p", "The same images and mask through the run's checkpoints:"),
                   ("img", "report/reconstruction_series.png", storage.read_bytes(series), "reconstructions over training")]
    return blocks


def build(run: str, data: str = "", pictures: bool = True, samples: int = 8) -> list[tuple]:
    cfg = read_json(storage.join(run, "config.json"))
    if cfg is None:
        raise FileNotFoundError(f"{run} has no config.json: give a run folder written by `maepipe train`")
    # step records only: checkpoint / restore events share the file
    metrics = [m for m in read_jsonl(storage.join(run, "metrics.jsonl")) if "event" not in m]
    evals = read_jsonl(storage.join(run, EVALS))
    blocks: list[tuple] = [("h1", f"maepipe run: {cfg.get('name', run)}"),
                           ("p", f"Run folder `{run}`; report written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.")]
    blocks.append(("h2", "Training"))
    if metrics:
        curves = _curves_png(metrics)
        storage.write_atomic(storage.join(run, "report", "curves.png"), curves)
        blocks += [("img", "report/curves.png", curves, "loss and lr curves"),
                   ("table", ["quantity", "value"], [list(kv) for kv in throughput(metrics)])]
    else:
        blocks.append(("p", "No metrics.jsonl yet."))
    blocks.append(("h2", "Evaluation"))
    if evals:
        header, body = eval_table(evals)
        blocks += [("p", "Every row: top-1 accuracy on the test split, with the split sizes and the protocol; "
                         "baselines (raw_pixels, random_init, scratch) use the same splits and protocol. "
                         "wall s includes feature extraction."),
                   ("table", header, body)]
    else:
        blocks.append(("p", f"No {EVALS} yet: run `maepipe eval {run} --data DEST --knn --linear --baselines`."))
    if pictures:
        blocks.append(("h2", "Reconstructions"))
        blocks.append(("p", "Columns: original, masked input, reconstruction, reconstruction with the visible "
                            "patches pasted back (norm-pix predictions un-normalized with each patch's own statistics)."))
        try:
            blocks += _pictures(run, cfg, data, samples)
        except (FileNotFoundError, KeyError, ValueError) as err:
            log.warning("no reconstructions: %s", err)
            blocks.append(("p", f"No reconstructions: {err}"))
    blocks += [("h2", "Config"), ("code", json.dumps(cfg, indent=1))]
    return blocks


def to_markdown(blocks: list[tuple]) -> str:
    out = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            out.append(("# " if kind == "h1" else "## ") + rest[0])
        elif kind == "p":
            out.append(rest[0])
        elif kind == "img":
            out.append(f"![{rest[2]}]({rest[0]})")
        elif kind == "code":
            out.append(f"```\n{rest[0]}\n```")
        elif kind == "table":
            header, body = rest
            out.append("\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                                 + ["| " + " | ".join(row) + " |" for row in body]))
    return "\n\n".join(out) + "\n"


def to_html(blocks: list[tuple]) -> str:
    e = html.escape
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>maepipe report</title><style>"
           "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}pre{background:#f6f6f6;padding:1em;"
           "overflow:auto;max-height:30em}img{max-width:100%}</style></head><body>"]
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            out.append(f"<{kind}>{e(rest[0])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{e(rest[0])}</p>")
        elif kind == "img":
            out.append(f"<img alt='{e(rest[2])}' src='data:image/png;base64,{base64.b64encode(rest[1]).decode()}'>")
        elif kind == "code":
            out.append(f"<pre>{e(rest[0])}</pre>")
        elif kind == "table":
            header, body = rest
            out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in body)
                       + "</table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(run: str, data: str = "", pictures: bool = True, samples: int = 8) -> str:
    """Write RUN/report.md and RUN/report.html (local or URL); -> the markdown's URL."""
    run = str(run).rstrip("/")
    blocks = build(run, data, pictures, samples)
    storage.write_atomic(storage.join(run, "report.html"), to_html(blocks).encode())
    md = storage.join(run, "report.md")
    storage.write_atomic(md, to_markdown(blocks).encode())
    log.info("report: %s (+ report.html)", md)
    return md
