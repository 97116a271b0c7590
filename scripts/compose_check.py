"""`make compose-check`: build the image and run compose.yaml for real on a Docker engine.

    .venv/bin/python scripts/compose_check.py [--profile observability] [--keep] [--no-build]

What it does, in order (each step prints what it ran):
  1. a Docker engine: uses a running one, else starts `dockerd` (and stops it at the end);
  2. base images: where the registry cannot be reached (tested with `docker pull`), builds local
     stand-ins from Debian (debootstrap) for python:3.11-slim and redis:7-alpine;
  3. builds the repo's Dockerfile with build arguments only (the base image, and torch from the
     wheel folder pip's find-links names, served over HTTP for the build);
  4. runs the services of compose.yaml (with the given profiles) in dependency order: there is
     no Compose v2 here, so this is a stand-in for `docker compose up` that reads compose.yaml and
     starts each service with `docker run` on a user-defined network, waiting for the
     `depends_on` conditions (healthy via the service's own healthcheck);
  5. an OpenAI SDK chat completion through the gateway's published port;
  6. with the observability profile: a trace of that request reaches the OpenTelemetry
     Collector service (or, when its image cannot be pulled, the stand-in receiver
     scripts/otlp_receiver.py under the collector's name and port), and Prometheus scraped
     the gateway;
  7. `docker stop` of the gateway during a streamed request: the stream finishes (drain) and
     the container exits within its stop_grace_period;
  8. tears everything down (containers, network, volumes), also after a failure.

Which compose implementation ran is printed; docs/deployment.md records a run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "folio-cc"  # container/network/volume prefix, so teardown removes only ours
DEBIAN_MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")

# Stand-in images built from Debian when the registry is out of reach. Bookworm's python3 is 3.11.
STANDINS = {
    "local/python:3.11-bookworm": (
        "python:3.11-slim",
        "RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv "
        "ca-certificates && rm -rf /var/lib/apt/lists/*",
    ),
    "local/redis:7-bookworm": (
        "redis:7-alpine",
        "RUN apt-get update && apt-get install -y --no-install-recommends redis-server "
        "&& rm -rf /var/lib/apt/lists/*",
    ),
}
# Stand-ins for images of compose.yaml's optional services, chosen through the service's image
# variable (compose.yaml: image: ${FOLIO_PROMETHEUS_IMAGE:-prom/prometheus:...}). Debian's
# prometheus (2.42) with the official image's entrypoint, command and user; wget for the
# service's health check. Grafana, Jaeger and the collector are not in Debian.
OPTIONAL_STANDINS = {
    "prometheus": ("FOLIO_PROMETHEUS_IMAGE", "local/prometheus:2-bookworm",
                   "RUN apt-get update && apt-get install -y --no-install-recommends prometheus wget "
                   "&& rm -rf /var/lib/apt/lists/* && mkdir /prometheus && chown nobody /prometheus\n"
                   "USER nobody\nEXPOSE 9090\nENTRYPOINT [\"/usr/bin/prometheus\"]\n"
                   "CMD [\"--config.file=/etc/prometheus/prometheus.yml\", "
                   "\"--storage.tsdb.path=/prometheus\"]"),
}


def log(msg: str) -> None:
    print(f"[compose-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(*argv: str, check: bool = True, quiet: bool = False, env: dict | None = None,
       timeout: float | None = None) -> subprocess.CompletedProcess:
    if not quiet:
        log("$ " + shlex.join(argv))
    return subprocess.run(argv, check=check, text=True, capture_output=quiet, env=env, timeout=timeout)


def docker(*args: str, **kw) -> subprocess.CompletedProcess:
    return sh("docker", *args, **kw)


# ---------------------------------------------------------------------- 1. engine
class Engine:
    """A Docker engine for the run: the running one, or a dockerd started here (and stopped)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Engine:
        if docker("info", check=False, quiet=True).returncode == 0:
            log("using the running Docker engine")
            return self
        if not shutil.which("dockerd"):
            sys.exit("no Docker engine: install one (Debian: apt-get install docker.io), see "
                     "../shared/containers.md")
        logf = open(tempfile.gettempdir() + "/compose-check-dockerd.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(["dockerd"], stdout=logf, stderr=subprocess.STDOUT)
        log(f"started dockerd (pid {self.proc.pid}, log {logf.name})")
        for _ in range(60):
            if docker("info", check=False, quiet=True).returncode == 0:
                return self
            time.sleep(1)
        sys.exit("dockerd did not come up in 60 s")

    def __exit__(self, *exc) -> None:
        if self.proc:
            log(f"stopping the dockerd this script started (pid {self.proc.pid})")
            self.proc.terminate()
            self.proc.wait(timeout=60)


def image_exists(ref: str) -> bool:
    return docker("image", "inspect", ref, check=False, quiet=True).returncode == 0


def pullable(ref: str) -> bool:
    """Present, or pulled now. A registry that cannot be reached fails fast (no retries)."""
    if image_exists(ref):
        return True
    try:
        return docker("pull", "-q", ref, check=False, quiet=True, timeout=120).returncode == 0
    except subprocess.TimeoutExpired:
        return False


# ---------------------------------------------------------------------- 2. base images
def debian_base() -> str:
    ref = "local/debian:bookworm"
    if image_exists(ref):
        return ref
    if not shutil.which("debootstrap"):
        sys.exit("no base image can be pulled and debootstrap is missing (apt-get install debootstrap)")
    with tempfile.TemporaryDirectory() as tmp:
        rootfs = Path(tmp) / "rootfs"
        sh("debootstrap", "--variant=minbase", "bookworm", str(rootfs), DEBIAN_MIRROR)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["docker", "import", "-", ref], stdin=tar.stdout, check=True)
        tar.wait()
    return ref


