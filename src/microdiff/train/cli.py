"""``microdiff train CONFIG.yaml [key=value ...]``: one stage, or every stage a stages file lists.

Examples:
    microdiff train configs/demo.yaml --out runs/demo
    microdiff train configs/demo.yaml train.steps=3000 optim.lr=5e-4 --out runs/longer
    microdiff train configs/demo.yaml --out runs/demo --resume auto      # continue after a crash
    torchrun --nproc_per_node 8 -m microdiff train configs/micro_diffusion/stage1_256_masked.yaml
    microdiff train configs/micro_diffusion/stages.yaml --out runs/md   # all four stages in order

A stages file lists config files (``stages: [a.yaml, b.yaml]``); stage k trains into OUT/<name of
its file> and a stage whose ``model.init_from`` is ``previous`` starts from the EMA weights of the
stage before it. Other sections of a stages file (e.g. ``ambient:``) apply to every stage, over
the stage's own values; command-line overrides apply to every stage, over both. ``--resume auto`` (the default) continues a
stage that has a checkpoint and skips stages that finished.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..utils.errors import report_error
from .checkpoint import checkpoint_config, list_checkpoints
from .config import ConfigError, load_config, shared_sections, stage_files, to_dict
from .run_folder import config_changes, refuse_unsafe
from .trainer import TrainingDiverged, train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a YAML config (see configs/) or a stages file")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. optim.lr=3e-4 train.steps=2000 model.init_from=null")
    parser.add_argument("--out", help="run folder (default: runs/<config name>)")
    parser.add_argument("--resume", default="auto",
                        help="auto (default: continue from the run's newest intact checkpoint if any), never (--out "
                             "must be new or empty), or a checkpoint / run folder")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume although the config changes keys that break an exact resume (lr, batch, "
                             "model, data, seeds, ...); the change is recorded in RUN/config_history.jsonl")


def _finished(out: Path, config, allow_config_change: bool) -> bool:
    """The stage in ``out`` reached its steps with this config (a config change is refused here, as a resume
    would refuse it, unless allowed)."""
    found = list_checkpoints(out)
    if not found or not (out / "pipeline").is_dir():
        return False
    step, path = found[-1]
    saved = checkpoint_config(path)
    changes = config_changes(saved, json.loads(json.dumps(to_dict(config)))) if isinstance(saved, dict) else []
    if not allow_config_change:
        refuse_unsafe(changes, f"checkpoint {path}")
    return step >= config.train.steps and not changes


def run_stages(path: Path, stages: list[Path], overrides: list[str], out: Path, resume: str,
               allow_config_change: bool = False) -> list[dict]:
    summaries, previous = [], None
    shared = shared_sections(path)
    for k, stage in enumerate(stages, 1):
        config = load_config(stage, overrides, data=shared)
        if config.model.init_from == "previous":
            if previous is None:
                raise ConfigError(f"{stage}: model.init_from=previous in the first stage of {path}; there is no "
                                  "stage before it")
            config.model.init_from = str(previous)
        stage_out = out / stage.stem
        print(f"stage {k}/{len(stages)}: {stage.name} -> {stage_out}", flush=True)
        if resume == "auto" and _finished(stage_out, config, allow_config_change):
            print(f"stage {k}/{len(stages)}: already finished, skipped", flush=True)
        else:
            summaries.append(train(config, stage_out, resume, allow_config_change))
        previous = stage_out
    return summaries


def run(args: argparse.Namespace) -> int:
    path = Path(args.config)
    stages = stage_files(path)
    out = Path(args.out) if args.out else Path("runs") / path.stem
    try:
        if stages is not None:
            summaries = run_stages(path, stages, list(args.overrides), out, args.resume, args.allow_config_change)
            print(json.dumps(summaries, indent=2, default=str))
            return 0
        config = load_config(path, list(args.overrides))
        summary = train(config, out, args.resume, args.allow_config_change)
    except TrainingDiverged as err:
        return report_error("train", str(err))
    print(f"trained {summary['steps']} steps in {summary['seconds']:.0f} s; final loss {summary['final_loss']}; "
          f"pipeline: {summary['pipeline']}  (try: microdiff sample --checkpoint {summary['pipeline']} \"...\")")
    return 0


__all__ = ["add_arguments", "run", "run_stages"]
