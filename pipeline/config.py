"""One typed config tree for a maepipe run.

A run is described by a TOML file in configs/ plus `section.key=value` overrides on the command
line. Every field carries a docstring (the string literal under it); `maepipe train --help-config`
prints them. Cross-field checks live in each section's `check()` and raise ConfigError naming the
field, so the CLI can exit 2 with a message that says what to change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.presets import resolve_preset


class ConfigError(ValueError):
    """A bad config value; the message names the field (`section.key`) and the accepted values."""


@dataclass
class ModelConfig:
    preset: Literal["micro", "tiny", "small", "base", "large", "huge"] = "tiny"
    """Encoder/decoder shape: micro (128-d x 6 blocks, for CPU runs on small images), tiny (ViT-Ti), small (ViT-S), base (ViT-B/16), large (ViT-L/16), huge (ViT-H/14)."""
    img_size: int = 224
    """Input side in pixels (square); must be divisible by patch_size."""
    patch_size: int = 0
    """Patch side in pixels; 0 takes the preset's (16, or 14 for huge)."""
    in_chans: int = 3
    """Image channels: 3 for RGB, 1 for grayscale data such as Fashion-MNIST."""
    mask_ratio: float = 0.75
    """Fraction of patches hidden from the encoder, in [0, 1)."""
    norm_pix_loss: bool = True
    """Regress per-patch normalized pixels (mean/var of each target patch, eps 1e-6), as the paper's best setting."""
    drop_path: float = 0.0
    """Stochastic depth rate in the encoder (used for fine-tuning; MAE pretraining uses 0)."""
    decoder_depth: int = 0
    """Decoder blocks; 0 takes the preset's. Deeper decoders leave the encoder's top blocks to representation (paper Table 1a)."""
    decoder_embed_dim: int = 0
    """Decoder width; 0 takes the preset's. Must be divisible by the preset's decoder head count."""

    def check(self) -> None:
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(f"model.mask_ratio={self.mask_ratio}: must be in [0, 1) (the paper uses 0.75)")
        if self.img_size <= 0:
            raise ConfigError(f"model.img_size={self.img_size}: must be positive")
        if self.patch_size < 0:
            raise ConfigError(f"model.patch_size={self.patch_size}: must be positive, or 0 for the preset's")
        try:
            shape = resolve_preset(self.preset)
        except ValueError as e:  # the one message for an unknown preset; here it is a config error
            raise ConfigError(str(e)) from None
        patch = self.patch_size or shape.patch_size
        if self.img_size % patch:
            raise ConfigError(
                f"model.img_size={self.img_size} is not divisible by model.patch_size={patch}: "
                f"pick an image size that is a multiple of {patch} or another patch size"
            )
        if self.in_chans not in (1, 3):
            raise ConfigError(f"model.in_chans={self.in_chans}: accepted values are 1 and 3")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"model.drop_path={self.drop_path}: must be in [0, 1)")
        if self.decoder_depth < 0:
            raise ConfigError(f"model.decoder_depth={self.decoder_depth}: must be positive, or 0 for the preset's")
        if self.decoder_embed_dim < 0:
            raise ConfigError(f"model.decoder_embed_dim={self.decoder_embed_dim}: must be positive, or 0 for the preset's")
        if (self.decoder_embed_dim or shape.decoder_embed_dim) % shape.decoder_num_heads:
            raise ConfigError(f"model.decoder_embed_dim={self.decoder_embed_dim}: must be a multiple of the "
                              f"{self.preset} preset's {shape.decoder_num_heads} decoder heads")


