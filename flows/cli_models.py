"""``dinoflow export`` and ``dinoflow models list|show|pull``: thin argparse wrappers that print JSON.

The work is done by components/models/{hf,timm,onnx}_export.py and components/registry/commands.py;
this module only resolves where MLflow lives (params/project.yaml and the environment, as every
stage does) and prints the returned dicts. ``flows/cli.py`` calls :func:`add_model_commands`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXPORT_FORMATS = ("hf", "timm", "onnx")


def add_model_commands(subparsers: Any) -> None:
    """Add ``export`` and ``models`` (with ``list``, ``show``, ``pull``) to the ``dinoflow`` subparsers."""
    export = subparsers.add_parser(
        "export", help="export a backbone for Hugging Face transformers, timm or ONNX",
        description="Export a backbone (folder, models:/NAME@ALIAS, models:/NAME/VERSION) as a Hugging Face "
                    "Dinov2Model folder (--format hf, loadable with from_pretrained), timm weights + build recipe "
                    "(--format timm, a .safetensors file), or an ONNX graph checked with onnxruntime "
                    "(--format onnx). Each export is reloaded and compared with the backbone before it is kept.")
    export.add_argument("--model", required=True, help="backbone folder or models:/ URI")
    export.add_argument("--format", choices=EXPORT_FORMATS, required=True, help="target format")
    export.add_argument("--out", required=True, help="output folder (hf) or file (timm: .safetensors, onnx: .onnx)")
    export.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    _add_project(export)
    export.set_defaults(handler=cmd_export)

    models = subparsers.add_parser(
        "models", help="list, show and pull registered backbones (MLflow model registry)",
        description="Inspect the MLflow model registry the project points at: every model with its versions "
                    "and aliases, one version with its lineage (git, DVC, Prefect, teacher, datasets), or "
                    "download a version's files.")
    actions = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="registered models, their versions and aliases")
    _add_project(listing)
    listing.set_defaults(handler=cmd_models_list)
    show = actions.add_parser("show", help="one version: aliases, source run, lineage")
    show.add_argument("model", help="NAME@ALIAS or NAME/VERSION (models:/ prefix optional)")
    _add_project(show)
    show.set_defaults(handler=cmd_models_show)
    pull = actions.add_parser("pull", help="download a version's files into a folder")
    pull.add_argument("model", help="NAME@ALIAS or NAME/VERSION (models:/ prefix optional)")
    pull.add_argument("--dest", required=True, help="destination folder (must be empty unless --force)")
    pull.add_argument("--force", action="store_true", help="replace a non-empty destination")
    pull.add_argument("--format", choices=("registry", "hf", "timm"), default="registry",
                      help="registry: the version's own files; hf: a folder for transformers' from_pretrained; "
                           "timm: model.safetensors + model.timm.json for timm.create_model (default: registry)")
    _add_project(pull)
    pull.set_defaults(handler=cmd_models_pull)


def _add_project(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--project", default="params/project.yaml",
                        help="project parameter file: tracking server (default: params/project.yaml)")


def point_mlflow_at_project(project_params: str) -> Path:
    """Set MLflow's tracking and registry URI from the project params / environment; returns the state folder."""
    import mlflow

    from components.config.project import load_project_config
    from components.environment import apply_environment, project_root

    root = project_root()
    state = apply_environment(start=root)
    params = Path(project_params)
    project = load_project_config(params if params.is_absolute() else root / params)
    uri = project.tracking_uri(state)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return state


def print_json(payload: object) -> int:
    print(json.dumps(payload, indent=2, default=str))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    try:
        return export_model(args)
    except ImportError as exc:  # transformers / timm / onnx(runtime) are optional dependencies
        print(f"dinoflow: export --format {args.format} needs {exc.name or exc}: "
              "pip install 'dinoflow[export]' (or dinoflow[dev])", file=sys.stderr)
        return 2


def export_model(args: argparse.Namespace) -> int:
    from components.registry.resolve import resolve

    model = str(args.model)
    state = point_mlflow_at_project(args.project)
    backbone_dir = resolve(model, Path.cwd(), state / "cache" / "models").require_backbone_dir()
    out = Path(args.out)
    result: dict[str, object] = {"model": model, "backbone_dir": str(backbone_dir), "format": args.format}
    if args.format == "hf":
        from components.models.hf_export import export_hf

        hf = export_hf(backbone_dir, out)
        result.update(out=str(hf.directory), model_class=hf.model_class, max_abs_diff=hf.max_abs_diff, notes=hf.notes)
    elif args.format == "timm":
        from components.models.timm_export import export_timm

        timm = export_timm(backbone_dir, out)
        result.update(out=str(timm.weights_path), timm_model=timm.model_name, timm_kwargs=timm.model_kwargs,
                      max_abs_diff=timm.max_abs_diff)
    else:
        from components.models.onnx_export import export_onnx

        onnx = export_onnx(backbone_dir, out, opset=args.opset)
        result.update(out=str(onnx.path), opset=onnx.opset, outputs=onnx.output_names, max_abs_diff=onnx.max_abs_diff)
    return print_json(result)


def cmd_models_list(args: argparse.Namespace) -> int:
    from components.registry.commands import list_models

    point_mlflow_at_project(args.project)
    return print_json(list_models())


def cmd_models_show(args: argparse.Namespace) -> int:
    from components.registry.commands import show_model

    point_mlflow_at_project(args.project)
    return print_json(show_model(args.model))


def cmd_models_pull(args: argparse.Namespace) -> int:
    from components.registry.commands import pull_model

    point_mlflow_at_project(args.project)
    try:
        return print_json(pull_model(args.model, Path(args.dest), overwrite=args.force, fmt=args.format))
    except FileExistsError as exc:
        print(f"dinoflow: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:  # transformers / timm are optional dependencies
        print(f"dinoflow: models pull --format {args.format} needs {exc.name or exc}: "
              "pip install 'dinoflow[export]' (or dinoflow[dev])", file=sys.stderr)
        return 2
