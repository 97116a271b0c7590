"""The deployment files checked without Docker or a cluster (issue 12, "Manifests, in CI"):

- every file in k8s/ and every rendered kustomization validates against the Kubernetes
  schemas of KUBERNETES_VERSION with kubernetes-validate (strict: unknown fields fail);
- compose.yaml, with each combination of its profiles, validates against the Compose
  Specification's JSON schema (vendored: tests/deploy/data/compose-spec.json);
- every folio command in compose.yaml and k8s/ parses with folio's own parser;
- the pieces agree with each other: probes on the gateway's real routes, grace periods longer
  than --shutdown-timeout, selectors that select, the collector config in compose and k8s,
  the images' cache paths and the mounts over them.

The containers for real: `make compose-check` (scripts/compose_check.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from services.cli import build_parser
from shared.cli_args import engine_config_from_args
from shared.config import EngineConfig
from tests.deploy.kustomize import build

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
DATA = Path(__file__).parent / "data"
KUBERNETES_VERSION = "1.37"  # the newest schema set kubernetes-validate 1.37 ships
KUSTOMIZATIONS = ["", "base", "overlays/gpu", "observability"]
# YAML in k8s/ that is not a Kubernetes object: configuration files mounted by compose.yaml
# (and, for the collector, repeated in a ConfigMap). Checked on their own below.
CONFIG_FILES = {"observability/otel-collector-config.yaml", "observability/prometheus.yml",
                "observability/grafana/datasources.yaml", "observability/grafana/dashboards.yaml"}
# compose.yaml's variables as a deployment might set them (defaults are the other case).
COMPOSE_ENV = {"FOLIO_MODEL": "/models/llama", "FOLIO_ENGINE_ARGS": "--max-num-seqs 64 --dtype bfloat16",
               "FOLIO_GATEWAY_ARGS": "--served-model-name x", "FOLIO_GPUS": "4"}


def _yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# ---------------------------------------------------------------------- Kubernetes schemas
def _validate(doc: dict) -> str:
    import kubernetes_validate as kv  # validates offline against the real OpenAPI schemas

    if doc["kind"] == "LeaderWorkerSet":  # a CRD with no schema there: its two pod templates
        group = doc["spec"]["leaderWorkerTemplate"]
        for role in ("leaderTemplate", "workerTemplate"):
            kv.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role},
                         "template": group[role]}, KUBERNETES_VERSION, strict=True)
        return "LeaderWorkerSet (pod templates)"
    kv.validate(doc, KUBERNETES_VERSION, strict=True)  # raises ValidationError
    return doc["kind"]


def _patch_files() -> set[str]:
    out = set()
    for variant in KUSTOMIZATIONS:
        k = yaml.safe_load((K8S / variant / "kustomization.yaml").read_text())
        out |= {(K8S / variant / p["path"]).relative_to(K8S).as_posix() for p in k.get("patches", [])}
    return out


def test_every_file_in_k8s_validates():
    checked, kinds = [], set()
    patches = _patch_files()  # partial objects: validated as applied, in the rendered overlays
    assert patches == {"overlays/gpu/engine-gpu.yaml", "overlays/gpu/configmap-gpu.yaml"}
    for path in sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml")):
        rel = path.relative_to(K8S).as_posix()
        if rel in CONFIG_FILES or rel in patches:
            continue
        docs = _yaml_docs(path)
        assert docs and all("apiVersion" in d and "kind" in d for d in docs), \
            f"k8s/{rel}: not a Kubernetes manifest (a config file? add it to CONFIG_FILES)"
        for doc in docs:
            if doc["kind"] == "Kustomization":  # no schema: rendered below
                continue
            kinds.add(_validate(doc))
        checked.append(rel)
    assert {"base/engine.yaml", "base/gateway.yaml", "base/redis.yaml", "leaderworkerset.yaml",
            "observability/otel-collector.yaml"} <= set(checked), checked
    assert {"Deployment", "StatefulSet", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "ConfigMap", "LeaderWorkerSet (pod templates)"} <= kinds


@pytest.mark.parametrize("variant", KUSTOMIZATIONS)
def test_every_rendered_kustomization_validates(variant):
    docs = build(K8S / variant)
    for doc in docs:
        _validate(doc)
    # the patches of an overlay are partial objects: only the rendered whole must be valid
    assert docs


def test_every_manifest_is_applied_by_a_kustomization():
    """A manifest no kustomization lists is never applied: only the LWS example may be one."""
    listed: set[str] = set()
    for variant in KUSTOMIZATIONS:
        folder = K8S / variant
        k = yaml.safe_load((folder / "kustomization.yaml").read_text())
        listed |= {(folder / r).resolve().relative_to(K8S).as_posix() for r in k.get("resources", [])}
        listed |= {(folder / p["path"]).resolve().relative_to(K8S).as_posix() for p in k.get("patches", [])}
    files = {p.relative_to(K8S).as_posix() for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert files - listed - CONFIG_FILES == {"leaderworkerset.yaml"}


# ---------------------------------------------------------------------- compose
def _interpolate(value, env: dict[str, str]):
    """Compose's ${VAR:-default} / ${VAR} substitution (the forms compose.yaml uses)."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if isinstance(value, str):
        assert not re.search(r"\$(?!\{)", value.replace("$$", "")), value  # only ${...} forms
        return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: env.get(m[1]) or (m[2] or ""), value)
    return value


