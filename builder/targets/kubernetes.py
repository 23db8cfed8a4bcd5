"""The `kubernetes` target: manifests for `kubectl apply` (an NFS
PersistentVolume and claim, a Deployment whose pod runs merge and create as
init containers and serve with GPU limits and probes, a ClusterIP Service).
builder renders them; the cluster runs them."""

from __future__ import annotations

from pathlib import Path

import copy
import dataclasses

from builder.render.blueprint import KEYS_FILE_NAME, MODEL_CACHE_DIR, MODELS_DIR, OLLAMA_INTERNAL_PORT, OLLAMA_PORT, Blueprint, gate_env

from builder.errors import ConfigError, Problem
from builder.targets.base import Declined, Target


K8S_GPU = "nvidia.com/gpu"
K8S_KEYS_DIR = "/run/builder-keys"  # the keys Secret, as a folder: the kubelet swaps it in place when the Secret changes

STARTUP_CHECKS = 30  # ollama serve answers within 5 minutes of the container's start

def kubernetes_gpu_count(blueprint: Blueprint) -> tuple[int, str | None]:
    """GPUs per pod: the count num_gpu was planned for, and a note when the
    config's wish cannot be said exactly. `gpus: all` means the GPUs in
    plan.gpu_memory_gib; without it there is no number to ask for (render
    stays pure: no nvidia-smi), so it is refused."""
    config = blueprint.config
    gpus = config.gpus
    if gpus.kind == "none":
        return 0, None
    if gpus.kind == "count":
        return gpus.count, None
    if gpus.kind == "ids":
        return len(gpus.ids), f"gpus: Kubernetes picks the devices; asking for {len(gpus.ids)} GPU(s), not ids {', '.join(gpus.ids)}"
    if config.plan.gpu_memory_gib:
        count = len(config.plan.gpu_memory_gib)
        return count, f"gpus: all: asking for the {count} GPU(s) of plan.gpu_memory_gib, which num_gpu was planned for"
    raise ConfigError(Problem(
        "gpus", "all has no Kubernetes equivalent: a pod asks for a number of GPUs; set gpus: N (the GPUs num_gpu was planned for)",
        None, config.source,
    ))

