"""Static checks of the cluster/deployment manifests under ``cluster/``.

* KubeRay manifests (``cluster/kuberay/*.yaml``) are validated against the
  ``ray.io/v1`` CRD schemas shipped in ``<repo>/../shared/schemas/kuberay``
  (override with ``KDRAY_SHARED_DIR``). CRD schemas do not forbid unknown
  fields (Kubernetes prunes them, or rejects them only with strict server-side
  field validation), so the schema is made *strict* first: every object schema
  that lists ``properties`` and says nothing about extra keys gets
  ``additionalProperties: false``. That catches misspelt field names.
* The ``serveConfigV2`` of the RayService is parsed and checked against Ray
  Serve's own config schema.
* ``cluster/aws.yaml`` is validated with Ray's cluster-launcher validation
  (``ray.autoscaler._private.util.validate_config``, i.e. jsonschema against
  ``ray/autoscaler/ray-schema.json``).
* Modules referenced by the manifests must exist in the repository.

Everything here is offline and needs neither a Ray cluster nor Kubernetes.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER_DIR = REPO_ROOT / "cluster"
KUBERAY_DIR = CLUSTER_DIR / "kuberay"
AWS_YAML = CLUSTER_DIR / "aws.yaml"
KUBERAY_MANIFESTS = sorted(KUBERAY_DIR.glob("*.yaml"))

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# ---------------------------------------------------------------------------
# Schema helpers
# ---------------------------------------------------------------------------


def kuberay_schema_dir() -> Path | None:
    """Folder holding the KubeRay CRDs (ray.io_*.yaml), or None if absent.

    ``KDRAY_SHARED_DIR`` may point at the shared folder (containing
    ``schemas/kuberay``) or directly at the folder holding the CRD files.
    Default: ``<repo>/../shared/schemas/kuberay``.
    """
    env = os.environ.get("KDRAY_SHARED_DIR")
    bases = [Path(env).expanduser()] if env else [REPO_ROOT.parent / "shared"]
    for base in bases:
        for cand in (base / "schemas" / "kuberay", base):
            if cand.is_dir() and any(cand.glob("ray.io_*.yaml")):
                return cand
    return None


def _require_schema_dir() -> Path:
    d = kuberay_schema_dir()
    if d is None:
        where = os.environ.get("KDRAY_SHARED_DIR") or str(REPO_ROOT.parent / "shared")
        pytest.skip(
            f"KubeRay CRD schemas not found (looked for ray.io_*.yaml under {where}"
            "/schemas/kuberay); set KDRAY_SHARED_DIR to the shared folder"
        )
    return d


@functools.lru_cache(maxsize=None)
def _load_crd_file(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=_Loader)


def _crd_for_kind(kind: str) -> dict:
    d = _require_schema_dir()
    # Conventional file name first (ray.io_rayjobs.yaml), then scan all.
    preferred = d / f"ray.io_{kind.lower()}s.yaml"
    candidates = [preferred] if preferred.exists() else []
    candidates += [p for p in sorted(d.glob("*.yaml")) if p != preferred]
    for p in candidates:
        crd = _load_crd_file(str(p))
        if (
            isinstance(crd, dict)
            and crd.get("kind") == "CustomResourceDefinition"
            and crd.get("spec", {}).get("names", {}).get("kind") == kind
        ):
            return crd
    raise AssertionError(f"no CRD for kind {kind!r} in {d}")


def crd_v1_schema(kind: str) -> dict:
    """``spec.versions[?name=='v1'].schema.openAPIV3Schema`` of the CRD for *kind*."""
    crd = _crd_for_kind(kind)
    assert crd["spec"]["group"] == "ray.io"
    versions = [v for v in crd["spec"]["versions"] if v.get("name") == "v1"]
    assert versions, f"CRD for {kind} has no v1 version"
    return versions[0]["schema"]["openAPIV3Schema"]


_SCHEMA_MAP_KEYWORDS = ("properties", "patternProperties", "definitions", "$defs")
_SCHEMA_LIST_KEYWORDS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SCHEMA_KEYWORDS = ("items", "additionalProperties", "not", "additionalItems")


def strict_schema(schema: Any) -> Any:
    """Deep copy of an (OpenAPI v3 / JSON) schema that rejects unknown fields.

    Every object schema with ``properties`` but without ``additionalProperties``
    and without ``x-kubernetes-preserve-unknown-fields: true`` gets
    ``additionalProperties: false``. Recursion follows schema keywords only, so
    a field that happens to be *named* "properties" is not mistaken for one.
    """

    def walk(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        out = dict(node)
        for key in _SCHEMA_MAP_KEYWORDS:
            if isinstance(out.get(key), dict):
                out[key] = {name: walk(sub) for name, sub in out[key].items()}
        for key in _SCHEMA_LIST_KEYWORDS:
            if isinstance(out.get(key), list):
                out[key] = [walk(sub) for sub in out[key]]
        for key in _SCHEMA_KEYWORDS:
            if isinstance(out.get(key), dict):
                out[key] = walk(out[key])
            elif isinstance(out.get(key), list):  # draft-4 tuple form of items
                out[key] = [walk(sub) for sub in out[key]]
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields", False)
        ):
            out["additionalProperties"] = False
        return out

    return walk(copy.deepcopy(schema))


@functools.lru_cache(maxsize=None)
def _validator(kind: str, strict: bool):
    schema = crd_v1_schema(kind)
    if strict:
        schema = strict_schema(schema)
    cls = jsonschema.Draft7Validator
    cls.check_schema(schema)
    return cls(schema)


def crd_errors(doc: dict, strict: bool = True) -> list[str]:
    """Readable validation errors of a ray.io/v1 manifest against its CRD."""
    errors = []
    api, kind = doc.get("apiVersion"), doc.get("kind")
    if api != "ray.io/v1":
        errors.append(f"apiVersion is {api!r}, expected 'ray.io/v1'")
    if not isinstance(doc.get("metadata"), dict) or not doc["metadata"].get("name"):
        errors.append("metadata.name is missing")
    validator = _validator(kind, strict)
    for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
        path = "/".join(str(p) for p in err.absolute_path) or "<root>"
        errors.append(f"{path}: {err.message}")
    return errors


def load_manifests(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def ray_docs(path: Path) -> list[dict]:
    return [d for d in load_manifests(path) if str(d.get("apiVersion", "")).startswith("ray.io/")]


def one_ray_doc(kind: str) -> tuple[Path, dict]:
    found = [(p, d) for p in KUBERAY_MANIFESTS for d in ray_docs(p) if d.get("kind") == kind]
    assert len(found) == 1, f"expected exactly one {kind} under {KUBERAY_DIR}, found {len(found)}"
    return found[0]


def serve_config(rayservice: dict) -> dict:
    raw = rayservice["spec"]["serveConfigV2"]
    assert isinstance(raw, str), "serveConfigV2 must be a YAML *string* (use `|`)"
    cfg = yaml.safe_load(raw)
    assert isinstance(cfg, dict), "serveConfigV2 does not parse to a mapping"
    return cfg


def _walk_pod_containers(cluster_spec: dict) -> Iterator[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]
    for g in groups:
        yield from g["template"]["spec"]["containers"]


def _cluster_spec(doc: dict) -> dict:
    spec = doc["spec"]
    return spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec


# ---------------------------------------------------------------------------
# (a) KubeRay manifests against the CRD schemas
# ---------------------------------------------------------------------------


def test_kuberay_manifests_present():
    names = {p.name for p in KUBERAY_MANIFESTS}
    assert {"rayjob-pipeline.yaml", "rayservice-student.yaml"} <= names, names


@pytest.mark.parametrize("path", KUBERAY_MANIFESTS, ids=lambda p: p.name)
def test_kuberay_manifest_matches_crd(path: Path):
    docs = ray_docs(path)
    assert docs, f"{path} holds no ray.io resource"
    for doc in docs:
        errors = crd_errors(doc, strict=True)
        assert not errors, f"{path.name} ({doc.get('kind')}):\n  " + "\n  ".join(errors)


MISSPELLINGS = [
    # (kind, path to the mapping, correct key, misspelt key)
    ("RayJob", ("spec",), "shutdownAfterJobFinishes", "shutdownAfterJobFinish"),
    ("RayJob", ("spec",), "ttlSecondsAfterFinished", "ttlSecondAfterFinished"),
    ("RayJob", ("spec", "rayClusterSpec"), "enableInTreeAutoscaling", "enableInTreeAutoScaling"),
    ("RayJob", ("spec", "rayClusterSpec", "workerGroupSpecs", 0), "maxReplicas", "maxReplica"),
    (
        "RayJob",
        ("spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec", "containers", 0),
        "resources",
        "resource",
    ),
    ("RayService", ("spec",), "serveConfigV2", "serveConfigv2"),
    ("RayService", ("spec",), "rayClusterConfig", "rayClusterSpec"),
    ("RayService", ("spec", "rayClusterConfig", "headGroupSpec"), "rayStartParams", "rayStartParam"),
]


@pytest.mark.parametrize(
    "kind,where,good,bad", MISSPELLINGS, ids=[f"{m[0]}-{m[3]}" for m in MISSPELLINGS]
)
def test_misspelt_kuberay_field_fails(kind, where, good, bad):
    _, doc = one_ray_doc(kind)
    assert not crd_errors(doc), "the unmodified manifest must validate first"
    broken = copy.deepcopy(doc)
    node = broken
    for step in where:
        node = node[step]
    assert good in node, f"{good!r} not found at {where} in the {kind} manifest"
    node[bad] = node.pop(good)
    errors = crd_errors(broken, strict=True)
    assert any(bad in e for e in errors), f"misspelt {bad!r} was not caught: {errors}"


def test_wrong_type_fails_even_without_strict_mode():
    _, doc = one_ray_doc("RayJob")
    broken = copy.deepcopy(doc)
    broken["spec"]["shutdownAfterJobFinishes"] = "yes"
    assert crd_errors(broken, strict=False)


def test_strict_schema_keeps_open_maps_open():
    # rayStartParams is a string map (additionalProperties: {type: string}):
    # strict mode must not close it; preserve-unknown-fields objects stay open too.
    schema = {
        "type": "object",
        "properties": {
            "params": {"type": "object", "additionalProperties": {"type": "string"}},
            "blob": {"type": "object", "properties": {"a": {}}, "x-kubernetes-preserve-unknown-fields": True},
            "properties": {"type": "object", "properties": {"x": {"type": "integer"}}},
        },
    }
    v = jsonschema.Draft7Validator(strict_schema(schema))
    assert v.is_valid({"params": {"any-key": "1"}, "blob": {"zzz": 1}, "properties": {"x": 1}})
    assert not v.is_valid({"params": {"k": 1}})
    assert not v.is_valid({"nope": 1})
    assert not v.is_valid({"properties": {"y": 1}})


def test_kuberay_images_and_ray_version_agree():
    for path in KUBERAY_MANIFESTS:
        for doc in ray_docs(path):
            cs = _cluster_spec(doc)
            version = cs.get("rayVersion")
            assert version, f"{path.name}: set rayVersion (needed for authOptions)"
            for c in _walk_pod_containers(cs):
                m = re.fullmatch(r"rayproject/ray:([0-9.]+)-py311(-gpu)?@sha256:(REPLACE-ME|[0-9a-f]{64})", c["image"])
                assert m, f"{path.name}: unexpected image {c['image']!r}"
                assert m.group(1) == version, f"{path.name}: {c['image']} vs rayVersion {version}"


def test_rayjob_settings():
    _, job = one_ray_doc("RayJob")
    spec = job["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int)
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.pipeline"]
    assert argv[argv.index("--data.root") + 1] == "s3://kdray-data/cxr"
    assert argv[argv.index("--output") + 1] == "s3://kdray-runs/pipeline"
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    gpu_limits = [
        c["resources"]["limits"].get("nvidia.com/gpu")
        for g in workers
        for c in g["template"]["spec"]["containers"]
    ]
    assert any(str(x) == "1" for x in gpu_limits), gpu_limits


@pytest.mark.parametrize("kind", ["RayJob", "RayService"])
def test_s3_credentials_come_from_secret(kind):
    _, doc = one_ray_doc(kind)
    for c in _walk_pod_containers(_cluster_spec(doc)):
        env = {e["name"]: e for e in c.get("env", [])}
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert var in env, f"{kind} container {c['name']} lacks {var}"
            assert "value" not in env[var], f"{var} must not be inlined"
            ref = env[var]["valueFrom"]["secretKeyRef"]
            assert ref["name"] and ref["key"]


@pytest.mark.parametrize("path", KUBERAY_MANIFESTS, ids=lambda p: p.name)
def test_irsa_is_one_uncommented_line_away(path: Path):
    """EKS IRSA instead of keys: uncommenting ``serviceAccountName: kdray`` gives a valid manifest whose every Ray
    pod runs as that ServiceAccount, and the Secret's keys are optional, so pods start without the Secret."""
    text = path.read_text()
    assert "# serviceAccountName: kdray" in text
    docs = [d for d in yaml.safe_load_all(text.replace("# serviceAccountName:", "serviceAccountName:"))
            if d and str(d.get("apiVersion", "")).startswith("ray.io/")]
    assert docs
    for doc in docs:
        assert not crd_errors(doc), crd_errors(doc)
        cs = _cluster_spec(doc)
        for group in [cs["headGroupSpec"], *cs.get("workerGroupSpecs", [])]:
            assert group["template"]["spec"].get("serviceAccountName") == "kdray"
        for c in _walk_pod_containers(cs):
            env = {e["name"]: e for e in c.get("env", [])}
            for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert env[var]["valueFrom"]["secretKeyRef"].get("optional") is True, (c["name"], var)


