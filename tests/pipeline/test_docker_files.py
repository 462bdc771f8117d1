"""docker/ and docs/cluster.md as shipped (Docker is not available here, so the files are parsed):
the compose cluster and the RayJob have the parts a cluster run needs, the image pins the versions the
README's numbers come from, and every command line in them parses with the program's own parser
(the project's argparse parsers, Ray's and MLflow's click commands) and resolves to a valid config."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import shlex
from importlib.metadata import version
from pathlib import Path
from typing import Callable, Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker" / "compose.yaml"
RAYJOB = REPO / "docker" / "rayjob-resnet50.yaml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
CLUSTER_DOC = REPO / "docs" / "cluster.md"
COMMAND_FILES = (COMPOSE, RAYJOB, DOCKERFILE, CLUSTER_DOC)

# A program's start: `python workflows/X.py`, `ray job submit`, `ray start`, `mlflow server`.
PROGRAM_RE = re.compile(r"(?:python3?\s+(workflows/\w+\.py)|\b(ray\s+job\s+submit|ray\s+start|mlflow\s+server))\b")
SHELL_ENDS = {"&&", "||", ";", "|", ">", ">>"}


def base_version(package: str) -> str:
    """The installed version without a local tag (``2.14.1+cu130`` -> ``2.14.1``)."""
    return version(package).split("+")[0]


# --------------------------------------------------------------------------- finding command lines


def logical_lines(text: str) -> list[str]:
    """Lines with comment markers removed (YAML/Dockerfile comments document commands too) and
    backslash continuations joined."""
    out, pending = [], ""
    for raw in text.splitlines():
        line = re.sub(r"^\s*#+\s?", "", raw).rstrip()
        joined = f"{pending} {line.strip()}" if pending else line
        if joined.endswith("\\"):
            pending = joined[:-1].rstrip()
            continue
        out.append(joined)
        pending = ""
    return out + ([pending] if pending else [])


def exec_form_commands(text: str) -> list[str]:
    """JSON-array commands (Dockerfile ``CMD [...]``, compose ``command: [...]``) as shell lines."""
    lines = []
    for match in re.finditer(r"\[\s*\"[^\]]*\]", text, flags=re.S):
        try:
            items = json.loads(match.group(0))
        except json.JSONDecodeError:
            continue
        if items and all(isinstance(i, str) for i in items):
            lines.append(shlex.join(items))
    return lines


def yaml_strings(node) -> Iterator[str]:
    """Every string in parsed YAML, lists of strings also joined as one command line (``command: [...]``)."""
    if isinstance(node, dict):
        for value in node.values():
            yield from yaml_strings(value)
    elif isinstance(node, list):
        if node and all(isinstance(i, str) for i in node):
            yield shlex.join(node)
        for value in node:
            yield from yaml_strings(value)
    elif isinstance(node, str):
        yield " ".join(node.split())


def find_commands(text: str, extra_lines: list[str] = ()) -> list[tuple[str, tuple[str, ...]]]:
    """``(program, argv)`` for every program start in ``text`` (and in ``extra_lines``), deduplicated.
    ``argv`` runs to the end of the line, an inline-code backtick, a comment or a shell operator;
    templates with an elided ``...`` argument are not command lines."""
    found: dict[tuple[str, tuple[str, ...]], None] = {}
    for line in [*logical_lines(text), *exec_form_commands(text), *extra_lines]:
        for match in PROGRAM_RE.finditer(line):
            program = match.group(1) or " ".join(match.group(2).split())
            tail = line[match.end():].split("`", 1)[0]
            try:
                tokens = shlex.split(tail, comments=True)
            except ValueError as err:
                raise AssertionError(f"cannot split the command line {line.strip()!r}: {err}") from None
            argv = []
            for token in tokens:
                if token in SHELL_ENDS:
                    break
                argv.append(token)
            if "..." not in argv:  # an elided template in prose (`ray job submit ... -- python ...`)
                found[(program, tuple(argv))] = None
    return list(found)


def commands_in(path: Path) -> list[tuple[str, tuple[str, ...]]]:
    text = path.read_text()
    extra = []
    if path.suffix == ".yaml":
        extra = [s for doc in yaml.safe_load_all(text) for s in yaml_strings(doc)]
    return find_commands(text, extra)


# --------------------------------------------------------------------------- parsing them


@contextlib.contextmanager
def argparse_problem(sink: list[str]) -> Iterator[None]:
    """Turn argparse's exit (usage error printed to stderr) into a problem line in ``sink``."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            yield
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            sink.append(err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {exit_.code}")
        else:
            sink.append("")  # --help: parsed, nothing to resolve


def check_pipeline(argv: list[str]) -> str | None:
    from pipeline.cli.runner import parse_args, resolve_config
    from pipeline.config.loading import ConfigError

    sink: list[str] = []
    with argparse_problem(sink):
        args = parse_args(argv)
    if sink:
        return sink[0] or None
    try:
        resolve_config(args)
    except ConfigError as err:
        return f"config: {err}"
    return None


def check_sweep(argv: list[str]) -> str | None:
    from pipeline.config.loading import ConfigError, load_config
    from pipeline.sweep import SweepUsageError
    from pipeline.sweep.plan import parse_args, sweep_overrides

    sink: list[str] = []
    with argparse_problem(sink):
        args = parse_args(argv)
    if sink:
        return sink[0] or None
    try:
        load_config(args.config, [*args.overrides, *sweep_overrides(args)])
    except (ConfigError, SweepUsageError) as err:
        return f"config: {err}"
    return None


def check_make_shards(argv: list[str]) -> str | None:
    spec = importlib.util.spec_from_file_location("make_shards", REPO / "workflows" / "make_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sink: list[str] = []
    with argparse_problem(sink):
        module.build_parser().parse_args(argv)
    return sink[0] if sink and sink[0] else None


def click_checker(load: Callable) -> Callable[[list[str]], str | None]:
    """A checker that parses ``argv`` with a click command (Ray's, MLflow's) without running it."""
    def check(argv: list[str]) -> str | None:
        import click

        command = load()
        try:
            command.make_context(command.name, list(argv))
        except click.exceptions.Exit:
            return None
        except click.ClickException as err:
            return err.format_message()
        return None
    return check


def _ray_submit():
    from ray.dashboard.modules.job.cli import submit
    return submit


def _ray_start():
    from ray.scripts.scripts import start
    return start


def _mlflow_server():
    from mlflow.cli import server
    return server


CHECKERS: dict[str, Callable[[list[str]], str | None]] = {
    "workflows/full_pipeline.py": check_pipeline,
    "workflows/sweep.py": check_sweep,
    "workflows/make_shards.py": check_make_shards,
    "ray job submit": click_checker(_ray_submit),
    "ray start": click_checker(_ray_start),
    "mlflow server": click_checker(_mlflow_server),
}


def command_problem(program: str, argv: tuple[str, ...]) -> str | None:
    if program not in CHECKERS:
        return f"no parser known for {program} (add one to CHECKERS)"
    return CHECKERS[program](list(argv))


def problems_in(commands) -> list[str]:
    return [f"{program} {shlex.join(argv)}: {problem}" for program, argv in commands
            if (problem := command_problem(program, argv))]


# --------------------------------------------------------------------------- command-line tests


@pytest.mark.parametrize("path", COMMAND_FILES, ids=lambda p: p.name)
def test_every_command_line_parses_and_resolves(path):
    commands = commands_in(path)
    assert any(program == "workflows/full_pipeline.py" for program, _ in commands), commands
    assert not problems_in(commands), "\n".join(problems_in(commands))


@pytest.mark.parametrize("script", ["full_pipeline.py", "sweep.py"])
def test_entry_point_docstring_commands_parse(script):
    commands = find_commands((REPO / "workflows" / script).read_text())
    assert any(program == f"workflows/{script}" and argv for program, argv in commands), commands
    assert not problems_in(commands), "\n".join(problems_in(commands))


def test_the_expected_command_lines_are_found():
    """The finder sees the commands that matter (else the test above would pass on nothing)."""
    doc = commands_in(CLUSTER_DOC)
    programs = [p for p, _ in doc]
    assert programs.count("ray job submit") >= 2 and "workflows/make_shards.py" in programs
    submitted = [argv[argv.index("--") + 1:] for p, argv in doc if p == "ray job submit"]
    assert all(entry[:2] == ("python", "workflows/full_pipeline.py") for entry in submitted), submitted
    compose = [p for p, _ in commands_in(COMPOSE)]
    assert compose.count("ray start") == 2 and "mlflow server" in compose, compose  # head, worker (x2, same line)
    rayjob = [argv for p, argv in commands_in(RAYJOB) if p == "workflows/full_pipeline.py"]
    assert ("--config", "imagenet_resnet50") == rayjob[0][:2], rayjob


@pytest.mark.parametrize("typo, expected", [
    ("--run-name", "unrecognized arguments"),                  # argparse: a flag that does not exist
    ("--storage s3://penni/runs", "unrecognized arguments"),
    ("--set ray.num_workers=2", "num_workrs"),                 # config: a key that does not exist
    ("--rows-per-shard 1000", "unrecognized arguments"),       # make_shards' own parser
    ("--working-dir .", "No such option"),                     # ray job submit (click)
])
def test_a_typo_in_a_command_line_is_caught(typo, expected):
    """The same text with one flag misspelt fails: the check is not vacuous."""
    text = "\n".join(p.read_text() for p in (CLUSTER_DOC, COMPOSE))
    assert typo in text, f"{typo!r} no longer appears in the docs: pick another typo for this test"
    misspelt = {"--run-name": "--run-nme", "--storage s3://penni/runs": "--storge s3://penni/runs",
                "--set ray.num_workers=2": "--set ray.num_workrs=2", "--rows-per-shard 1000": "--rows-per-shards 1000",
                "--working-dir .": "--workingdir ."}[typo]
    problems = problems_in(find_commands(text.replace(typo, misspelt)))
    assert any(expected in p for p in problems), problems


def test_the_finder_joins_continuations_and_cuts_shell_syntax():
    text = ("# ray job submit --address http://h:8265 -- \\\n"
            "#     python workflows/full_pipeline.py --config tiny \\\n"
            "#     --set ray.num_workers=2 && echo done\n"
            "Run `python workflows/make_shards.py a b --overwrite` first.\n"
            'CMD ["python", "workflows/sweep.py", "--d", "3,5"]\n')
    found = find_commands(text)
    assert ("workflows/full_pipeline.py", ("--config", "tiny", "--set", "ray.num_workers=2")) in found
    assert ("workflows/make_shards.py", ("a", "b", "--overwrite")) in found
    assert ("workflows/sweep.py", ("--d", "3,5")) in found
    assert not problems_in(found)
    assert problems_in([("workflows/sweep.py", ("--d", "3,5", "--num-sampels", "2"))])


# --------------------------------------------------------------------------- compose


def _compose() -> dict:
    (doc,) = list(yaml.safe_load_all(COMPOSE.read_text()))
    return doc


def _command(service: dict) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else list(command)


def _bytes(size: str) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)b?", str(size).lower()).groups()
    return float(number) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit]


