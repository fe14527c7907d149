"""The ``dinoflow`` command line.

Stage commands run their stage as a Prefect flow on the configured Prefect API (the embedded,
project-local one unless PREFECT_API_URL is set), or with ``--engine local`` as a plain function
call. Either way the same ``components`` function does the work. Heavy imports (Prefect, MLflow,
torch) happen inside the command that needs them so ``dinoflow --help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from components.config import ConfigError
from flows.cli_models import add_model_commands

DESCRIPTION = """\
dinoflow builds your own DINOv2-class vision backbone: curate an image pool, pretrain a ViT with
the DINOv2 recipe, distill it, evaluate it, and register it with its lineage in MLflow.

Everything runs on embedded defaults (local object store, SQLite MLflow, project-local Prefect)
inside the state folder .dinoflow/ unless params/project.yaml or the environment
(DINOFLOW_STORE_URI, MLFLOW_TRACKING_URI, PREFECT_API_URL, AWS_*) point elsewhere.
"""


def _add_common(parser: argparse.ArgumentParser, default_params: str | None) -> None:
    if default_params is not None:
        parser.add_argument("--params", default=default_params,
                            help=f"stage parameter file (default: {default_params})")
    parser.add_argument("--project", default="params/project.yaml",
                        help="project parameter file: object store and tracking (default: params/project.yaml)")


def _add_engine(parser: argparse.ArgumentParser) -> None:
    import os

    default = os.environ.get("DINOFLOW_ENGINE", "prefect")  # e.g. DINOFLOW_ENGINE=local dvc repro
    if default not in ("prefect", "local"):
        raise ConfigError(f"DINOFLOW_ENGINE must be 'prefect' or 'local', got {default!r}")
    parser.add_argument("--engine", choices=("prefect", "local"), default=default,
                        help="prefect: run as a Prefect flow; local: plain function call, no Prefect "
                             f"(default: {default}, from DINOFLOW_ENGINE or 'prefect')")


# The long help of each stage command (the one-line help and the order come from the stage catalog).
STAGE_DESCRIPTIONS = {
    "data": "Fetch the real demo images (Debian package dataset-fashion-mnist, scikit-image photos), write one PNG "
            "per image to the object store, a labels table (parquet) beside them, the local manifest "
            "data/demo/pool.parquet and metrics/data.json.",
    "curate": "Ingest a folder or s3:// pool (every file decoded; corrupt ones rejected with a reason), drop exact "
              "and near duplicates and images that leak evaluation sets, retrieve what is close to curated seed "
              "sets and balance with hierarchical k-means. Writes the curated manifest, the rejects table, "
              "metrics/curate.json and pictures (clusters, duplicate groups); rerunning continues an interrupted "
              "run.",
    "pretrain": "Train with DINO + iBOT + KoLeo, an EMA teacher and multi-crop on the images of a manifest. "
                "Rerunning the same command continues from the newest complete checkpoint. For several processes, "
                "launch it under torchrun with --engine local: torchrun --nproc-per-node N -m flows.cli pretrain "
                "--engine local. At the end the teacher backbone is exported (safetensors + config.json) and "
                "registered in MLflow with the alias 'challenger'.",
    "distill": "Train a small ViT (params 'backbone') from a frozen teacher (params 'teacher.source': "
               "models:/NAME@ALIAS, models:/NAME/VERSION, a pretraining checkpoint folder, a backbone folder or an "
               "official .pth) with the DINOv2 distillation recipe: through the teacher's DINO/iBOT heads when it "
               "has them, else in feature space. Rerunning continues from the newest complete checkpoint; under "
               "torchrun use --engine local. The student's EMA is exported and registered with the alias "
               "'challenger' and tags naming its teacher.",
    "evaluate": "Evaluate a backbone folder or a registry version (models:/NAME@ALIAS, models:/NAME/VERSION) with "
                "weighted k-NN, the DINOv2 linear grid and logistic regression, next to the same architecture "
                "untrained and raw pixels. Writes metrics/eval.json and metrics/eval_knn_sweep.json, logs an MLflow "
                "run and, for a registry version, tags it with the metrics (eval.*).",
}
# Shorthand flags users already rely on: each is one --set override.
STAGE_ALIASES = {"distill": ("--teacher", "teacher.source", "teacher source (same as --set teacher.source=...)"),
                 "evaluate": ("--model", "model", "backbone folder or models:/ URI (same as --set model=...)")}
# Switches: a flag without a value that stands for one fixed --set override.
STAGE_SWITCHES = {"curate": ("--calibrate", "calibrate.enabled=true",
                             "measure the dedup thresholds on this pool with planted copies and report them "
                             "(same as --set calibrate.enabled=true; add --set calibrate.apply=true to use them)")}
OVERRIDE_HELP = ("override one parameter of the stage's file, e.g. --set objective.optim.base_lr=0.002 "
                 "(repeatable; the value is YAML, checked like the file)")


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=OVERRIDE_HELP)


def build_parser() -> argparse.ArgumentParser:
    from components.stages.catalog import STAGES, stage_names

    parser = argparse.ArgumentParser(prog="dinoflow", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, description: str, params: str | None, engine: bool,
                handler: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=description)
        _add_common(sub, params)
        if engine:
            _add_engine(sub)
        sub.set_defaults(handler=handler)
        return sub

    for stage in STAGES:
        sub = command(stage.name, stage.summary, STAGE_DESCRIPTIONS[stage.name], stage.params, True, _cmd_stage)
        _add_overrides(sub)
        if stage.name in STAGE_ALIASES:
            flag, _key, help_text = STAGE_ALIASES[stage.name]
            sub.add_argument(flag, dest="alias_value", default=None, help=help_text)
        if stage.name in STAGE_SWITCHES:
            switch, _override, switch_help = STAGE_SWITCHES[stage.name]
            sub.add_argument(switch, dest="switch_on", action="store_true", help=switch_help)
        sub.set_defaults(stage=stage.name)
    promote = command(
        "promote", "evaluate champion and challenger of a registered model; move 'champion' by policy",
        "Evaluate the versions behind the aliases champion and challenger (params evaluate.promotion and "
        "evaluate.schedule), apply the promotion policy and tag both versions (promotion.*). A failed evaluation "
        "moves no alias. --serve runs it on the cron schedule from params with Prefect's flow.serve.",
        "params/evaluate.yaml", True, _cmd_promote)
    _add_overrides(promote)
    promote.add_argument("--model-name", default=None,
                         help="registered model (default: evaluate.schedule.model_name)")
    promote.add_argument("--serve", action="store_true",
                         help="serve the scheduled-evaluation flow on its cron schedule (blocks)")
    order = ", ".join(stage_names())
    command("pipeline", "run every stage in order as one Prefect flow (the demo pipeline)",
            f"Run all stages ({order}) as sub-flows of one Prefect 'pipeline' flow, on the embedded Prefect API "
            "unless PREFECT_API_URL is set. Each stage logs an MLflow run.",
            None, False, _cmd_pipeline)
    command("report", "print the evaluation table (model vs baselines), registered models and how to open the UIs",
            "Read metrics/eval.json (the evaluate stage's DVC metrics), print the model against its baselines as a "
            "table, the registered models with their aliases, and the commands that open the MLflow and Prefect "
            "UIs.", "params/evaluate.yaml", False, _cmd_report)
    command("info", "show where state, objects, runs and flows go (resolved from params and environment)",
            "Print the resolved state folder, object store URI, MLflow tracking URI and Prefect API "
            "as JSON. Credentials are never printed.",
            None, False, _cmd_info)
    add_model_commands(commands)
    return parser


def _emit(outputs: object) -> int:
    """A command's result as JSON on stdout (the last thing it prints; scripts parse it)."""
    print(json.dumps(outputs, indent=2, default=str))
    return 0