@dataclass
class DataConfig:
    manifest: str = ""
    """URL of the shard manifest (DEST/manifest.json or DEST): a local path, file://, s3://, any fsspec URL."""
    split: str = "train"
    """Manifest split to pretrain on."""
    batch_size: int = 64
    """Micro-batch per rank; the effective batch is batch_size x world size x grad_accum."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0 reads in the training process)."""
    shuffle_window: int = 1024
    """Samples permuted together inside each window of the epoch order (bigger mixes more, costs memory)."""
    remainder: Literal["drop", "wrap"] = "drop"
    """Samples that do not fill a global batch at epoch end: drop them, or wrap from the epoch start."""
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    """RandomResizedCrop area range (fractions of the image)."""
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    """RandomResizedCrop aspect ratio range."""
    hflip: bool = True
    """Random horizontal flip with probability 0.5."""
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    """Per-channel mean used to normalize pixels in [0, 1]."""
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    """Per-channel std used to normalize pixels in [0, 1]."""
    max_skip_fraction: float = 0.01
    """Stop the run once more than this fraction of samples read could not be decoded."""
    retries: int = 8
    """Attempts per remote read before giving up (exponential backoff with jitter between them)."""

    def check(self) -> None:
        if not self.manifest:
            raise ConfigError("data.manifest is empty: give the URL of a shard manifest (maepipe shard SRC DEST makes one)")
        for name in ("batch_size", "shuffle_window", "retries"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name}={getattr(self, name)}: must be at least 1")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers}: must be 0 or more")
        lo, hi = _pair("data.crop_scale", self.crop_scale)
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"data.crop_scale={self.crop_scale}: need 0 < min <= max <= 1")
        lo, hi = _pair("data.crop_ratio", self.crop_ratio)
        if not 0 < lo <= hi:
            raise ConfigError(f"data.crop_ratio={self.crop_ratio}: need 0 < min <= max")
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ConfigError(f"data.mean/data.std: need one positive std per mean, got {self.mean} and {self.std}")
        if not 0 <= self.max_skip_fraction < 1:
            raise ConfigError(f"data.max_skip_fraction={self.max_skip_fraction}: must be in [0, 1)")


@dataclass
class OptimConfig:
    base_lr: float = 1.5e-4
    """Learning rate per 256 images: lr = base_lr x effective_batch / 256 (the MAE recipe)."""
    lr: float = 0.0
    """Absolute learning rate; when > 0 it replaces the base_lr rule."""
    min_lr: float = 0.0
    """Floor of the cosine schedule."""
    weight_decay: float = 0.05
    """AdamW decoupled weight decay, not applied to norms, biases, position embeddings or tokens."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas (the MAE recipe uses 0.95 for beta2)."""
    warmup_steps: int = 0
    """Linear warmup length in optimizer steps; with warmup_fraction both may be given and the larger wins."""
    warmup_fraction: float = 0.05
    """Warmup length as a fraction of train.steps (MAE: 40 of 800 epochs = 0.05)."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value; 0 turns clipping off (MAE pretraining does not clip)."""

    def check(self) -> None:
        if self.base_lr <= 0:
            raise ConfigError(f"optim.base_lr={self.base_lr}: must be positive")
        if self.lr < 0:
            raise ConfigError(f"optim.lr={self.lr}: must be positive, or 0 to use optim.base_lr")
        if self.min_lr < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("optim.min_lr, optim.weight_decay and optim.grad_clip must be 0 or more")
        b1, b2 = _pair("optim.betas", self.betas)
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ConfigError(f"optim.betas={self.betas}: each must be in [0, 1)")
        if self.warmup_steps < 0 or not 0 <= self.warmup_fraction < 1:
            raise ConfigError("optim.warmup_steps must be >= 0 and optim.warmup_fraction in [0, 1)")


