"""Ray job: watch a run's checkpoints; for each newly completed one consolidate, evaluate, upload, prune, report.

    ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.checkpoint_manager RUN \\
        [--upload-url URL] [--keep-last K [--keep-every M]] [--consolidate] [--evaluate knn,linear] \\
        [--data MANIFEST] [--set section.key=value ...] [--poll-s S] [--until-step N | --once]

RUN is a run folder, local or s3://... (for example the checkpoint.upload_url of a training run);
the manager watches RUN/checkpoints. A checkpoint exists for it only once it holds client_state.json
(the completion mark training writes last): folders still being written are never touched. For each
new checkpoint, as Ray tasks running at once:
  --consolidate    RUN/consolidated/step-NNNNNNNN.safetensors: the fp32 encoder (`maepipe export`, native)
  --evaluate P,..  the protocols (knn, linear, finetune) on its encoder, rows appended to RUN/evals.jsonl
                   with checkpoint and step; the baselines (raw pixels, random init, from scratch) run
                   once per run, beside the first checkpoint evaluated (--no-baselines: never)
  --upload-url U   (local RUN) a copy in U/checkpoints, unless already there (training's own uploader)
Then --keep-last K / --keep-every M prune the object-store copy (U/checkpoints, or RUN/checkpoints
when RUN is remote; the local folder is training's to prune), and RUN/report.md is rewritten.

RUN/checkpoint_manager.json records, per checkpoint, the work done; a restarted manager does only what
is missing (new protocols on old checkpoints included). A task's rows are appended before its work is
recorded, so a crash between the two repeats that one task. Without RAY_ADDRESS (which `ray job
submit` sets) the tasks run on a local 2-CPU Ray.

Stops: --once after one pass, --until-step N once that checkpoint's work is done, and on SIGTERM/SIGINT
(`ray job stop` sends SIGTERM): at once when idle, else as soon as a running task finishes and is
recorded; work not recorded is redone by the next manager. Exit codes: 0 done or stopped; 1 a task
failed (--once; a polling manager retries failed work at the next poll); 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace

from data_shards import storage
from pipeline.config import ConfigError

log = logging.getLogger("checkpoint_manager")
STATE = "checkpoint_manager.json"
PROTOCOLS = ("knn", "linear", "finetune")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def take_stop_signals(stop: threading.Event) -> None:
    """SIGTERM/SIGINT set `stop` (checked between tasks and while idle) instead of ending the process.

    Again after ray.init, which installs its own SIGTERM handler (exit at once)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, _frame: stop.set())


@dataclass(frozen=True)
class Plan:
    """What to do for every checkpoint of one run, resolved from the command line."""

    run: str  # the run folder (absolute path or URL)
    work: tuple[str, ...]  # per checkpoint: "upload", "consolidate" and protocol names
    protocols: tuple[str, ...]
    baselines: bool
    overrides: tuple[str, ...]  # config overrides for evaluation (data.manifest from --data first)
    data: str
    upload_dir: str  # URL/checkpoints of --upload-url, or ""
    prune_dir: str  # the object-store checkpoints folder retention applies to, or ""
    keep_last: int
    keep_every: int
    report: bool
    cpus_per_task: float

    @property
    def ckpts(self) -> str:
        return storage.join(self.run, "checkpoints")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.checkpoint_manager", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="run folder whose checkpoints/ to watch: path or s3://...")
    p.add_argument("--upload-url", default="", help="copy each checkpoint of a local RUN to URL/checkpoints")
    p.add_argument("--keep-last", type=int, default=0, help="retention on the object-store copy: newest K (0: none)")
    p.add_argument("--keep-every", type=int, default=0, help="retention: also keep steps that are multiples of M")
    p.add_argument("--consolidate", action="store_true", help="write RUN/consolidated/step-NNNNNNNN.safetensors")
    p.add_argument("--evaluate", default="", metavar="P,...", help=f"protocols among {', '.join(PROTOCOLS)}")
    p.add_argument("--no-baselines", action="store_true", help="evaluate the MAE encoder only")
    p.add_argument("--data", default="", help="labelled shard set for evaluation (default: the run's data.manifest)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="section.key=value",
                   help="evaluation config override, repeatable (e.g. --set eval.max_train_samples=10000)")
    p.add_argument("--no-report", action="store_true", help="do not rewrite RUN/report.md")
    p.add_argument("--cpus-per-task", type=float, default=1.0, help="Ray CPUs per task")
    p.add_argument("--poll-s", type=float, default=60.0, help="seconds between looks at RUN/checkpoints")
    stop = p.add_mutually_exclusive_group()
    stop.add_argument("--until-step", type=int, default=0, help="exit once a checkpoint at or past step N is done")
    stop.add_argument("--once", action="store_true", help="one pass over what is there now, then exit")
    return p.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    run = args.run.rstrip("/")
    run = run if storage.is_remote(run) else os.path.abspath(run.removeprefix("file://"))
    protocols = tuple(p for p in args.evaluate.split(",") if p)
    if unknown := sorted(set(protocols) - set(PROTOCOLS)):
        raise ConfigError(f"--evaluate {args.evaluate}: unknown protocol(s) {unknown}; accepted: {', '.join(PROTOCOLS)}")
    if args.upload_url and storage.is_remote(run):
        raise ConfigError("--upload-url copies a local run's checkpoints, but RUN is already remote: "
                          "drop --upload-url (retention then applies to RUN/checkpoints)")
    if args.keep_last < 0 or args.keep_every < 0 or (args.keep_every and not args.keep_last):
        raise ConfigError("--keep-last K (K >= 1) turns retention on; --keep-every M (M >= 0) only goes with it")
    upload_dir = storage.join(args.upload_url, "checkpoints") if args.upload_url else ""
    prune_dir = ""
    if args.keep_last:
        prune_dir = upload_dir or (storage.join(run, "checkpoints") if storage.is_remote(run) else "")
        if not prune_dir:
            raise ConfigError("--keep-last prunes the object-store copy: give --upload-url or an s3:// RUN "
                              "(a local run folder is pruned by training's checkpoint.keep_last)")
    work = (("upload",) if upload_dir else ()) + (("consolidate",) if args.consolidate else ()) + protocols
    if not work and not prune_dir:
        raise ConfigError("nothing to do: give --consolidate, --evaluate P,..., --upload-url or --keep-last")
    return Plan(run=run, work=work, protocols=protocols, baselines=not args.no_baselines,
                overrides=((f"data.manifest={args.data!r}",) if args.data else ()) + tuple(args.overrides),
                data=args.data, upload_dir=upload_dir, prune_dir=prune_dir, keep_last=args.keep_last,
                keep_every=args.keep_every, report=not args.no_report, cpus_per_task=args.cpus_per_task)