# The init containers, sized by their work (the page cache they stream
# through is charged to them but reclaimed, never a reason to kill):
STEP_RESOURCES = {
    # builder's join streams the shards through four 16 MiB buffers and hashes on a second core
    "merge": {"requests": {"cpu": "1", "memory": "256Mi"}, "limits": {"cpu": "2", "memory": "1Gi"}},
    # llama-gguf-split holds one buffer the size of the largest tensor (about 2 GiB for R1)
    "merge-gguf-split": {"requests": {"cpu": "1", "memory": "3Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}},
    # ollama 0.5.7 registers a hard-linked blob: a private ollama serve and one API call
    "create": {"requests": {"cpu": "500m", "memory": "256Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
    # ollama 0.30+ rewrites the shards with llama-quantize, one tensor at a time
    "create-rewrite": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}},
}
STEP_REASONS = (
    "init containers sized by their work: merge streams the shards through 64 MiB of buffers (1Gi;",
    "4Gi with merge_tool llama-gguf-split, which holds the largest tensor); create registers a",
    "hard-linked blob with a private ollama (1Gi; 4Gi for ollama 0.30+'s tensor-by-tensor rewrite)",
)


def step_kind(config, role: str) -> str:
    """Which STEP_RESOURCES entry an init container gets."""
    from builder.supervisor.common import CURRENT

    if role == "merge":
        return "merge-gguf-split" if config.model.merge_tool == "llama-gguf-split" else "merge"
    return "create-rewrite" if config.ollama_generation == CURRENT else "create"


def kubernetes_manifests(blueprint: Blueprint) -> tuple[dict[str, list[dict]], list[str]]:
    """The manifests, by file, and notes on what could not be said exactly."""
    config = blueprint.config
    k8s = config.kubernetes
    name = config.project.replace("_", "-")
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/managed-by": "builder"}
    # Never the default namespace: the configured one, else one of its own.
    namespace = k8s.namespace or name
    meta = {"name": name, "labels": dict(labels), "namespace": namespace}
    notes: list[str] = []
    # The memory limit must hold the part of the model that stays off the GPUs:
    # derived from the plan when the shards could be read (the preflight), else 256Gi.
    memory_limit = blueprint.k8s_memory_limit or (k8s.memory_limit if k8s.memory_limit != "auto" else "256Gi")
    if blueprint.k8s_memory_limit and k8s.memory_limit == "auto":
        memory_note = (f"serve's memory limit is {memory_limit}: the RAM `builder plan` says the part of the model off the GPUs needs, "
                       "plus 2 GiB (kubernetes.memory_limit: auto)")
    elif k8s.memory_limit == "auto":
        memory_note = ("serve's memory limit is 256Gi: the shards could not be read here to derive it; mount them and set "
                       "plan.shards_dir, or set kubernetes.memory_limit above what `builder plan` says stays off the GPUs")
    else:
        memory_note = (f"serve's memory limit is {memory_limit} (kubernetes.memory_limit): keep it above the part of the model "
                       "that stays off the GPUs, which `builder plan` shows")
    mount = [{"name": "models", "mountPath": MODELS_DIR}]
    scratch = {"name": "tmp", "mountPath": "/tmp"}  # the only writable path besides the model volume
    storage_docs: list[dict] = []
    storage = config.storage
    if storage.kind == "local":
        volume = {"name": "models", "hostPath": {"path": storage.path, "type": "Directory"}}
        notes.append("storage.local becomes a hostPath volume: every pod must run on a node that has the folder")
    else:
        claim = {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": k8s.storage_size}}}
        if k8s.storage_class:
            claim["storageClassName"] = k8s.storage_class
        else:
            pv = {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": f"{name}-models", "labels": dict(labels)},
                "spec": {
                    "capacity": {"storage": k8s.storage_size},
                    "accessModes": ["ReadWriteMany"],
                    "persistentVolumeReclaimPolicy": "Retain",
                    "storageClassName": "",
                    "mountOptions": [o for o in storage.options.split(",") if o],
                    "nfs": {"server": storage.server, "path": storage.export},
                },
            }
            storage_docs.append(pv)
            claim["storageClassName"] = ""
            claim["volumeName"] = f"{name}-models"
        pvc_meta = dict(meta, name=f"{name}-models")
        storage_docs.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": pvc_meta, "spec": claim})
        volume = {"name": "models", "persistentVolumeClaim": {"claimName": f"{name}-models"}}
    cache_volumes: list[dict] = []
    if storage.model_cache:  # the node's own disk: merge and create write there, the model volume is only read
        mount = [dict(mount[0], readOnly=True), {"name": "cache", "mountPath": MODEL_CACHE_DIR}]
        cache_volumes = [{"name": "cache", "hostPath": {"path": storage.model_cache, "type": "Directory"}}]
        notes.append(f"storage.model_cache becomes a hostPath volume: on every node that may run the pod, "
                     f"`mkdir -p {storage.model_cache} && chown {config.uid}:{config.gid} {storage.model_cache}` on its local disk; "
                     "each node fills it from the model volume once")
    gpu_count, note = kubernetes_gpu_count(blueprint)
    if note:
        notes.append(note)

    # Least privilege on every container (CIS Kubernetes Benchmark, checkov).
    hardened = {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    def step(role: str) -> dict:
        container = {"name": role, "image": blueprint.image, "imagePullPolicy": "IfNotPresent", "args": [role],
                     "securityContext": dict(hardened), "resources": copy.deepcopy(STEP_RESOURCES[step_kind(config, role)]),
                     "volumeMounts": [*mount, scratch]}
        # create: num_gpu planned for plan.gpu_memory_gib's GPUs; both: the model cache
        env = blueprint.compose["create_env"] if role == "create" else blueprint.compose["cache_env"]
        if env:
            container["env"] = [{"name": k, "value": v} for k, v in env.items()]
        return container

    # Ready means the model answers: the supervisor's warm-up loaded it
    # (health --loaded). Started and alive mean ollama answers. The load has
    # no budget here: ollama's load timeout is a stall timer (a 158 GB load
    # from a 1 GbE share takes 24 minutes and is fine while it progresses);
    # a load ollama gave up on leaves the pod not ready, its cause in the log.
    loaded = {"exec": {"command": ["python3", "-m", "supervisor", "health", "--loaded"]}, "periodSeconds": 10, "timeoutSeconds": 10}
    alive = {"exec": {"command": ["python3", "-m", "supervisor", "health"]}, "periodSeconds": 10, "timeoutSeconds": 5}
    if gpu_count and config.plan.gpu_memory_gib:
        memory = " + ".join(f"{g:g}" for g in config.plan.gpu_memory_gib)
        notes.append(f"num_gpu was planned for {gpu_count} GPU(s) of {memory} GiB: schedule the pod on nodes with such GPUs"
                     + ("" if k8s.gpu_product else " (kubernetes.gpu_product selects them by nvidia.com/gpu.product)"))
    serve = {
        "name": "serve",
        "image": blueprint.image,
        "imagePullPolicy": "IfNotPresent",  # air-gapped clusters load the image, they do not pull it
        "args": ["serve"],
        "ports": [{"name": "http", "containerPort": OLLAMA_PORT, "protocol": "TCP"}],
        # Always keys: a Service is reachable from other pods. The gate reads
        # them from a Secret you create (NOTES.md says how): never in a manifest.
        "env": [{"name": k, "value": v} for k, v in {
            **{k: v for k, v in blueprint.compose["serve_env"].items() if k != "BUILDER_GATE"},
            **gate_env(dataclasses.replace(config, serve=dataclasses.replace(config.serve, auth="keys")),
                       f"0.0.0.0:{OLLAMA_PORT}", OLLAMA_INTERNAL_PORT, f"{K8S_KEYS_DIR}/{KEYS_FILE_NAME}"),
        }.items()],
        "startupProbe": dict(alive, failureThreshold=STARTUP_CHECKS),
        "readinessProbe": dict(loaded, failureThreshold=3),
        "livenessProbe": dict(alive, failureThreshold=6),
        "securityContext": dict(hardened),
        # The memory limit must hold the part of the model that stays off the
        # GPUs (`builder plan`): ollama reads /proc/meminfo, which shows the
        # node, so a smaller cgroup limit is an OOM kill after ollama's own check passed.
        "resources": {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"cpu": k8s.cpu_limit, "memory": memory_limit}},
        "volumeMounts": [*(dict(m, readOnly=True) for m in mount), scratch, {"name": "keys", "mountPath": K8S_KEYS_DIR, "readOnly": True}],
    }
    keys_secret = f"{name}-keys"
    notes.append(f"API keys: every request needs Authorization: Bearer KEY. Create the Secret before applying: "
                 f"`builder keys add NAME` (or `python3 -m supervisor.keys --file FILE add NAME`), then "
                 f"`kubectl -n {namespace} create secret generic {keys_secret} --from-file={KEYS_FILE_NAME}=FILE`; "
                 f"edit the Secret to add or revoke keys: the gate rereads it without a restart")
    if not serve["env"]:
        del serve["env"]
    if gpu_count:
        serve["resources"]["limits"][K8S_GPU] = gpu_count
    notes.append(memory_note)
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": k8s.replicas,
            "strategy": {"type": "Recreate"},  # a rolling update would need twice the GPUs
            "selector": {"matchLabels": dict(labels)},
            "template": {
                "metadata": {"labels": dict(labels)},
                "spec": {
                    "automountServiceAccountToken": False,  # the pod never talks to the API server
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": config.uid,
                        "runAsGroup": config.gid,
                        "fsGroup": config.gid,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    # Init containers run in order, to completion: merge, then create.
                    # Pods sharing the export take a lock on it, so only one merges.
                    "initContainers": [step("merge"), step("create")],
                    "containers": [serve],
                    "volumes": [volume, *cache_volumes, {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}},
                                # 0440, group fsGroup: the gate (runAsUser) reads it through its group.
                                {"name": "keys", "secret": {"secretName": keys_secret, "defaultMode": 0o440,
                                                            "items": [{"key": KEYS_FILE_NAME, "path": KEYS_FILE_NAME}]}}],
                    **({"nodeSelector": {"nvidia.com/gpu.product": k8s.gpu_product}} if k8s.gpu_product else {}),
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "type": "ClusterIP",  # ollama has no authentication: expose it through your own ingress
            "selector": dict(labels),
            "ports": [{"name": "http", "port": OLLAMA_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }
    # Only the API port is reachable, and only from inside the cluster's network.
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": meta,
        "spec": {
            "podSelector": {"matchLabels": dict(labels)},
            "policyTypes": ["Ingress"],
            # Only pods of this namespace, and of the namespaces the config names.
            "ingress": [{
                "from": [{"podSelector": {}}] + [
                    {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": other}}} for other in k8s.allow_from_namespaces],
                "ports": [{"protocol": "TCP", "port": OLLAMA_PORT}],
            }],
        },
    }
    files = {"kubernetes/deployment.yaml": [deployment], "kubernetes/service.yaml": [service], "kubernetes/networkpolicy.yaml": [policy]}
    if not k8s.namespace:
        files["kubernetes/namespace.yaml"] = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "labels": dict(labels)}}]
    if storage_docs:
        files["kubernetes/storage.yaml"] = storage_docs
    return files, notes

def render_kubernetes(blueprint: Blueprint) -> dict[str, bytes]:
    import yaml

    from builder import __version__

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data) -> bool:  # plain copies read better than &id001 anchors
            return True

    files, notes = kubernetes_manifests(blueprint)
    out = {}
    header = f"# Rendered by builder {__version__}; change the config and run `builder render --target kubernetes` again.\n"
    for name, docs in files.items():
        body = "---\n".join(yaml.dump(doc, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=1 << 16) for doc in docs)
        if "\n      initContainers:\n" in body:  # the reason for the init containers' sizes, where a reader meets them
            body = body.replace("\n      initContainers:\n", "\n" + "".join(f"      # {line}\n" for line in STEP_REASONS) + "      initContainers:\n", 1)
        out[name] = (header + body).encode()
    readme = ["# Kubernetes manifests rendered by builder", "", "Apply: kubectl apply -f kubernetes/", ""]
    readme += [f"- {note}" for note in notes]
    out["kubernetes/NOTES.md"] = ("\n".join(readme).rstrip() + "\n").encode()
    return out


class KubernetesTarget(Target):
    """Rendering only: the cluster is kubectl's to drive."""

    name = "kubernetes"
    deploys = False
    KUBECTL = "render the manifests (`builder render --target kubernetes`) and use kubectl: {}"

    def render(self, blueprint: Blueprint, env) -> dict[str, bytes]:
        return render_kubernetes(blueprint)

    def up(self, blueprint: Blueprint, context: Path, engine, echo):
        raise Declined(self.KUBECTL.format("kubectl apply -f context/kubernetes/"))

    def down(self, project: str, engine, volumes: bool, config=None) -> None:
        raise Declined(self.KUBECTL.format("kubectl delete -f context/kubernetes/"))

    def status(self, blueprint: Blueprint, engine, lock_sha256: str | None) -> dict:
        raise Declined(self.KUBECTL.format("kubectl get pods,svc -l app.kubernetes.io/managed-by=builder"))

    def logs(self, project: str, engine, service: str | None, follow: bool, tail: str, config=None) -> None:
        raise Declined(self.KUBECTL.format(f"kubectl logs deploy/{project.replace('_', '-')} -c {service or 'serve'}"))


TARGET = KubernetesTarget()
