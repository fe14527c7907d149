"""Prefect flows over the ``components`` stage functions.

Importing this package applies dinoflow's quiet/offline environment defaults (project-local
PREFECT_HOME, no telemetry) before Prefect is imported anywhere below it: Prefect reads its
settings when it is first imported, so this is the one place the defaults can take effect for
users who import the flows from Python. Values already in the environment are never changed.
"""

from components.environment import apply_environment

apply_environment()