def base_images() -> dict[str, str]:
    """{official image: the image to use}: the official one when it can be pulled."""
    chosen = {}
    for local, (official, recipe) in STANDINS.items():
        if pullable(official):
            chosen[official] = official
            continue
        log(f"{official} cannot be pulled: using the stand-in {local} (Debian bookworm)")
        if not image_exists(local):
            dockerfile = f"FROM {debian_base()}\n{recipe}\n"
            subprocess.run(["docker", "build", "-t", local, "-"], input=dockerfile, text=True, check=True)
        chosen[official] = local
    return chosen


# ---------------------------------------------------------------------- 3. the folio image
def _pip_config(key: str) -> str | None:
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        k, _, v = line.partition("=")
        if k.split(".")[-1] == key:
            return v.strip().strip("'\"")
    return None


def _serve_dir(folder: str) -> tuple[ThreadingHTTPServer, int]:
    class Quiet(SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=folder, **kw)

        def log_message(self, *a):  # pip's requests are not news
            pass

    # A fixed port where free: the URL is a build argument, so a new port would rebuild the
    # torch layer every time.
    try:
        server = ThreadingHTTPServer(("127.0.0.1", 38765), Quiet)
    except OSError:
        server = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def build_command() -> tuple[list[str], dict[str, str]]:
    """A BuildKit `docker build` (the Dockerfile uses cache and secret mounts)."""
    env = dict(os.environ)
    if docker("buildx", "version", check=False, quiet=True).returncode == 0:
        return ["docker", "buildx", "build", "--load"], env
    # Docker 23+'s CLI needs the buildx plugin for BuildKit; Debian's 20.10 CLI has it built in.
    env["DOCKER_BUILDKIT"] = "1"
    for cli in ("/usr/bin/docker", "docker"):
        v = subprocess.run([cli, "version", "--format", "{{.Client.Version}}"], capture_output=True,
                           text=True)
        if v.returncode == 0 and int(v.stdout.split(".")[0]) < 23:
            return [cli, "build"], env
    sys.exit("no BuildKit: install the buildx plugin (or Debian's docker.io CLI)")


