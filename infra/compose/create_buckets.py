"""Create the stack's S3 buckets when missing (one-shot service of infra/compose/docker-compose.yaml).

Credentials are read from the docker secrets the compose file mounts, never from arguments.
Usage: create_buckets.py BUCKET [BUCKET ...]   (endpoint: AWS_ENDPOINT_URL)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import boto3
from botocore.exceptions import ClientError, EndpointConnectionError

SECRETS = Path(os.environ.get("SECRETS_DIR", "/run/secrets"))


def read_secret(name: str) -> str:
    return (SECRETS / name).read_text().strip()


def main(buckets: list[str]) -> int:
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"],
                          aws_access_key_id=read_secret("s3_access_key"),
                          aws_secret_access_key=read_secret("s3_secret_key"),
                          region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    for attempt in range(30):  # the S3 service may still be starting although its container is up
        try:
            existing = {bucket["Name"] for bucket in client.list_buckets().get("Buckets", [])}
            break
        except EndpointConnectionError:
            time.sleep(min(2 ** attempt, 5))
    else:
        print("create_buckets: S3 endpoint never answered", file=sys.stderr)
        return 1
    for name in buckets:
        if name in existing:
            print(f"create_buckets: {name} exists")
            continue
        try:
            client.create_bucket(Bucket=name)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
        print(f"create_buckets: {name} created")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
