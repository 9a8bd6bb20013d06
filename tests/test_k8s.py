"""The KubeRay manifests (k8s/) and the cluster launcher config (cluster/): what KubeRay v1
and the Ray launcher require, nothing exposed outside the cluster, token auth everywhere,
and entrypoints that name real files and valid configs of this repo."""

from __future__ import annotations

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


def test_every_manifest_and_config_is_here_and_parses():
    names = {p.relative_to(ROOT).as_posix() for p in FILES}
    assert {"k8s/raycluster.yaml", "k8s/rayjob-sprec.yaml", "k8s/rayjob-sweep.yaml", "k8s/pvc.yaml",
            "k8s/secret.example.yaml", "cluster/gpu-cluster.yaml", "cluster/runtime_env.yaml"} <= names
    assert len(CLUSTERS) == 3 and len(RAYJOBS) == 2
    for path, doc in DOCS:
        if path.startswith("k8s/"):
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], path


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
    assert len({g for g, _ in groups(spec)}) == len(groups(spec)), "groupName must be unique"
    mounts = set()
    for group, g in groups(spec):
        params = g["rayStartParams"]
        assert isinstance(params, dict) and all(isinstance(v, str) for v in params.values()), group
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
    assert isinstance(spec["entrypoint"], str) and spec["entrypoint"].strip()
    assert "rayClusterSpec" in spec or "clusterSelector" in spec
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert isinstance(spec["activeDeadlineSeconds"], int) and spec["activeDeadlineSeconds"] > 0
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
