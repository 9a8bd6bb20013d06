"""The KubeRay manifests (k8s/) and the cluster launcher config (cluster/): valid against the
CRD schemas of the pinned KubeRay release (vendored in tests/schemas/, unknown fields refused)
and what the Ray launcher requires, nothing exposed outside the cluster, token auth
everywhere, and entrypoints that name real files and valid configs of this repo."""

from __future__ import annotations

import gzip
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.runtime_env import RuntimeEnv

from recray.cli import build_parser
from recray.config import load_config
from recray.sweep import load_sweep

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted([*ROOT.glob("k8s/*.yaml"), *ROOT.glob("cluster/*.yaml")])
DOCS = [(p.relative_to(ROOT).as_posix(), d)
        for p in FILES for d in yaml.safe_load_all(p.read_text()) if d is not None]
RAY_VERSION = re.search(r'"ray\[[^\]]*\]==([\d.]+)"', (ROOT / "pyproject.toml").read_text())[1]


def of_kind(kind: str) -> dict[str, dict]:
    return {f"{path}:{d['metadata']['name']}": d for path, d in DOCS if d.get("kind") == kind}


RAYJOBS = of_kind("RayJob")
CLUSTERS = {**{k: d["spec"] for k, d in of_kind("RayCluster").items()},
            **{k: d["spec"]["rayClusterSpec"] for k, d in RAYJOBS.items()
               if "rayClusterSpec" in d["spec"]}}
(PVC,) = of_kind("PersistentVolumeClaim").values()
(SECRET,) = of_kind("Secret").values()
TOKEN_KEY = {"name": SECRET["metadata"]["name"], "key": next(iter(SECRET["stringData"]))}