def build_folio(bases: dict[str, str], dockerfile: str = "Dockerfile", tag: str = "folio:latest",
                extra_args: tuple[str, ...] = ()) -> None:
    args = ["--build-arg", f"BASE_IMAGE={bases['python:3.11-slim']}"]
    server = None
    wheels = _pip_config("find-links")
    if not pullable_url("https://download.pytorch.org/whl/cpu/torch/") and wheels:
        server, port = _serve_dir(wheels)
        log(f"download.pytorch.org cannot be reached: torch from {wheels}, served on port {port}")
        args += ["--build-arg", f"TORCH_PIP_ARGS=--find-links http://127.0.0.1:{port}/"]
    cert = os.environ.get("PIP_CERT") or _pip_config("cert")
    if cert:  # a TLS-intercepting proxy's CA: pip in the build needs it too (a secret, not a layer)
        args += ["--secret", f"id=pip_ca,src={cert}"]
    cmd, env = build_command()
    try:
        # --network host: the build's RUN steps reach the wheel server on 127.0.0.1
        sh(*cmd, "--network", "host", "-f", dockerfile, *args, *extra_args, "-t", tag, str(ROOT), env=env)
    finally:
        if server:
            server.shutdown()


def pullable_url(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=5)
        return True
    except Exception:
        return False


# ---------------------------------------------------------------------- 4. compose.yaml
_VAR = re.compile(r"\$\$|\$\{(\w+)(?:(:?-)([^}]*))?\}|\$(\w+)")


def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution: ${VAR}, ${VAR:-default}, ${VAR-default}, $VAR, $$."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        if m[0] == "$$":
            return "$"
        name = m[1] or m[4]
        if m[2] == ":-":
            return env.get(name) or m[3]
        if m[2] == "-":
            return env.get(name, m[3])
        return env.get(name, "")
    return _VAR.sub(one, value)


def active_services(compose: dict, profiles: set[str]) -> dict[str, dict]:
    return {name: svc for name, svc in compose["services"].items()
            if not svc.get("profiles") or profiles & set(svc["profiles"])}


