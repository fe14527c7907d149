# Source this to get the same quiet, project-local environment dinoflow sets for itself, for tools
# started by hand (mlflow ui, prefect server start): `. infra/state-env.sh` from the project root.
#
# POSIX sh (dash, bash, zsh, ...): a sourced file cannot find its own path in POSIX sh, so the project
# root is $DINOFLOW_ROOT if set (the Makefile sets it), else bash's BASH_SOURCE, else the current
# folder. The Python interpreter is $DINOFLOW_PYTHON if set, else the project's .venv, else python3.
# The values come from components/environment.py (`python -m components.environment --shell`), the
# same code the dinoflow CLI runs, so the UIs see the stores the CLI writes to:
#   PREFECT_HOME   the project's Prefect database (the embedded server the CLI's flow runs use)
#   MLFLOW_UI_URI  MLFLOW_TRACKING_URI, else tracking.uri of params/project.yaml, else the SQLite store
#   MLFLOW_UI_ARTIFACTS  the project's MLflow artifact root
# Values already exported (DINOFLOW_HOME, PREFECT_HOME, MLFLOW_TRACKING_URI, ...) are kept.
if [ -n "${DINOFLOW_ROOT:-}" ]; then
    _dinoflow_root=$DINOFLOW_ROOT
elif [ -n "${BASH_VERSION:-}" ]; then
    eval '_dinoflow_root=$(dirname "${BASH_SOURCE[0]}")/..'  # eval: dash must never parse this line
else
    _dinoflow_root=.
fi
_dinoflow_root=$(cd "$_dinoflow_root" 2>/dev/null && pwd)
if [ -z "$_dinoflow_root" ] || [ ! -f "$_dinoflow_root/infra/state-env.sh" ]; then
    echo "state-env.sh: cannot find the dinoflow project root; source it from the project root or set DINOFLOW_ROOT" >&2
    unset _dinoflow_root
    return 1 2>/dev/null || exit 1
fi
_dinoflow_python=${DINOFLOW_PYTHON:-}
if [ -z "$_dinoflow_python" ]; then
    if [ -x "$_dinoflow_root/.venv/bin/python" ]; then
        _dinoflow_python=$_dinoflow_root/.venv/bin/python
    else
        _dinoflow_python=python3
    fi
fi
if _dinoflow_exports=$(cd "$_dinoflow_root" && "$_dinoflow_python" -m components.environment --shell --root .); then
    eval "$_dinoflow_exports"
    unset _dinoflow_root _dinoflow_python _dinoflow_exports
else
    echo "state-env.sh: '$_dinoflow_python -m components.environment --shell' failed (is the venv set up? make setup)" >&2
    unset _dinoflow_root _dinoflow_python _dinoflow_exports
    return 1 2>/dev/null || exit 1
fi
