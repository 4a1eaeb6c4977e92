#!/usr/bin/env python3
"""Checks the Helm chart with Helm's own engine, without a cluster or the helm binary.

helm-python-sdk (PyPI) binds Helm v4's Go SDK through a C library, so the rendering,
`values.schema.json` validation and lint below are Helm's, not an imitation. This script:

1. lints the chart (strict) with each example's values,
2. renders each `examples/NAME.values.yaml` and compares it with the committed
   `examples/NAME.yaml` (`--write` regenerates them),
3. checks what the chart promises in the rendered objects (rolling update without loss,
   probes, preStop drain, security context, ports),
4. checks that wrong values are refused with a message that says what to change,
5. with `--rustygate BIN`: lays out the ConfigMap example the way the kubelet mounts a
   ConfigMap volume (`..data` symlinks) and runs `rustygate validate` on it.

kubernetes-validate (.ci/run) then checks the rendered files against the Kubernetes schemas.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import tempfile

import helm_python as helm
import yaml

HERE = pathlib.Path(__file__).resolve().parent
CHART = HERE / "rustygate"
EXAMPLES = HERE / "examples"
RELEASE, NAMESPACE = "gw", "gateway"
GIT = {"config": {"git": {"url": "https://git.example.com/acme/gateway-config.git"}}}

failures: list[str] = []


def check(ok: bool, what: str) -> None:
    if not ok:
        failures.append(what)


def render(values: dict) -> dict[str, str]:
    chart = helm.Chart.load(str(CHART))
    return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def as_file(rendered: dict[str, str]) -> str:
    """The manifests as one multi-document file, in template order, like `helm template`."""
    docs = []
    for path in sorted(rendered):
        body = rendered[path].strip()
        if path.endswith("NOTES.txt") or not body:
            continue
        docs.append(f"# Source: {path}\n{body}\n")
    return "---\n" + "---\n".join(docs)


def objects(rendered: dict[str, str]) -> dict[str, dict]:
    out = {}
    for doc in yaml.safe_load_all(as_file(rendered)):
        if doc:
            out[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return out


def merge(*dicts: dict) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def check_promises(name: str, objs: dict[str, dict]) -> None:
    dep = objs.get("Deployment/gw-rustygate")
    check(dep is not None, f"{name}: no Deployment")
    if dep is None:
        return
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    check(spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0, f"{name}: maxUnavailable must be 0")
    check(c["readinessProbe"]["httpGet"]["path"] == "/readyz", f"{name}: readiness is /readyz")
    check(c["livenessProbe"]["httpGet"]["path"] == "/healthz", f"{name}: liveness is /healthz")
    env = {e["name"]: e for e in c["env"]}
    grace = int(env["RUSTYGATE_SHUTDOWN_GRACE"]["value"].rstrip("s"))
    sleep = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    check(sleep > 0, f"{name}: a preStop sleep drains endpoints before SIGTERM")
    check(pod["terminationGracePeriodSeconds"] > sleep + grace, f"{name}: terminationGracePeriodSeconds too short")
    check(env["RUSTYGATE_ADMIN_LISTEN"]["value"].startswith("0.0.0.0:"), f"{name}: probes need the admin listener on the pod IP")
    sc, psc = c["securityContext"], pod["securityContext"]
    check(psc.get("runAsNonRoot") is True and psc.get("runAsUser") == 65532, f"{name}: runs as non-root 65532")
    check(sc.get("readOnlyRootFilesystem") is True, f"{name}: read-only root filesystem")
    check(sc.get("allowPrivilegeEscalation") is False, f"{name}: no privilege escalation")
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    cache = env["RUSTYGATE_CACHE_DIR"]["value"]
    check(cache in mounts and "emptyDir" in volumes[mounts[cache]], f"{name}: the git cache is an emptyDir")
    cm = objs.get("ConfigMap/gw-rustygate-config")
    if cm is not None:
        items = next(v for v in pod["volumes"] if v["name"] == "config")["configMap"]["items"]
        check(
            all(cm["data"].get(i["key"], "").strip() for i in items),
            f"{name}: every mounted ConfigMap key holds a file",
        )
    svc = objs["Service/gw-rustygate"]
    check([p["targetPort"] for p in svc["spec"]["ports"]] == ["http"], f"{name}: the main Service exposes the proxy only")


def check_example(path: pathlib.Path, write: bool) -> dict[str, str]:
    name = path.name.removesuffix(".values.yaml")
    values = yaml.safe_load(path.read_text())
    report = helm.lint(str(CHART), values, strict=True, kube_version="v1.30.0")
    problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    check(not problems and not report.get("errors"), f"{name}: helm lint: {problems or report.get('errors')}")
    rendered = render(values)
    text = as_file(rendered)
    target = EXAMPLES / f"{name}.yaml"
    header = f"# Rendered from {path.name} by deploy/helm/check.py --write (release {RELEASE}, namespace {NAMESPACE}).\n"
    if write:
        target.write_text(header + text)
    else:
        check(
            target.exists() and target.read_text() == header + text,
            f"{target.relative_to(HERE.parent.parent)} is stale: run `python3 deploy/helm/check.py --write`",
        )
    check_promises(name, objects(rendered))
    return rendered


def refused(values: dict, expected: str) -> None:
    try:
        render(values)
    except helm.HelmError as e:
        check(expected in str(e), f"values {values} refused, but without `{expected}`: {e}")
        return
    failures.append(f"values {values} were accepted; expected an error with `{expected}`")


def check_refusals() -> None:
    refused({}, "config.git.url is required")
    refused(merge(GIT, {"replicas": 3}), "replicas")  # a typo of replicaCount: schema error
    refused(merge(GIT, {"config": {"source": "s3"}}), "source")
    refused(merge(GIT, {"config": {"git": {"pollInterval": "often"}}}), "pollInterval")
    refused(merge(GIT, {"terminationGracePeriodSeconds": 30}), "must exceed preStopSleepSeconds")
    refused(
        merge(GIT, {"config": {"git": {"credentials": {"tokenKey": "token"}}}}),
        "no config.git.credentials.existingSecret",
    )
    refused(
        merge(GIT, {"config": {"git": {"credentials": {"existingSecret": "s", "sshPrivateKeyKey": "id"}}}}),
        "knownHostsKey is required",
    )
    refused({"config": {"source": "configMap"}}, "set config.configMap.files")
    refused({"config": {"source": "configMap", "configMap": {"existing": "cm"}}}, "config.configMap.items")
    refused({"config": {"source": "configMap", "configMap": {"files": {"../x.toml": ""}}}}, "invalid propertyName '../x.toml'")


def check_defaults() -> None:
    objs = objects(render(GIT))
    check("Service/gw-rustygate-admin" not in objs, "the admin Service is off by default")
    check("HorizontalPodAutoscaler/gw-rustygate" not in objs, "no HPA by default")
    check("PodDisruptionBudget/gw-rustygate" in objs, "a PDB by default")
    dep = objs["Deployment/gw-rustygate"]
    env = {e["name"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    check(not env & {"RUSTYGATE_GIT_TOKEN", "RUSTYGATE_ADMIN_TOKEN", "RUSTYGATE_WEBHOOK_SECRET"}, "no secrets by default")
    check_promises("defaults", objs)
    # HTTPS token from an existing Secret.
    objs = objects(render(merge(GIT, {"config": {"git": {"credentials": {"existingSecret": "git", "tokenKey": "token"}}}})))
    env = {e["name"]: e for e in objs["Deployment/gw-rustygate"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    ref = env.get("RUSTYGATE_GIT_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
    check(ref == {"name": "git", "key": "token"}, f"the git token comes from the Secret: {ref}")
    check(not any(k.startswith("NetworkPolicy/") for k in objects(render(GIT))), "no NetworkPolicy by default")
    # The admin port only from the listed peers, the proxy port from anyone.
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    objs = objects(render(merge(GIT, {"networkPolicy": {"enabled": True, "admin": {"from": [monitoring]}}})))
    rules = objs.get("NetworkPolicy/gw-rustygate", {}).get("spec", {}).get("ingress", [])
    by_port = {r["ports"][0]["port"]: r.get("from") for r in rules}
    check(by_port == {"http": None, "admin": [monitoring]}, f"the NetworkPolicy's rules: {rules}")
    objs = objects(render(merge(GIT, {"networkPolicy": {"enabled": True}})))
    rules = objs.get("NetworkPolicy/gw-rustygate", {}).get("spec", {}).get("ingress", [])
    check([r["ports"][0]["port"] for r in rules] == ["http"], f"no admin.from: the admin port is closed: {rules}")


def check_configmap_layout(rendered: dict[str, str], rustygate: str) -> None:
    """Mounts the example ConfigMap like the kubelet does and validates it with the real binary."""
    objs = objects(rendered)
    cm = objs["ConfigMap/gw-rustygate-config"]
    dep = objs["Deployment/gw-rustygate"]
    (vol,) = [v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"]
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp) / "config"
        stamp = root / "..2026_01_01_00_00_00.000000000"
        for item in vol["configMap"]["items"]:
            f = stamp / item["path"]
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(cm["data"][item["key"]])
        (root / "..data").symlink_to(stamp.name)
        for top in {pathlib.Path(i["path"]).parts[0] for i in vol["configMap"]["items"]}:
            (root / top).symlink_to(f"..data/{top}")
        out = subprocess.run([rustygate, "validate", "--deny-warnings", str(root)], capture_output=True, text=True)
        check(out.returncode == 0, f"the ConfigMap example does not validate as mounted:\n{out.stderr}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="regenerate examples/NAME.yaml")
    parser.add_argument("--rustygate", help="a rustygate binary, to validate the ConfigMap example")
    args = parser.parse_args()
    print(f"Helm SDK {helm.helm_sdk_version()} (helm-python-sdk)")
    examples = sorted(EXAMPLES.glob("*.values.yaml"))
    check(len(examples) >= 2, "examples/*.values.yaml: expected the git and ConfigMap examples")
    for path in examples:
        rendered = check_example(path, args.write)
        if args.rustygate and "ConfigMap/gw-rustygate-config" in objects(rendered):
            check_configmap_layout(rendered, args.rustygate)
    check_defaults()
    check_refusals()
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    print(f"helm chart: {len(examples)} example(s) rendered, {len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
