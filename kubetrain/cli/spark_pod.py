"""The command of the Spark driver and executor containers of a clean SparkApplication.

Spark on Kubernetes starts its pods with arguments only, ``driver --properties-file
... --class ... <app> <args>`` for the driver and ``executor`` for each executor
(the rest travels as ``SPARK_*`` variables), and leaves it to the image's entrypoint
to turn them into a process. Spark's own images ship a shell entrypoint for that;
kubetrain's CPU image has none (KFP sets each step's command) and carries Spark as
the pyspark wheel inside ``/opt/venv``. So the SparkApplication's pod templates
(`kubetrain.cluster.spark`) make this module the container command:

* ``driver ARGS``: ``$SPARK_HOME/bin/spark-submit --deploy-mode client ARGS``, bound to
  the pod's IP (``SPARK_DRIVER_BIND_ADDRESS``), which then runs the application file
  (`kubetrain.cli.spark_clean`) and asks the API server for executor pods;
* ``executor``: the JVM running Spark's ``KubernetesExecutorBackend`` with the
  classpath, heap and identity the driver put into the pod's environment.

The process replaces this one (``exec``), so SIGTERM reaches the JVM directly.
``SPARK_HOME`` is the installed pyspark package unless the environment sets it.
A missing variable is a one-line ``kubetrain | spark | error:`` and exit 2.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

from kubetrain.core.errors import KubetrainError

#: Spark's executor entry point on Kubernetes (spark-kubernetes jar).
EXECUTOR_BACKEND = "org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend"
#: What the driver sets on every executor pod: flag of the backend -> variable.
EXECUTOR_FLAGS = (
    ("--driver-url", "SPARK_DRIVER_URL"),
    ("--executor-id", "SPARK_EXECUTOR_ID"),
    ("--cores", "SPARK_EXECUTOR_CORES"),
    ("--app-id", "SPARK_APPLICATION_ID"),
    ("--hostname", "SPARK_EXECUTOR_POD_IP"),
    ("--resourceProfileId", "SPARK_RESOURCE_PROFILE_ID"),
    ("--podName", "SPARK_EXECUTOR_POD_NAME"),
)
#: JVM options the driver hands executors as SPARK_JAVA_OPT_0, _1, ... (in that order).
_JAVA_OPT = re.compile(r"SPARK_JAVA_OPT_(\d+)")
USAGE = "usage: python -m kubetrain.cli.spark_pod driver SPARK-SUBMIT-ARGS... | executor"


def spark_home(env: Mapping[str, str]) -> str:
    """``SPARK_HOME``, else the pyspark package (its bin/ and jars/ are a Spark install)."""
    if env.get("SPARK_HOME"):
        return env["SPARK_HOME"]
    try:
        import pyspark
    except ImportError:
        raise KubetrainError(
            "pyspark is not installed and SPARK_HOME is not set: this image cannot run "
            "Spark; build the CPU image with the spark extra (docker/install.sh)"
        ) from None
    return str(Path(pyspark.__file__).parent)


def java(env: Mapping[str, str]) -> str:
    """The java binary: ``$JAVA_HOME/bin/java``, else ``java`` on the PATH."""
    if env.get("JAVA_HOME"):
        return f"{env['JAVA_HOME']}/bin/java"
    found = shutil.which("java", path=env.get("PATH"))
    if not found:
        raise KubetrainError(
            "no Java runtime: java is not on the PATH and JAVA_HOME is not set; the CPU "
            "image installs openjdk-17-jre-headless (docker/Dockerfile.cpu)"
        )
    return found


def _required(env: Mapping[str, str], name: str, role: str) -> str:
    value = env.get(name, "")
    if not value:
        raise KubetrainError(
            f"{name} is not set: `{role}` runs inside a pod that Spark on Kubernetes "
            "started, which sets it"
        )
    return value


def driver_command(args: list[str], env: Mapping[str, str], home: str) -> list[str]:
    """spark-submit in client mode inside the driver pod, listening on the pod's IP."""
    address = _required(env, "SPARK_DRIVER_BIND_ADDRESS", "driver")
    return [
        f"{home}/bin/spark-submit",
        "--conf",
        f"spark.driver.bindAddress={address}",
        "--conf",
        f"spark.executorEnv.SPARK_DRIVER_POD_IP={address}",
        "--deploy-mode",
        "client",
        *args,
    ]


def classpath(env: Mapping[str, str], home: str) -> str:
    """Spark's conf directory first (the driver mounts the executors' conf there), then
    Hadoop's, the image's jars and any extra entries, and the working directory."""
    conf = env.get("SPARK_CONF_DIR") or f"{home}/conf"
    parts = [
        conf,
        env.get("HADOOP_CONF_DIR", ""),
        env.get("SPARK_CLASSPATH", ""),
        f"{home}/jars/*",
        env.get("SPARK_EXTRA_CLASSPATH", ""),
        env.get("SPARK_DIST_CLASSPATH", ""),
        os.getcwd(),
    ]
    return ":".join(p for p in parts if p)


def executor_command(env: Mapping[str, str], home: str) -> list[str]:
    """The executor JVM exactly as the driver describes it in the pod's environment."""
    memory = _required(env, "SPARK_EXECUTOR_MEMORY", "executor")
    numbered = []
    for name, value in env.items():
        match = _JAVA_OPT.fullmatch(name)
        if match:
            numbered.append((int(match.group(1)), value))
    options = [value for _, value in sorted(numbered)]
    command = [
        java(env),
        *options,
        f"-Xms{memory}",
        f"-Xmx{memory}",
        "-cp",
        classpath(env, home),
        EXECUTOR_BACKEND,
    ]
    for flag, name in EXECUTOR_FLAGS:
        command += [flag, _required(env, name, "executor")]
    return command


def command(argv: list[str], env: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """The process to exec for ``argv`` (``driver ...`` or ``executor``) and its environment."""
    if not argv or argv[0] not in ("driver", "executor"):
        raise KubetrainError(
            f"expected `driver` or `executor` as the first argument, got "
            f"{argv[0] if argv else 'nothing'!r} ({USAGE})"
        )
    home = spark_home(env)
    out_env = {**env, "SPARK_HOME": home}
    if argv[0] == "driver":
        return driver_command(argv[1:], out_env, home), out_env
    return executor_command(out_env, home), out_env


def main(argv: list[str] | None = None) -> int:
    try:
        cmd, env = command(sys.argv[1:] if argv is None else argv, os.environ)
    except KubetrainError as exc:
        print(f"kubetrain | spark | error: {exc}", file=sys.stderr, flush=True)
        return 2
    sys.stdout.flush()
    os.execve(cmd[0], cmd, env)
    return 0  # not reached: exec replaces this process


if __name__ == "__main__":
    sys.exit(main())
