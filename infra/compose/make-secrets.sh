#!/usr/bin/env bash
# Write random secrets for infra/compose/docker-compose.yaml into ${DINOFLOW_SECRETS_DIR:-./secrets}
# Existing files are kept, so rerunning never rotates a live password. The folder is 700 (other host
# users cannot reach the files); the files are 644 because compose bind-mounts each one as-is into
# /run/secrets, where non-root container users (the MLflow image runs as uid 10001) must read them.
set -euo pipefail
dir="${DINOFLOW_SECRETS_DIR:-$(cd "$(dirname "$0")" && pwd)/secrets}"
mkdir -p "$dir"
chmod 700 "$dir"
umask 022
# prefect_api_auth_string is Prefect's whole `user:password` auth string (server and clients compare it
# as-is); mlflow_admin_password is the password of the MLflow admin (${MLFLOW_ADMIN_USERNAME:-dinoflow}),
# mlflow_flask_secret_key signs the MLflow auth app's CSRF tokens. Nothing is ever printed but file names.
for name in prefect_db_password mlflow_db_password s3_access_key s3_secret_key \
            prefect_api_auth_string mlflow_admin_password mlflow_flask_secret_key; do
  if [ ! -s "$dir/$name" ]; then
    prefix=""
    [ "$name" = prefect_api_auth_string ] && prefix="dinoflow:"
    # URL-safe characters only: the database passwords end up inside connection URLs.
    python3 -c 'import secrets, sys; print(sys.argv[1] + secrets.token_urlsafe(24))' "$prefix" > "$dir/$name.tmp"
    mv "$dir/$name.tmp" "$dir/$name"
    echo "make-secrets: wrote $dir/$name"
  fi
done