def test_rayjob_runtime_env_is_valid_for_ray():
    _, job = one_ray_doc("RayJob")
    renv = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert isinstance(renv, dict) and renv.get("working_dir"), "runtimeEnvYAML needs working_dir"
    ray_runtime_env = pytest.importorskip("ray.runtime_env")
    ray_runtime_env.RuntimeEnv(**renv)  # raises on unknown/invalid fields


#: A pinned code archive: a release tag's or one commit's GitHub archive, never a branch's (refs/heads/...).
PINNED_ARCHIVE = re.compile(r"https://github\.com/[^/]+/[^/]+/archive/(refs/tags/(?P<tag>[^/]+)|(?P<commit>[0-9a-f]{40}))\.zip")


def manifest_values(node: Any, keys: frozenset[str]) -> Iterator[Any]:
    """The value of every one of ``keys`` in a loaded manifest, also inside embedded YAML strings
    (``runtimeEnvYAML``, ``serveConfigV2``)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in keys:
                yield value
            else:
                yield from manifest_values(value, keys)
    elif isinstance(node, list):
        for value in node:
            yield from manifest_values(value, keys)
    elif isinstance(node, str) and any(key in node for key in keys):
        embedded = yaml.safe_load(node)
        if isinstance(embedded, (dict, list)):
            yield from manifest_values(embedded, keys)


def _working_dirs(node: Any) -> Iterator[str]:
    """Every runtime_env ``working_dir`` in a loaded manifest."""
    return manifest_values(node, frozenset({"working_dir"}))


def _unpinned(working_dir: str, version: str) -> str | None:
    """Why ``working_dir`` is not a pinned archive of kdray ``version``, or None."""
    m = PINNED_ARCHIVE.fullmatch(working_dir)
    if not m:
        return "not a tag or commit archive (https://github.com/<owner>/kdray/archive/refs/tags/v<version>.zip)"
    if m["tag"] and m["tag"] != f"v{version}":
        return f"tag {m['tag']} is not v{version} (kdray.__version__)"
    return None


def test_runtime_env_working_dirs_are_pinned():
    """The manifests run one version of the code: a release tag's archive (matching kdray.__version__) or a
    commit's, never a moving branch's."""
    import kdray

    paths = [*KUBERAY_MANIFESTS, *sorted(CLUSTER_DIR.glob("*.yaml")), REPO_ROOT / "serve" / "config.yaml"]
    found = {(p.name, w) for p in paths for d in load_manifests(p) for w in _working_dirs(d)}
    assert {name for name, _ in found} >= {"rayjob-pipeline.yaml", "rayservice-student.yaml"}, found
    bad = [(name, w, why) for name, w in sorted(found) if (why := _unpinned(w, kdray.__version__))]
    assert not bad, bad
    branch = "https://github.com/REPLACE-ME/kdray/archive/refs/heads/main.zip"
    assert _unpinned(branch, kdray.__version__) and _unpinned(branch.replace("heads/main", "tags/v0.0.9"), "0.1.0")
    assert _unpinned(f"https://github.com/o/kdray/archive/{'a' * 40}.zip", "0.1.0") is None


# ---------------------------------------------------------------------------
# (b) serveConfigV2 of the RayService
# ---------------------------------------------------------------------------


def test_serve_config_v2():
    _, svc = one_ray_doc("RayService")
    cfg = serve_config(svc)
    apps = cfg["applications"]
    assert len(apps) == 1
    app = apps[0]
    assert app["import_path"] == "serve.app:app_builder"
    assert app["route_prefix"] == "/"
    assert app["args"]["model_dir"] == "s3://kdray-runs/pipeline/export/student"
    # Deployment knobs come from serve/options.py (the one source); the RayService only sets the
    # environment's replica bound and CPUs per replica, as app args that serve.app:app_builder accepts.
    assert "deployments" not in app
    assert app["args"]["max_replicas"] == 4 and app["args"]["num_cpus"] == 2
    from serve.app import app_builder

    bound = app_builder({**app["args"], "model_dir": str(Path(__file__).resolve().parents[1])})
    assert bound._bound_deployment._deployment_config.autoscaling_config.max_replicas == 4


def _model_keys(model) -> set[str]:
    fields = getattr(model, "model_fields", None) or model.__fields__
    keys = set(fields)
    keys |= {f.alias for f in fields.values() if getattr(f, "alias", None)}
    return keys


def unknown_serve_keys(cfg: dict) -> list[str]:
    """Keys of a Serve config that Ray's Serve schema models do not define.

    Ray's ServeDeploySchema is forward compatible and silently ignores unknown
    keys (and autoscaling_config is a plain dict at parse time), so misspelt
    keys have to be looked for explicitly.
    """
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import (
        DeploymentSchema,
        HTTPOptionsSchema,
        RayActorOptionsSchema,
        ServeApplicationSchema,
        ServeDeploySchema,
    )

    bad: list[str] = []

    def check(obj, model, where):
        if isinstance(obj, dict):
            bad.extend(f"{where}.{k}" for k in sorted(set(obj) - _model_keys(model)))

    check(cfg, ServeDeploySchema, "<root>")
    check(cfg.get("http_options"), HTTPOptionsSchema, "http_options")
    for i, app in enumerate(cfg.get("applications", [])):
        check(app, ServeApplicationSchema, f"applications[{i}]")
        for j, dep in enumerate(app.get("deployments", [])):
            where = f"applications[{i}].deployments[{j}]"
            check(dep, DeploymentSchema, where)
            check(dep.get("ray_actor_options"), RayActorOptionsSchema, where + ".ray_actor_options")
            check(dep.get("autoscaling_config"), AutoscalingConfig, where + ".autoscaling_config")
    return bad


def test_serve_config_v2_matches_ray_serve_schema():
    schema_mod = pytest.importorskip("ray.serve.schema")
    from ray.serve.config import AutoscalingConfig

    _, svc = one_ray_doc("RayService")
    cfg = serve_config(svc)
    parsed = schema_mod.ServeDeploySchema.model_validate(cfg)
    assert parsed.applications[0].import_path == "serve.app:app_builder"
    assert not unknown_serve_keys(cfg)
    for app in cfg["applications"]:
        for dep in app.get("deployments", []):
            if "autoscaling_config" in dep:
                AutoscalingConfig(**dep["autoscaling_config"])  # value checks
        if "runtime_env" in app:
            pytest.importorskip("ray.runtime_env").RuntimeEnv(**app["runtime_env"])


@pytest.mark.parametrize(
    "path,bad",
    [
        (("applications", 0, "deployments", 0, "autoscaling_config"), "max_replica"),
        (("applications", 0, "deployments", 0, "ray_actor_options"), "num_cpu"),
        (("applications", 0, "deployments", 0), "autoscaling_configs"),
        (("applications", 0), "import_paths"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_serve_config_v2_misspelt_key_fails(path, bad):
    pytest.importorskip("ray.serve.schema")
    _, svc = one_ray_doc("RayService")
    cfg = serve_config(svc)
    # The RayService has no deployments section (serve/options.py owns those knobs); a section
    # someone adds later must still be checked, so give the checker one to find the typo in.
    cfg["applications"][0].setdefault("deployments", [{
        "name": "StudentClassifier", "autoscaling_config": {"max_replicas": 4}, "ray_actor_options": {"num_cpus": 1}}])
    node = cfg
    for step in path:
        node = node[step]
    node[bad] = 1
    assert any(k.endswith("." + bad) for k in unknown_serve_keys(cfg))


# ---------------------------------------------------------------------------
# (c) AWS cluster-launcher YAML against Ray's schema
# ---------------------------------------------------------------------------


def _ray_autoscaler_util():
    pytest.importorskip("ray")
    return pytest.importorskip("ray.autoscaler._private.util")


def _aws_config() -> dict:
    assert AWS_YAML.exists(), f"{AWS_YAML} missing"
    with open(AWS_YAML, encoding="utf-8") as f:
        return yaml.safe_load(f)


def test_aws_yaml_validates_against_ray_schema():
    util = _ray_autoscaler_util()
    import ray.autoscaler

    cfg = _aws_config()
    # Exactly what ray's validate_config does first: jsonschema.validate with
    # ray/autoscaler/ray-schema.json from the installed package.
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    jsonschema.validate(cfg, schema)
    util.validate_config(cfg)
    # And as `ray up` sees it, after defaults are filled in.
    util.validate_config(util.prepare_config(copy.deepcopy(cfg)))


def test_aws_yaml_content():
    cfg = _aws_config()
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["node_config"]["InstanceType"].startswith("m5.")
    gpu = [t for n, t in types.items() if n != cfg["head_node_type"]]
    assert any(
        t["node_config"]["InstanceType"] == "g5.xlarge"
        and t.get("min_workers", 0) == 0
        and t["max_workers"] == 4
        for t in gpu
    )
    assert cfg["docker"]["image"].startswith("rayproject/ray:2.60.0-py311-gpu@sha256:")  # by digest: test_supply_chain
    assert any("pip install" in c for c in cfg["setup_commands"])
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("$RAY_HEAD_IP" in c for c in cfg["worker_start_ray_commands"])
    local_paths = [Path(p) for p in cfg["file_mounts"].values()]
    assert any(p == Path(".") or p.resolve() == REPO_ROOT for p in local_paths)
    # The dashboard (and job API) is not exposed without auth: it listens on the head's 127.0.0.1 only (reached
    # through `ray dashboard`'s SSH forward), and every node runs with Ray token auth, the token carried to it
    # from the user's machine.
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    head_args = [shlex.split(c.split("ray start", 1)[1]) for c in cfg["head_start_ray_commands"] if "--head" in c]
    assert len(head_args) == 1
    hosts = [a.split("=", 1)[1] for a in head_args[0] if a.startswith("--dashboard-host")]
    assert hosts == ["127.0.0.1"], hosts
    assert not any("0.0.0.0" in c for c in starts)
    assert starts and all("export RAY_AUTH_MODE=token;" in c for c in starts)
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


AWS_MISSPELLINGS = [
    ((), "head_start_ray_commands", "head_start_ray_command"),
    ((), "setup_commands", "setup_command"),
    (("docker",), "image", "imgae"),
    (("available_node_types", "ray.worker.gpu"), "max_workers", "max_worker"),
]


@pytest.mark.parametrize("where,good,bad", AWS_MISSPELLINGS, ids=[m[2] for m in AWS_MISSPELLINGS])
def test_aws_yaml_misspelt_key_fails(where, good, bad):
    util = _ray_autoscaler_util()
    cfg = _aws_config()
    node = cfg
    for step in where:
        node = node[step]
    assert good in node
    node[bad] = node.pop(good)
    with pytest.raises(jsonschema.ValidationError) as exc:
        util.validate_config(cfg)
    assert bad in str(exc.value)


# ---------------------------------------------------------------------------
# (d) modules referenced by the manifests exist in the repository
#     (these fail until jobs/ and serve/ are written)
# ---------------------------------------------------------------------------


def _module_file(module: str) -> Path:
    rel = Path(*module.split("."))
    for cand in (REPO_ROOT / rel.with_suffix(".py"), REPO_ROOT / rel / "__init__.py"):
        if cand.exists():
            return cand
    return REPO_ROOT / rel.with_suffix(".py")


def test_rayjob_entrypoint_module_exists():
    _, job = one_ray_doc("RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert "-m" in argv, f"entrypoint should be `python -m jobs.<stage>`: {argv}"
    module = argv[argv.index("-m") + 1]
    assert module.startswith("jobs."), module
    path = _module_file(module)
    assert path.exists(), f"RayJob entrypoint runs {module}, but {path.relative_to(REPO_ROOT)} does not exist"


def test_rayservice_import_path_module_exists():
    _, svc = one_ray_doc("RayService")
    for app in serve_config(svc)["applications"]:
        module, _, attr = app["import_path"].partition(":")
        path = _module_file(module)
        assert path.exists(), f"RayService imports {module}, but {path.relative_to(REPO_ROOT)} does not exist"
        assert re.search(rf"^(def|class)\s+{re.escape(attr)}\b|^{re.escape(attr)}\s*=", path.read_text(), re.M), (
            f"{path.relative_to(REPO_ROOT)} does not define {attr}"
        )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_every_node_start_sets_kdray_node_env():
    """RAY_SERVE_ENABLE_DIRECT_INGRESS (kdray.raycluster.NODE_ENV) is read as a node starts: every place that
    starts nodes sets it — the local head script, the KubeRay pods and the AWS launcher's start commands."""
    from kdray.raycluster import NODE_ENV

    _, svc = one_ray_doc("RayService")
    spec = svc["spec"]["rayClusterConfig"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]
    script = (CLUSTER_DIR / "local_head.sh").read_text()
    starts = [c for c in _aws_config()["head_start_ray_commands"] + _aws_config()["worker_start_ray_commands"]
              if "ray start" in c]
    for key, value in NODE_ENV.items():
        assert f'export {key}="${{{key}:-{value}}}"' in script
        for pod in pods:
            env = {e["name"]: e.get("value") for c in pod["spec"]["containers"] for e in c.get("env", [])}
            assert env.get(key) == value, (key, pod["spec"]["containers"][0]["name"])
        assert starts and all(f"export {key}={value};" in c for c in starts)