@dataclass
class TrainConfig:
    steps: int = 1000
    """Total optimizer steps; the lr schedule spans them."""
    time_limit_minutes: float = 0.0
    """Stop (with a checkpoint) after this many minutes of training; 0 means no limit."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision; bf16 on GPUs, fp32 on CPU (bf16 is ~10x slower on AVX2 CPUs)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer), 2 (+gradients), 3 (+parameters)."""
    seed: int = 0
    """Seeds model init, masking noise and augmentation; with the data seed it fixes the whole run."""
    log_every: int = 10
    """Optimizer steps between metric lines (JSONL, TensorBoard, console)."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    activation_checkpointing: bool = False
    """Recompute encoder blocks in the backward pass to save activation memory."""
    nonfinite_skips: int = 0
    """Steps with a non-finite loss or gradient that may be skipped before the run stops."""
    peak_tflops: float = 0.0
    """Accelerator peak TFLOP/s for MFU; 0 looks the device up in a table of known GPUs."""
    dist_timeout_s: float = 300.0
    """Collective timeout: a rank that dies makes the others fail after at most this long."""

    def check(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"train.steps={self.steps}: must be at least 1")
        if self.grad_accum < 1:
            raise ConfigError(f"train.grad_accum={self.grad_accum}: must be at least 1")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"train.zero_stage={self.zero_stage}: accepted values are 0, 1, 2, 3")
        if self.log_every < 1:
            raise ConfigError(f"train.log_every={self.log_every}: must be at least 1")
        if self.time_limit_minutes < 0 or self.nonfinite_skips < 0 or self.dist_timeout_s <= 0:
            raise ConfigError("train.time_limit_minutes and train.nonfinite_skips must be >= 0, train.dist_timeout_s > 0")


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Save every N optimizer steps (0: only at the end, on preemption and on the time limit)."""
    every_minutes: float = 0.0
    """Also save when this many minutes passed since the last save (0: off)."""
    keep_last: int = 3
    """Keep the newest K complete checkpoints."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of M (0: off)."""
    upload_url: str = ""
    """Copy each complete checkpoint to this fsspec URL (e.g. s3://bucket/run) in the background."""
    resume: str = ""
    """'' starts fresh; 'auto' takes the newest complete checkpoint (local, then upload_url); or a path/URL."""

    def check(self) -> None:
        if self.every_steps < 0 or self.every_minutes < 0 or self.keep_every < 0:
            raise ConfigError("checkpoint.every_steps, checkpoint.every_minutes and checkpoint.keep_every must be >= 0")
        if self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last={self.keep_last}: must be at least 1 (the newest is always kept)")


@dataclass
class EvalConfig:
    split_train: str = "train"
    """Labelled split the probes train on (kNN memory bank, linear head)."""
    split_test: str = "val"
    """Labelled split the accuracies are measured on."""
    max_train_samples: int = 0
    """Cap on training samples for the probes (0: the whole split)."""
    pool: Literal["cls", "mean"] = "mean"
    """Feature of an image: the [cls] token or the mean of the patch tokens."""
    knn_k: int = 20
    """Neighbours voting in kNN."""
    knn_temperature: float = 0.07
    """Temperature of the exp(sim / T) vote weights (DINO's protocol)."""
    linear_epochs: int = 20
    """Epochs of linear-probe training on cached features."""
    linear_lr: float = 0.1
    """Base lr of the probe (LARS-free SGD with momentum 0.9, cosine), scaled by batch/256."""
    linear_batch: int = 1024
    """Batch size of the linear probe (on cached features: larger batches cost less per epoch)."""
    finetune_epochs: int = 5
    """Epochs of fine-tuning."""
    finetune_blocks: int = 0
    """Fine-tune only the last k encoder blocks (0: the whole encoder)."""
    finetune_samples: int = 0
    """Cap on training samples for fine-tuning (0: the whole split); steps = epochs x samples / batch."""
    finetune_drop_path: float = 0.1
    """Stochastic depth rate of the last encoder block while fine-tuning (linear from 0 at the first)."""
    finetune_weight_decay: float = 0.05
    """AdamW weight decay of fine-tuning (not on norms, biases and tokens)."""
    finetune_lr: float = 1e-3
    """Base lr of fine-tuning (scaled by batch/256)."""
    layer_decay: float = 0.75
    """Layer-wise lr decay of fine-tuning."""
    batch_size: int = 256
    """Batch size for feature extraction and fine-tuning."""

    def check(self) -> None:
        if self.knn_k < 1 or self.knn_temperature <= 0:
            raise ConfigError("eval.knn_k must be >= 1 and eval.knn_temperature > 0")
        if self.finetune_samples < 0 or self.max_train_samples < 0 or self.finetune_blocks < 0:
            raise ConfigError("eval.max_train_samples, eval.finetune_samples and eval.finetune_blocks must be >= 0")
        if not 0 <= self.finetune_drop_path < 1:
            raise ConfigError(f"eval.finetune_drop_path={self.finetune_drop_path}: must be in [0, 1)")
        if self.linear_epochs < 1 or self.finetune_epochs < 1 or self.batch_size < 1 or self.linear_batch < 2:
            raise ConfigError("eval.linear_epochs, eval.finetune_epochs, eval.batch_size must be >= 1, eval.linear_batch >= 2")
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"eval.layer_decay={self.layer_decay}: must be in (0, 1]")