# ---- state: RUN/checkpoint_manager.json

def load_state(run: str) -> dict:
    from pipeline.eval.runs import read_json

    return read_json(storage.join(run, STATE)) or {"version": 1, "done": {}, "baselines": []}


def save_state(run: str, state: dict) -> None:
    storage.write_atomic(storage.join(run, STATE), json.dumps(state | {"updated": time.time()}, indent=1).encode())


def pending(plan: Plan, state: dict) -> list[tuple[str, list[str]]]:
    """(tag, work not yet done) for the complete checkpoints, oldest first."""
    from pipeline.train.checkpoint import complete_tags

    out = []
    for tag in complete_tags(plan.ckpts):
        missing = [w for w in plan.work if w not in state["done"].get(tag, [])]
        if missing:
            out.append((tag, missing))
    return out


def mark(state: dict, tag: str, items: list[str]) -> None:
    done = state["done"].setdefault(tag, [])
    done += [w for w in items if w not in done]


# ---- one pass

def init_ray() -> None:
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto")  # the cluster the job was submitted to
    else:  # embedded default; tasks pass URLs and rows only, so a small object store does
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=2**28)


def check_overrides(plan: Plan, tag: str) -> None:
    """Fail fast (exit 2) on an override the checkpoint's config rejects, not once per task."""
    from pipeline.config import apply_overrides, config_from_dict
    from pipeline.train.checkpoint import read_client_state

    apply_overrides(config_from_dict(read_client_state(storage.join(plan.ckpts, tag))["config"]), plan.overrides)


