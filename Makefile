# The two commands of the README:
#   make demo   set up everything on a fresh machine, fetch the demo data and run the pipeline
#   make test   set up everything on a fresh machine and run lint, type checks and the test suite
# Both are idempotent: set-up steps are skipped when already done.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: demo test setup system lint pytest mlflow-ui prefect-ui s3-start s3-stop clean-state images stack-up

# dvc repro runs every stage (data, curate, pretrain, distill, evaluate); each stage command runs as a
# Prefect flow and logs an MLflow run. `dinoflow pipeline` is the same chain as one Prefect flow.
demo: setup
	dvc repro
	dvc push
	dinoflow report

test: setup lint pytest

setup: system $(VENV)/.installed

# Debian packages: the Fashion-MNIST demo data and a real S3-compatible server (Ceph RGW) for tests.
system:
	bash infra/setup-system.sh

$(VENV)/.installed: pyproject.toml infra/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c infra/constraints.txt -e ".[dev]"
	touch $@

lint:
	$(BIN)/ruff check .
	$(BIN)/mypy

pytest:
	$(BIN)/python -m pytest -q -rs --durations=15

# The UIs of the project's own stores (the ones the dinoflow CLI writes to, see infra/state-env.sh): MLflow
# on MLFLOW_TRACKING_URI / tracking.uri / .dinoflow/mlflow/mlflow.db, Prefect on PREFECT_HOME's database.
# Ports: make mlflow-ui MLFLOW_PORT=5001, make prefect-ui PREFECT_PORT=4201.
MLFLOW_PORT ?= 5000
PREFECT_PORT ?= 4200
STATE_ENV = DINOFLOW_ROOT="$(CURDIR)" DINOFLOW_PYTHON="$(abspath $(BIN))/python" . infra/state-env.sh

mlflow-ui:
	@$(STATE_ENV) && case "$$MLFLOW_UI_URI" in \
	  http://*|https://*) echo "MLFLOW_TRACKING_URI is a tracking server; its UI: $$MLFLOW_UI_URI" ;; \
	  *) echo "MLflow UI of $$MLFLOW_UI_URI on http://127.0.0.1:$(MLFLOW_PORT)" && \
	     exec "$(abspath $(BIN))/mlflow" ui --backend-store-uri "$$MLFLOW_UI_URI" \
	       --artifacts-destination "$$MLFLOW_UI_ARTIFACTS" --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1 ;; \
	esac

prefect-ui:
	@$(STATE_ENV) && if [ -n "$${PREFECT_API_URL:-}" ]; then \
	  echo "PREFECT_API_URL is set: flow runs go to $$PREFECT_API_URL; open that server's UI"; \
	else \
	  echo "Prefect UI of PREFECT_HOME=$$PREFECT_HOME on http://127.0.0.1:$(PREFECT_PORT)" && \
	  exec "$(abspath $(BIN))/prefect" server start --host 127.0.0.1 --port $(PREFECT_PORT); \
	fi

# A real S3-compatible server on loopback for development (prints the AWS_* variables to export).
s3-start:
	bash infra/s3/ceph-rgw.sh install && bash infra/s3/ceph-rgw.sh start .dinoflow/ceph-rgw

s3-stop:
	bash infra/s3/ceph-rgw.sh stop .dinoflow/ceph-rgw

clean-state:
	rm -rf .dinoflow data metrics

# Container images and the production stack (docs/deployment.md; needs Docker with the compose plugin).
images:
	docker build -f infra/docker/Dockerfile.train -t ghcr.io/dinoflow/dinoflow-train:0.1.0 .
	docker build -f infra/docker/Dockerfile.flow -t ghcr.io/dinoflow/dinoflow-flow:0.1.0 .
	docker build -f infra/docker/Dockerfile.mlflow -t ghcr.io/dinoflow/dinoflow-mlflow:0.1.0 .

stack-up:
	cd infra/compose && ./make-secrets.sh && docker compose up -d