def groups(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"]), *((g["groupName"], g) for g in spec["workerGroupSpecs"])]


def env_of(env_list: list[dict]) -> dict[str, dict]:
    return {e["name"]: e for e in env_list}


def assert_token_auth(env_list: list[dict]) -> None:
    env = env_of(env_list)
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == TOKEN_KEY


KUBERAY = "v1.7.0"                  # the KubeRay release k8s/README.md pins
CRD_DIR = ROOT / "tests" / "schemas" / f"kuberay-{KUBERAY}"
CRD_SCHEMAS = {"RayCluster": "raycluster.v1.schema.json.gz", "RayJob": "rayjob.v1.schema.json.gz"}
KUBERAY_DOCS = {f"{path}:{d['metadata']['name']}": d for path, d in DOCS
                if path.startswith("k8s/") and str(d.get("apiVersion", "")).startswith("ray.io/")}


def crd_schema(kind: str) -> dict:
    """The vendored `ray.io/v1` openAPIV3Schema of a KubeRay CRD, exactly as released."""
    return json.loads(gzip.decompress((CRD_DIR / CRD_SCHEMAS[kind]).read_bytes()))


def strict(node: dict) -> dict:
    """A CRD schema node as Kubernetes reads it, spelled out for jsonschema, unknown fields refused.

    Kubernetes prunes (silently drops) a field that an object schema does not name, unless the
    object has `additionalProperties` or `x-kubernetes-preserve-unknown-fields: true`: in a
    manifest such a field is a typo, so here it is an error. `x-kubernetes-int-or-string` is an
    integer or a string (KubeRay's generator also writes the anyOf); `nullable` admits null;
    `x-kubernetes-list-type: set` means unique items, `map` unique keys (checked by
    `list_map_keys`). CEL rules (`x-kubernetes-validations`) are not evaluated.
    """
    out = {}
    for key, value in node.items():
        if key == "properties":
            value = {name: strict(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            value = strict(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            value = [strict(sub) for sub in value]
        out[key] = value                # default, enum, x-kubernetes-*: data, kept as they are
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if ((node.get("type") == "object" or "properties" in node) and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    if node.get("nullable"):
        out = {"anyOf": [{"type": "null"}, out]}
    return out


def list_map_keys(validator, keys, instance, schema):
    """`x-kubernetes-list-type: map`: no two items with the same keys (a key's default counts)."""
    if schema.get("x-kubernetes-list-type") != "map" or not validator.is_type(instance, "array"):
        return
    props = schema.get("items", {}).get("properties", {})
    seen = set()
    for item in instance:
        if isinstance(item, dict):
            key = tuple(json.dumps(item.get(k, props.get(k, {}).get("default"))) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(f"two items with the same {'/'.join(keys)} {key}")
            seen.add(key)


# OpenAPI 3.0 schemas are close to draft 4. Of the formats, only Kubernetes' integer widths are
# checked; others (date-time, anything unknown) pass, as in jsonschema without a checker.
CRDValidator = jsonschema.validators.extend(jsonschema.Draft4Validator,
                                            {"x-kubernetes-list-map-keys": list_map_keys})
FORMATS = jsonschema.FormatChecker(formats=())
for _format, _bits in (("int32", 32), ("int64", 64)):
    FORMATS.checks(_format)(lambda v, b=_bits: not isinstance(v, int) or -2 ** (b - 1) <= v < 2 ** (b - 1))


def object_meta(kind: str) -> dict:
    """The CRDs say only `metadata: {type: object}`; the API server checks it as ObjectMeta.
    Here: the fields a manifest sets, and the name rules of the KubeRay operator (a DNS-1035
    label of at most 53 characters for a RayCluster, 47 for a RayJob)."""
    strings = {"type": "object", "additionalProperties": {"type": "string"}}
    return {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
        "name": {"type": "string", "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$",
                 "maxLength": {"RayCluster": 53, "RayJob": 47}[kind]},
        "namespace": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "labels": strings, "annotations": strings,
        "finalizers": {"type": "array", "items": {"type": "string"}}}}


def crd_validator(kind: str, schema: dict | None = None) -> jsonschema.protocols.Validator:
    schema = strict(crd_schema(kind)) if schema is None else schema
    schema["properties"].update(apiVersion={"enum": ["ray.io/v1"]}, kind={"enum": [kind]},
                                metadata=object_meta(kind))
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return CRDValidator(schema, format_checker=FORMATS)


VALIDATORS = {kind: crd_validator(kind) for kind in CRD_SCHEMAS}


def schema_errors(doc: dict, validator: jsonschema.protocols.Validator | None = None) -> list[str]:
    validator = validator or VALIDATORS[doc["kind"]]
    return sorted(f"{'/'.join(map(str, e.absolute_path)) or '.'}: {e.message}"
                  for e in validator.iter_errors(doc))


def test_every_manifest_and_config_is_here_and_parses():
    names = {p.relative_to(ROOT).as_posix() for p in FILES}
    assert {"k8s/raycluster.yaml", "k8s/rayjob-sprec.yaml", "k8s/rayjob-sweep.yaml", "k8s/pvc.yaml",
            "k8s/secret.example.yaml", "cluster/gpu-cluster.yaml", "cluster/runtime_env.yaml"} <= names
    assert len(CLUSTERS) == 3 and len(RAYJOBS) == 2
    assert sorted(d["kind"] for d in KUBERAY_DOCS.values()) == ["RayCluster", "RayJob", "RayJob"]
    for path, doc in DOCS:
        if path.startswith("k8s/"):
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], path


def test_the_kuberay_release_is_pinned_and_its_schemas_vendored():
    readme = (ROOT / "k8s" / "README.md").read_text()
    assert f"KubeRay operator {KUBERAY}" in readme and "or later" not in readme
    assert "Apache License" in (CRD_DIR / "LICENSE").read_text()
    assert f"tag `{KUBERAY}`" in (CRD_DIR.parent / "README.md").read_text()
    for kind in CRD_SCHEMAS:
        assert set(crd_schema(kind)["properties"]) == {"apiVersion", "kind", "metadata", "spec", "status"}


@pytest.mark.parametrize("name", sorted(KUBERAY_DOCS))
def test_manifest_matches_the_pinned_kuberay_crd_schema(name):
    assert schema_errors(KUBERAY_DOCS[name]) == []


def at(node, *path):
    for step in path:
        node = node[step]
    return node


WORKER = ("spec", "workerGroupSpecs", 0)
CONTAINER = (*WORKER, "template", "spec", "containers", 0)


@pytest.mark.parametrize(("where", "field", "typo"), [
    pytest.param(WORKER, "rayStartParams", "rayStartParam", id="worker-rayStartParam"),
    pytest.param(CONTAINER, "imagePullPolicy", "imagePullPolicyy", id="container-imagePullPolicyy"),
    pytest.param((*CONTAINER, "env", 1, "valueFrom"), "secretKeyRef", "secretKeyref", id="env-secretKeyref"),
    pytest.param((*CONTAINER, "resources"), "limits", "limit", id="resources-limit"),
    pytest.param(("spec", "headGroupSpec", "template", "spec", "volumes", 0, "persistentVolumeClaim"),
                 "claimName", "claimname", id="pvc-claimname"),
    pytest.param(("spec", "autoscalerOptions"), "idleTimeoutSeconds", "idleTimeoutSecond", id="autoscaler"),
    pytest.param(("metadata",), "labels", "lables", id="metadata-lables"),
])
def test_the_schema_check_refuses_a_typo_in_a_nested_field(where, field, typo):
    doc = json.loads(json.dumps(KUBERAY_DOCS["k8s/raycluster.yaml:recray"]))   # unshares YAML anchors
    assert schema_errors(doc) == []
    node = at(doc, *where)
    node[typo] = node.pop(field, "IfNotPresent")           # the manifest may not set the field
    errors = schema_errors(doc)
    assert any(f"'{typo}' was unexpected" in e and e.startswith("/".join(map(str, where)))
               for e in errors), errors


def test_the_crd_schemas_alone_would_let_a_typo_through():
    """Why strict(): KubeRay's schemas leave additionalProperties open, and Kubernetes prunes."""
    doc = json.loads(json.dumps(KUBERAY_DOCS["k8s/raycluster.yaml:recray"]))
    at(doc, *CONTAINER)["imagePullPolicyy"] = "Always"
    at(doc, *WORKER)["rayStartParam"] = at(doc, *WORKER).pop("rayStartParams")
    assert schema_errors(doc, crd_validator("RayCluster", crd_schema("RayCluster"))) == []
    assert len(schema_errors(doc)) == 2


@pytest.mark.parametrize(("where", "field", "value", "message"), [
    pytest.param(WORKER, "replicas", "1", "is not of type 'integer'", id="string-for-int"),
    pytest.param(WORKER, "maxReplicas", 2 ** 31, "is not a 'int32'", id="int32-overflow"),
    pytest.param(("spec", "autoscalerOptions"), "upscalingMode", "Fast", "is not one of", id="enum"),
    pytest.param((*CONTAINER, "resources", "limits"), "cpu", 0.5, "is not valid under any", id="quantity"),
    pytest.param(WORKER, "groupName", None, "is a required property", id="required"),
    pytest.param(("spec", "headGroupSpec", "template", "spec", "containers", 0), "ports", "dup",
                 "two items with the same containerPort/protocol", id="list-map"),   # protocol: TCP default
    pytest.param(("metadata",), "name", "Recray_1", "does not match", id="dns-1035-name"),
    pytest.param((), "apiVersion", "ray.io/v1alpha1", "is not one of", id="apiVersion"),
])
def test_the_schema_check_refuses_a_wrong_value(where, field, value, message):
    doc = json.loads(json.dumps(KUBERAY_DOCS["k8s/raycluster.yaml:recray"]))
    node = at(doc, *where)
    if value is None:
        del node[field]
    elif value == "dup":
        node[field].append({**node[field][0], "name": "again"})
    else:
        node[field] = value
    errors = schema_errors(doc)
    assert any(message in e for e in errors), errors
    assert schema_errors(KUBERAY_DOCS["k8s/raycluster.yaml:recray"]) == []


@pytest.mark.parametrize("name", sorted(CLUSTERS))
def test_ray_cluster_spec_has_what_kuberay_requires(name):
    spec = CLUSTERS[name]
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"          # drivers only, no tasks on the head
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)
    assert spec["workerGroupSpecs"]
    # The CRD schema does not make workerGroupSpecs a list-map keyed by groupName.
    assert len({g for g, _ in groups(spec)}) == len(groups(spec)), "groupName must be unique"
    mounts = set()
    for group, g in groups(spec):
        pod = g["template"]["spec"]
        c = pod["containers"][0]
        assert c["name"] and c["image"].startswith(f"rayproject/ray:{RAY_VERSION}-"), group
        assert "ray stop" in " ".join(c["lifecycle"]["preStop"]["exec"]["command"]), group
        assert_token_auth(c["env"])
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in pod["volumes"] if "persistentVolumeClaim" in v}
        shared = [m["mountPath"] for m in c["volumeMounts"]
                  if claims.get(m["name"]) == PVC["metadata"]["name"]]
        assert len(shared) == 1, f"{group}: the shared PVC is not mounted"
        mounts.add(shared[0])
        assert env_of(c["env"])["RECRAY_HOME"]["value"].startswith(shared[0] + "/")
        if group != "head":
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], group
            assert g["minReplicas"] < g["maxReplicas"], f"{group}: autoscaling has no room"
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1, group
            assert "nvidia.com/gpu" in {t["key"] for t in pod["tolerations"]}, group
    assert len(mounts) == 1, f"the shared PVC is mounted at different paths: {mounts}"
    assert_token_auth(spec["autoscalerOptions"]["env"])      # the injected autoscaler talks to the GCS


def test_shared_volume_is_read_write_many():
    assert "ReadWriteMany" in PVC["spec"]["accessModes"]


def test_secret_example_is_a_placeholder():
    assert "REPLACE" in SECRET["stringData"][TOKEN_KEY["key"]]


def test_nothing_is_exposed_outside_the_cluster():
    def walk(node, path):
        if isinstance(node, dict):
            for key, value in node.items():
                assert not (key in ("type", "serviceType") and value in ("LoadBalancer", "NodePort")), path
                walk(value, path)
        elif isinstance(node, list):
            for item in node:
                walk(item, path)
    for path, doc in DOCS:
        assert doc.get("kind") not in ("Ingress", "Route", "Gateway"), path
        walk(doc, path)


@pytest.mark.parametrize("name", sorted(RAYJOBS))
def test_rayjob_has_what_kuberay_requires(name):
    spec = RAYJOBS[name]["spec"]
    assert spec["entrypoint"].strip()
    assert "rayClusterSpec" in spec or "clusterSelector" in spec
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] >= 0            # types: the CRD schema test
    assert spec["activeDeadlineSeconds"] > 0
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(runtime_env) <= RuntimeEnv.known_fields
    RuntimeEnv(**runtime_env)                                  # Ray's own type checks
    job_env = yaml.safe_load((ROOT / "cluster/runtime_env.yaml").read_text())["env_vars"]
    assert runtime_env["env_vars"] == job_env, "keep in step with cluster/runtime_env.yaml"
    # KubeRay's default submitter pod carries no token, and the head refuses it.
    assert_token_auth(spec["submitterPodTemplate"]["spec"]["containers"][0]["env"])


