"""Chart checks: strict lint and offline rendering through the Helm library (helm-python-sdk),
then `kubernetes-validate --strict` on every rendered manifest, for the default values and the
production-like values of each chart; then what the charts promise, asserted on the rendering.

    python3 helm/check.py        (needs: pip install helm-python-sdk kubernetes-validate)
"""

import pathlib
import subprocess
import sys
import tempfile

import helm_python
import yaml

HELM = pathlib.Path(__file__).resolve().parent
KUBERNETES = "1.30.0"
# Custom resources have no schema in kubernetes-validate; their shape is asserted below.
CUSTOM_KINDS = {"ServiceMonitor"}


def values(chart, name):
    if name == "default":
        return {}
    return yaml.safe_load((HELM / chart / "ci" / f"{name}-values.yaml").read_text())


def render(chart, vals):
    rendered = helm_python.Chart.load(HELM / chart).render(values=vals, name="herald", namespace="herald")
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def lint(chart, vals):
    report = helm_python.lint(HELM / chart, vals, strict=True, kube_version=f"v{KUBERNETES}")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report.get("errors", [])
    if problems:
        sys.exit(f"{chart}: helm lint --strict: {problems}")


def validate(chart, name, docs):
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, doc in enumerate(docs):
            if doc["kind"] in CUSTOM_KINDS:
                continue
            f = pathlib.Path(tmp) / f"{i:02d}-{doc['kind']}.yaml"
            f.write_text(yaml.safe_dump(doc))
            files.append(str(f))
        run = subprocess.run(
            ["kubernetes-validate", "-k", KUBERNETES, "--strict", "--quiet", *files], capture_output=True, text=True
        )
        if run.returncode != 0:
            sys.exit(f"{chart} ({name}): kubernetes-validate:\n{run.stdout}{run.stderr}")
    print(f"{chart} ({name}): lint clean, {len(docs)} manifests valid against Kubernetes {KUBERNETES}")


def kinds(docs):
    return {d["kind"]: d for d in docs}


def container(deployment, name):
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def env(c):
    return {e["name"]: e for e in c.get("env", [])}


def seconds(text):
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for unit in sorted(units, key=len, reverse=True):
        if str(text).endswith(unit):
            return float(str(text)[: -len(unit)]) * units[unit]
    return float(text)


def check_common(chart, docs, container_name, grace_over):
    k = kinds(docs)
    d = k["Deployment"]
    pod = d["spec"]["template"]["spec"]
    c = container(d, container_name)
    if "HERALD_DRAIN_TIMEOUT" in env(c):
        # A pod must outlive its drain, which must outlive the longest webhook timeout (60 s).
        drain = seconds(env(c)["HERALD_DRAIN_TIMEOUT"]["value"])
        assert drain > 60, f"{chart}: drain timeout {drain}s"
        grace_over = max(grace_over, drain)
    assert pod["securityContext"]["runAsNonRoot"] is True, chart
    assert c["securityContext"]["readOnlyRootFilesystem"] is True, chart
    assert c["securityContext"]["allowPrivilegeEscalation"] is False, chart
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz", chart
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz", chart
    assert pod["terminationGracePeriodSeconds"] > grace_over, chart
    assert "PodDisruptionBudget" in k, chart
    # No secret ever reaches the command line, where `ps` shows it.
    for e in env(c).values():
        if "SECRET" in e["name"] or "TOKEN" in e["name"] or e["name"] in ("HERALD_DATABASE_URL", "HERALD_BOOTSTRAP_API_KEY"):
            assert "secretKeyRef" in e.get("valueFrom", {}), f"{chart}: {e['name']} must come from a Secret"
    for each in pod["containers"] + pod.get("initContainers", []):
        words = each.get("command", []) + each.get("args", [])
        assert not any(w.startswith("-") for w in words), f"{chart}: flags belong in the environment: {words}"
        for e in env(each).values():
            if e["name"] in ("HERALD_DATABASE_URL", "HERALD_SECRET_KEY", "HERALD_AGENT_TOKEN"):
                assert "secretKeyRef" in e.get("valueFrom", {}), f"{chart}: {e['name']} must come from a Secret"
    return d, c