def test_compose_has_a_ray_head_two_workers_mlflow_and_s3():
    from ray.scripts.scripts import start

    services = _compose()["services"]
    ray_nodes = {name: s for name, s in services.items() if _command(s)[:2] == ["ray", "start"]}
    params = {name: start.make_context("start", _command(s)[2:]).params for name, s in ray_nodes.items()}
    heads = [name for name, p in params.items() if p["head"]]
    assert len(heads) == 1 and len(ray_nodes) == 3, params
    head = heads[0]
    for name, p in params.items():
        if name != head:
            assert p["address"] == f"{head}:{params[head]['port']}", (name, p["address"])
        assert p["block"], f"{name}: `ray start` without --block exits and the container stops"
        assert _bytes(ray_nodes[name]["shm_size"]) >= 2**30, f"{name}: Ray's object store needs /dev/shm"
    assert "127.0.0.1:8265:8265" in services[head]["ports"]

    mlflow = [s for s in services.values() if _command(s)[:2] == ["mlflow", "server"]]
    s3 = [n for n, s in services.items() if "minio/minio" in str(s.get("image"))]
    assert len(mlflow) == 1 and len(s3) == 1


def test_compose_listens_on_localhost_only_and_ray_demands_its_token():
    """Every published port is bound to 127.0.0.1 (a Ray cluster runs the code it is sent); every Ray node runs with
    token auth, the token from the user's environment (compose refuses to start without it)."""
    services = _compose()["services"]
    published = [(name, str(port)) for name, s in services.items() for port in s.get("ports", [])]
    assert published and all(port.startswith("127.0.0.1:") for _, port in published), published
    for name, s in services.items():
        if _command(s)[:2] == ["ray", "start"]:
            env = s["environment"]
            assert env["RAY_AUTH_MODE"] == "token", name
            assert env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?"), name  # required, never a default