@pytest.mark.parametrize("name", sorted(RAYJOBS))
def test_entrypoint_names_a_real_file_and_a_valid_config(name):
    argv = shlex.split(RAYJOBS[name]["spec"]["entrypoint"])
    assert argv[0] == "python"
    if argv[1] == "-m":
        source, cli_args = ROOT / (argv[2].replace(".", "/") + ".py"), argv[3:]
    else:
        source, cli_args = ROOT / argv[1], ["run", *argv[2:]]   # jobs/sprec.py is `recray run`
    assert source.is_file(), source
    if cli_args[0] == "sweep":      # a sweep YAML names its base run config itself
        args = build_parser().parse_args(cli_args)
        load_sweep(ROOT / args.config, args.overrides)     # ConfigError names a bad key
        assert args.output.startswith("/mnt/recray/"), "Tuner.restore needs the shared volume"
        return
    args = build_parser().parse_args(cli_args)
    assert (ROOT / args.config).is_file(), args.config
    load_config(ROOT / args.config, args.overrides)         # ConfigError names a bad key


def test_launcher_config_has_what_the_launcher_needs():
    (config,) = (d for path, d in DOCS if path == "cluster/gpu-cluster.yaml")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    assert config["cluster_name"] and config["provider"]["type"] and config["max_workers"] >= 1
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"]["CPU"] == 0
    workers = [t for n, t in types.items() if n != config["head_node_type"]]
    assert workers and all(t["min_workers"] <= t["max_workers"] <= config["max_workers"] for t in workers)
    assert config["docker"]["image"].startswith(f"rayproject/ray:{RAY_VERSION}-")
    assert config["file_mounts"]["~/.ray/auth_token"]          # every node gets the token
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start           # reached only by SSH port-forward
    for cmd in (head_start, " ".join(config["worker_start_ray_commands"])):
        assert "RAY_AUTH_MODE=token ray start" in cmd


def test_runtime_env_builds():
    RuntimeEnv(**yaml.safe_load((ROOT / "cluster/runtime_env.yaml").read_text()))
