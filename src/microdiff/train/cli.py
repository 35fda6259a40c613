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

from .config import ConfigError, load_config, shared_sections, stage_files


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a YAML config (see configs/) or a stages file")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. optim.lr=3e-4 train.steps=2000 model.init_from=null")
    parser.add_argument("--out", help="run folder (default: runs/<config name>)")
    parser.add_argument("--resume", default="auto",
                        help="auto (default: continue from the run's latest checkpoint if any), never, or a "
                             "checkpoint / run folder")


def _finished(out: Path, steps: int) -> bool:
    from .checkpoint import list_checkpoints

    found = list_checkpoints(out)
    return bool(found) and found[-1][0] >= steps and (out / "pipeline").is_dir()


def run_stages(path: Path, stages: list[Path], overrides: list[str], out: Path, resume: str) -> list[dict]:
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
        if resume == "auto" and _finished(stage_out, config.train.steps):
            print(f"stage {k}/{len(stages)}: already finished, skipped", flush=True)
        else:
            from .trainer import train

            summaries.append(train(config, stage_out, resume))
        previous = stage_out
    return summaries


def run(args: argparse.Namespace) -> int:
    path = Path(args.config)
    try:
        stages = stage_files(path)
        out = Path(args.out) if args.out else Path("runs") / path.stem
        if stages is not None:
            summaries = run_stages(path, stages, list(args.overrides), out, args.resume)
            print(json.dumps(summaries, indent=2, default=str))
            return 0
        config = load_config(path, list(args.overrides))
    except (ConfigError, ValueError, FileNotFoundError) as err:
        raise SystemExit(f"microdiff train: {err}") from None
    from .trainer import TrainingDiverged, train

    try:
        summary = train(config, out, args.resume)
    except (TrainingDiverged, ConfigError, ValueError, FileNotFoundError) as err:
        raise SystemExit(f"microdiff train: {err}") from None
    print(f"trained {summary['steps']} steps in {summary['seconds']:.0f} s; final loss {summary['final_loss']}; "
          f"pipeline: {summary['pipeline']}  (try: microdiff sample --checkpoint {summary['pipeline']} \"...\")")
    return 0


__all__ = ["add_arguments", "run", "run_stages"]
