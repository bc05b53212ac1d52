"""`maepipe submit slurm|ray SCRIPT [options] ARGS...`: render and submit the scripts in slurm/ and jobs/.

    maepipe submit slurm train --nodes 4 --gpus-per-node 8 --time 24:00:00 --config configs/vit_large.toml data.manifest=...
    maepipe submit slurm ray --nodes 2 --cpus-per-task 32 python -m jobs.shard_job SRC DEST --executor ray
    maepipe submit slurm shard --array-tasks 16 --cpus-per-task 8 SRC DEST --max-side 512
    maepipe submit ray shard --address http://HEAD:8265 SRC s3://bucket/shards --shard-samples 2000
    maepipe submit ray train -- --config configs/vit_base.toml --workers 8 --gpus --resume auto
    maepipe submit ray manage --env AWS_ENDPOINT_URL s3://bucket/runs/r --consolidate --evaluate knn,linear

slurm: the sbatch options become command-line flags of sbatch; script parameters travel as environment
variables (sbatch exports the caller's environment), so values may hold commas and spaces.
ray: `ray job submit --address ADDR --working-dir . -- python -m jobs.X ARGS` (this checkout is
uploaded as the job's working directory); --env NAME passes the caller's value of NAME to the job.
Job arguments that begin with an option go after `--` (everything from the first positional on is the job's).
--dry-run prints the command instead of running it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.config import ConfigError

SLURM_DIR = Path(__file__).resolve().parents[1] / "slurm"
# script -> (file in slurm/, help)
SCRIPTS = {
    "train": ("train.sbatch", "multi-node pretraining that requeues itself on preemption"),
    "ray": ("ray_cluster.sbatch", "a Ray cluster over the allocation, then a driver command"),
    "shard": ("shard_array.sbatch", "`maepipe shard` as a job array, then a job that writes the manifest"),
}
# ray job -> (module run by `python -m`, help)
RAY_JOBS = {
    "shard": ("jobs.shard_job", "`maepipe shard` with one Ray task per output shard"),
    "train": ("jobs.train_ray", "pretraining on Ray Train workers"),
    "manage": ("jobs.checkpoint_manager", "consolidate, evaluate, upload and prune a run's checkpoints as they complete"),
}


def add_parser(sub) -> None:
    p = sub.add_parser("submit", help="submit a pipeline stage to Slurm", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    targets = p.add_subparsers(dest="target", metavar="TARGET", required=True)
    slurm = targets.add_parser("slurm", help="sbatch one of the scripts in slurm/")
    scripts = slurm.add_subparsers(dest="script", metavar="SCRIPT", required=True)
    for name, (_, help_text) in SCRIPTS.items():
        s = scripts.add_parser(name, help=help_text, description=help_text)
        s.add_argument("--nodes", type=int, default=1, help="nodes (one Ray node, or gpus-per-node training tasks, each)")
        s.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node to ask for (0: none)")
        s.add_argument("--ntasks-per-node", type=int, default=0,
                       help="tasks per node (train: default one per GPU, else 1)")
        s.add_argument("--cpus-per-task", type=int, default=0, help="CPUs per task (0: the site's default)")
        s.add_argument("--time", default="", help="time limit, e.g. 24:00:00 (default: the partition's)")
        s.add_argument("--partition", default="", help="partition to run in")
        s.add_argument("--account", default="", help="account to charge")
        s.add_argument("--output", default="", help="log file (sbatch patterns such as %%j work)")
        s.add_argument("--venv", default=os.environ.get("VIRTUAL_ENV", ""),
                       help="virtual environment the job activates (default: the active one)")
        s.add_argument("--sbatch", action="append", default=[], metavar="ARG",
                       help="any other sbatch option, e.g. --sbatch=--qos=high (repeatable)")
        s.add_argument("--dry-run", action="store_true", help="print the sbatch command and environment, submit nothing")
        if name == "train":
            s.add_argument("--config", default="configs/demo.toml", help="TOML run file")
            s.add_argument("--resume", default="auto", help="--resume of every run of the job")
            s.add_argument("--notice-s", type=int, default=300,
                           help="seconds before the time limit that training is told to checkpoint and stop")
        if name == "shard":
            s.add_argument("--array-tasks", type=int, default=4, help="array tasks sharing the shards")
        # REMAINDER: everything from the first positional on goes to the script, so submit options come first
        s.add_argument("args", nargs=argparse.REMAINDER,
                       help={"train": "section.key=value overrides", "ray": "the driver command",
                             "shard": "SRC DEST [maepipe shard options]"}[name])
    ray = targets.add_parser("ray", help="ray job submit one of the jobs in jobs/")
    ray_jobs = ray.add_subparsers(dest="job", metavar="JOB", required=True)
    for name, (module, help_text) in RAY_JOBS.items():
        s = ray_jobs.add_parser(name, help=help_text, description=f"{help_text}: `python -m {module} --help` lists ARGS")
        s.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265"),
                       help="the cluster's job API (dashboard) address (default $RAY_API_SERVER_ADDRESS or %(default)s)")
        s.add_argument("--working-dir", default=".", help="maepipe checkout uploaded as the job's working directory")
        s.add_argument("--env", action="append", default=[], metavar="NAME",
                       help="pass the caller's value of this variable to the job (repeatable), e.g. AWS_ENDPOINT_URL")
        s.add_argument("--entrypoint-num-cpus", type=float, default=0, help="CPUs reserved for the driver (0: none)")
        s.add_argument("--stop-wait-s", type=int, default=300 if name == "train" else 0,
                       help="seconds `ray job stop` gives the job after its SIGTERM before SIGKILL "
                            "(RAY_JOB_STOP_WAIT_TIME_S; 0: Ray's 3 s). train: a preempted run saves a checkpoint "
                            "in that time (default %(default)s)")
        s.add_argument("--no-wait", action="store_true", help="return once submitted (default: follow the job's logs)")
        s.add_argument("--dry-run", action="store_true", help="print the ray job submit command, submit nothing")
        s.add_argument("args", nargs=argparse.REMAINDER, help=f"arguments of python -m {module} (after `--` if the first is an option)")
    p.set_defaults(func=run)


def sbatch_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """-> (the sbatch command line, the environment variables it adds for the script)."""
    script = SLURM_DIR / SCRIPTS[args.script][0]
    if not script.is_file():
        raise ConfigError(f"{script} not found: `maepipe submit slurm` runs the scripts of a maepipe checkout")
    cmd = ["sbatch", "--parsable", f"--nodes={args.nodes}"]
    per_node = args.ntasks_per_node or (args.gpus_per_node if args.script == "train" else 0) or 1
    cmd.append(f"--ntasks-per-node={per_node}")
    for flag, value in (("--gpus-per-node", args.gpus_per_node), ("--cpus-per-task", args.cpus_per_task),
                        ("--time", args.time), ("--partition", args.partition), ("--account", args.account),
                        ("--output", args.output)):
        if value:
            cmd.append(f"{flag}={value}")
    env = {"PYTHON": sys.executable}
    if args.venv:
        env["VENV"] = args.venv
    rest = list(args.args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    if args.script == "train":
        env.update(CONFIG=args.config, RESUME=args.resume)
        cmd.append(f"--signal=B:USR1@{args.notice_s}")
    elif args.script == "ray":
        if not rest:
            raise ConfigError("maepipe submit slurm ray: give the driver command, e.g. python -m jobs.shard_job ...")
    elif args.script == "shard":
        if len(rest) < 2:
            raise ConfigError("maepipe submit slurm shard: give SRC DEST [maepipe shard options]")
        if args.array_tasks < 1:
            raise ConfigError(f"--array-tasks={args.array_tasks}: must be at least 1")
        cmd.append(f"--array=0-{args.array_tasks - 1}")
    return cmd + list(args.sbatch) + [str(script)] + rest, env


def ray_command(args: argparse.Namespace) -> list[str]:
    """-> the `ray job submit` command line (environment values passed in --runtime-env-json)."""
    if not (Path(args.working_dir) / "jobs" / f"{RAY_JOBS[args.job][0].split('.')[1]}.py").is_file():
        raise ConfigError(f"--working-dir {args.working_dir}: not a maepipe checkout (no jobs/ folder); "
                          "run from the checkout's root or pass --working-dir")
    missing = [name for name in args.env if name not in os.environ]
    if missing:
        raise ConfigError(f"--env {', '.join(missing)}: not set in this environment (set it, or drop --env)")
    ray = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    cmd = [ray, "job", "submit", "--address", args.address, "--working-dir", args.working_dir]
    env_vars = {name: os.environ[name] for name in args.env}
    if args.stop_wait_s:  # read by the job's supervisor from the job's runtime env
        env_vars["RAY_JOB_STOP_WAIT_TIME_S"] = str(args.stop_wait_s)
    if env_vars:
        cmd += ["--runtime-env-json", json.dumps({"env_vars": env_vars})]
    if args.entrypoint_num_cpus:
        cmd += ["--entrypoint-num-cpus", f"{args.entrypoint_num_cpus:g}"]
    if args.no_wait:
        cmd.append("--no-wait")
    rest = list(args.args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    return cmd + ["--", "python", "-m", RAY_JOBS[args.job][0], *rest]


def run(args: argparse.Namespace) -> int:
    return run_slurm(args) if args.target == "slurm" else run_ray(args)


def run_ray(args: argparse.Namespace) -> int:
    cmd = ray_command(args)
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    if not Path(cmd[0]).is_file():
        raise ConfigError("the `ray` command is missing: pip install 'ray[default]' in this environment")
    return subprocess.run(cmd).returncode


def run_slurm(args: argparse.Namespace) -> int:
    cmd, env = sbatch_command(args)
    if args.dry_run:
        print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(cmd))
        return 0
    if not shutil.which("sbatch"):
        raise ConfigError("sbatch not found: run this on a Slurm login node (or slurm/local_cluster.sh start locally)")
    done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    if done.returncode:
        print(f"maepipe submit: sbatch failed: {done.stderr.strip()}", file=sys.stderr)
        return done.returncode
    job = done.stdout.strip().split(";")[0]
    print(f"submitted {args.script} as job {job}: `squeue -j {job}`, `scontrol show job {job}`")
    return 0
