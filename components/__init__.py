"""dinoflow's library: plain, typed Python that knows nothing of Prefect.

Sub-packages: ``config`` (typed params), ``storage`` (object stores), ``data`` (demo data, manifests),
``tracking`` (MLflow helpers). Importing this package has no side effects.
"""

__version__ = "0.1.0"