def start_order(services: dict[str, dict]) -> list[str]:
    """Dependencies first (compose's order); a cycle or a missing dependency is an error."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in path:
            sys.exit(f"depends_on cycle: {' -> '.join(path + (name,))}")
        if name in seen:
            return
        if name not in services:
            sys.exit(f"{path[-1]} depends on {name}, which is not enabled by the active profiles")
        for dep in depends_on(services[name]):
            visit(dep, path + (name,))
        seen.add(name)
        order.append(name)
    for name in services:
        visit(name, ())
    return order


def depends_on(svc: dict) -> dict[str, str]:
    deps = svc.get("depends_on", {})
    if isinstance(deps, list):
        return {d: "service_started" for d in deps}
    return {d: spec.get("condition", "service_started") for d, spec in deps.items()}


def seconds(duration: str | int) -> float:
    """Compose durations: 40s, 1m30s, 500ms, 2h."""
    if isinstance(duration, int | float):
        return float(duration)
    total = 0.0
    for num, unit in re.findall(r"([\d.]+)(ms|us|h|m|s)", duration):
        total += float(num) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[unit]
    return total


def run_args(name: str, svc: dict) -> list[str]:
    """`docker run` arguments for one compose service (the keys compose.yaml uses; any other
    key is refused rather than silently dropped)."""
    known = {"image", "build", "command", "entrypoint", "environment", "depends_on", "volumes",
             "restart", "stop_grace_period", "ports", "healthcheck", "shm_size", "profiles",
             "ulimits", "deploy"}
    unknown = set(svc) - known
    if unknown:
        sys.exit(f"compose-check does not handle {sorted(unknown)} of service {name}")
    a = ["--name", f"{PROJECT}-{name}-1", "--network", f"{PROJECT}_default",
         "--network-alias", name, "--label", f"com.folio.compose-check={PROJECT}"]
    env = svc.get("environment", {})
    env = env if isinstance(env, dict) else dict(e.partition("=")[::2] for e in env)
    for k, v in env.items():
        a += ["-e", f"{k}={'' if v is None else v}"]
    for vol in svc.get("volumes", []):
        src, _, rest = vol.partition(":")
        if src.startswith((".", "/")):
            src = str((ROOT / src).resolve())
        else:
            src = f"{PROJECT}_{src}"
        a += ["-v", f"{src}:{rest}"]
    for port in svc.get("ports", []):
        a += ["-p", str(port)]
    if "restart" in svc:
        a += ["--restart", svc["restart"]]
    if "stop_grace_period" in svc:
        a += ["--stop-timeout", str(int(seconds(svc["stop_grace_period"])))]
    if "shm_size" in svc:
        a += ["--shm-size", str(svc["shm_size"])]
    for key, lim in svc.get("ulimits", {}).items():
        lim = f"{lim['soft']}:{lim['hard']}" if isinstance(lim, dict) else str(lim)
        a += ["--ulimit", f"{key}={lim}"]
    devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    for d in devices:
        a += ["--gpus", str(d.get("count", "all"))]
    hc = svc.get("healthcheck")
    if hc and not hc.get("disable"):
        test = hc["test"]
        # docker run takes the shell form only; CMD ["a", "b"] becomes the quoted line "a b".
        cmd = test[1] if test[0] == "CMD-SHELL" else shlex.join(test[1:]) if test[0] == "CMD" else test
        a += ["--health-cmd", cmd]
        for key, flag in (("interval", "--health-interval"), ("timeout", "--health-timeout"),
                          ("start_period", "--health-start-period")):
            if key in hc:
                a += [flag, f"{seconds(hc[key])}s"]
        if "retries" in hc:
            a += ["--health-retries", str(hc["retries"])]
    if "entrypoint" in svc:
        ep = svc["entrypoint"]
        ep = ep if isinstance(ep, list) else shlex.split(ep)
        a += ["--entrypoint", ep[0]]
        command_prefix = ep[1:]
    else:
        command_prefix = []
    cmd = svc.get("command", [])
    cmd = cmd if isinstance(cmd, list) else shlex.split(cmd)
    return a + [svc["image"]] + command_prefix + cmd


def container_state(name: str) -> tuple[str, str, int]:
    out = docker("inspect", "--format",
                 "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}} "
                 "{{.State.ExitCode}}", f"{PROJECT}-{name}-1", quiet=True).stdout.split()
    return out[0], out[1], int(out[2])


def wait_for(name: str, condition: str, timeout: float) -> float:
    """Wait until service `name` meets a depends_on condition; seconds it took."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        status, health, code = container_state(name)
        if condition == "service_started" and status == "running":
            return time.monotonic() - t0
        if condition == "service_healthy":
            if health == "healthy":
                return time.monotonic() - t0
            if health == "unhealthy":
                raise RuntimeError(f"{name} is unhealthy")
        if condition == "service_completed_successfully" and status == "exited":
            if code == 0:
                return time.monotonic() - t0
            raise RuntimeError(f"{name} exited with {code}")
        if status in ("exited", "dead"):
            raise RuntimeError(f"{name} stopped (exit {code}) before {condition}")
        time.sleep(1)
    raise RuntimeError(f"{name}: not {condition} after {timeout:.0f} s")