def run_pass(plan: Plan, state: dict, todo: list[tuple[str, list[str]]], stop: threading.Event) -> int:
    """Start every missing piece of work as a Ray task, record each as it finishes (until `stop`). -> failures."""
    import ray

    from jobs import checkpoint_tasks as tasks
    from pipeline.eval.runs import EVALS, append_jsonl
    from pipeline.train.checkpoint import complete_tags

    remote = {name: ray.remote(num_cpus=plan.cpus_per_task, max_retries=0)(getattr(tasks, name))
              for name in ("consolidate", "evaluate_checkpoint", "upload_checkpoint")}
    uploaded = set(complete_tags(plan.upload_dir)) if plan.upload_dir else set()
    need_baselines = [p for p in plan.protocols if p not in state["baselines"]] if plan.baselines else []
    refs: dict = {}  # ObjectRef -> (tag, work items, protocols whose baselines it brings)
    for tag, missing in todo:
        ckpt = storage.join(plan.ckpts, tag)
        if "upload" in missing:
            if tag in uploaded:
                mark(state, tag, ["upload"])
            else:
                refs[remote["upload_checkpoint"].remote(ckpt, plan.upload_dir)] = (tag, ["upload"], [])
        if "consolidate" in missing:
            out = storage.join(plan.run, "consolidated", f"{tag}.safetensors")
            refs[remote["consolidate"].remote(ckpt, out)] = (tag, ["consolidate"], [])
        if protocols := [p for p in plan.protocols if p in missing]:
            with_baselines = [p for p in protocols if p in need_baselines]
            need_baselines = [p for p in need_baselines if p not in with_baselines]
            ref = remote["evaluate_checkpoint"].remote(ckpt, protocols, list(plan.overrides), bool(with_baselines))
            refs[ref] = (tag, protocols, with_baselines)
    save_state(plan.run, state)
    failures = 0
    while refs and not stop.is_set():
        ready, _ = ray.wait(list(refs), num_returns=1, timeout=1.0)  # timeout: look at `stop` every second
        if not ready:
            continue
        tag, items, with_baselines = refs.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except Exception as err:  # noqa: BLE001 - one failed task must not stop the others; retried next pass
            failures += 1
            log.error("%s of %s failed: %s", "+".join(items), tag, err)
            continue
        if isinstance(result, list):  # evaluation rows; baselines only for protocols that lacked them
            rows = [r for r in result if r["encoder"] == "mae" or r["protocol"].split()[0] in with_baselines]
            append_jsonl(storage.join(plan.run, EVALS), rows)
            state["baselines"] += with_baselines
            log.info("%s: %s, %d rows -> %s", tag, "+".join(items), len(rows), EVALS)
        else:
            log.info("%s: %s -> %s (%.1fs)", tag, items[0], result["out"], result["seconds"])
        mark(state, tag, items)
        save_state(plan.run, state)
    return failures


def ensure_config(plan: Plan) -> None:
    """The report reads RUN/config.json; an object-store copy made by training's uploader holds only
    checkpoints, so write the run's config there from the newest checkpoint's client state."""
    from pipeline.config import config_from_dict
    from pipeline.train.checkpoint import complete_tags, read_client_state

    target = storage.join(plan.run, "config.json")
    if storage.exists(target) or not (tags := complete_tags(plan.ckpts)):
        return
    cfg = config_from_dict(read_client_state(storage.join(plan.ckpts, tags[-1]))["config"])
    storage.write_atomic(target, (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())


def finish_pass(plan: Plan, failures: int) -> int:
    """Retention (only after a clean pass: nothing unprocessed is pruned), then the report. -> failures."""
    import ray

    from jobs import checkpoint_tasks as tasks
    from pipeline.train.checkpoint import prune

    if plan.prune_dir and not failures:
        deleted = prune(plan.prune_dir, plan.keep_last, plan.keep_every)
        log.info("retention on %s (keep last %d, every %d): deleted %s", plan.prune_dir, plan.keep_last,
                 plan.keep_every, ", ".join(deleted) or "nothing")
    if plan.report:
        ensure_config(plan)
        try:
            log.info("report: %s", ray.get(ray.remote(num_cpus=plan.cpus_per_task, max_retries=0)(tasks.report)
                                           .remote(plan.run, plan.data)))
        except Exception as err:  # noqa: BLE001 - the checkpoints' work is recorded; the next pass rewrites it
            failures += 1
            log.error("report of %s failed: %s", plan.run, err)
    return failures


def reached(state: dict, plan: Plan, step: int) -> bool:
    """A checkpoint at or past `step` has all its work done."""
    return any(int(tag.split("-")[1]) >= step and set(plan.work) <= set(done) for tag, done in state["done"].items())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        plan = make_plan(args)
    except ConfigError as err:
        print(f"checkpoint_manager: usage error: {err}", file=sys.stderr)
        return 2
    state = load_state(plan.run)
    stop = threading.Event()
    take_stop_signals(stop)
    checked = False
    while not stop.is_set():
        todo = pending(plan, state)
        failures = 0
        if todo:
            if plan.protocols and not checked:
                try:
                    check_overrides(plan, todo[0][0])
                except ConfigError as err:
                    print(f"checkpoint_manager: usage error: {err}", file=sys.stderr)
                    return 2
                checked = True
            import ray

            if not ray.is_initialized():  # only when there is work: a pass with nothing new stays cheap
                init_ray()
                take_stop_signals(stop)
            log.info("%d checkpoint(s) with work to do in %s: %s", len(todo), plan.ckpts,
                     ", ".join(f"{t} ({'+'.join(m)})" for t, m in todo))
            failures = run_pass(plan, state, todo, stop)
            if stop.is_set():  # retention and the report wait for a pass that ran to its end
                break
            failures = finish_pass(plan, failures)
        else:
            log.info("nothing new in %s", plan.ckpts)
            if plan.prune_dir:  # retention alone (no per-checkpoint work), or copies added by training's uploader
                finish_pass(replace(plan, report=False), 0)
        if args.once:
            return 1 if failures else 0
        if args.until_step and reached(state, plan, args.until_step):
            return 0
        stop.wait(args.poll_s)
    log.info("stop requested: exiting (work recorded in %s is kept; the rest is redone next time)", STATE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
