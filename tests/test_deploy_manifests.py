"""compose.yaml and k8s/ run the engines they say they run: compose's engine service scales,
one engine pod is one engine (one scheduler, ranks 0..N-1, one engine id), one
LeaderWorkerSet group is one engine, on CPU and in the GPU overlay.

Commands are expanded by a real `sh` (as in the containers) with the environment the pod
would get (ConfigMap, downward API, LeaderWorkerSet's variables), then parsed by folio's own
parser. Schemas, probes, shutdown and the images: tests/deploy/test_deploy_checks.py.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from services.cli import build_parser
from shared.cli_args import engine_config_from_args
from tests.deploy.kustomize import build

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _rendered(variant: str) -> dict[tuple[str, str], dict]:
    """{(kind, name): object} of a kustomization ("base", "overlays/gpu") as kubectl applies it."""
    return {(d["kind"], d["metadata"]["name"]): d for d in build(K8S / variant)}


def _container_env(c: dict, pod: dict[str, str], base: dict[str, str], configmap: dict[str, str]) -> dict:
    """A container's environment: `base` (set by the platform), the ConfigMap, its own `env`
    with downward-API fields read from `pod` ({"metadata.name": ..., "status.podIP": ...})."""
    env = dict(base)
    for src in c.get("envFrom", []):
        assert src["configMapRef"]["name"] == "folio-config", src
        env |= configmap
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "fieldRef" in e.get("valueFrom", {}):
            env[e["name"]] = pod[e["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def _sh_argv(script: str, env: dict[str, str]) -> list[str]:
    """The argv that `sh -c script` would exec under `env` (printed instead of run)."""
    assert script.startswith("exec folio "), script  # exec: folio itself gets the pod's SIGTERM
    out = subprocess.run(["sh", "-c", "exec printf '%s\\n' " + script[len("exec "):]],
                         env={"PATH": os.environ["PATH"], **env}, capture_output=True, text=True,
                         check=True, timeout=10)
    return out.stdout.splitlines()


def _check_engine_probes(c: dict, env: dict[str, str], args, config) -> bool:
    """A container's exec probes, parsed by folio's parser: `folio probe engine` on the
    container's own engine and Redis, a stall bound no shorter than the engine's own
    --step-timeout (the scheduler fails a stuck step first), and a startup allowance for
    model loading. True if the container has a liveness probe."""
    for name in ("startupProbe", "livenessProbe", "readinessProbe"):
        if name not in c:
            continue
        cmd = c[name]["exec"]["command"]
        assert cmd[:2] == ["sh", "-c"] and len(cmd) == 3, (c["name"], name)
        argv = _sh_argv(cmd[2], env)
        assert argv[:3] == ["folio", "probe", "engine"], argv
        probe = build_parser().parse_args(argv[1:])
        assert probe.engine_id == args.engine_id, (c["name"], name, probe.engine_id)
        assert probe.redis_url == args.redis_url and probe.redis_namespace == args.redis_namespace
        assert probe.stall_timeout >= config.resolved_step_timeout(), (c["name"], name)
        assert c[name]["timeoutSeconds"] >= 3, (c["name"], name)  # a Python start plus Redis
    if "livenessProbe" not in c:
        return False
    startup = c["startupProbe"]  # without it, liveness would kill the engine while it loads
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, c["name"]
    live = c["livenessProbe"]
    # a heartbeat gap of a Redis restart or a rank reload is not a dead engine
    assert live["periodSeconds"] * live["failureThreshold"] >= 30, c["name"]
    return True


def _pod_engine(containers: list[dict], pod: dict[str, str], base: dict[str, str] | None = None,
                engine_args: str | None = None, variant: str = "base",
                probed: list[str] | None = None) -> dict[str, list]:
    """{"scheduler"/"executor": [(args, EngineConfig), ...]} of one pod's containers, with
    the variant's ConfigMap, its FOLIO_ENGINE_ARGS replaced by `engine_args` if given. Their
    exec probes are checked too; `probed` gets the names of those with a liveness probe."""
    configmap = dict(_rendered(variant)["ConfigMap", "folio-config"]["data"])
    if engine_args is not None:
        configmap["FOLIO_ENGINE_ARGS"] = engine_args
    roles: dict[str, list] = {}
    for c in containers:
        assert c["command"] == ["sh", "-c"], c["name"]
        env = _container_env(c, pod, base or {}, configmap)
        argv = _sh_argv(c["args"][0], env)
        assert argv[0] == "folio", argv
        args = build_parser().parse_args(argv[1:])
        config = engine_config_from_args(args)
        roles.setdefault(args.command, []).append((args, config))
        if _check_engine_probes(c, env, args, config) and probed is not None:
            probed.append(c["name"])
    return roles


def _assert_one_engine(roles: dict[str, list], engine_id: str) -> int:
    """One scheduler, ranks 0..N-1 once each, everyone on tensor-parallel size N and one id."""
    assert sorted(roles) == ["executor", "scheduler"] and len(roles["scheduler"]) == 1, roles
    tp = len(roles["executor"])
    assert sorted(a.tp_rank for a, _ in roles["executor"]) == list(range(tp))
    everyone = roles["scheduler"] + roles["executor"]
    assert {c.tensor_parallel_size for _, c in everyone} == {tp}
    assert {a.engine_id for a, _ in everyone} == {engine_id}
    return tp


# ---------------------------------------------------------------------- compose
def _compose_engine() -> dict:
    # safe_load resolves the `<<: *folio` merge, so inherited keys are checked too.
    return yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["engine"]


def _compose_argv(svc: dict, env: dict[str, str]) -> list[str]:
    cmd = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m[1], m[2]), svc["command"])
    return shlex.split(cmd)


def test_compose_engine_service_scales():
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    assert "scheduler" not in services and "executor" not in services, sorted(services)
    engine = _compose_engine()
    # `docker compose up --scale engine=N`: a fixed name, host name or host port clashes, and
    # a fixed engine id makes N containers one engine (the id defaults to the host name).
    for key in ("container_name", "hostname", "ports"):
        assert key not in engine, key
    env = engine.get("environment", {})
    env = env if isinstance(env, dict) else dict(e.partition("=")[::2] for e in env)
    assert "FOLIO_ENGINE_ID" not in env
    assert env["FOLIO_REDIS_URL"] == "redis://redis:6379/0"
    argv = _compose_argv(engine, {})
    assert argv[0] == "engine" and "--engine-id" not in argv, argv
    args = build_parser().parse_args(argv)
    # healthy: `folio probe engine` on the container's own engine (both default to the host
    # name), with the engine's step timeout as stall bound and time to load the model
    for svc in (engine, services["engine-gpu"]):
        hc = svc["healthcheck"]
        assert hc["test"][0] == "CMD" and hc["test"][1:4] == ["folio", "probe", "engine"], hc
        assert "--engine-id" not in hc["test"] and "--redis-url" not in hc["test"]
        probe = build_parser().parse_args(hc["test"][2:])
        assert probe.stall_timeout >= engine_config_from_args(args).resolved_step_timeout()
        assert int(hc["start_period"].removesuffix("s")) >= 600
        assert int(hc["interval"].removesuffix("s")) * hc["retries"] >= 30


def test_compose_tensor_parallel_knob_reaches_the_engine():
    engine = _compose_engine()
    for engine_args, tp in (("", 1), ("--tensor-parallel-size 2", 2)):
        argv = _compose_argv(engine, {"FOLIO_ENGINE_ARGS": engine_args})
        assert engine_config_from_args(build_parser().parse_args(argv)).tensor_parallel_size == tp


# ---------------------------------------------------------------------- k8s engine pod
def _engine_pod_spec(variant: str = "base") -> dict:
    return _rendered(variant)["Deployment", "folio-engine"]["spec"]["template"]["spec"]


# The ConfigMap's flags cannot change the pod's rank count: the containers decide it.
@pytest.mark.parametrize("variant", ["base", "overlays/gpu"])
@pytest.mark.parametrize("engine_args", [None, "--tensor-parallel-size 8"])
def test_k8s_engine_pod_is_one_engine(engine_args, variant):
    containers = _engine_pod_spec(variant)["containers"]
    for pod in ({"metadata.name": "folio-engine-6d4cf-x7k2q", "status.podIP": "10.0.0.7"},
                {"metadata.name": "folio-engine-6d4cf-b9zr4", "status.podIP": "10.0.1.3"}):
        probed: list[str] = []
        roles = _pod_engine(containers, pod, engine_args=engine_args, variant=variant, probed=probed)
        # each pod is its own engine, named after the pod
        assert _assert_one_engine(roles, pod["metadata.name"]) == 2
        # every container restarts on a hung engine (a rank stuck in a collective never exits)
        assert probed == [c["name"] for c in containers]
        if variant == "overlays/gpu" and engine_args is None:
            assert {c.device for _, c in roles["scheduler"] + roles["executor"]} == {"cuda"}


def test_k8s_gpu_overlay_gives_each_rank_one_gpu():
    spec = _engine_pod_spec("overlays/gpu")
    for c in spec["containers"]:
        assert c["image"] == "folio:cuda", c["name"]
        gpus = c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
        # one GPU per executor (rank); the scheduler needs none
        assert gpus == (1 if c["name"].startswith("executor-") else None), c["name"]
        if gpus:
            assert c["resources"]["requests"]["nvidia.com/gpu"] == gpus
            # the overlay's merge kept the base's command, env and mounts
            assert c["args"][0].startswith("exec folio executor") and c["envFrom"] and c["volumeMounts"]
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    # nothing else changes: the gateway stays on the CPU image, on CPU nodes
    gpu, base = _rendered("overlays/gpu"), _rendered("base")
    assert gpu.keys() == base.keys()
    assert gpu["Deployment", "folio-gateway"] == base["Deployment", "folio-gateway"]


def test_k8s_engine_ranks_publish_the_pod_ip():
    for c in _engine_pod_spec()["containers"]:
        if c["args"][0].startswith("exec folio executor"):
            env = {e["name"]: e for e in c.get("env", [])}
            assert env["FOLIO_DISTRIBUTED_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP", \
                c["name"]


# ---------------------------------------------------------------------- LeaderWorkerSet
# A CRD: kubernetes-validate has no schema for it, so its structure is checked here, its
# pod templates against the core PodTemplate schema below, and its commands by the parser.
def _lws() -> dict:
    (lws,) = _docs("leaderworkerset.yaml")
    return lws


# The pod templates must work for any group size, not only the one written down.
@pytest.mark.parametrize("size", [None, 4])
def test_k8s_leaderworkerset_group_is_one_engine(size):
    lws = _lws()
    assert (lws["apiVersion"], lws["kind"]) == ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet")
    assert isinstance(lws["spec"]["replicas"], int)
    group = lws["spec"]["leaderWorkerTemplate"]
    assert group["size"] >= 2
    size = size or group["size"]
    # a dead rank cannot rejoin its group's torch.distributed group: restart the whole group
    assert group["restartPolicy"] == "RecreateGroupOnPodRestart"
    leader_spec, worker_spec = group["leaderTemplate"]["spec"], group["workerTemplate"]["spec"]
    for group_index in (0, 1):
        leader = f"folio-engine-lws-{group_index}.folio-engine-lws.default"
        roles: dict[str, list] = {}
        # what LWS sets in every container of the group; worker pods have indices 1..size-1
        pods = [(leader_spec, 0)] + [(worker_spec, i) for i in range(1, size)]
        for spec, index in pods:
            base = {"LWS_LEADER_ADDRESS": leader, "LWS_GROUP_SIZE": str(size), "LWS_WORKER_INDEX": str(index)}
            probed: list[str] = []
            pod_roles = _pod_engine(spec["containers"], {"status.podIP": f"10.0.{index}.9"}, base,
                                    probed=probed)
            if index == 0:
                assert sorted(pod_roles) == ["executor", "scheduler"]  # the leader: scheduler + rank 0
                # its restart recreates the group: one probe covers every rank
                assert probed == ["scheduler"]
                assert [a.tp_rank for a, _ in pod_roles["executor"]] == [0]
            else:
                assert sorted(pod_roles) == ["executor"] and pod_roles["executor"][0][0].tp_rank == index
            for role, found in pod_roles.items():
                roles.setdefault(role, []).extend(found)
        assert _assert_one_engine(roles, leader) == size  # engine id: the leader's address
        # every rank meets at rank 0's store on the leader
        assert {c.distributed_init_method for _, c in roles["executor"]} == {f"tcp://{leader}:29500"}
    for spec in (leader_spec, worker_spec):
        for c in spec["containers"]:
            if c["args"][0].startswith("exec folio executor"):
                env = {e["name"]: e for e in c.get("env", [])}
                assert env["FOLIO_DISTRIBUTED_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"


