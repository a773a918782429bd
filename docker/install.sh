#!/usr/bin/env bash
# The one install step of the kubetrain images (docker/Dockerfile.*), also run by
# tests/test_images.py in a clean venv, so the image's install is tested without Docker.
#
#   docker/install.sh <venv-dir> [cpu|cuda]
#
# Creates <venv-dir> with $PYTHON (default python3.11) unless it exists, installs
# kubetrain NON-editable with constraints.txt (kfp, kfp-kubernetes and torch are
# pinned in pyproject.toml, everything else in constraints.txt), then checks that
# kfp, torch of the requested flavor and every component module import. The cpu
# flavor also gets the `spark` extra (pyspark): the clean step's SparkApplication
# runs its driver and executors in the CPU image (kubetrain/cluster/spark.py), so the
# check also finds Spark's Kubernetes backend and the driver program where the
# SparkApplication's mainApplicationFile points.
#   PIP_EXTRA_ARGS  extra pip arguments, e.g. "--extra-index-url https://download.pytorch.org/whl/cpu"
#                   (the CPU image passes the CPU wheel index here)
# The build runs in a temporary copy of the sources: no build/ or *.egg-info is
# left in the repository.
set -euo pipefail

usage="usage: docker/install.sh <venv-dir> [cpu|cuda]"
venv=${1:?$usage}
flavor=${2:-cpu}
case "$flavor" in cpu | cuda) ;; *) echo "error: flavor '$flavor' is not cpu or cuda; $usage" >&2; exit 2 ;; esac
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3.11}
read -r -a extra <<<"${PIP_EXTRA_ARGS:-}"

if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
fi
venv=$(cd "$venv" && pwd)

src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
(cd "$root" && tar -cf - --exclude=__pycache__ --exclude='*.pyc' --exclude=pipelines/compiled \
    pyproject.toml constraints.txt README.md kubetrain components pipelines) | tar -xf - -C "$src"

target=$src
if [[ "$flavor" == cpu ]]; then
    target="${src}[spark,serve,registry]"  # serve: the InferenceService runs this image
fi

echo "kubetrain | install | $flavor image venv in $venv (${extra[*]:-default indexes})"
"$venv/bin/python" -m pip install --no-cache-dir --disable-pip-version-check --no-input --root-user-action=ignore \
    -c "$src/constraints.txt" ${extra[@]+"${extra[@]}"} "$target"

# Fails the build when the wrong torch flavor, or a module, did not make it in.
cd "$venv"  # not the source tree: imports must come from site-packages
KUBETRAIN_FLAVOR=$flavor "$venv/bin/python" - <<'EOF'
import importlib
import os
import pkgutil

import kfp
import torch

import kubetrain
import kubetrain.components
import kubetrain.pipelines.training  # noqa: F401

flavor = os.environ["KUBETRAIN_FLAVOR"]
cuda = torch.version.cuda
if (flavor == "cpu") != (cuda is None):
    raise SystemExit(f"error: torch {torch.__version__} (CUDA {cuda}) is not a {flavor} build")
if "site-packages" not in kubetrain.__file__:
    raise SystemExit(f"error: kubetrain imported from {kubetrain.__file__}, not site-packages")
names = [m.name for m in pkgutil.iter_modules(kubetrain.components.__path__)]
for name in names:
    importlib.import_module(f"kubetrain.components.{name}")
spark = "no Spark"
if flavor == "cpu":
    import sys
    from pathlib import Path, PurePosixPath

    import pyspark

    from kubetrain.cluster import spark as app

    if pyspark.__version__ != app.SPARK_VERSION:
        raise SystemExit(f"error: pyspark {pyspark.__version__}, but SparkApplications say "
                         f"sparkVersion {app.SPARK_VERSION} (kubetrain/cluster/spark.py)")
    if not list((Path(pyspark.__file__).parent / "jars").glob("spark-kubernetes_*.jar")):
        raise SystemExit("error: pyspark has no spark-kubernetes jar: Spark cannot run on Kubernetes")
    main_file = Path(sys.prefix) / PurePosixPath(app.MAIN_FILE).relative_to(app.VENV)
    if not main_file.is_file():
        raise SystemExit(f"error: no {main_file}: the SparkApplication's mainApplicationFile "
                         f"{app.MAIN_FILE} would not exist in the image")
    spark = f"pyspark {pyspark.__version__}"
print(f"kubetrain | install | ok: kubetrain {kubetrain.__version__}, kfp {kfp.__version__}, "
      f"torch {torch.__version__} (CUDA {cuda}), {spark}, components: {', '.join(names)}")
EOF
