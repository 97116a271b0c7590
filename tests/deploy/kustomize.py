"""A small kustomize renderer for the tests: what `kubectl kustomize DIR` prints for the
kustomizations in k8s/, without needing kubectl (CI may not have it).

It does only what k8s/ uses and refuses everything else, so a new feature in a
kustomization.yaml fails here instead of rendering wrongly:
  - `resources`: files (every YAML document in them) and folders with their own kustomization;
  - `patches` with a `path` only: strategic-merge patches, applied to the one resource of the
    same kind and name. Maps merge key by key, `null` deletes, and lists merge by the merge
    keys Kubernetes declares for them (containers, env, volumes ... by name, volumeMounts by
    mountPath, ports by containerPort); every other list is replaced, as in the API.
tests/deploy/test_kustomize.py checks it against `kubectl kustomize` where kubectl exists.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

# patchMergeKey of the list fields the manifests use (k8s.io/api core/v1 types.go).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
}

_FIELDS = {"apiVersion", "kind", "resources", "patches"}


class KustomizeError(ValueError):
    pass


def build(folder: Path) -> list[dict]:
    """The resources of the kustomization in `folder`, patched."""
    k = yaml.safe_load((folder / "kustomization.yaml").read_text())
    if k.get("kind") != "Kustomization" or set(k) - _FIELDS:
        raise KustomizeError(f"{folder}: unsupported kustomization fields {sorted(set(k) - _FIELDS)}")
    docs: list[dict] = []
    for res in k.get("resources", []):
        path = (folder / res).resolve()
        if path.is_dir():
            docs += build(path)
        elif path.is_file():
            if not path.is_relative_to(folder.resolve()):  # kustomize's load restrictor
                raise KustomizeError(f"{folder}: file {res} is outside the kustomization's folder")
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
        else:
            raise KustomizeError(f"{folder}: resource {res} does not exist")
    seen = set()
    for d in docs:
        key = (d["kind"], d["metadata"]["name"])
        if key in seen:
            raise KustomizeError(f"{folder}: {key} appears twice")
        seen.add(key)
    for patch in k.get("patches", []):
        if set(patch) != {"path"}:
            raise KustomizeError(f"{folder}: only strategic-merge patches by path: {patch}")
        for p in yaml.safe_load_all((folder / patch["path"]).read_text()):
            target = [d for d in docs if (d["kind"], d["metadata"]["name"]) ==
                      (p["kind"], p["metadata"]["name"])]
            if len(target) != 1:
                raise KustomizeError(f"{folder}: patch {patch['path']} matches no {p['kind']} "
                                     f"{p['metadata']['name']}")
            docs[docs.index(target[0])] = merge(target[0], p)
    return docs


def merge(base: dict, patch: dict) -> dict:
    """Strategic merge of `patch` into a copy of `base`."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(key, str) and key.startswith("$"):
            raise KustomizeError(f"patch directive {key} is not supported")
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        elif isinstance(value, list) and key in MERGE_KEYS and isinstance(out.get(key), list):
            out[key] = _merge_list(out[key], value, MERGE_KEYS[key])
        else:
            out[key] = copy.deepcopy(value)
    return out


def _merge_list(base: list[dict], patch: list[dict], merge_key: str) -> list[dict]:
    out = [copy.deepcopy(item) for item in base]
    for item in patch:
        if merge_key not in item:
            raise KustomizeError(f"list item without its merge key {merge_key}: {item}")
        found = [i for i, b in enumerate(out) if b.get(merge_key) == item[merge_key]]
        if found:
            out[found[0]] = merge(out[found[0]], item)
        else:
            out.append(copy.deepcopy(item))  # new items go last, as kustomize puts them
    return out