class Stack:
    """compose.yaml's services as plain containers; `down()` removes everything made."""

    def __init__(self, services: dict[str, dict], order: list[str]) -> None:
        self.services, self.order, self.started = services, order, []

    def up(self, timeout: float) -> None:
        docker("network", "create", f"{PROJECT}_default", quiet=True)
        for name in self.order:
            svc = self.services[name]
            for dep, condition in depends_on(svc).items():
                took = wait_for(dep, condition, timeout)
                log(f"{name}: dependency {dep} is {condition.removeprefix('service_')} ({took:.0f} s)")
            docker("run", "-d", *run_args(name, svc), quiet=False)
            self.started.append(name)
        # `docker compose up --wait`: every service with a health check healthy.
        for name in self.order:
            if self.services[name].get("healthcheck"):
                took = wait_for(name, "service_healthy", timeout)
                log(f"{name} is healthy ({took:.0f} s)")

    def logs(self) -> None:
        for name in self.started:
            out = docker("logs", "--tail", "40", f"{PROJECT}-{name}-1", check=False, quiet=True)
            print(f"----- {name} (last 40 lines)\n{out.stdout}{out.stderr}", flush=True)

    def down(self) -> None:
        """`docker compose down -v`: stop in reverse dependency order (each gets its
        stop_grace_period), then remove containers, network and named volumes."""
        for name in reversed(self.started):
            t0 = time.monotonic()
            docker("stop", f"{PROJECT}-{name}-1", check=False, quiet=True)
            status, _, code = container_state(name)
            log(f"stopped {name} in {time.monotonic() - t0:.1f} s (exit code {code})")
        ids = docker("ps", "-aq", "--filter", f"label=com.folio.compose-check={PROJECT}",
                     quiet=True).stdout.split()
        if ids:  # -v: also the anonymous volumes of the images' VOLUME (the model cache)
            docker("rm", "-f", "-v", *ids, quiet=True)
        docker("network", "rm", f"{PROJECT}_default", check=False, quiet=True)
        vols = docker("volume", "ls", "-q", "--filter", f"name={PROJECT}_", quiet=True).stdout.split()
        if vols:
            docker("volume", "rm", *vols, quiet=True)
        log("torn down: containers, network, volumes")


# ---------------------------------------------------------------------- 5./6. the checks
def chat_completion(port: int, model: str) -> object:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=os.environ.get("FOLIO_API_KEY") or "none",
                    timeout=120)
    t0 = time.monotonic()
    resp = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Name one colour."}], max_tokens=16)
    text = resp.choices[0].message.content
    log(f"OpenAI SDK chat completion in {time.monotonic() - t0:.1f} s: id={resp.id} "
        f"finish_reason={resp.choices[0].finish_reason} usage={resp.usage} text={text!r}")
    assert text, "empty completion"
    return resp


# One trace per request spans all three (service.name of each process's spans).
TRACE_SERVICES = {"folio-gateway", "folio-scheduler", "folio-executor"}


def trace_reached_standin(port: int, response_id: str, timeout: float = 30) -> None:
    """The request's trace at the stand-in receiver, with spans of every service (each
    process's exporter sends its batch on its own schedule: poll)."""
    deadline = time.monotonic() + timeout
    spans: list[dict] = []
    services: set[str] = set()
    while time.monotonic() < deadline:
        spans = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/spans", timeout=5))
        ours = [s for s in spans if s["attributes"].get("gen_ai.response.id") == response_id]
        if ours:
            trace = [s for s in spans if s["trace_id"] == ours[0]["trace_id"]]
            services = {s["service"] or "?" for s in trace}
            if services >= TRACE_SERVICES:
                log(f"trace {ours[0]['trace_id']} of {response_id} reached the collector: {len(trace)} "
                    f"spans from {sorted(services)}: " + ", ".join(sorted({s['name'] for s in trace})))
                return
        time.sleep(1)
    raise AssertionError(f"the trace of {response_id} did not reach the collector from all of "
                         f"{sorted(TRACE_SERVICES)} in {timeout:.0f} s (its services: {sorted(services)}; "
                         f"{len(spans)} spans arrived)")