def main():
    for chart in ("herald-agent", "herald-control-plane"):
        for name in ("default", "production"):
            vals = values(chart, name)
            lint(chart, vals)
            docs = render(chart, vals)
            validate(chart, name, docs)

    # The agent in zone eu-west with its token from a Secret.
    docs = render("herald-agent", {"zone": "eu-west", "token": {"existingSecret": "eu-token", "key": "token"}})
    d, c = check_common("herald-agent", docs, "agent", grace_over=75)
    e = env(c)
    assert e["HERALD_ZONE"]["value"] == "eu-west"
    assert e["HERALD_WORKER_THREADS"]["value"] == "2", "agents do not start a thread per node core"
    assert e["HERALD_AGENT_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "eu-token", "key": "token"}
    assert d["spec"]["template"]["metadata"]["labels"]["herald.dev/zone"] == "eu-west"
    assert "ServiceMonitor" not in kinds(docs), "the ServiceMonitor is optional and off by default"

    prod = render("herald-agent", values("herald-agent", "production"))
    d, c = check_common("herald-agent", prod, "agent", grace_over=75)
    e = env(c)
    assert e["HERALD_CLIENT_CERT"]["value"].startswith("/etc/herald/client/")
    assert e["HERALD_EXTRA_CA_CERT"]["value"] == "/etc/herald/ca/ca.crt"
    assert e["HERALD_CONTROL_PLANE"]["value"] == "https://herald.eu.internal:7070,https://herald-2.eu.internal:7070"
    sm = kinds(prod)["ServiceMonitor"]
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics" and sm["metadata"]["labels"]["release"] == "prometheus"

    unset = env(container(kinds(render("herald-agent", {"token": {"existingSecret": "t"}, "workerThreads": None}))["Deployment"], "agent"))
    assert "HERALD_WORKER_THREADS" not in unset, "a null workerThreads leaves the agent's default"
    zero = env(container(kinds(render("herald-agent", {"token": {"existingSecret": "t"}, "workerThreads": 0}))["Deployment"], "agent"))
    assert zero["HERALD_WORKER_THREADS"]["value"] == "0", "0 reaches the agent, which refuses it, rather than meaning the default"

    # A chart without its token Secret refuses to render rather than start agents that cannot connect.
    try:
        render("herald-agent", {"token": {"existingSecret": ""}})
        sys.exit("herald-agent rendered without a token Secret")
    except helm_python.HelmError as e:
        assert "token.existingSecret" in str(e), e

    # Every rendering keeps the common promises, defaults included.
    for chart, name, grace in (("herald-agent", "default", 75), ("herald-control-plane", "default", 30)):
        check_common(chart, render(chart, values(chart, name)), "agent" if chart == "herald-agent" else "control-plane", grace)
    # A drain longer than the pod's grace period would be cut short: the check catches it.
    try:
        check_common("herald-agent", render("herald-agent", {"drainTimeout": "120s"}), "agent", 0)
        sys.exit("a drain longer than the grace period passed the check")
    except AssertionError:
        pass

    # The control plane: PostgreSQL URL from a Secret, migrations before serving, TLS and mTLS.
    cp = render("herald-control-plane", values("herald-control-plane", "production"))
    d, c = check_common("herald-control-plane", cp, "control-plane", grace_over=30)
    e = env(c)
    assert e["HERALD_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "herald-postgres", "key": "url"}
    assert e["HERALD_PREVIOUS_SECRET_KEYS"]["valueFrom"]["secretKeyRef"]["key"] == "previous"
    assert e["HERALD_CLIENT_CA"]["value"] == "/etc/herald/client-ca/ca.crt"
    init = d["spec"]["template"]["spec"]["initContainers"][0]
    assert init["args"] == ["migrate"] and "secretKeyRef" in env(init)["HERALD_DATABASE_URL"]["valueFrom"]
    assert d["spec"]["replicas"] == 3
    print("chart promises hold: zone, token and secrets from Secrets, probes, grace, PDB, non-root, migrations")


if __name__ == "__main__":
    main()