def test_compose_credentials_and_endpoints_agree():
    """Every Ray node and the MLflow server get the AWS variables; they name the S3 service and its
    root user, the MLflow service and its port; the bucket the job writes to is created."""
    from mlflow.cli import server

    services = _compose()["services"]
    s3_name, s3 = next((n, s) for n, s in services.items() if "minio/minio" in str(s.get("image")))
    mlflow_name, mlflow = next((n, s) for n, s in services.items() if _command(s)[:2] == ["mlflow", "server"])
    mlflow_params = server.make_context("server", _command(mlflow)[2:]).params
    users = [s for s in services.values() if _command(s)[:2] in (["ray", "start"], ["mlflow", "server"])]
    for service in users:
        env = service["environment"]
        assert env["AWS_ACCESS_KEY_ID"] == s3["environment"]["MINIO_ROOT_USER"]
        assert env["AWS_SECRET_ACCESS_KEY"] == s3["environment"]["MINIO_ROOT_PASSWORD"]
        assert env["AWS_ENDPOINT_URL"] == env["MLFLOW_S3_ENDPOINT_URL"] == f"http://{s3_name}:9000"
        assert env["MLFLOW_TRACKING_URI"] == f"http://{mlflow_name}:{mlflow_params['port']}"
        assert env.get("AWS_DEFAULT_REGION")
    bucket_commands = " ".join(" ".join(_command(s)) for s in services.values())
    job_storage = [argv[argv.index("--storage") + 1] for p, argv in commands_in(COMPOSE)
                   if p == "workflows/full_pipeline.py" and "--storage" in argv]
    for uri in [*job_storage, mlflow_params["artifacts_destination"]]:
        bucket = re.match(r"s3://([^/]+)", uri).group(1)
        assert f"mb --ignore-existing local/{bucket}" in bucket_commands, f"bucket {bucket} is never created"
    built = [s["image"] for s in services.values() if "build" in s]
    assert all(s["image"] in built for s in services.values() if _command(s)[:2] == ["ray", "start"])


