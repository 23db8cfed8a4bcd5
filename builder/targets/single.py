"""Deploy targets beyond one Compose host: one container (`single`, e.g. for
AutoDL) and Kubernetes. Pure: each returns file contents or argv as values."""

from __future__ import annotations

import shlex
from pathlib import PurePosixPath

from builder.render.blueprint import MODELS_DIR, OLLAMA_PORT, OLLAMA_PREFIX, Blueprint

AUTODL_DATA_DISK = "/root/autodl-tmp"
AUTODL_PORT = 6006


def _csv_field(text: str) -> str:
    """A field of `--mount`'s comma-separated value, quoted when it holds a comma."""
    return f'"{text}"' if "," in text or '"' in text else text


def single_mount(blueprint: Blueprint) -> str:
    opts = blueprint.compose["driver_opts"]
    if opts["type"] == "none":
        return f"type=bind,source={opts['device']},target={MODELS_DIR}"
    fields = [
        "type=volume",
        f"source={blueprint.config.project}_models",
        f"target={MODELS_DIR}",
        "volume-driver=local",
        f"volume-opt=type={opts['type']}",
        _csv_field(f"volume-opt=o={opts['o']}"),
        f"volume-opt=device={opts['device']}",
    ]
    return ",".join(fields)


def single_gpus(blueprint: Blueprint) -> list[str]:
    gpus = blueprint.config.gpus
    if gpus.kind == "none":
        return []
    if gpus.kind == "all":
        return ["--gpus", "all"]
    if gpus.kind == "count":
        return ["--gpus", str(gpus.count)]
    return ["--gpus", f'"device={",".join(gpus.ids)}"']


def single_argv(blueprint: Blueprint) -> list[str]:
    """The `docker run` that runs merge, create and serve in one container."""
    config = blueprint.config
    argv = ["docker", "run", "-d", "--name", config.project, "--restart", "unless-stopped"]
    for key, value in sorted(blueprint.compose["labels"].items()):
        argv += ["--label", f"{key}={value}"]
    argv += ["--label", "io.builder.role=all"]
    argv += ["--publish", f"{config.serve.bind}:{config.serve.port}:{OLLAMA_PORT}" if ":" not in config.serve.bind
             else f"[{config.serve.bind}]:{config.serve.port}:{OLLAMA_PORT}"]
    argv += ["--mount", single_mount(blueprint)]
    argv += ["--health-cmd", "python3 -m supervisor health", "--health-interval", "10s",
             "--health-timeout", "5s", "--health-retries", "3", "--health-start-period", "30s"]
    argv += single_gpus(blueprint)
    for name, value in blueprint.compose["serve_env"].items():
        argv += ["--env", f"{name}={value}"]
    argv += [blueprint.image, "all"]
    return argv


def render_single(blueprint: Blueprint, env) -> dict[str, bytes]:
    from builder import __version__
    from builder.render.blueprint import LLAMA_CPP_BIN, OLLAMA_STORE, SUPERVISOR_HOME

    run = env.get_template("targets/single/run.sh.j2").render(
        builder_version=__version__, name=blueprint.config.project, argv=single_argv(blueprint)
    )
    shards_folder = str(PurePosixPath(blueprint.config.model.shards.folder)) if blueprint.config.model.shards.folder else "."
    autodl_env = [
        ("OLLAMA_HOST", f"0.0.0.0:{AUTODL_PORT}"),
        ("OLLAMA_MODELS", OLLAMA_STORE),
        ("LD_LIBRARY_PATH", LLAMA_CPP_BIN),
        ("PYTHONPATH", SUPERVISOR_HOME),
        ("PYTHONDONTWRITEBYTECODE", "1"),
        *blueprint.compose["serve_env"].items(),
    ]
    autodl = env.get_template("targets/single/autodl.sh.j2").render(
        builder_version=__version__,
        data_disk=AUTODL_DATA_DISK,
        shards_folder=shards_folder,
        port=AUTODL_PORT,
        ollama_prefix=OLLAMA_PREFIX,
        models_dir=MODELS_DIR,
        env=autodl_env,
        log=f"{AUTODL_DATA_DISK}/builder-serve.log",
    )
    return {"single/run.sh": run.encode(), "single/autodl.sh": autodl.encode()}


def sh(value) -> str:
    return shlex.quote(str(value))


def sh_join(argv: list[str]) -> str:
    """Quoted for the shell, one option (with its value) per line."""
    lines: list[list[str]] = []
    for index, arg in enumerate(argv):
        if index == 0 or (arg.startswith("-") and index > 2):
            lines.append([])
        lines[-1].append(shlex.quote(arg))
    return " \\\n  ".join(" ".join(line) for line in lines)


K8S_GPU = "nvidia.com/gpu"


def kubernetes_gpu_count(blueprint: Blueprint) -> tuple[int, str | None]:
    """GPUs per pod, and a note when the config's wish cannot be said exactly."""
    gpus = blueprint.config.gpus
    if gpus.kind == "none":
        return 0, None
    if gpus.kind == "count":
        return gpus.count, None
    if gpus.kind == "ids":
        return len(gpus.ids), f"gpus: Kubernetes picks the devices; asking for {len(gpus.ids)} GPU(s), not ids {', '.join(gpus.ids)}"
    return 1, "gpus: all has no Kubernetes equivalent; asking for 1 GPU per pod (set gpus to a count)"


def kubernetes_manifests(blueprint: Blueprint) -> tuple[dict[str, list[dict]], list[str]]:
    """The manifests, by file, and notes on what could not be said exactly."""
    config = blueprint.config
    k8s = config.kubernetes
    name = config.project.replace("_", "-")
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/managed-by": "builder"}
    meta = {"name": name, "labels": dict(labels)}
    if k8s.namespace:
        meta["namespace"] = k8s.namespace
    notes: list[str] = []
    mount = [{"name": "models", "mountPath": MODELS_DIR}]
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
    gpu_count, note = kubernetes_gpu_count(blueprint)
    if note:
        notes.append(note)

    def step(role: str) -> dict:
        return {"name": role, "image": blueprint.image, "args": [role], "volumeMounts": mount}

    probe = {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 10, "timeoutSeconds": 5}
    serve = {
        "name": "serve",
        "image": blueprint.image,
        "args": ["serve"],
        "ports": [{"name": "http", "containerPort": OLLAMA_PORT, "protocol": "TCP"}],
        "env": [{"name": k, "value": v} for k, v in blueprint.compose["serve_env"].items()],
        "readinessProbe": dict(probe, failureThreshold=3),
        "livenessProbe": dict(probe, initialDelaySeconds=30, failureThreshold=6),
        "volumeMounts": [dict(mount[0], readOnly=True)],
    }
    if not serve["env"]:
        del serve["env"]
    if gpu_count:
        serve["resources"] = {"limits": {K8S_GPU: gpu_count}}
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
                    # Init containers run in order, to completion: merge, then create.
                    # Pods sharing the export take a lock on it, so only one merges.
                    "initContainers": [step("merge"), step("create")],
                    "containers": [serve],
                    "volumes": [volume],
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
    files = {"kubernetes/deployment.yaml": [deployment], "kubernetes/service.yaml": [service]}
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
        out[name] = (header + body).encode()
    readme = ["# Kubernetes manifests rendered by builder", "", "Apply: kubectl apply -f kubernetes/", ""]
    readme += [f"- {note}" for note in notes]
    out["kubernetes/NOTES.md"] = ("\n".join(readme).rstrip() + "\n").encode()
    return out