def _compose(env: dict[str, str], profiles: set[str]) -> dict:
    """compose.yaml as `docker compose --profile ... config` would resolve it."""
    model = _interpolate(yaml.safe_load((ROOT / "compose.yaml").read_text()), env)
    model["services"] = {n: s for n, s in model["services"].items()
                         if not s.get("profiles") or profiles & set(s["profiles"])}
    return model


PROFILE_SETS = [set(c) for n in range(3) for c in itertools.combinations(["gpu", "observability"], n)]


@pytest.mark.parametrize("env", [{}, COMPOSE_ENV], ids=["defaults", "set"])
@pytest.mark.parametrize("profiles", PROFILE_SETS, ids=lambda p: "+".join(sorted(p)) or "none")
def test_compose_validates_against_the_compose_spec(profiles, env):
    import jsonschema

    schema = json.loads((DATA / "compose-spec.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    validator.validate(yaml.safe_load((ROOT / "compose.yaml").read_text()))  # as written
    model = _compose(env, profiles)
    validator.validate(model)  # as resolved for these profiles
    services = model["services"]
    expected = {"redis", "engine", "gateway"}
    expected |= {"engine-gpu"} if "gpu" in profiles else set()
    if "observability" in profiles:
        expected |= {"otel-collector", "jaeger", "prometheus", "grafana"}
    assert set(services) == expected
    for name, svc in services.items():
        # compose refuses a dependency that the active profiles leave out
        assert set(svc.get("depends_on", {})) <= set(services), name
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):  # a bind mount of a repo file must exist
                assert (ROOT / src).exists(), f"{name} mounts {src}, which does not exist"
            else:
                assert src in model["volumes"], f"{name}: volume {src} not declared"


def _compose_seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)([hms])", duration))


def _folio_argv(svc: dict) -> list[str]:
    return shlex.split(svc["command"])


def _parse(argv: list[str]) -> argparse.Namespace:
    """folio's own parser, as the container's `folio ARGV` would run it (parse only)."""
    if argv[0] == "gateway":  # `folio gateway` hands its argv to the gateway's parser
        from services.gateway import server

        p = argparse.ArgumentParser()
        server.add_cli_args(p)
        return p.parse_args(argv[1:] + ["--redis-url", "redis://x"])
    args = build_parser().parse_args(argv)  # unknown flags fail here
    engine_config_from_args(args)  # invalid values fail here
    return args


def _shutdown_timeout(argv: list[str]) -> float:
    """--shutdown-timeout of a folio command, or its default (EngineConfig's)."""
    value = _parse(argv).shutdown_timeout
    if value is None:
        (field,) = [f for f in dataclasses.fields(EngineConfig) if f.name == "shutdown_timeout"]
        value = field.default
    return value


@pytest.mark.parametrize("env", [{}, COMPOSE_ENV], ids=["defaults", "set"])
def test_compose_folio_services_parse_and_outlast_their_drain(env):
    services = _compose(env, {"gpu", "observability"})["services"]
    folio = {n: s for n, s in services.items() if s["image"].startswith("folio:")}
    assert set(folio) == {"engine", "gateway", "engine-gpu"}
    for name, svc in folio.items():
        argv = _folio_argv(svc)
        _parse(argv)
        # Docker's SIGKILL comes stop_grace_period after SIGTERM: after the drain, with a margin
        grace = _compose_seconds(svc["stop_grace_period"])
        assert grace >= _shutdown_timeout(argv) + 10, name
        assert svc["environment"]["FOLIO_REDIS_URL"] == "redis://redis:6379/0"
    # the gateway is healthy when it is ready to serve (an engine is live), not merely up
    assert "/ready" in " ".join(services["gateway"]["healthcheck"]["test"])
    assert services["redis"]["healthcheck"]


