"""The deploy files run the whole product: every manifest parses and keeps the topology's invariants.

Containers cannot run here, so this reads deploy/k8s (the Kustomize base) and deploy/compose.yaml and checks:
each Celery queue a producer sends to has a consumer (and no pool waits on a queue nobody fills), image storage
is shared by every writer and reader, exactly one beat, migrations run once (a Job; gateways --no-migrate),
probes on every long-running container, PDBs, non-root securityContext, GPU limits, autoscalers. The roles and
their queues come from services/topology.py, the same code `pigment worker` and `pigment stack` run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pigment.services.common.settings import Settings
from pigment.services.topology import WORKER_ROLES, worker_queue

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
K8S = DEPLOY / "k8s"
WRITERS_READERS = {"gateway", "render", "batch", "retrain"}  # who touches the stored images


def role_of(args: list[str]) -> str | None:
    """gateway | render | batch | retrain | beat | migrate from a container's command line."""
    if args[:2] == ["pigment", "serve"]:
        return "gateway"
    if args[:2] == ["pigment", "worker"]:
        assert args[2] in WORKER_ROLES, args
        return args[2]
    if args[:2] == ["pigment", "beat"]:
        return "beat"
    if args[:3] == ["pigment", "db", "upgrade"]:
        return "migrate"
    return None


def settings_for(env: dict) -> Settings:
    """What a process with this environment would read (secrets are not in the manifests)."""
    fields = {k.removeprefix("PIGMENT_").lower(): v for k, v in env.items()
              if k.startswith("PIGMENT_") and k not in ("PIGMENT_PROBE", "PIGMENT_DATABASE_URL", "PIGMENT_BROKER_URL")}
    return Settings(**fields)


# -- Kubernetes ----------------------------------------------------------------------------------------------
def k8s_docs() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == files, "every manifest is in the kustomization and exists"
    return [d for f in files for d in yaml.safe_load_all((K8S / f).read_text()) if d]


@pytest.fixture(scope="module")
def k8s():
    docs = k8s_docs()
    config = next(d["data"] for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "pigment-config")
    pods = []
    for d in docs:
        if d["kind"] in ("Deployment", "Job"):
            spec = d["spec"]["template"]["spec"]
            for c in spec["containers"]:
                env = {**config, **{e["name"]: e["value"] for e in c.get("env", [])}}
                pods.append({"doc": d, "pod": spec, "c": c, "role": role_of(c["args"]), "env": env,
                             "settings": settings_for(env)})
    return {"docs": docs, "pods": pods, "by_kind": lambda k: [d for d in docs if d["kind"] == k]}


def test_k8s_every_container_has_a_role(k8s):
    assert all(p["role"] for p in k8s["pods"]), [p["c"]["args"] for p in k8s["pods"] if not p["role"]]
    assert {p["role"] for p in k8s["pods"]} == {"gateway", "render", "batch", "retrain", "beat", "migrate"}


def test_k8s_each_queue_has_a_consumer_and_each_pool_a_producer(k8s):
    produced = set()
    for p in k8s["pods"]:
        if p["role"] == "gateway":  # renders and batch chunks
            produced |= {worker_queue(p["settings"], "render"), worker_queue(p["settings"], "batch")}
        if p["role"] == "beat":  # the retrain schedule
            assert p["settings"].retrain_every_s > 0, "beat runs but schedules nothing"
            produced.add(worker_queue(p["settings"], "retrain"))
    consumed = {worker_queue(p["settings"], p["role"]) for p in k8s["pods"] if p["role"] in WORKER_ROLES}
    assert produced == consumed, f"no consumer: {produced - consumed}; no producer: {consumed - produced}"


def test_k8s_one_beat_and_migrations_once(k8s):
    beats = [p for p in k8s["pods"] if p["role"] == "beat"]
    assert len(beats) == 1 and beats[0]["doc"]["spec"]["replicas"] == 1
    assert beats[0]["doc"]["spec"]["strategy"]["type"] == "Recreate", "a rolling update would run two beats"
    scaled = {d["spec"]["scaleTargetRef"]["name"] for d in k8s["by_kind"]("HorizontalPodAutoscaler")
              + k8s["by_kind"]("ScaledObject")}
    assert beats[0]["doc"]["metadata"]["name"] not in scaled
    migrations = [p for p in k8s["pods"] if p["role"] == "migrate"]
    assert len(migrations) == 1 and migrations[0]["doc"]["kind"] == "Job"
    assert all("--no-migrate" in p["c"]["args"] for p in k8s["pods"] if p["role"] == "gateway")


def test_k8s_image_storage_is_shared(k8s):
    claims = {d["metadata"]["name"]: d for d in k8s["by_kind"]("PersistentVolumeClaim")}
    locations = set()
    for p in (p for p in k8s["pods"] if p["role"] in WRITERS_READERS):
        storage = str(p["settings"].storage_dir)
        if "://" in storage:  # an object store: shared by construction
            locations.add(storage)
            continue
        mount = next((m for m in p["c"]["volumeMounts"] if storage.startswith(m["mountPath"])), None)
        assert mount, f"{p['doc']['metadata']['name']}: {storage} is not on a mounted volume"
        volume = next(v for v in p["pod"]["volumes"] if v["name"] == mount["name"])
        claim = volume.get("persistentVolumeClaim", {}).get("claimName")
        assert claim, f"{p['doc']['metadata']['name']}: images on a pod-local volume"
        assert "ReadWriteMany" in claims[claim]["spec"]["accessModes"]
        locations.add((claim, storage))
    assert len(locations) == 1, f"writers and readers disagree on image storage: {locations}"


