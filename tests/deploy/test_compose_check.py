"""`make compose-check`'s stand-in for `docker compose up` (scripts/compose_check.py), on
compose.yaml itself: what it would run, without Docker. The real run: docs/deployment.md."""

from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("compose_check", ROOT / "scripts/compose_check.py")
cc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cc)


def _services(profiles: set[str], env: dict[str, str] | None = None) -> dict[str, dict]:
    compose = cc.interpolate(yaml.safe_load((ROOT / "compose.yaml").read_text()), env or {})
    return cc.active_services(compose, profiles)


def test_interpolation_follows_compose():
    env = {"A": "1", "E": ""}
    assert cc.interpolate("${A:-x} ${E:-x} ${E-x} ${U-x} ${U} $A $$A", env) == "1 x  x  1 $A"
    assert cc.interpolate({"k": ["${A}", 3]}, env) == {"k": ["1", 3]}


def test_start_order_puts_dependencies_first():
    services = _services({"observability"})
    order = cc.start_order(services)
    assert order.index("redis") < min(order.index("engine"), order.index("gateway"))
    assert order.index("jaeger") < order.index("otel-collector")
    assert order.index("prometheus") < order.index("grafana")
    with pytest.raises(SystemExit):  # a dependency outside the active profiles
        cc.start_order({"a": {"depends_on": {"b": {"condition": "service_started"}}}})
    with pytest.raises(SystemExit):
        cc.start_order({"a": {"depends_on": ["b"]}, "b": {"depends_on": ["a"]}})


def test_docker_run_arguments_carry_the_service_definition():
    gw = cc.run_args("gateway", _services(set(), {"FOLIO_PORT": "8123"})["gateway"])
    opts = dict(zip(gw, gw[1:], strict=False))
    assert opts["--network-alias"] == "gateway" and opts["-p"] == "8123:8000"
    assert opts["--stop-timeout"] == "40" and opts["--restart"] == "unless-stopped"
    assert "/ready" in opts["--health-cmd"] and opts["--health-start-period"] == "300.0s"
    assert shlex.split(opts["--health-cmd"])[0] == "python3"  # the CMD form, quoted for the shell
    assert opts["-v"] == f"{cc.PROJECT}_folio-cache:/var/cache/folio"
    image = gw.index("folio:latest")
    assert gw[image + 1:image + 3] == ["gateway", "--host"]
    gpu = cc.run_args("engine-gpu", _services({"gpu"}, {"FOLIO_GPUS": "4"})["engine-gpu"])
    assert dict(zip(gpu, gpu[1:], strict=False))["--gpus"] == "4"
    prom = cc.run_args("prometheus", _services({"observability"})["prometheus"])
    assert f"{ROOT}/k8s/observability/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom
    with pytest.raises(SystemExit):  # a key it cannot translate is refused, not dropped
        cc.run_args("x", {"image": "i", "network_mode": "host"})


def test_durations():
    assert cc.seconds("40s") == 40 and cc.seconds("1m30s") == 90 and cc.seconds("500ms") == 0.5