@dataclass
class RunConfig:
    name: str = "run"
    """Run name; the run directory is out_dir/name unless out_dir already names it."""
    out_dir: str = "runs"
    """Parent folder of run directories."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def check(self) -> "RunConfig":
        for section in SECTIONS:
            getattr(self, section).check()
        if len(self.data.mean) != self.model.in_chans:
            raise ConfigError(
                f"data.mean has {len(self.data.mean)} values but model.in_chans={self.model.in_chans}: "
                "give one mean and std per channel"
            )
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self, sections: tuple[str, ...] = ("model",)) -> str:
        """Digest of the named sections: what a checkpoint must agree with to be resumed."""
        blob = json.dumps({s: dataclasses.asdict(getattr(self, s)) for s in sections}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")


SECTIONS = ("model", "data", "optim", "train", "checkpoint", "eval")


def _pair(name: str, values: list[float]) -> tuple[float, float]:
    if len(values) != 2:
        raise ConfigError(f"{name}={values}: needs exactly two numbers [min, max]")
    return float(values[0]), float(values[1])


def _coerce(path: str, value: Any, annotation: Any) -> Any:
    """Check `value` against a field annotation; ints widen to floats, nothing else converts."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{path}={value!r}: accepted values are {', '.join(map(repr, choices))}")
        return value
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{path}={value!r}: expected a list such as [0.2, 1.0]")
        return [_coerce(f"{path}[{i}]", v, item) for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{path}={value!r}: expected true or false")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{path}={value!r}: expected an integer")
    if not isinstance(value, annotation):
        raise ConfigError(f"{path}={value!r}: expected {annotation.__name__}")
    return value


def _apply(obj: Any, path: str, values: dict[str, Any]) -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in values.items():
        where = f"{path}.{key}" if path else key
        if key not in names:
            raise ConfigError(f"unknown key {where!r}; accepted keys here: {', '.join(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where} is a section: set its keys, e.g. {where}.{dataclasses.fields(current)[0].name}=...")
            _apply(current, where, value)
        else:
            setattr(obj, key, _coerce(where, value, hints[key]))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (['section', 'key'], value); the value is read as TOML, else as a string."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read a TOML run file, apply `section.key=value` overrides, and check the result."""
    cfg = RunConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found (named runs live in configs/*.toml)")
        try:
            values = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML: {err}") from err
        _apply(cfg, "", values)
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: RunConfig, overrides: list[str] | tuple[str, ...]) -> RunConfig:
    """Apply `section.key=value` overrides in order (in place) and check the result."""
    for text in overrides:
        keys, value = parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _apply(cfg, "", nested)
    return cfg.check()


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig saved by RunConfig.save (e.g. from a checkpoint)."""
    cfg = RunConfig()
    _apply(cfg, "", values)
    return cfg


def describe() -> str:
    """Every field with its type, default and docstring, for --help-config."""
    import ast
    import inspect

    lines = []
    for section in SECTIONS:
        cls = type(getattr(RunConfig(), section))
        docs: dict[str, str] = {}
        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = nxt.value.value
        lines.append(f"[{section}]")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {f.name} = {default!r}\n      {docs.get(f.name, '')}")
    return "\n".join(lines)
