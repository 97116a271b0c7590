"""Raw HTTP for what the OpenAI SDK cannot do: malformed bodies, dropped connections, /metrics."""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
import urllib.request


def raw_post(url: str, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    """POST raw bytes; (status, JSON body)."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, json.loads(data) if data else {}
    finally:
        conn.close()


def get(url: str, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url + path, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def metrics(url: str) -> dict[str, float]:
    """/metrics as {name: value}, labels dropped and the series of a name summed (one model;
    request series are per `engine`, including `none` for requests no engine answered) and
    request_success_total kept per finished_reason as `request_success_total:REASON`, and
    request_rejected_total per reason as `request_rejected_total:REASON`."""
    status, body = get(url, "/metrics")
    assert status == 200
    out: dict[str, float] = {}
    for line in body.decode().splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, value = line.rsplit(" ", 1)
        name = name_labels.split("{", 1)[0]
        if name == "folio:request_success_total":
            reason = name_labels.split('finished_reason="', 1)[1].split('"', 1)[0]
            name = f"{name}:{reason}"
        elif name == "folio:request_rejected_total":
            reason = name_labels.split('reason="', 1)[1].split('"', 1)[0]
            name = f"{name}:{reason}"
        if "_bucket" in name:
            continue
        out[name] = out.get(name, 0.0) + float(value)
    return out


def open_stream(url: str, path: str, payload: dict, api_key: str) -> http.client.HTTPConnection:
    """Start a streaming request and return the open connection (caller reads, then drops it)."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    conn.request(
        "POST",
        path,
        body=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"},
    )
    return conn


def request(url: str, method: str, path: str, body: dict | None = None, headers: dict | None = None) -> int:
    """Any method, optional JSON body; the status code."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def wait_metrics(url: str, done, deadline_s: float = 30.0, what: str = "") -> dict[str, float]:
    """Poll /metrics until done(metrics) (engine stats are published every ~0.5 s)."""
    t0 = time.monotonic()
    while True:
        m = metrics(url)
        if done(m):
            return m
        if time.monotonic() - t0 > deadline_s:
            raise AssertionError(f"/metrics never showed {what or 'it'} in {deadline_s}s: {m}")
        time.sleep(0.1)