@pytest.mark.parametrize("gpus", [None, "1", "4"])
def test_compose_gpu_engine_reserves_one_gpu_per_rank(gpus):
    env = {"FOLIO_GPUS": gpus} if gpus else {}
    svc = _compose(env, {"gpu"})["services"]["engine-gpu"]
    (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
    config = engine_config_from_args(_parse(_folio_argv(svc)))
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert int(device["count"]) == config.tensor_parallel_size == int(gpus or 1)
    assert config.device == "cuda" and svc["build"]["dockerfile"] == "Dockerfile.cuda"
    # scalable like the CPU engine: one engine per container, its id the host name
    assert not {"container_name", "hostname", "ports"} & set(svc) and "--engine-id" not in svc["command"]


# ---------------------------------------------------------------------- k8s commands
# What k8s and LeaderWorkerSet set in the containers' environment besides the ConfigMap.
_POD_ENV = {"FOLIO_ENGINE_ID": "folio-engine-6d4cf-x7k2q",
            "LWS_LEADER_ADDRESS": "folio-engine-lws-0.folio-engine-lws.default", "LWS_GROUP_SIZE": "2",
            "LWS_WORKER_INDEX": "1"}


def _pod_specs(doc: dict) -> list[dict]:
    if doc["kind"] in ("Deployment", "StatefulSet"):
        return [doc["spec"]["template"]["spec"]]
    if doc["kind"] == "LeaderWorkerSet":
        group = doc["spec"]["leaderWorkerTemplate"]
        return [group["leaderTemplate"]["spec"], group["workerTemplate"]["spec"]]
    return []


def _expand(script: str, env: dict[str, str]) -> list[str]:
    """The words of a container's `sh -c` line with its variables set (unknown: KeyError)."""
    return shlex.split(re.sub(r"\$(\w+)", lambda m: env[m[1]], script))


def _k8s_env(variant: str = "base") -> dict[str, str]:
    return {**_objects(variant)["ConfigMap", "folio-config"]["data"], **_POD_ENV}


def _k8s_commands() -> list[tuple[str, list[str]]]:
    """(source, folio argv) of every folio container of every rendered variant and the LWS."""
    found = []
    variants = [(v, build(K8S / v)) for v in ("base", "overlays/gpu")]
    variants.append(("leaderworkerset", build(K8S / "base") + _yaml_docs(K8S / "leaderworkerset.yaml")))
    for variant, docs in variants:
        (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "folio-config"]
        env = {**cm["data"], **_POD_ENV}
        for doc in docs:
            for spec in _pod_specs(doc):
                for c in spec["containers"]:
                    if not c["image"].startswith("folio:"):
                        continue
                    assert c["command"] == ["sh", "-c"], c["name"]
                    argv = _expand(c["args"][0], env)
                    assert argv[:2] == ["exec", "folio"], argv  # exec: folio itself gets SIGTERM
                    found.append((f"{variant}:{doc['metadata']['name']}:{c['name']}", argv[2:]))
    return found


def test_every_k8s_folio_command_parses():
    commands = _k8s_commands()
    assert {"base:folio-engine:scheduler", "base:folio-engine:executor-1", "base:folio-gateway:gateway",
            "overlays/gpu:folio-engine:executor-0", "leaderworkerset:folio-engine-lws:executor"} <= \
        {s for s, _ in commands}
    assert sorted({argv[0] for _, argv in commands}) == ["executor", "gateway", "scheduler"]
    for source, argv in commands:
        args = _parse(argv)
        if argv[0] == "executor":
            assert 0 <= args.tp_rank < engine_config_from_args(args).tensor_parallel_size, source


# ---------------------------------------------------------------------- k8s: how the pieces meet
def _objects(variant: str = "base") -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in build(K8S / variant)}


def _app_routes() -> set[str]:
    """The gateway's GET routes, read from its FastAPI decorators (building the app needs Redis)."""
    return set(re.findall(r'@app\.get\("([^"]+)"\)', (ROOT / "services/gateway/app.py").read_text()))


