# Source this to get the same quiet, project-local environment dinoflow sets for itself, for tools
# started by hand (mlflow ui, prefect server start): `. infra/state-env.sh`.
_root="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/.." && pwd)"
export DINOFLOW_HOME="${DINOFLOW_HOME:-$_root/.dinoflow}"
eval "$("$_root/.venv/bin/python" -c '
import os, shlex
from components.environment import apply_environment
env = {}
env.update(os.environ)
state = apply_environment(env)
for key in ("DINOFLOW_HOME", "PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "MLFLOW_DISABLE_TELEMETRY",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "DVC_NO_ANALYTICS", "DVC_SITE_CACHE_DIR", "HF_HUB_OFFLINE"):
    print(f"export {key}={shlex.quote(env[key])}")
print(f"export MLFLOW_UI_URI={shlex.quote(os.environ.get(\"MLFLOW_TRACKING_URI\") or f\"sqlite:///{state}/mlflow/mlflow.db\")}")
')"
unset _root
