#!/usr/bin/env python3
"""Static checks of Cairn's Kubernetes manifests and container image recipe.

Every manifest is validated against the JSON schemas of one Kubernetes
release (KUBERNETES_VERSION, passed explicitly to kubernetes-validate), and
the files are checked against each other and against the Rust sources: the
CSI driver name, the StorageClass parameters the controller accepts, ports,
socket paths, service accounts, the pool configuration, and the binaries the
Dockerfile ships. The expected values are read from the files; nothing here
restates them.

Run with `manifests/test/run.sh` (sets up a venv), with pytest, or with plain
`python3 manifests/test/validate.py` where kubernetes-validate is installed.
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
import traceback
from pathlib import Path
from urllib.parse import urlparse

import yaml

try:
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError, ValidationError
except ImportError:  # reported by test_schemas
    kubernetes_validate = None

# The Kubernetes release whose API schemas the manifests must satisfy.
KUBERNETES_VERSION = os.environ.get("CAIRN_KUBERNETES_VERSION", "1.37.0")

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
DEPLOY = MANIFESTS / "deploy"
EXAMPLES = MANIFESTS / "examples"

WORKLOAD_KINDS = ("Deployment", "DaemonSet", "StatefulSet", "Pod")


class Skip(Exception):
    """A check that does not apply to this tree (yet)."""


def skip(reason: str) -> None:
    if "pytest" in sys.modules:
        import pytest

        pytest.skip(reason)
    raise Skip(reason)


def check(errors: list[str]) -> None:
    if errors:
        raise AssertionError("\n".join(errors))


# ---------------------------------------------------------------- loading


class Doc:
    def __init__(self, path: Path, obj: dict):
        self.path = path
        self.obj = obj

    @property
    def kind(self) -> str:
        return self.obj.get("kind", "")

    @property
    def name(self) -> str:
        return self.obj.get("metadata", {}).get("name", "")

    @property
    def namespace(self) -> str | None:
        return self.obj.get("metadata", {}).get("namespace")

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}: {self.kind}/{self.name}"


def load_docs(paths) -> list[Doc]:
    docs = []
    for path in paths:
        with open(path) as f:
            for obj in yaml.safe_load_all(f):
                if obj:
                    docs.append(Doc(path, obj))
    return docs


def deploy_files() -> list[Path]:
    return sorted(p for p in DEPLOY.iterdir() if p.suffix in (".yaml", ".yml"))


def example_files() -> list[Path]:
    return sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".yaml", ".yml"))


_CACHE: dict = {}


def deploy_docs() -> list[Doc]:
    if "deploy" not in _CACHE:
        _CACHE["deploy"] = load_docs(deploy_files())
    return _CACHE["deploy"]


def example_docs() -> list[Doc]:
    if "examples" not in _CACHE:
        _CACHE["examples"] = load_docs(example_files())
    return _CACHE["examples"]


def all_docs() -> list[Doc]:
    return deploy_docs() + example_docs()


def of_kind(kind: str, docs=None) -> list[Doc]:
    return [d for d in (docs if docs is not None else deploy_docs()) if d.kind == kind]


def one(kind: str, name: str | None = None, docs=None) -> Doc:
    found = [d for d in of_kind(kind, docs) if name is None or d.name == name]
    assert len(found) == 1, f"expected one {kind}{'/' + name if name else ''}, found {len(found)}"
    return found[0]


def pod_spec(doc: Doc) -> dict:
    if doc.kind == "Pod":
        return doc.obj["spec"]
    return doc.obj["spec"]["template"]["spec"]


def pod_labels(doc: Doc) -> dict:
    if doc.kind == "Pod":
        return doc.obj["metadata"].get("labels", {})
    return doc.obj["spec"]["template"]["metadata"].get("labels", {})


def workloads(docs=None) -> list[Doc]:
    return [d for d in (docs if docs is not None else deploy_docs()) if d.kind in WORKLOAD_KINDS]


def containers(spec: dict, init: bool = True) -> list[dict]:
    out = list(spec.get("containers", []))
    if init:
        out += spec.get("initContainers", [])
    return out


def container(spec: dict, name: str) -> dict:
    found = [c for c in containers(spec) if c["name"] == name]
    assert len(found) == 1, f"expected one container {name}, found {len(found)}"
    return found[0]


def flags(c: dict) -> dict[str, str | bool]:
    """Parses `--flag value` and `--flag=value` arguments of a container."""
    out: dict[str, str | bool] = {}
    tokens = [str(t) for t in c.get("args", [])]
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if t.startswith("--"):
            if "=" in t:
                k, v = t[2:].split("=", 1)
                out[k] = v
            elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                out[t[2:]] = tokens[i + 1]
                i += 1
            else:
                out[t[2:]] = True
        i += 1
    return out


def listen_port(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


def url_port(url: str) -> int:
    port = urlparse(url).port
    assert port is not None, f"{url} names no port"
    return port


def named_port(spec: dict, port) -> int:
    """Resolves a probe or Service target port (number or name) in a pod."""
    if isinstance(port, int):
        return port
    for c in containers(spec):
        for p in c.get("ports", []):
            if p.get("name") == port:
                return p["containerPort"]
    raise AssertionError(f"no container port named {port!r}")


def volume(spec: dict, name: str) -> dict:
    found = [v for v in spec.get("volumes", []) if v["name"] == name]
    assert len(found) == 1, f"expected one volume {name}, found {len(found)}"
    return found[0]


def mount_at(spec: dict, c: dict, path: str) -> tuple[dict, dict] | None:
    """The volume mount (and its volume) a container has at `path`."""
    for m in c.get("volumeMounts", []):
        if m["mountPath"].rstrip("/") == path.rstrip("/"):
            return m, volume(spec, m["name"])
    return None


# ------------------------------------------------------- repository facts


def rust_string_const(path: Path, name: str) -> str:
    text = path.read_text()
    m = re.search(r"pub\s+const\s+" + name + r"\s*:\s*&(?:'static\s+)?str\s*=\s*\"([^\"]*)\"\s*;", text)
    assert m, f"{path.relative_to(ROOT)} defines no `pub const {name}: &str`"
    return m.group(1)


def rust_str_slice_const(path: Path, name: str) -> list[str]:
    text = path.read_text()
    m = re.search(r"pub\s+const\s+" + name + r"\s*:\s*&\[\s*&(?:'static\s+)?str\s*\]\s*=\s*&\[(.*?)\]\s*;", text, re.S)
    assert m, f"{path.relative_to(ROOT)} defines no `pub const {name}: &[&str]`"
    body = re.sub(r"//[^\n]*", "", m.group(1))
    return re.findall(r"\"([^\"]*)\"", body)


def driver_name() -> str:
    return rust_string_const(ROOT / "csi" / "src" / "lib.rs", "DRIVER_NAME")


def accepted_parameters() -> list[str]:
    return rust_str_slice_const(ROOT / "csi" / "src" / "params.rs", "PARAMETERS")


def workspace() -> dict:
    with open(ROOT / "Cargo.toml", "rb") as f:
        return tomllib.load(f)


def workspace_version() -> str:
    return workspace()["workspace"]["package"]["version"]


def workspace_binaries() -> dict[str, Path]:
    """Binary name -> directory of the crate that builds it."""
    bins: dict[str, Path] = {}
    for member in workspace()["workspace"].get("members", []):
        crate = ROOT / member
        manifest = crate / "Cargo.toml"
        if not manifest.exists():
            continue
        with open(manifest, "rb") as f:
            cargo = tomllib.load(f)
        package = cargo.get("package", {}).get("name")
        for b in cargo.get("bin", []):
            bins[b["name"]] = crate
        autobins = cargo.get("package", {}).get("autobins", True)
        if autobins and package and (crate / "src" / "main.rs").exists():
            bins.setdefault(package, crate)
        if autobins and (crate / "src" / "bin").is_dir():
            for p in (crate / "src" / "bin").iterdir():
                if p.suffix == ".rs":
                    bins.setdefault(p.stem, crate)
                elif (p / "main.rs").exists():
                    bins.setdefault(p.name, crate)
    return bins


def cairn_image_name() -> str:
    kust = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    images = kust.get("images", [])
    assert len(images) == 1, "kustomization.yaml should name exactly one image (Cairn's)"
    return images[0]["name"]


def image_repo(image: str) -> str:
    last = image.rsplit("/", 1)[-1]
    return image.rsplit(":", 1)[0] if ":" in last else image


def image_tag(image: str) -> str | None:
    last = image.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


def cairn_containers(docs=None) -> list[tuple[Doc, dict, dict]]:
    """(workload, pod spec, container) for every container of Cairn's image."""
    name = cairn_image_name()
    out = []
    for w in workloads(docs):
        spec = pod_spec(w)
        for c in containers(spec):
            if image_repo(c["image"]) == name:
                out.append((w, spec, c))
    return out


