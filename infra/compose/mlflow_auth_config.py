"""Write the config of MLflow's basic-auth app (``MLFLOW_AUTH_CONFIG_PATH``) from the stack's docker secrets.

Run by the mlflow-server service of infra/compose/docker-compose.yaml just before
``mlflow server --app-name basic-auth``. Secrets are read from files (``SECRETS_DIR``, default
/run/secrets), never from arguments or the environment; the config is written with mode 0600 because
it holds the admin password and the user store's connection string.

Usage: mlflow_auth_config.py OUT.ini

Environment (none of it secret):
  MLFLOW_ADMIN_USERNAME            admin created on the first start (default: dinoflow); password: the
                                   mlflow_admin_password secret. Both are ignored once the user exists.
  MLFLOW_AUTH_DEFAULT_PERMISSION   what an authenticated user may do without an explicit grant (default: READ)
  MLFLOW_AUTH_DATABASE_URI         the user store as a password-free URI (e.g. sqlite:////data/auth.db);
                                   default: the PostgreSQL database MLFLOW_AUTH_DB_NAME (mlflow_auth) on
                                   MLFLOW_AUTH_DB_HOST (mlflow-db) as MLFLOW_AUTH_DB_USER (mlflow), password
                                   from the mlflow_db_password secret, created when missing. The auth app
                                   keeps its own tables and migrations, so it gets its own database.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import quote

SECRETS = Path(os.environ.get("SECRETS_DIR", "/run/secrets"))
AUTHORIZATION_FUNCTION = "mlflow.server.auth:authenticate_request_basic_auth"


def read_secret(name: str) -> str:
    return (SECRETS / name).read_text().strip()


def postgres_auth_database() -> str:
    """The PostgreSQL user-store URI; creates the database on first use (the image's superuser may)."""
    import psycopg2

    host = os.environ.get("MLFLOW_AUTH_DB_HOST", "mlflow-db")
    port = os.environ.get("MLFLOW_AUTH_DB_PORT", "5432")
    user = os.environ.get("MLFLOW_AUTH_DB_USER", "mlflow")
    name = os.environ.get("MLFLOW_AUTH_DB_NAME", "mlflow_auth")
    password = read_secret("mlflow_db_password")
    connection = psycopg2.connect(host=host, port=port, user=user, password=password,
                                  dbname=os.environ.get("MLFLOW_AUTH_DB_MAINTENANCE", "mlflow"))
    try:
        connection.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cursor.fetchone() is None:
                cursor.execute(f'CREATE DATABASE "{name}"')
                print(f"mlflow_auth_config: created database {name}")
    finally:
        connection.close()
    return f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{port}/{name}"


def config_text(database_uri: str, admin_username: str, admin_password: str, default_permission: str) -> str:
    """The ini text; ``%`` is doubled because MLflow reads it with ConfigParser's interpolation."""
    values = {
        "default_permission": default_permission,
        "database_uri": database_uri,
        "admin_username": admin_username,
        "admin_password": admin_password,
        "authorization_function": AUTHORIZATION_FUNCTION,
    }
    lines = ["[mlflow]"]
    for key, value in values.items():
        if "\n" in value or "\r" in value:
            raise ValueError(f"{key} must be one line")
        lines.append(f"{key} = {value.replace('%', '%%')}")
    return "\n".join(lines) + "\n"


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by the owner only (the folder too, when this creates it)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    admin_password = read_secret("mlflow_admin_password")
    if len(admin_password) < 12:
        print("mlflow_auth_config: mlflow_admin_password must have at least 12 characters", file=sys.stderr)
        return 1
    database_uri = os.environ.get("MLFLOW_AUTH_DATABASE_URI") or postgres_auth_database()
    text = config_text(database_uri, os.environ.get("MLFLOW_ADMIN_USERNAME") or "dinoflow", admin_password,
                       os.environ.get("MLFLOW_AUTH_DEFAULT_PERMISSION") or "READ")
    write_private(Path(argv[0]), text)
    print(f"mlflow_auth_config: wrote {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