def drain_on_stop(port: int, model: str, service: str, grace: float) -> None:
    """`docker stop` of the gateway while a stream is in flight: the stream still finishes
    (the gateway drains for --shutdown-timeout) and the container exits before
    stop_grace_period runs out (no SIGKILL)."""
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=os.environ.get("FOLIO_API_KEY") or "none",
                    timeout=120)
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Count from 1 to 100."}], max_tokens=96,
        stream=True, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    first = next(chunks)
    stopped: dict[str, float] = {}

    def stop() -> None:
        t0 = time.monotonic()
        docker("stop", f"{PROJECT}-{service}-1", quiet=True)
        stopped["s"] = time.monotonic() - t0
    stopper = threading.Thread(target=stop)
    stopper.start()
    finish, n = None, 1
    for chunk in chunks:
        n += 1
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    stopper.join()
    _, _, code = container_state(service)
    log(f"docker stop {service} during a stream: the stream went on to finish_reason={finish} "
        f"({n} chunks after {first.id}); the container exited with {code} after {stopped['s']:.1f} s "
        f"(stop_grace_period {grace:.0f} s)")
    assert finish == "length", f"the stream was cut off (finish_reason {finish})"
    assert code != 137 and stopped["s"] < grace, "the gateway was killed, not drained"


def prometheus_scraped(port: int, timeout: float = 60) -> None:
    """Prometheus (the observability profile's scrape config) scraped the gateway: its target is
    up and folio's series are stored."""
    def query(q: str) -> list:
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
        return json.load(urllib.request.urlopen(url, timeout=5))["data"]["result"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            up = query('up{job="folio-gateway"}')
            series = query('count({__name__=~"folio:.+"})')
        except OSError:
            up, series = [], []
        if up and all(r["value"][1] == "1" for r in up) and series:
            log(f"Prometheus scraped {len(up)} gateway target(s): up=1, "
                f"{series[0]['value'][1]} folio: series stored")
            return
        time.sleep(2)
    raise AssertionError(f"Prometheus has not scraped the gateway in {timeout:.0f} s")


def trace_reached_jaeger(port: int, response_id: str, timeout: float = 60) -> None:
    """The real collector forwarded the request's trace to Jaeger: find it through Jaeger's
    query API by the response id (untested here: no Jaeger image could be pulled)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            url = f"http://127.0.0.1:{port}/api/traces?service=folio-gateway&limit=50&lookback=1h"
            traces = json.load(urllib.request.urlopen(url, timeout=5)).get("data") or []
        except OSError:
            traces = []
        for t in traces:
            tags = {(tag["key"], str(tag["value"])) for sp in t["spans"] for tag in sp.get("tags", [])}
            if ("gen_ai.response.id", response_id) in tags:
                services = sorted({p["serviceName"] for p in t["processes"].values()})
                log(f"trace {t['traceID']} of {response_id} reached Jaeger through the collector: "
                    f"{len(t['spans'])} spans from {services}")
                return
        time.sleep(2)
    raise AssertionError(f"no trace with gen_ai.response.id={response_id} in Jaeger after {timeout:.0f} s")


def trace_reached_collector(container: str, timeout: float = 30) -> None:
    """The real collector without Jaeger: its debug exporter logs every batch of spans."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = docker("logs", container, check=False, quiet=True)
        if re.search(r'"#spans": [1-9]|spans["\s:]+[1-9]', out.stdout + out.stderr):
            log("the collector's debug exporter logged the request's spans")
            return
        time.sleep(1)
    raise AssertionError("the collector logged no spans")


# ---------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", action="append", default=[], help="compose profiles to enable")
    p.add_argument("--no-build", action="store_true", help="use the folio:latest image as it is")
    p.add_argument("--cuda-dockerfile", action="store_true",
                   help="also build Dockerfile.cuda, on the CPU stand-in base with CPU torch (checks "
                        "every step but CUDA itself)")
    p.add_argument("--keep", action="store_true", help="leave the services running")
    p.add_argument("--timeout", type=float, default=600, help="seconds for each service to get ready")
    args = p.parse_args()
    # SIGTERM (and SIGINT, which a background job started by a shell ignores) runs the teardown
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    profiles = set(args.profile)
    t_start = time.monotonic()

    with Engine():
        found = "`docker compose` is installed but not used" if has_compose_v2() else "no Compose v2 here"
        log(f"compose implementation: this script's stand-in ({found}): compose.yaml's services "
            "started with `docker run` on a user-defined network, in depends_on order, with their "
            "health checks")
        bases = base_images()
        env = dict(os.environ)
        if bases["redis:7-alpine"] != "redis:7-alpine":
            env["FOLIO_REDIS_IMAGE"] = bases["redis:7-alpine"]
        if not args.no_build:
            build_folio(bases)
        if args.cuda_dockerfile:
            build_folio(bases, "Dockerfile.cuda", "folio:cuda-on-cpu",
                        ("--build-arg", f"BASE_IMAGE={debian_base()}"))
        port = int(env.setdefault("FOLIO_PORT", "8000"))
        standin_collector = False
        if "observability" in profiles:
            env.setdefault("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://otel-collector:4318/v1/traces")
        raw = yaml.safe_load((ROOT / "compose.yaml").read_text())
        for name, (var, local, recipe) in OPTIONAL_STANDINS.items():
            svc = raw["services"].get(name)
            if svc is None or not set(svc.get("profiles", [])) <= profiles:
                continue
            official = interpolate(svc["image"], env)
            if not pullable(official):
                log(f"{official} cannot be pulled: {name} runs the stand-in {local} ({var}={local})")
                if not image_exists(local):
                    subprocess.run(["docker", "build", "-t", local, "-"], text=True, check=True,
                                   input=f"FROM {debian_base()}\n{recipe}\n")
                env[var] = local
        compose = interpolate(raw, env)
        services = active_services(compose, profiles)
        for name in list(services):
            svc = services[name]
            if "build" in svc or image_exists(svc["image"]) or pullable(svc["image"]):
                continue
            if name == "otel-collector":
                log(f"{svc['image']} cannot be pulled: the collector is the stand-in "
                    "scripts/otlp_receiver.py (a real OTLP/HTTP receiver on 4318, in the folio image); "
                    "nothing is forwarded to Jaeger")
                services[name] = {
                    "image": "folio:latest", "entrypoint": ["python3", "/otlp_receiver.py"],
                    "command": ["--port", "4318"], "ports": svc.get("ports", []),
                    "volumes": [f"{ROOT}/scripts/otlp_receiver.py:/otlp_receiver.py:ro"]}
                standin_collector = True
            else:
                log(f"SKIPPED {name}: {svc['image']} cannot be pulled and has no stand-in here")
                del services[name]
        for svc in services.values():  # drop dependencies on skipped services
            if isinstance(svc.get("depends_on"), dict):
                svc["depends_on"] = {d: c for d, c in svc["depends_on"].items() if d in services}
        order = start_order(services)
        log(f"profiles {sorted(profiles) or '(none)'}: starting {order}")
        stack = Stack(services, order)
        ok = False
        try:
            t0 = time.monotonic()
            stack.up(args.timeout)
            log(f"all services up and healthy in {time.monotonic() - t0:.0f} s")
            model = env.get("FOLIO_MODEL", "smollm2-135m-instruct")
            resp = chat_completion(port, model)
            if "prometheus" in services:
                prometheus_scraped(9090)
            if "otel-collector" in services:
                if standin_collector:
                    trace_reached_standin(4318, resp.id)
                elif "jaeger" in services:
                    trace_reached_jaeger(16686, resp.id)
                else:
                    trace_reached_collector(f"{PROJECT}-otel-collector-1")
            drain_on_stop(port, model, "gateway", seconds(services["gateway"]["stop_grace_period"]))
            ok = True
        except Exception as e:
            log(f"FAILED: {type(e).__name__}: {e}")
            stack.logs()
        finally:
            if not args.keep:
                stack.down()
        log(f"{'PASSED' if ok else 'FAILED'} in {time.monotonic() - t_start:.0f} s")
        if not ok:
            sys.exit(1)


def has_compose_v2() -> bool:
    return docker("compose", "version", check=False, quiet=True).returncode == 0


if __name__ == "__main__":
    main()