def _in_process(args: argparse.Namespace) -> bool:
    """Run the stage function here: asked for (--engine local), or under torchrun, whose ranks must all
    call it (one Prefect flow per rank would be wrong)."""
    import os

    return bool(args.engine == "local" or int(os.environ.get("WORLD_SIZE", "1")) > 1)


def _is_main_rank() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def _overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` items, then the stage's shorthand flag (``--teacher`` / ``--model``) and switch
    (``--calibrate``) as more: a switch wins over a ``--set`` of the same key."""
    from flows.common import with_alias

    stage = getattr(args, "stage", "")
    alias = STAGE_ALIASES.get(stage, (None, None, None))[1]
    overrides = with_alias(list(args.overrides), alias, getattr(args, "alias_value", None)) if alias \
        else list(args.overrides)
    switched = [STAGE_SWITCHES[stage][1]] if getattr(args, "switch_on", False) else []
    return overrides + switched


def _cmd_stage(args: argparse.Namespace) -> int:
    """Any stage: in this process (``run_stage``) or as its Prefect flow; either way its ``summary()``."""
    overrides = _overrides(args)
    if _in_process(args):
        from components.stages.catalog import run_stage

        outputs = run_stage(args.stage, args.params, args.project, overrides)
        return _emit(outputs.summary()) if _is_main_rank() else 0
    from flows.pipeline import STAGE_FLOWS

    return _emit(STAGE_FLOWS[args.stage](params=args.params, project_params=args.project, overrides=overrides))


def _cmd_promote(args: argparse.Namespace) -> int:
    from components.stages.context import make_context
    from components.stages.evaluate import load_evaluate_config, run_promotion

    context = make_context(args.project)
    cfg = load_evaluate_config(context.root / args.params, args.overrides)
    if args.serve:
        from flows.scheduled_evaluation import serve

        serve(args.params, args.project, args.overrides)
        return 0
    if args.engine == "local":
        outputs: object = run_promotion(context, cfg, args.model_name).summary()
    else:
        from flows.scheduled_evaluation import scheduled_evaluation

        outputs = scheduled_evaluation(model_name=args.model_name or cfg.schedule.model_name,
                                       params=args.params, project_params=args.project, overrides=args.overrides)
    return _emit(outputs)


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from flows.pipeline import pipeline_flow

    return _emit(pipeline_flow(project_params=args.project))


REPORT_METRICS = ("knn_top1_k20", "knn_top5_k20", "linear_top1", "logreg_top1", "retrieval_map",
                  "copydetect_muap", "seg_miou", "depth_rmse", "depth_delta1")


def _cmd_report(args: argparse.Namespace) -> int:
    from components.evaluate.report import read_eval_report
    from components.stages.context import make_context
    from components.stages.evaluate import load_evaluate_config

    context = make_context(args.project)
    cfg = load_evaluate_config(context.root / args.params)
    print(f"Evaluation of {cfg.model} ({cfg.metrics_path}):\n")
    print(read_eval_report(context.root / cfg.metrics_path, REPORT_METRICS))
    from components.registry.commands import list_models
    from components.tracking import configure

    configure(context.tracking)
    models = list_models()
    print("\nRegistered models (MLflow registry):")
    for model in models.get("models", []):
        aliases = ", ".join(f"{a}=v{v}" for a, v in sorted(model.get("aliases", {}).items())) or "no alias"
        print(f"  {model['name']}: {len(model.get('versions', []))} version(s); {aliases}")
    print("\nOpen the UIs: make mlflow-ui (http://127.0.0.1:5000) | make prefect-ui (http://127.0.0.1:4200)")
    print("Lineage of a model: dinoflow models show dinoflow-backbone@challenger")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import os

    from components.config.project import load_project_config
    from components.environment import apply_environment, project_root

    root = project_root()
    state = apply_environment(start=root)
    project = load_project_config(root / args.project)
    print(json.dumps({
        "project_root": str(root),
        "state_dir": str(state),
        "store_uri": project.store_uri(state),
        "mlflow_tracking_uri": project.tracking_uri(state),
        "mlflow_experiment": project.tracking.experiment,
        "prefect_api_url": os.environ.get("PREFECT_API_URL") or f"embedded (PREFECT_HOME={os.environ['PREFECT_HOME']})",
    }, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        handler: Callable[[argparse.Namespace], int] = args.handler
        return handler(args)
    except ConfigError as exc:
        print(f"dinoflow: parameter error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"dinoflow: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
