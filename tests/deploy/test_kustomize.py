"""The tests' kustomize renderer (tests/deploy/kustomize.py): its merge rules on small cases,
and its output for every kustomization in k8s/ equal to real kustomize's where kubectl exists."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.kustomize import KustomizeError, build, merge

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZATIONS = sorted(p.parent for p in (ROOT / "k8s").rglob("kustomization.yaml"))


def _pod(containers: list[dict], **spec) -> dict:
    return {"kind": "Deployment", "metadata": {"name": "d"},
            "spec": {"template": {"spec": {"containers": containers, **spec}}}}


def test_lists_with_a_merge_key_merge_by_it_and_others_are_replaced():
    base = _pod([{"name": "a", "image": "x", "args": ["1", "2"],
                  "env": [{"name": "E", "value": "1"}, {"name": "F", "value": "2"}],
                  "volumeMounts": [{"name": "v", "mountPath": "/m"}]},
                 {"name": "b", "image": "x"}],
                tolerations=[{"key": "t1"}])
    patch = _pod([{"name": "b", "image": "y", "resources": {"limits": {"gpu": 1}}},
                  {"name": "a", "args": ["3"],
                   "env": [{"name": "F", "value": "9"}, {"name": "G", "value": "3"}],
                   "volumeMounts": [{"name": "w", "mountPath": "/m"}]},
                  {"name": "c", "image": "z"}],
                 tolerations=[{"key": "t2"}])
    spec = merge(base, patch)["spec"]["template"]["spec"]
    a, b, c = spec["containers"]
    assert [a["name"], b["name"], c["name"]] == ["a", "b", "c"]  # order kept, new ones last
    assert a["image"] == "x" and a["args"] == ["3"]  # untouched key kept; plain list replaced
    assert a["env"] == [{"name": "E", "value": "1"}, {"name": "F", "value": "9"}, {"name": "G", "value": "3"}]
    assert a["volumeMounts"] == [{"name": "w", "mountPath": "/m"}]  # merged by mountPath
    assert b == {"name": "b", "image": "y", "resources": {"limits": {"gpu": 1}}}
    assert spec["tolerations"] == [{"key": "t2"}]
    assert base["spec"]["template"]["spec"]["containers"][1] == {"name": "b", "image": "x"}  # no aliasing


def test_null_deletes_and_directives_are_refused():
    assert merge({"a": 1, "b": {"c": 2, "d": 3}}, {"b": {"c": None}}) == {"a": 1, "b": {"d": 3}}
    with pytest.raises(KustomizeError):
        merge({"a": [{"name": "x"}]}, {"$patch": "replace"})


def _write(folder: Path, files: dict[str, object]) -> None:
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))


def test_resources_folders_and_patches(tmp_path):
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"A": "1", "B": "2"}}
    _write(tmp_path, {
        "base/kustomization.yaml": {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                                    "resources": ["cm.yaml"]},
        "base/cm.yaml": cm,
        "over/kustomization.yaml": {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                                    "resources": ["../base"], "patches": [{"path": "p.yaml"}]},
        "over/p.yaml": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"},
                        "data": {"B": "3"}},
    })
    assert build(tmp_path / "base") == [cm]
    (out,) = build(tmp_path / "over")
    assert out["data"] == {"A": "1", "B": "3"}
    # a patch must find its target; unknown fields and files outside the folder are refused
    _write(tmp_path, {"over/p.yaml": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "nope"}}})
    with pytest.raises(KustomizeError, match="matches no"):
        build(tmp_path / "over")
    for bad in ({"resources": ["../base/cm.yaml"]}, {"resources": ["../base"], "namePrefix": "x-"}):
        _write(tmp_path, {"over/kustomization.yaml": {"apiVersion": "kustomize.config.k8s.io/v1beta1",
                                                      "kind": "Kustomization", **bad}})
        with pytest.raises(KustomizeError):
            build(tmp_path / "over")


def test_every_kustomization_in_k8s_renders():
    assert {p.relative_to(ROOT).as_posix() for p in KUSTOMIZATIONS} == {
        "k8s", "k8s/base", "k8s/overlays/gpu", "k8s/observability"}
    for folder in KUSTOMIZATIONS:
        assert build(folder), folder


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (real kustomize) not installed")
@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_renders_what_kubectl_kustomize_renders(folder):
    out = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, check=True,
                         timeout=30).stdout
    theirs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out)}
    ours = {(d["kind"], d["metadata"]["name"]): d for d in build(folder)}
    assert ours == theirs