def test_gateway_probes_shutdown_and_scaling():
    objs = _objects()
    dep = objs["Deployment", "folio-gateway"]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    routes = _app_routes()
    # readiness: /ready (503 while draining or with no live engine); liveness: a route that
    # answers while the process runs, whatever the engines do
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["path"] in routes, probe
        assert c[probe]["httpGet"]["port"] in {p["name"] for p in c["ports"]}
    assert c["livenessProbe"]["httpGet"]["path"] not in ("/ready", "/health")
    # preStop (endpoint removal) + the drain must fit in the grace period, with a margin
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    argv = _expand(c["args"][0], _k8s_env())[2:]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + _shutdown_timeout(argv) + 5
    # the HPA scales this Deployment; PDB and Service select its pods
    hpa = objs["HorizontalPodAutoscaler", "folio-gateway"]
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "folio-gateway"}
    assert hpa["spec"]["scaleTargetRef"] == target
    # a PDB that allows no disruption at the HPA's minimum would block node drains
    assert hpa["spec"]["minReplicas"] > objs["PodDisruptionBudget", "folio-gateway"]["spec"]["minAvailable"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    for kind in ("PodDisruptionBudget", "Service"):
        spec = objs[kind, "folio-gateway"]["spec"]
        selector = spec["selector"].get("matchLabels", spec["selector"])
        assert selector.items() <= labels.items(), kind
    assert pod["securityContext"]["runAsNonRoot"]


@pytest.mark.parametrize("variant", ["base", "overlays/gpu"])
def test_engine_pods_outlast_their_drain_and_redis_is_reachable(variant):
    objs = _objects(variant)
    pod = objs["Deployment", "folio-engine"]["spec"]["template"]["spec"]
    for c in pod["containers"]:
        argv = _expand(c["args"][0], _k8s_env(variant))[2:]
        assert pod["terminationGracePeriodSeconds"] >= _shutdown_timeout(argv) + 5, c["name"]
    assert objs["PodDisruptionBudget", "folio-engine"]["spec"]["selector"]["matchLabels"].items() <= \
        objs["Deployment", "folio-engine"]["spec"]["template"]["metadata"]["labels"].items()
    # one Redis, behind the Service the ConfigMap's URL names; the StatefulSet's governing
    # Service exists and is headless
    sts = objs["StatefulSet", "folio-redis"]
    assert sts["spec"]["replicas"] == 1
    assert objs["Service", sts["spec"]["serviceName"]]["spec"]["clusterIP"] == "None"
    host = re.match(r"redis://([^:/]+)", objs["ConfigMap", "folio-config"]["data"]["FOLIO_REDIS_URL"])[1]
    redis_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert objs["Service", host]["spec"]["selector"].items() <= redis_labels.items()


def test_lws_grace_period_matches_the_engine_pods():
    (lws,) = _yaml_docs(K8S / "leaderworkerset.yaml")
    engine = _objects()["Deployment", "folio-engine"]["spec"]["template"]["spec"]
    group = lws["spec"]["leaderWorkerTemplate"]
    for role in ("leaderTemplate", "workerTemplate"):
        assert group[role]["spec"]["terminationGracePeriodSeconds"] == engine["terminationGracePeriodSeconds"]


# ---------------------------------------------------------------------- observability config
def test_collector_config_is_the_same_in_compose_and_k8s_and_complete():
    text = (K8S / "observability/otel-collector-config.yaml").read_text()
    objs = _objects("observability")
    in_k8s = objs["ConfigMap", "otel-collector-config"]["data"]["config.yaml"]
    assert yaml.safe_load(in_k8s) == yaml.safe_load(text)
    config = yaml.safe_load(text)
    for pipeline in config["service"]["pipelines"].values():
        for kind in ("receivers", "processors", "exporters"):
            assert set(pipeline[kind]) <= set(config[kind]), kind
    assert set(config["service"]["extensions"]) <= set(config["extensions"])
    # the exporter's host is the Jaeger service in both
    host = config["exporters"]["otlp/jaeger"]["endpoint"].split(":")[0]
    assert ("Service", host) in objs
    assert host in yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    # folio's endpoint, as the ConfigMap comment and compose.yaml's header give it, reaches it
    assert objs["Service", "otel-collector"]["spec"]["ports"][1]["port"] == 4318
    assert "http://otel-collector:4318/v1/traces" in (K8S / "base/configmap.yaml").read_text()


def test_grafana_provisioning_points_at_the_dashboards():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in compose["volumes"])
    (provider,) = yaml.safe_load((K8S / "observability/grafana/dashboards.yaml").read_text())["providers"]
    assert mounts["./k8s/observability/dashboards"] == provider["options"]["path"]
    (ds,) = yaml.safe_load((K8S / "observability/grafana/datasources.yaml").read_text())["datasources"]
    assert ds["url"] == "http://prometheus:9090" and ds["type"] == "prometheus"
    # every panel and variable of the dashboards names the provisioned datasource
    for path in (K8S / "observability/dashboards").glob("*.json"):
        refs = re.findall(r'"datasource":\s*(\{[^}]*\})', path.read_text())
        assert refs and {json.loads(r)["uid"] for r in refs} == {ds["uid"]}, path.name