# --------------------------------------------------------------------------- RayJob


def _rayjob_docs() -> tuple[dict, dict]:
    docs = {d["kind"]: d for d in yaml.safe_load_all(RAYJOB.read_text())}
    return docs["ConfigMap"], docs["RayJob"]


def _pods(rayjob: dict) -> dict[str, dict]:
    spec = rayjob["spec"]["rayClusterSpec"]
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    pods.update({g["groupName"]: g["template"]["spec"] for g in spec["workerGroupSpecs"]})
    return pods


def _walk(node) -> Iterator[tuple[str, object]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def test_rayjob_reads_credentials_only_from_a_secret_and_mlflow_from_the_configmap():
    configmap, rayjob = _rayjob_docs()
    assert configmap["data"]["MLFLOW_TRACKING_URI"].startswith("http")
    assert not set(CREDENTIALS) & set(configmap["data"]), "credentials belong in a Secret, not the ConfigMap"
    for key, value in _walk(rayjob):
        assert key not in CREDENTIALS, f"{key} written into the RayJob"
        if key == "env":
            for item in value:
                assert item["name"] not in CREDENTIALS or "secretKeyRef" in item.get("valueFrom", {}), item
    for pod_name, pod in _pods(rayjob).items():
        for container in pod.get("initContainers", []) + pod["containers"]:
            refs = container.get("envFrom", [])
            assert any("secretRef" in r for r in refs), f"{pod_name}/{container['name']}: no S3 Secret"
            assert {"name": configmap["metadata"]["name"]} in [r.get("configMapRef") for r in refs]


def test_rayjob_containers_have_requests_limits_and_shm():
    _, rayjob = _rayjob_docs()
    for pod_name, pod in _pods(rayjob).items():
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod.get("initContainers", []) + pod["containers"]:
            where = f"{pod_name}/{container['name']}"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{where}: no {kind}"
        for container in pod["containers"]:
            shm = [m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
            assert shm and volumes[shm[0]]["emptyDir"]["medium"] == "Memory", f"{pod_name}: /dev/shm"


def _gpus(container: dict, kind: str) -> int:
    return int(container["resources"][kind].get("nvidia.com/gpu", 0))


def _cpus(quantity: str) -> float:
    quantity = str(quantity)
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def test_rayjob_has_gpu_and_cpu_groups_that_fit_the_config():
    """The GPU group holds ``ray.num_workers`` Ray Train workers with their CPUs; a CPU-only group
    takes Ray Data's decoding; every Ray node mounts the directory of ``model.weights``."""
    from pipeline.cli.runner import parse_args, resolve_config

    _, rayjob = _rayjob_docs()
    spec = rayjob["spec"]
    assert spec["rayClusterSpec"]["rayVersion"] == base_version("ray")
    ((program, argv),) = find_commands(spec["entrypoint"])
    cfg = resolve_config(parse_args(argv))
    groups = {g["groupName"]: g for g in spec["rayClusterSpec"]["workerGroupSpecs"]}
    gpu_groups, cpu_groups = [], []
    for name, group in groups.items():
        (container,) = group["template"]["spec"]["containers"]
        gpus = _gpus(container, "limits")
        assert gpus == _gpus(container, "requests"), f"{name}: GPU requests must equal limits"
        (gpu_groups if gpus else cpu_groups).append((group, container, gpus))
    assert gpu_groups and cpu_groups, list(groups)
    group, container, gpus = gpu_groups[0]
    assert group["replicas"] * gpus >= cfg.ray.num_workers
    assert _cpus(container["resources"]["limits"]["cpu"]) >= gpus * cfg.ray.cpus_per_worker
    weights_dir = str(Path(cfg.model.weights).parent)
    for pod_name, pod in _pods(rayjob).items():
        for c in pod["containers"]:
            assert weights_dir in [m["mountPath"] for m in c["volumeMounts"]], f"{pod_name}: no {weights_dir}"


# --------------------------------------------------------------------------- Dockerfile


def _dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)", DOCKERFILE.read_text(), flags=re.M))


def test_dockerfile_pins_the_installed_versions_the_readme_names():
    args, text, readme = _dockerfile_args(), DOCKERFILE.read_text(), (REPO / "README.md").read_text()
    pins = {"TORCH_VERSION": "torch", "TORCHVISION_VERSION": "torchvision", "MLFLOW_VERSION": "mlflow"}
    for arg, package in pins.items():
        assert args[arg] == base_version(package), (arg, args[arg], version(package))
        assert f'"{package}==${{{arg}}}"' in text, f"{arg} is not what pip installs"
        assert base_version(package) in readme, f"the README does not name {package} {base_version(package)}"
    assert re.fullmatch(rf"rayproject/ray:{re.escape(base_version('ray'))}-py3\d+-gpu", args["RAY_IMAGE"])
    assert "TORCH_INDEX" in args, "a build argument for other CUDA builds"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'ray[default,train,tune]=={base_version("ray")}"' in pyproject