def test_k8s_probes_security_pdbs_gpu_and_autoscaling(k8s):
    pdb_selectors = [d["spec"]["selector"]["matchLabels"] for d in k8s["by_kind"]("PodDisruptionBudget")]
    for p in k8s["pods"]:
        name, c, pod = p["doc"]["metadata"]["name"], p["c"], p["pod"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], name
        assert "pigment-secrets" in json.dumps(c["envFrom"]), f"{name}: secrets come from the Secret"
        assert not any(k in p["env"] for k in ("PIGMENT_DATABASE_URL", "PIGMENT_BROKER_URL")), name
        if p["doc"]["kind"] == "Job":
            continue
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert probe in c, f"{name} lacks {probe}"
        if p["role"] != "beat":
            labels = p["doc"]["spec"]["template"]["metadata"]["labels"]
            assert any(sel.items() <= labels.items() for sel in pdb_selectors), f"{name} has no PDB"
        if p["role"] in ("gateway", "render", "batch"):  # a render in hand may take the full timeout
            assert pod["terminationGracePeriodSeconds"] >= p["settings"].render_timeout_s + 10, name
    gateway = next(p for p in k8s["pods"] if p["role"] == "gateway")
    assert "grpc" in gateway["c"]["readinessProbe"]
    render = next(p for p in k8s["pods"] if p["role"] == "render")
    assert render["c"]["resources"]["limits"]["nvidia.com/gpu"] == 1 and render["pod"]["tolerations"]
    assert render["settings"].render_device == "cuda" and render["c"]["image"] == "pigment-gpu"
    keda = {d["spec"]["scaleTargetRef"]["name"]: d for d in k8s["by_kind"]("ScaledObject")}
    trigger = keda[render["doc"]["metadata"]["name"]]["spec"]["triggers"][0]
    assert trigger["metadata"]["listName"] == render["settings"].render_queue
    hpa = {d["spec"]["scaleTargetRef"]["name"] for d in k8s["by_kind"]("HorizontalPodAutoscaler")}
    assert gateway["doc"]["metadata"]["name"] in hpa


# -- compose -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose():
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())  # anchors and merge keys resolved by PyYAML
    services = {}
    for name, svc in doc["services"].items():
        role = role_of(svc.get("command", []))
        if role:
            services[name] = {**svc, "role": role, "settings": settings_for(svc["environment"])}
    return doc, services


def test_compose_topology(compose):
    doc, services = compose
    roles = [s["role"] for s in services.values()]
    assert roles.count("beat") == 1 and roles.count("migrate") == 1
    gateway = next(s for s in services.values() if s["role"] == "gateway")
    produced = {worker_queue(gateway["settings"], "render"), worker_queue(gateway["settings"], "batch"),
                worker_queue(gateway["settings"], "retrain")}
    consumed = {worker_queue(s["settings"], s["role"]) for s in services.values() if s["role"] in WORKER_ROLES}
    assert produced == consumed
    assert "--no-migrate" in gateway["command"]
    shared = set()
    for name, s in services.items():
        if s["role"] in WRITERS_READERS:
            storage = str(s["settings"].storage_dir)
            volume = next(v for v in s["volumes"] if storage.startswith(v.split(":")[1]))
            assert volume.split(":")[0] in doc["volumes"], f"{name}: images on a container-local path"
            shared.add((volume.split(":")[0], storage))
        if s["role"] != "migrate":
            assert "healthcheck" in s, f"{name} has no healthcheck"
            assert s["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name
        assert "PIGMENT_PROBE" in s["environment"], name
    assert len(shared) == 1
    assert all(dep.get("condition") for s in doc["services"].values() for dep in
               (s.get("depends_on") or {}).values()), "depends_on without a health condition"


def test_dockerfiles_are_locked_non_root_and_checked():
    cpu, gpu = (DEPLOY / "Dockerfile").read_text(), (DEPLOY / "Dockerfile.gpu").read_text()
    for text in (cpu, gpu):
        assert "requirements.lock" in text and "--no-deps ." in text
        assert "USER 10001" in text and "HEALTHCHECK" in text
    assert '"torch==2.13.0+cpu"' in cpu and "whl/cpu" in cpu
    gpu_lock = (DEPLOY / "requirements-gpu.lock").read_text()
    assert "onnxruntime-gpu==" in gpu_lock and "grep -vE '^(torch|onnxruntime|faiss-cpu)=='" in gpu


def test_grafana_dashboard_queries_exported_metrics():
    from pigment.services.common import metrics

    exported = {m._name for m in vars(metrics).values() if hasattr(m, "_name") and hasattr(m, "_type")}
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "pigment.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for name in exported:
        assert name in exprs, f"metric {name} is on no panel"
    assert "user" not in exprs