# ---------------------------------------------------------------------- images
def _dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", (ROOT / name).read_text())
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in text.splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")]


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_images_are_multi_stage_non_root_with_the_model_cache_on_a_volume(name):
    lines = _dockerfile(name)
    assert lines[0][0] == "ARG" and lines[0][1].startswith("BASE_IMAGE=")  # the base is a build arg
    froms = [a for i, a in lines if i == "FROM"]
    assert froms == ["${BASE_IMAGE} AS build", "${BASE_IMAGE} AS runtime"]
    runtime = lines[[a for _, a in lines].index("${BASE_IMAGE} AS runtime"):]
    assert [a for i, a in runtime if i == "USER"] == ["1000"]
    assert not any("--from=build /root" in a for i, a in runtime if i == "COPY")  # no build caches
    env = " ".join(a for i, a in runtime if i == "ENV")
    assert "FOLIO_CACHE_DIR=/var/cache/folio" in env and "HF_HOME=/var/cache/folio/huggingface" in env
    assert [a for i, a in runtime if i == "VOLUME"] == ['["/var/cache/folio"]']
    assert {a for i, a in lines if i == "ARG"} >= {"TORCH_SPEC=torch==2.13.0"}
    assert any(a.startswith("TORCH_PIP_ARGS=") for i, a in lines if i == "ARG")
    # everything COPY'd from the context passes .dockerignore's allow-list
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    for i, a in lines:
        if i == "COPY" and "--from" not in a:
            for src in a.split()[:-1]:
                assert src in allowed and (ROOT / src).exists(), src
    # the k8s model volumes mount inside the image's cache (below it, so the bundled conversion
    # the image holds stays visible)
    for variant in ("base",):
        for (kind, _), obj in _objects(variant).items():
            if kind != "Deployment" or obj["metadata"]["name"] not in ("folio-engine", "folio-gateway"):
                continue
            for c in obj["spec"]["template"]["spec"]["containers"]:
                paths = {m["mountPath"] for m in c["volumeMounts"] if m["name"] == "model-cache"}
                assert paths == {"/var/cache/folio/huggingface"}, c["name"]


# ---------------------------------------------------------------------- defaults that run
# (attention heads, KV heads) of the default models, from their config.json. Tensor
# parallelism splits heads across ranks: a size that does not divide both fails every rank at
# load ("num_attention_heads 9 is not divisible by tensor-parallel size 2"), a crash loop.
HEADS = {"smollm2-135m-instruct": (9, 3), "Qwen/Qwen2.5-0.5B-Instruct": (14, 2)}


def _divides(model: str, tp: int) -> bool:
    return all(n % tp == 0 for n in HEADS[model])


def test_default_models_split_over_the_default_rank_counts():
    assert not _divides("smollm2-135m-instruct", 2) and _divides("smollm2-135m-instruct", 3)
    for profiles in ({"gpu"}, set()):
        for name, svc in _compose({}, profiles)["services"].items():
            if svc["image"].startswith("folio:") and name != "gateway":
                args = _parse(_folio_argv(svc))
                model = engine_config_from_args(args).model
                assert _divides(model, engine_config_from_args(args).tensor_parallel_size), name
    for variant in ("base", "overlays/gpu"):
        model = _objects(variant)["ConfigMap", "folio-config"]["data"]["FOLIO_MODEL"]
        pod = _objects(variant)["Deployment", "folio-engine"]["spec"]["template"]["spec"]
        ranks = sum(c["name"].startswith("executor-") for c in pod["containers"])
        assert _divides(model, ranks), (variant, model, ranks)
    (lws,) = _yaml_docs(K8S / "leaderworkerset.yaml")
    assert _divides(_objects()["ConfigMap", "folio-config"]["data"]["FOLIO_MODEL"],
                    lws["spec"]["leaderWorkerTemplate"]["size"])