def cairn_binary_container(binary: str, mode: str | None = None) -> tuple[Doc, dict, dict]:
    found = [
        (w, s, c)
        for (w, s, c) in cairn_containers()
        if c.get("command", [None])[0] == binary and (mode is None or flags(c).get("mode") == mode)
    ]
    assert len(found) == 1, f"expected one container running {binary} {mode or ''}, found {len(found)}"
    return found[0]


def sidecar(spec: dict, image_suffix: str) -> dict:
    found = [c for c in containers(spec) if image_repo(c["image"]).endswith("/" + image_suffix)]
    assert len(found) == 1, f"expected one {image_suffix} container, found {len(found)}"
    return found[0]


class Dockerfile:
    def __init__(self, path: Path):
        text = path.read_text()
        # Join continuation lines, drop comments.
        lines = []
        for raw in text.replace("\\\n", " ").splitlines():
            s = raw.strip()
            if s and not s.startswith("#"):
                lines.append(s)
        self.stages: list[dict] = []
        for line in lines:
            instr, _, rest = line.partition(" ")
            instr = instr.upper()
            if instr == "FROM":
                m = re.match(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
                assert m, f"cannot parse FROM {rest}"
                self.stages.append({"image": m.group(1), "name": m.group(2), "ins": []})
            elif self.stages:
                self.stages[-1]["ins"].append((instr, rest.strip()))

    def stage(self, name: str) -> dict:
        for s in self.stages:
            if s["name"] == name:
                return s
        raise AssertionError(f"Dockerfile has no stage named {name}")


# ---------------------------------------------------------------- checks


def test_schemas():
    """Every manifest is a valid object of the pinned Kubernetes release."""
    assert kubernetes_validate is not None, "kubernetes-validate is not installed (use manifests/test/run.sh)"
    errors = []
    docs = all_docs()
    assert docs, "no manifests found"
    for d in docs:
        try:
            kubernetes_validate.validate(d.obj, KUBERNETES_VERSION, strict=True)
        except ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            errors.append(f"{d.where()}: {path}: {e.message}")
        except SchemaNotFoundError as e:
            errors.append(f"{d.where()}: {e.message}")
    check(errors)


def test_kustomization_matches_deploy_dir():
    """`apply -k manifests/` and `apply -f manifests/deploy/` install the same objects."""
    kust = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    listed = [MANIFESTS / r for r in kust.get("resources", [])]
    errors = [f"kustomization.yaml lists missing {p}" for p in listed if not p.exists()]
    if sorted(listed) != deploy_files():
        errors.append(
            "kustomization.yaml resources differ from manifests/deploy/: "
            f"{sorted(str(p.relative_to(MANIFESTS)) for p in set(listed) ^ set(deploy_files()))}"
        )
    # The Namespace must come first for `apply -f` (files apply in name order).
    first = load_docs([deploy_files()[0]])
    if not first or any(d.kind != "Namespace" for d in first):
        errors.append(f"{deploy_files()[0].name} (applied first) should hold only the Namespace")
    check(errors)


def test_namespaces():
    """Namespaced objects all live in the one namespace the manifests create."""
    ns = one("Namespace").name
    errors = []
    cluster_scoped = {"Namespace", "CSIDriver", "StorageClass", "ClusterRole", "ClusterRoleBinding"}
    for d in deploy_docs():
        if d.kind in cluster_scoped:
            if d.namespace is not None:
                errors.append(f"{d.where()}: cluster-scoped object has a namespace")
        elif d.namespace != ns:
            errors.append(f"{d.where()}: namespace {d.namespace!r}, expected {ns!r}")
    for d in of_kind("ClusterRoleBinding") + of_kind("RoleBinding"):
        for s in d.obj.get("subjects", []):
            if s.get("kind") == "ServiceAccount" and s.get("namespace") != ns:
                errors.append(f"{d.where()}: subject {s['name']} in namespace {s.get('namespace')!r}")
    check(errors)


def test_driver_name_agrees():
    """CSIDriver, StorageClasses and kubelet paths use the driver's DRIVER_NAME."""
    name = driver_name()
    errors = []
    drivers = of_kind("CSIDriver")
    if [d.name for d in drivers] != [name]:
        errors.append(f"CSIDriver objects {[d.name for d in drivers]}, expected [{name!r}]")
    scs = of_kind("StorageClass")
    if not scs:
        errors.append("no StorageClass")
    for sc in scs:
        if sc.obj.get("provisioner") != name:
            errors.append(f"{sc.where()}: provisioner {sc.obj.get('provisioner')!r}, expected {name!r}")
    w, spec, c = cairn_binary_container("cairn-csi", "node")
    reg = flags(sidecar(spec, "csi-node-driver-registrar")).get("kubelet-registration-path", "")
    if f"/plugins/{name}/" not in str(reg):
        errors.append(f"{w.where()}: kubelet registration path {reg!r} is not under plugins/{name}/")
    check(errors)


def test_csidriver_spec():
    d = one("CSIDriver")
    spec = d.obj["spec"]
    errors = []
    if spec.get("attachRequired") is not True:
        errors.append("attachRequired must be true (ControllerPublishVolume builds the nexus)")
    if "podInfoOnMount" not in spec:
        errors.append("podInfoOnMount is not set")
    if "fsGroupPolicy" not in spec:
        errors.append("fsGroupPolicy is not set")
    check(errors)


def _validate_param(key: str, value: str) -> str | None:
    if key == "repl":
        return None if value.isdigit() and 1 <= int(value) <= 3 else "must be 1..3"
    if key == "protocol":
        return None if value == "nvmf" else "must be nvmf"
    if key == "thin":
        return None if value in ("true", "false") else "must be true or false"
    if key == "fsType":
        return None if value in ("ext4", "xfs") else "must be ext4 or xfs"
    if key in ("ctrlLossTmo", "reconnectDelay", "keepAliveTmo", "nrIoQueues"):
        return None if value.isdigit() and int(value) > 0 else "must be a positive integer"
    return None


def test_storageclass_parameters():
    """Every StorageClass parameter is one the controller accepts, with a valid value."""
    accepted = accepted_parameters()
    assert accepted, "csi/src/params.rs PARAMETERS is empty"
    errors = []
    for sc in of_kind("StorageClass"):
        params = sc.obj.get("parameters", {})
        for k, v in params.items():
            if k not in accepted:
                errors.append(f"{sc.where()}: parameter {k!r} is not in csi/src/params.rs PARAMETERS {accepted}")
            elif not isinstance(v, str):
                errors.append(f"{sc.where()}: parameter {k} is not a string")
            elif (why := _validate_param(k, v)) is not None:
                errors.append(f"{sc.where()}: {k}={v!r} {why}")
        if sc.obj.get("allowVolumeExpansion") is not True:
            errors.append(f"{sc.where()}: allowVolumeExpansion is not true")
        if "repl" not in params:
            errors.append(f"{sc.where()}: no repl parameter")
    check(errors)


def test_storageclass_set():
    """The advertised classes exist: 1, 2 and 3 replicas, thin, and xfs."""
    scs = {sc.name: sc.obj.get("parameters", {}) for sc in of_kind("StorageClass")}
    errors = []
    if scs.get("cairn-nvmf", {}).get("repl") != "1":
        errors.append("cairn-nvmf must exist with repl 1")
    if scs.get("cairn-nvmf-mirror", {}).get("repl") != "2":
        errors.append("cairn-nvmf-mirror must exist with repl 2")
    if not any(p.get("repl") == "3" for p in scs.values()):
        errors.append("no StorageClass with 3 replicas")
    if not any(p.get("thin") == "true" for p in scs.values()):
        errors.append("no thin StorageClass")
    if not any(p.get("fsType") == "xfs" for p in scs.values()):
        errors.append("no xfs StorageClass")
    check(errors)


def test_engine_agent_ports():
    """The agent reaches its engine, and the engine's ports are declared."""
    _, espec, engine = cairn_binary_container("cairn-engine")
    _, aspec, agent = cairn_binary_container("cairn-agent")
    ef, af = flags(engine), flags(agent)
    errors = []
    grpc = listen_port(ef["grpc-listen"])
    nvmf = listen_port(ef["nvmf-listen"])
    engine_url = urlparse(af["engine"])
    if engine_url.port != grpc:
        errors.append(f"agent --engine {af['engine']} does not match engine --grpc-listen port {grpc}")
    if espec is not aspec:
        errors.append("engine and agent must share a pod (the agent dials its engine on loopback)")
    elif engine_url.hostname not in ("127.0.0.1", "localhost", "::1"):
        errors.append(f"agent --engine host {engine_url.hostname} is not loopback")
    declared = {p["containerPort"] for p in engine.get("ports", [])}
    for port, what in ((grpc, "grpc"), (nvmf, "nvmf")):
        if port not in declared:
            errors.append(f"engine {what} port {port} is not a declared containerPort")
    agent_port = listen_port(af["listen"])
    if agent_port not in {p["containerPort"] for p in agent.get("ports", [])}:
        errors.append(f"agent --listen port {agent_port} is not a declared containerPort")
    if not espec.get("hostNetwork"):
        errors.append("engine pod must use the host network (NVMe-oF is served at the node address)")
    for probe_name in ("readinessProbe", "livenessProbe"):
        for c in (engine, agent):
            probe = c.get(probe_name, {})
            port = (probe.get("tcpSocket") or probe.get("httpGet") or probe.get("grpc") or {}).get("port")
            if port is not None and named_port(espec, port) not in {p["containerPort"] for p in c.get("ports", [])}:
                errors.append(f"{c['name']} {probe_name} probes port {port}, not one of its own")
    check(errors)


def test_csi_reaches_agent():
    """CSI controller -> cairn-agent-control Service -> agents; CSI node -> local agent."""
    _, aspec, agent = cairn_binary_container("cairn-agent")
    storage = [w for w in workloads() if pod_spec(w) is aspec][0]
    agent_port = listen_port(flags(agent)["listen"])
    ns = one("Namespace").name
    errors = []

    _, _, ctrl = cairn_binary_container("cairn-csi", "controller")
    url = urlparse(flags(ctrl)["agent"])
    host = url.hostname or ""
    svc_name = host.split(".")[0]
    if host not in (svc_name, f"{svc_name}.{ns}", f"{svc_name}.{ns}.svc", f"{svc_name}.{ns}.svc.cluster.local"):
        errors.append(f"controller --agent host {host} is not a Service name in {ns}")
    svcs = [s for s in of_kind("Service") if s.name == svc_name]
    if len(svcs) != 1:
        errors.append(f"controller --agent names Service {svc_name}, which is not defined")
    else:
        svc = svcs[0].obj["spec"]
        ports = [p for p in svc.get("ports", []) if p["port"] == url.port]
        if not ports:
            errors.append(f"Service {svc_name} has no port {url.port}")
        elif named_port(aspec, ports[0].get("targetPort", ports[0]["port"])) != agent_port:
            errors.append(f"Service {svc_name} port {url.port} does not target the agent's port {agent_port}")
        sel = svc.get("selector", {})
        labels = pod_labels(storage)
        if not sel or any(labels.get(k) != v for k, v in sel.items()):
            errors.append(f"Service {svc_name} selector {sel} does not select the agent pods {labels}")

    nw, nspec, node = cairn_binary_container("cairn-csi", "node")
    nurl = urlparse(flags(node)["agent"])
    if nurl.port != agent_port:
        errors.append(f"node --agent port {nurl.port} != agent --listen port {agent_port}")
    if nurl.hostname in ("127.0.0.1", "localhost", "::1"):
        if not (nspec.get("hostNetwork") and aspec.get("hostNetwork")):
            errors.append("node plugin dials the agent on loopback: both pods need hostNetwork")
        if nspec.get("nodeSelector") != aspec.get("nodeSelector"):
            errors.append(
                "node plugin dials its node's agent, so it must run on exactly the agent's nodes "
                f"(nodeSelector {nspec.get('nodeSelector')} vs {aspec.get('nodeSelector')})"
            )
    if aspec.get("nodeSelector", {}).get("cairn.dev/storage") != "true":
        errors.append("engine/agent DaemonSet must select nodes labelled cairn.dev/storage=true")
    check(errors)


def test_etcd_store():
    """The agents' --store names every member of the etcd StatefulSet at its client port."""
    _, aspec, agent = cairn_binary_container("cairn-agent")
    store = str(flags(agent)["store"])
    endpoints = [urlparse(e) for e in store.split(",")]
    errors = [f"store endpoint {e.geturl()} is not etcd://" for e in endpoints if e.scheme != "etcd"]
    if aspec.get("hostNetwork") and aspec.get("dnsPolicy") != "ClusterFirstWithHostNet":
        errors.append("agent is on the host network: it needs dnsPolicy ClusterFirstWithHostNet to resolve etcd")
    sts = of_kind("StatefulSet")
    etcd = [s for s in sts if any("etcd" in c["image"] for c in containers(pod_spec(s)))]
    assert len(etcd) == 1, "expected one etcd StatefulSet"
    s = etcd[0]
    replicas = s.obj["spec"].get("replicas", 1)
    if replicas != 3:
        errors.append(f"etcd has {replicas} members, expected 3")
    service = s.obj["spec"]["serviceName"]
    svc = one("Service", service).obj["spec"]
    if svc.get("clusterIP") != "None":
        errors.append(f"Service {service} is not headless")
    sel = svc.get("selector", {})
    if any(pod_labels(s).get(k) != v for k, v in sel.items()):
        errors.append(f"Service {service} does not select the etcd pods")
    econt = containers(pod_spec(s))[0]
    eflags = flags(econt)
    client_port = listen_port(str(eflags["listen-client-urls"]).split(",")[0])
    svc_ports = {p["port"] for p in svc.get("ports", [])}
    expected = {f"{s.name}-{i}.{service}" for i in range(replicas)}
    got = {e.hostname for e in endpoints}
    if got != expected:
        errors.append(f"agent --store hosts {sorted(got)} != etcd members {sorted(expected)}")
    for e in endpoints:
        if e.port != client_port or e.port not in svc_ports:
            errors.append(f"store endpoint {e.geturl()}: port is not etcd's client port {client_port}")
    initial = str(eflags.get("initial-cluster", ""))
    members = {m.split("=", 1)[0] for m in initial.split(",") if m}
    if members != {f"{s.name}-{i}" for i in range(replicas)}:
        errors.append(f"etcd --initial-cluster members {sorted(members)} do not match {replicas} replicas")
    check(errors)


def test_csi_socket_paths():
    """The driver and every sidecar use the same socket, in a shared volume."""
    errors = []
    for mode in ("controller", "node"):
        w, spec, drv = cairn_binary_container("cairn-csi", mode)
        endpoint = urlparse(str(flags(drv)["endpoint"]))
        if endpoint.scheme != "unix":
            errors.append(f"{w.where()}: endpoint {endpoint.geturl()} is not unix://")
            continue
        sock = endpoint.path
        sock_dir = os.path.dirname(sock)
        drv_mount = mount_at(spec, drv, sock_dir)
        if drv_mount is None:
            errors.append(f"{w.where()}: driver has no volume at {sock_dir}")
            continue
        for c in containers(spec, init=False):
            if c is drv:
                continue
            addr = flags(c).get("csi-address")
            if addr is None:
                errors.append(f"{w.where()}: sidecar {c['name']} has no --csi-address")
                continue
            if addr != sock:
                errors.append(f"{w.where()}: {c['name']} --csi-address {addr} != driver socket {sock}")
            m = mount_at(spec, c, os.path.dirname(str(addr)))
            if m is None or m[1]["name"] != drv_mount[1]["name"]:
                errors.append(f"{w.where()}: {c['name']} does not mount the driver's socket volume")
        if mode == "node":
            plugin_dir = drv_mount[1].get("hostPath", {}).get("path")
            if plugin_dir is None:
                errors.append(f"{w.where()}: node socket volume is not a hostPath")
                continue
            reg = sidecar(spec, "csi-node-driver-registrar")
            path = flags(reg).get("kubelet-registration-path")
            if path != f"{plugin_dir}/{os.path.basename(sock)}":
                errors.append(f"{w.where()}: registration path {path} != {plugin_dir}/{os.path.basename(sock)}")
            probe = " ".join(reg.get("livenessProbe", {}).get("exec", {}).get("command", []))
            if probe and f"--kubelet-registration-path={path}" not in probe:
                errors.append(f"{w.where()}: registrar probe checks a different path")
            rm = mount_at(spec, reg, "/registration")
            if rm is None or not rm[1].get("hostPath", {}).get("path", "").endswith("/plugins_registry"):
                errors.append(f"{w.where()}: registrar lacks kubelet's plugins_registry at /registration")
            kubelet_root = str(path).split("/plugins/")[0]
            km = mount_at(spec, drv, kubelet_root)
            if km is None or km[1].get("hostPath", {}).get("path") != kubelet_root:
                errors.append(f"{w.where()}: node plugin does not mount the kubelet directory {kubelet_root}")
            elif km[0].get("mountPropagation") != "Bidirectional":
                errors.append(f"{w.where()}: kubelet directory mount is not Bidirectional")
    check(errors)


def test_health_ports():
    """Each livenessprobe sidecar serves the port its driver's liveness probe asks."""
    errors = []
    for mode in ("controller", "node"):
        w, spec, drv = cairn_binary_container("cairn-csi", mode)
        lp = sidecar(spec, "livenessprobe")
        port = int(flags(lp).get("health-port", 9808))
        probe = drv.get("livenessProbe", {}).get("httpGet")
        if probe is None:
            errors.append(f"{w.where()}: driver has no httpGet liveness probe")
        elif named_port(spec, probe["port"]) != port:
            errors.append(f"{w.where()}: probe port {probe['port']} != livenessprobe --health-port {port}")
    # Host-network pods on one node must not collide.
    used: dict[int, str] = {}
    for w in workloads():
        spec = pod_spec(w)
        if not spec.get("hostNetwork"):
            continue
        for c in containers(spec, init=False):
            ports = [p["containerPort"] for p in c.get("ports", [])]
            if "health-port" in flags(c):
                ports.append(int(flags(c)["health-port"]))
            for p in ports:
                if p in used and used[p] != w.name:
                    errors.append(f"host port {p} used by both {used[p]} and {w.name}")
                used[p] = w.name
    check(errors)


def test_node_plugin_host_access():
    """The node plugin is privileged with host /dev, /sys, /run/udev and host network."""
    w, spec, drv = cairn_binary_container("cairn-csi", "node")
    errors = []
    if not drv.get("securityContext", {}).get("privileged"):
        errors.append("node plugin is not privileged")
    if not spec.get("hostNetwork"):
        errors.append("node plugin is not on the host network")
    for path in ("/dev", "/sys", "/run/udev"):
        m = mount_at(spec, drv, path)
        if m is None or m[1].get("hostPath", {}).get("path") != path:
            errors.append(f"node plugin does not mount host {path} at {path}")
    check(errors)


def test_service_accounts_and_rbac():
    """Pods run as accounts that exist; bindings point at accounts and roles that exist."""
    sas = {(d.namespace, d.name) for d in of_kind("ServiceAccount")}
    roles = {(d.namespace, d.name) for d in of_kind("Role")}
    croles = {d.name for d in of_kind("ClusterRole")}
    errors = []
    for w in workloads():
        sa = pod_spec(w).get("serviceAccountName")
        if sa is None:
            errors.append(f"{w.where()}: no serviceAccountName")
        elif (w.namespace, sa) not in sas:
            errors.append(f"{w.where()}: ServiceAccount {sa} is not defined")
    for b in of_kind("RoleBinding") + of_kind("ClusterRoleBinding"):
        for s in b.obj.get("subjects", []):
            if s["kind"] == "ServiceAccount" and (s.get("namespace"), s["name"]) not in sas:
                errors.append(f"{b.where()}: subject ServiceAccount {s['name']} is not defined")
        ref = b.obj["roleRef"]
        if ref["kind"] == "ClusterRole" and ref["name"] not in croles:
            errors.append(f"{b.where()}: ClusterRole {ref['name']} is not defined")
        if ref["kind"] == "Role" and (b.namespace, ref["name"]) not in roles:
            errors.append(f"{b.where()}: Role {ref['name']} is not defined")
    check(errors)


def _granted(sa_ns: str, sa: str) -> list[tuple[str | None, dict]]:
    """(namespace or None for cluster-wide, rule) granted to a ServiceAccount."""
    out = []
    for b in of_kind("RoleBinding") + of_kind("ClusterRoleBinding"):
        if not any(s["kind"] == "ServiceAccount" and s["name"] == sa and s.get("namespace") == sa_ns
                   for s in b.obj.get("subjects", [])):
            continue
        ref = b.obj["roleRef"]
        role = [d for d in of_kind(ref["kind"]) if d.name == ref["name"]
                and (ref["kind"] == "ClusterRole" or d.namespace == b.namespace)]
        scope = None if b.kind == "ClusterRoleBinding" else b.namespace
        for r in role:
            out += [(scope, rule) for rule in r.obj.get("rules", [])]
    return out


def _allows(rules, ns, group, resource, verb) -> bool:
    for scope, rule in rules:
        if scope is not None and scope != ns:
            continue
        if (group in rule.get("apiGroups", []) or "*" in rule.get("apiGroups", [])) and \
           (resource in rule.get("resources", []) or "*" in rule.get("resources", [])) and \
           (verb in rule.get("verbs", []) or "*" in rule.get("verbs", [])):
            return True
    return False


# What each CSI sidecar needs from the API server (from the sidecars' own
# RBAC manifests); leader election needs leases in the pod's namespace.
SIDECAR_NEEDS = {
    "csi-provisioner": [
        ("", "persistentvolumes", "create"), ("", "persistentvolumes", "delete"),
        ("", "persistentvolumes", "watch"), ("", "persistentvolumeclaims", "update"),
        ("storage.k8s.io", "storageclasses", "watch"), ("", "events", "create"),
        ("", "nodes", "get"), ("storage.k8s.io", "csinodes", "get"),
    ],
    "csi-attacher": [
        ("", "persistentvolumes", "patch"), ("storage.k8s.io", "volumeattachments", "patch"),
        ("storage.k8s.io", "volumeattachments/status", "patch"), ("storage.k8s.io", "csinodes", "get"),
    ],
    "csi-resizer": [
        ("", "persistentvolumes", "patch"), ("", "persistentvolumeclaims", "watch"),
        ("", "persistentvolumeclaims/status", "patch"), ("", "events", "create"),
        ("", "pods", "list"),
    ],
}


def test_sidecar_permissions():
    """The controller's account may do what its sidecars do."""
    errors = []
    for w in workloads():
        spec = pod_spec(w)
        sa = spec.get("serviceAccountName")
        rules = _granted(w.namespace, sa)
        for c in containers(spec):
            repo = image_repo(c["image"]).rsplit("/", 1)[-1]
            for group, res, verb in SIDECAR_NEEDS.get(repo, []):
                if not _allows(rules, w.namespace, group, res, verb):
                    errors.append(f"{w.where()}: {repo} needs {verb} {res} ({group or 'core'})")
            if "leader-election" in flags(c) and not _allows(rules, w.namespace, "coordination.k8s.io", "leases", "create"):
                errors.append(f"{w.where()}: {c['name']} elects a leader but may not create leases")
    check(errors)


def test_selectors():
    """Workload selectors match their pod labels; Services select some pods."""
    errors = []
    for w in workloads():
        if w.kind == "Pod":
            continue
        sel = w.obj["spec"]["selector"].get("matchLabels", {})
        labels = pod_labels(w)
        if not sel or any(labels.get(k) != v for k, v in sel.items()):
            errors.append(f"{w.where()}: selector {sel} does not match template labels {labels}")
    for s in of_kind("Service"):
        sel = s.obj["spec"].get("selector", {})
        matched = [w for w in workloads() if w.namespace == s.namespace
                   and all(pod_labels(w).get(k) == v for k, v in sel.items())]
        if not matched:
            errors.append(f"{s.where()}: selects no pods")
        for p in s.obj["spec"].get("ports", []):
            for w in matched:
                try:
                    named_port(pod_spec(w), p.get("targetPort", p["port"]))
                except AssertionError as e:
                    errors.append(f"{s.where()}: port {p.get('name')}: {e} in {w.name}")
    check(errors)


def test_volumes_consistent():
    """Every mount names a volume of its pod, and every volume is mounted."""
    errors = []
    for w in workloads(all_docs()):
        spec = pod_spec(w)
        defined = {v["name"] for v in spec.get("volumes", [])}
        mounted = {m["name"] for c in containers(spec) for m in c.get("volumeMounts", [])}
        if w.kind == "StatefulSet":
            defined |= {t["metadata"]["name"] for t in w.obj["spec"].get("volumeClaimTemplates", [])}
        for name in sorted(mounted - defined):
            errors.append(f"{w.where()}: mounts undefined volume {name}")
        for name in sorted(defined - mounted):
            errors.append(f"{w.where()}: volume {name} is never mounted")
    check(errors)


def test_pool_config():
    """--pool-config is a key of a mounted ConfigMap, in the format the agent reads."""
    _, spec, agent = cairn_binary_container("cairn-agent")
    path = str(flags(agent)["pool-config"])
    m = mount_at(spec, agent, os.path.dirname(path))
    assert m is not None, f"agent mounts nothing at {os.path.dirname(path)}"
    mount, vol = m
    assert "configMap" in vol, f"{os.path.dirname(path)} is not a ConfigMap volume"
    assert mount.get("readOnly"), "pool config mount should be read-only"
    cm = one("ConfigMap", vol["configMap"]["name"])
    key = os.path.basename(path)
    items = vol["configMap"].get("items")
    if items:
        by_path = {i["path"]: i["key"] for i in items}
        assert key in by_path, f"ConfigMap volume does not project {key}"
        key = by_path[key]
    data = cm.obj.get("data", {})
    assert key in data, f"ConfigMap {cm.name} has no key {key}"
    pools = yaml.safe_load(data[key])
    errors = []
    if not isinstance(pools, dict) or set(pools) != {"nodes"} or not isinstance(pools["nodes"], dict):
        raise AssertionError(f"{key} must be a mapping with the single key `nodes`")
    for node, entries in pools["nodes"].items():
        if not isinstance(entries, list) or not entries:
            errors.append(f"node {node}: expected a list of pools")
            continue
        names = []
        for e in entries:
            if not isinstance(e, dict) or set(e) != {"name", "device"}:
                errors.append(f"node {node}: pool entry {e} must have exactly name and device")
                continue
            if not str(e["device"]).startswith("/dev/"):
                errors.append(f"node {node}: device {e['device']} is not under /dev")
            names.append(e["name"])
        if len(names) != len(set(names)):
            errors.append(f"node {node}: pool names repeat")
        devices = [e.get("device") for e in entries if isinstance(e, dict)]
        if len(devices) != len(set(devices)):
            errors.append(f"node {node}: a device is listed twice")
    # The engine opens the listed devices, so it needs the host's /dev.
    _, espec, engine = cairn_binary_container("cairn-engine")
    dm = mount_at(espec, engine, "/dev")
    if dm is None or dm[1].get("hostPath", {}).get("path") != "/dev":
        errors.append("engine does not mount the host's /dev")
    check(errors)


def test_resources_tell_the_truth():
    """Requests everywhere, memory limits, no hugepages, no dedicated cores."""
    errors = []
    for w in workloads(all_docs()):
        for c in containers(pod_spec(w)):
            res = c.get("resources", {})
            req, lim = res.get("requests", {}), res.get("limits", {})
            where = f"{w.where()} container {c['name']}"
            for k in list(req) + list(lim):
                if k.startswith("hugepages-"):
                    errors.append(f"{where}: asks for {k}")
            if "cpu" not in req or "memory" not in req:
                errors.append(f"{where}: needs cpu and memory requests")
            if "memory" not in lim:
                errors.append(f"{where}: needs a memory limit")
            if "cpu" in lim:
                errors.append(f"{where}: a CPU limit throttles I/O; request CPU instead")
            cpu = str(req.get("cpu", "0"))
            millis = int(cpu[:-1]) if cpu.endswith("m") else int(float(cpu) * 1000)
            if millis >= 1000:
                errors.append(f"{where}: requests {cpu} CPU; nothing in Cairn owns a core")
    check(errors)


def test_images_pinned():
    """Images carry explicit versions; Cairn's matches the workspace version."""
    cairn = cairn_image_name()
    version = workspace_version()
    kust = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    errors = []
    if str(kust["images"][0].get("newTag")) != version:
        errors.append(f"kustomization newTag {kust['images'][0].get('newTag')} != workspace version {version}")
    for w in workloads(all_docs()):
        for c in containers(pod_spec(w)):
            img = c["image"]
            tag = image_tag(img)
            if tag is None or tag == "latest":
                errors.append(f"{w.where()}: image {img} has no pinned tag")
            if image_repo(img) == cairn and tag != version:
                errors.append(f"{w.where()}: image {img} is not version {version}")
            if "/sig-storage/" in img:
                if not img.startswith("registry.k8s.io/sig-storage/"):
                    errors.append(f"{w.where()}: {img} is not from registry.k8s.io/sig-storage")
                if not re.fullmatch(r"v\d+\.\d+\.\d+", tag or ""):
                    errors.append(f"{w.where()}: {img} is not pinned to a release vX.Y.Z")
    for mode, needed in (("controller", ["csi-provisioner", "csi-attacher", "csi-resizer", "livenessprobe"]),
                         ("node", ["csi-node-driver-registrar", "livenessprobe"])):
        _, spec, _ = cairn_binary_container("cairn-csi", mode)
        present = {image_repo(c["image"]).rsplit("/", 1)[-1] for c in containers(spec)}
        for n in needed:
            if n not in present:
                errors.append(f"CSI {mode} pod lacks the {n} sidecar")
    check(errors)


def _manifest_commands() -> set[str]:
    return {c["command"][0] for (_, _, c) in cairn_containers(all_docs()) if c.get("command")}


# Tools the manifests run from Cairn's image that come from Debian packages.
TOOL_PACKAGES = {"modprobe": "kmod", "nvme": "nvme-cli", "mkfs.ext4": "e2fsprogs", "mkfs.xfs": "xfsprogs"}


def test_dockerfile():
    """The image builds with scripts/build-release.sh and ships every binary the manifests run."""
    df = Dockerfile(ROOT / "Dockerfile")
    errors = []
    assert len(df.stages) >= 2, "Dockerfile should be multi-stage"
    runtime = df.stages[-1]
    if runtime["image"] != "debian:bookworm-slim":
        errors.append(f"runtime stage is {runtime['image']}, expected debian:bookworm-slim")
    copies = [rest for (ins, rest) in runtime["ins"] if ins == "COPY" and "--from=" in rest]
    from_stages = {re.search(r"--from=(\S+)", r).group(1) for r in copies}
    if len(from_stages) != 1:
        errors.append(f"binaries should come from one build stage, not {sorted(from_stages)}")
    build = df.stage(next(iter(from_stages))) if len(from_stages) == 1 else df.stages[0]
    runs = " ".join(rest for (ins, rest) in build["ins"] if ins == "RUN")
    if "scripts/build-release.sh" not in runs:
        errors.append("build stage does not RUN scripts/build-release.sh")
    for ins, rest in build["ins"]:
        if ins == "RUN" and "cargo " in rest:
            errors.append(f"build stage runs cargo itself ({rest}); only scripts/build-release.sh may")
    script = (ROOT / "scripts" / "build-release.sh").read_text()
    cmds = [ln.strip() for ln in script.splitlines() if ln.strip().startswith("cargo ")]
    if cmds != ["cargo build --release --locked --workspace --bins"]:
        errors.append(f"scripts/build-release.sh runs {cmds}, expected exactly the CI build command")
    if not os.access(ROOT / "scripts" / "build-release.sh", os.X_OK):
        errors.append("scripts/build-release.sh is not executable")
    toolchain = tomllib.loads((ROOT / "rust-toolchain.toml").read_text())["toolchain"]["channel"]
    if not re.match(rf"rust:{re.escape(toolchain)}(-|$)", build["image"]):
        errors.append(f"build stage image {build['image']} is not the pinned toolchain {toolchain}")
    copied = set()
    for r in copies:
        srcs = r.split()[1:-1]
        copied |= {os.path.basename(s) for s in srcs if "/target/release/" in s}
    installed = set()
    for ins, rest in runtime["ins"]:
        if ins == "RUN" and "apt-get install" in rest:
            installed |= set(re.findall(r"(?<![-\w])([a-z0-9][a-z0-9.+-]+)", rest.split("apt-get install", 1)[1]))
    for pkg in ("nvme-cli", "e2fsprogs", "xfsprogs", "util-linux"):
        if pkg not in installed:
            errors.append(f"runtime stage does not install {pkg}")
    for cmd in sorted(_manifest_commands()):
        if cmd in TOOL_PACKAGES:
            if TOOL_PACKAGES[cmd] not in installed:
                errors.append(f"manifests run {cmd}, but the image lacks {TOOL_PACKAGES[cmd]}")
        elif cmd not in copied:
            errors.append(f"manifests run {cmd}, which the Dockerfile does not copy from target/release")
    check(errors)


def test_ci_uses_build_script():
    """CI builds with the same script as the image."""
    ci = ROOT / ".ci" / "run"
    if not ci.exists():
        skip(".ci/run does not exist yet")
    # Follow the scripts .ci/run runs (it delegates to the README's test command).
    seen, todo = set(), [ci]
    while todo:
        f = todo.pop()
        if f in seen or not f.exists():
            continue
        seen.add(f)
        text = f.read_text()
        if "scripts/build-release.sh" in text:
            return
        todo += [ROOT / m for m in re.findall(r"\b(scripts/[\w.-]+\.sh)\b", text)]
    assert False, f".ci/run (through {sorted(str(p.relative_to(ROOT)) for p in seen)}) does not call scripts/build-release.sh"


def test_binaries_are_built_by_the_workspace():
    """Every binary the manifests run or the image ships is a workspace binary."""
    bins = workspace_binaries()
    df = Dockerfile(ROOT / "Dockerfile")
    shipped = set()
    for ins, rest in df.stages[-1]["ins"]:
        if ins == "COPY" and "--from=" in rest:
            shipped |= {os.path.basename(s) for s in rest.split()[1:-1] if "/target/release/" in s}
    wanted = (_manifest_commands() - set(TOOL_PACKAGES)) | shipped
    missing = sorted(b for b in wanted if b not in bins)
    assert not missing, f"no workspace crate builds {missing} (have {sorted(bins)})"


def test_binary_flags_exist():
    """Each flag the manifests pass to a Cairn binary appears in that binary's crate."""
    bins = workspace_binaries()
    errors = []
    checked = 0
    for w, _, c in cairn_containers(all_docs()):
        cmd = (c.get("command") or [None])[0]
        if cmd not in bins:
            continue
        crate = bins[cmd]
        source = "\n".join(p.read_text() for p in crate.rglob("*.rs") if "target" not in p.parts)
        for flag in flags(c):
            checked += 1
            ident = flag.replace("-", "_")
            if f'"{flag}"' not in source and not re.search(rf"\b{ident}\s*:", source):
                errors.append(f"{w.where()}: {cmd} --{flag} appears nowhere in {crate.relative_to(ROOT)}/")
    if checked == 0:
        skip("no Cairn binary that the manifests run is built by the workspace yet")
    check(errors)


def test_example_uses_a_cairn_class():
    docs = example_docs()
    classes = {sc.name for sc in of_kind("StorageClass")}
    pvcs = {d.name: d for d in of_kind("PersistentVolumeClaim", docs)}
    errors = []
    assert pvcs, "no example PersistentVolumeClaim"
    for d in pvcs.values():
        if d.obj["spec"].get("storageClassName") not in classes:
            errors.append(f"{d.where()}: StorageClass {d.obj['spec'].get('storageClassName')} is not Cairn's")
    pods = of_kind("Pod", docs)
    fio = [p for p in pods if "fio" in " ".join(" ".join(c.get("command", []) + c.get("args", []))
                                              for c in containers(pod_spec(p)))]
    if not fio:
        errors.append("no example pod runs fio")
    for p in fio:
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod_spec(p).get("volumes", [])
                  if "persistentVolumeClaim" in v}
        if not claims or not claims <= set(pvcs):
            errors.append(f"{p.where()}: does not mount the example claim")
    check(errors)


