"""Stage entry points ``run_<stage>(context, config)`` shared by the CLI, DVC and Prefect."""