def test_readme():
    """The deploy guide lists the command lines, classes and parameters actually used."""
    text = (MANIFESTS / "README.md").read_text()
    errors = []
    for w, _, c in cairn_containers():
        if c["command"][0] in TOOL_PACKAGES:
            continue
        line = " ".join(c["command"] + [str(a) for a in c.get("args", [])])
        if line not in text:
            errors.append(f"README lacks the command line `{line}`")
    for sc in of_kind("StorageClass"):
        if f"`{sc.name}`" not in text:
            errors.append(f"README does not describe StorageClass {sc.name}")
    for p in accepted_parameters():
        if f"`{p}`" not in text:
            errors.append(f"README parameter table lacks `{p}`")
    for needle in ("kubectl apply -k manifests/", "kubectl apply -f manifests/deploy/", "nvme-tcp", "degraded",
                   "node is gone", "Uninstall"):
        if needle.lower() not in text.lower():
            errors.append(f"README does not mention {needle!r}")
    check(errors)


# ---------------------------------------------------------------- runner


def main() -> int:
    tests = [(n, f) for n, f in globals().items() if n.startswith("test_") and callable(f)]
    passed = failed = skipped = 0
    print(f"Kubernetes schemas: {KUBERNETES_VERSION}")
    for name, fn in tests:
        try:
            fn()
        except Skip as e:
            skipped += 1
            print(f"SKIP {name}: {e}")
        except AssertionError as e:
            failed += 1
            print(f"FAIL {name}")
            for line in str(e).splitlines() or ["(assertion failed)"]:
                print(f"    {line}")
        except Exception:
            failed += 1
            print(f"FAIL {name} (error)")
            print("    " + traceback.format_exc().replace("\n", "\n    "))
        else:
            passed += 1
            print(f"PASS {name}")
    summary = f"{passed} passed, {failed} failed"
    if skipped:
        summary += f", {skipped} skipped"
    print(summary)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
