#!/usr/bin/env python3
"""Validate geopush's deployment files: `k8s-validate.py --kubectl K --promtool P [--root DIR]`.

Run by `.ci/k8s-validate`, which installs the tools (pinned) under `target/`. Checks, each
printing every problem it finds:

1. Kubernetes manifests. `kubectl kustomize` renders deploy/k8s/base and every overlay
   (a render error is a failure). Every object of a core kind is validated with
   kubernetes-validate in strict mode (unknown fields are errors) against the oldest
   Kubernetes we support (1.30: `lifecycle.preStop.sleep`) and the newest schema the package
   has. ServiceMonitor and PrometheusRule (monitoring.coreos.com/v1) are CRDs, absent from
   the core schemas: they are validated against JSON schemas generated from the
   prometheus-operator models of `cloudcoil.models.prometheus_operator` (made from the
   operator's CRDs), made strict the same way. An object of any other kind is an error, not
   a skip. deploy/k8s/examples/*.yaml are validated the same way.
2. geopush's own rules over the rendered objects: strict security contexts, pinned images,
   requests and limits, references that resolve (ConfigMaps, Secrets, Service selectors and
   ports, HPA and PDB targets, NetworkPolicy selectors), the gateway's drain timing
   (terminationGracePeriodSeconds > preStop + GEOPUSH_DRAIN_SECONDS +
   GEOPUSH_SHUTDOWN_GRACE_SECONDS), probes, the prod overlay shipping no Secret, the
   required alerts and their connection limit matching GEOPUSH_MAX_CONNECTIONS.
3. Metric names: every `geopush_*` name in the PrometheusRule and the Grafana dashboard must
   be exported, as derived from the `registry.register("geopush_...", ...)` calls in
   gateway/src and worker/src and the metric's type (counters get `_total`, histograms
   `_bucket`/`_sum`/`_count`). All PromQL (alerts and dashboard queries, with the dashboard's
   variables substituted) must pass `promtool check rules`.
4. The Grafana dashboard is valid JSON with panels and queries.
5. The Dockerfile: base images pinned (no `latest`, no untagged image), `gateway` and `worker`
   targets that run as a numeric non-root USER with an exec-form ENTRYPOINT (the binary is
   PID 1 and gets SIGTERM); a .dockerignore that keeps target/ and .git out.

Then, unless --no-self-test, a negative self-test: it breaks a copy of the files in a temp
dir in one way at a time (a misspelt field, a wrong type, a CRD typo, bad PromQL, a renamed
metric, a too-short grace period, ...) and fails unless every one of them is caught, so
the validator cannot silently pass everything.

Exit status: 0 when everything is valid, 1 on a problem, 2 on bad usage or missing tools.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import jsonschema
    import kubernetes_validate.utils as kv
    import yaml
except ImportError as e:  # pragma: no cover - depends on the environment
    print(f"k8s-validate.py: missing Python packages ({e}); run .ci/k8s-validate", file=sys.stderr)
    sys.exit(2)

# The schema files are large (1.8 MB of definitions per version); kubernetes-validate reads
# them again for every object. They are never modified: read each once.
kv.schema_contents = functools.lru_cache(maxsize=None)(kv.schema_contents)
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

MIN_KUBERNETES = "1.30"
OVERLAYS = ("deploy/k8s/overlays/dev", "deploy/k8s/overlays/prod")
# Overlays whose Secret comes from outside: they must not render one.
EXTERNAL_SECRET_OVERLAYS = ("deploy/k8s/overlays/prod",)
BASE = "deploy/k8s/base"
EXAMPLES = "deploy/k8s/examples"
DASHBOARD = "deploy/grafana/geopush-dashboard.json"
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}
REQUIRED_ALERTS = (
    "GeopushBusDown",
    "GeopushPubSubProbeFailing",
    "GeopushSlowConsumerClosesRising",
    "GeopushConnectionsNearLimit",
)
# Defaults of the gateway flags (gateway/src/config.rs) used when a ConfigMap omits them.
GATEWAY_DEFAULTS = {"GEOPUSH_DRAIN_SECONDS": "10", "GEOPUSH_SHUTDOWN_GRACE_SECONDS": "5",
                    "GEOPUSH_MAX_CONNECTIONS": "50000"}
# Seconds between the end of the grace period and the kubelet's SIGKILL, at least.
GRACE_MARGIN_SECONDS = 5
POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
METRIC_RE = re.compile(r"\bgeopush_[a-z0-9_]+\b")
_CRD_SCHEMAS = None


class Checker:
    def __init__(self, root: Path, kubectl: str, promtool: str, quiet: bool = False):
        self.root = root
        self.kubectl = kubectl
        self.promtool = promtool
        self.quiet = quiet
        self.errors: list[str] = []

    def error(self, where: str, message: str) -> None:
        self.errors.append(f"{where}: {message}")

    def info(self, message: str) -> None:
        if not self.quiet:
            print(message)

    # ---------------------------------------------------------------- rendering + schemas

    def render(self, rel: str) -> list[dict] | None:
        result = subprocess.run([self.kubectl, "kustomize", str(self.root / rel)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            self.error(rel, "kustomize failed: " + result.stderr.strip())
            return None
        try:
            return [d for d in yaml.load_all(result.stdout, Loader=YAML_LOADER) if d is not None]
        except yaml.YAMLError as e:
            self.error(rel, f"kustomize output is not YAML: {e}")
            return None

    @staticmethod
    def crd_schemas() -> dict:
        global _CRD_SCHEMAS
        if _CRD_SCHEMAS is None:
            from cloudcoil.models.prometheus_operator import v1 as promop

            schemas = {}
            for model in (promop.ServiceMonitor, promop.PrometheusRule):
                schema = model.model_json_schema(by_alias=True)
                strictify(schema)
                schemas[("monitoring.coreos.com/v1", model.__name__)] = schema
            _CRD_SCHEMAS = schemas
        return _CRD_SCHEMAS

    def validate_schemas(self, where: str, docs: list[dict]) -> tuple[int, int]:
        versions = (MIN_KUBERNETES, kv.latest_version())
        core = crd = 0
        for doc in docs:
            name = f"{where}: {doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
            key = (doc.get("apiVersion"), doc.get("kind"))
            if key in CRD_KINDS:
                crd += 1
                validator = jsonschema.Draft202012Validator(self.crd_schemas()[key])
                for e in validator.iter_errors(doc):
                    e = innermost(e)
                    path = "/".join(str(p) for p in e.absolute_path)
                    self.errors.append(f"{name}: CRD schema (prometheus-operator): {path}: {short(e.message)}")
                continue
            core += 1
            for version in versions:
                try:
                    kv.validate(doc, version, strict=True)
                except kv.SchemaNotFoundError:
                    self.errors.append(f"{name}: no schema for {key} in Kubernetes {version} "
                                       "(neither a core kind nor a known CRD)")
                    break
                except kv.ValidationError as e:
                    path = "/".join(str(p) for p in e.absolute_path)
                    self.errors.append(f"{name}: Kubernetes {version} schema (strict): {path}: {short(e.message)}")
                    break
        return core, crd

    # ---------------------------------------------------------------- geopush rules

    def check_objects(self, where: str, docs: list[dict], external_secret: bool) -> None:
        by_kind: dict[str, list[dict]] = {}
        for d in docs:
            by_kind.setdefault(d["kind"], []).append(d)
        configmaps = {d["metadata"]["name"]: d.get("data") or {} for d in by_kind.get("ConfigMap", [])}
        secrets = {d["metadata"]["name"]: set((d.get("data") or {}) | (d.get("stringData") or {}))
                   for d in by_kind.get("Secret", [])}
        workloads = [d for d in docs if d["kind"] in POD_KINDS]

        if external_secret and secrets:
            self.error(where, f"renders Secret(s) {sorted(secrets)}: this overlay must expect an "
                              "externally provided Secret")

        external_refs: dict[str, set[str]] = {}
        for w in workloads:
            wname = f"{where}: {w['kind']}/{w['metadata']['name']}"
            pod = w["spec"]["template"]["spec"]
            pod_sc = pod.get("securityContext") or {}
            for c in pod.get("initContainers", []) + pod.get("containers", []):
                cname = f"{wname} container {c['name']}"
                self.check_container(cname, c, pod_sc)
                for ref in c.get("envFrom", []):
                    if "configMapRef" in ref and ref["configMapRef"]["name"] not in configmaps:
                        self.error(cname, f"envFrom ConfigMap {ref['configMapRef']['name']} is not rendered")
                    if "secretRef" in ref:
                        self.secret_ref(cname, ref["secretRef"]["name"], None,
                                        ref["secretRef"].get("optional", False), secrets,
                                        external_secret, external_refs)
                for env in c.get("env", []):
                    src = env.get("valueFrom") or {}
                    if "configMapKeyRef" in src:
                        r = src["configMapKeyRef"]
                        if r["name"] not in configmaps or r["key"] not in configmaps[r["name"]]:
                            if not r.get("optional"):
                                self.error(cname, f"env {env['name']}: ConfigMap key {r['name']}/{r['key']} not rendered")
                    if "secretKeyRef" in src:
                        r = src["secretKeyRef"]
                        self.secret_ref(cname, r["name"], r["key"], r.get("optional", False), secrets,
                                        external_secret, external_refs)
        for name, keys in sorted(external_refs.items()):
            self.info(f"  {where}: expects an external Secret {name} with keys {sorted(keys)}")

        # Services, PDBs, HPAs and NetworkPolicies must point at something.
        templates = [(w, w["spec"]["template"]) for w in workloads]
        for s in by_kind.get("Service", []):
            sel = (s.get("spec") or {}).get("selector") or {}
            matches = [(w, t) for w, t in templates if labels_match(sel, t["metadata"].get("labels", {}))]
            sname = f"{where}: Service/{s['metadata']['name']}"
            if not matches:
                self.error(sname, f"selector {sel} matches no pod template")
                continue
            for port in s["spec"].get("ports", []):
                target = port.get("targetPort", port["port"])
                for w, t in matches:
                    ports = [p for c in t["spec"]["containers"] for p in c.get("ports", [])]
                    if not any(p.get("name") == target or p["containerPort"] == target for p in ports):
                        self.error(sname, f"targetPort {target} is no port of {w['metadata']['name']}")
        for p in by_kind.get("PodDisruptionBudget", []):
            sel = p["spec"]["selector"].get("matchLabels", {})
            if not any(labels_match(sel, t["metadata"].get("labels", {})) for _, t in templates):
                self.error(f"{where}: PodDisruptionBudget/{p['metadata']['name']}", f"selector {sel} matches no pod")
        for np in by_kind.get("NetworkPolicy", []):
            sel = np["spec"]["podSelector"].get("matchLabels", {})
            if not any(labels_match(sel, t["metadata"].get("labels", {})) for _, t in templates):
                self.error(f"{where}: NetworkPolicy/{np['metadata']['name']}", f"podSelector {sel} matches no pod")
        names = {(w["kind"], w["metadata"]["name"]) for w in workloads}
        for h in by_kind.get("HorizontalPodAutoscaler", []):
            ref = h["spec"]["scaleTargetRef"]
            if (ref["kind"], ref["name"]) not in names:
                self.error(f"{where}: HorizontalPodAutoscaler/{h['metadata']['name']}", f"target {ref} is not rendered")
            if any(w["metadata"]["name"] == ref["name"] and "replicas" in w["spec"] for w in workloads):
                self.error(f"{where}: Deployment/{ref['name']}", "has `replicas` although an HPA scales it "
                                                                 "(every apply would reset the count)")

        gateway = next((w for w in workloads if w["metadata"]["name"] == "geopush-gateway"), None)
        if gateway is None:
            self.error(where, "no Deployment geopush-gateway")
        else:
            self.check_gateway(where, gateway, configmaps, by_kind)
        worker = next((w for w in workloads if w["metadata"]["name"] == "geopush-worker"), None)
        if worker is None:
            self.error(where, "no Deployment geopush-worker")
        else:
            self.check_probes(f"{where}: Deployment/geopush-worker", worker)
        for rule in by_kind.get("PrometheusRule", []):
            self.check_rules(f"{where}: PrometheusRule/{rule['metadata']['name']}", rule,
                             gateway, configmaps)

    def secret_ref(self, where, name, key, optional, secrets, external, external_refs) -> None:
        if external:
            external_refs.setdefault(name, set())
            if key and not optional:
                external_refs[name].add(key)
            return
        if name not in secrets:
            if not optional:
                self.error(where, f"Secret {name} is not rendered (and not optional)")
        elif key and key not in secrets[name] and not optional:
            self.error(where, f"Secret {name} has no key {key}")

    def check_container(self, where: str, c: dict, pod_sc: dict) -> None:
        image = c.get("image", "")
        if "@sha256:" not in image:
            last = image.rsplit("/", 1)[-1]
            if ":" not in last:
                self.error(where, f"image {image!r} has no tag")
            elif last.rsplit(":", 1)[1] == "latest":
                self.error(where, f"image {image!r} uses the `latest` tag")
        sc = c.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False:
            self.error(where, "securityContext.allowPrivilegeEscalation must be false")
        if sc.get("readOnlyRootFilesystem") is not True:
            self.error(where, "securityContext.readOnlyRootFilesystem must be true")
        if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
            self.error(where, "securityContext.capabilities.drop must contain ALL")
        if sc.get("privileged"):
            self.error(where, "must not be privileged")
        if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
            self.error(where, "runAsNonRoot must be true (container or pod)")
        uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
        if uid == 0:
            self.error(where, "runAsUser must not be 0")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            self.error(where, "seccompProfile must be RuntimeDefault (container or pod)")
        res = c.get("resources") or {}
        for k in ("cpu", "memory"):
            if k not in (res.get("requests") or {}):
                self.error(where, f"resources.requests.{k} is missing")
        if "memory" not in (res.get("limits") or {}):
            self.error(where, "resources.limits.memory is missing")

    def check_probes(self, where: str, w: dict) -> dict:
        c = w["spec"]["template"]["spec"]["containers"][0]
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            got = ((c.get(probe) or {}).get("httpGet") or {}).get("path")
            if got != path:
                self.error(where, f"{probe} must GET {path} (has {got!r})")
        ru = (w["spec"].get("strategy") or {}).get("rollingUpdate") or {}
        if ru.get("maxUnavailable") not in (0, "0", "0%"):
            self.error(where, "strategy.rollingUpdate.maxUnavailable must be 0")
        return c

    def check_gateway(self, where: str, w: dict, configmaps: dict, by_kind: dict) -> None:
        gw = f"{where}: Deployment/geopush-gateway"
        c = self.check_probes(gw, w)
        pod = w["spec"]["template"]["spec"]
        config = resolved_env(c, configmaps)
        for k, v in GATEWAY_DEFAULTS.items():
            config.setdefault(k, v)
        pre_stop = ((c.get("lifecycle") or {}).get("preStop")) or {}
        if "sleep" in pre_stop:
            pre = int(pre_stop["sleep"]["seconds"])
        elif "exec" in pre_stop:
            cmd = pre_stop["exec"].get("command", [])
            if cmd and Path(cmd[0]).name in ("sh", "bash", "sleep"):
                self.error(gw, f"preStop runs {cmd[0]!r}, but the distroless image has no shell or sleep")
            pre = 0
        else:
            self.error(gw, "needs a preStop hook (a sleep, so endpoints update before SIGTERM)")
            pre = 0
        drain = float(config["GEOPUSH_DRAIN_SECONDS"])
        grace = float(config["GEOPUSH_SHUTDOWN_GRACE_SECONDS"])
        tgps = pod.get("terminationGracePeriodSeconds", 30)
        need = pre + drain + grace + GRACE_MARGIN_SECONDS
        if tgps < need:
            self.error(gw, f"terminationGracePeriodSeconds {tgps} < preStop {pre} + GEOPUSH_DRAIN_SECONDS "
                           f"{drain:g} + GEOPUSH_SHUTDOWN_GRACE_SECONDS {grace:g} + {GRACE_MARGIN_SECONDS} s margin")
        node_id = next((e for e in c.get("env", []) if e["name"] == "GEOPUSH_NODE_ID"), None)
        if ((node_id or {}).get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath") != "metadata.name":
            self.error(gw, "GEOPUSH_NODE_ID must come from the pod name (fieldRef metadata.name)")
        if config.get("GEOPUSH_LOG_FORMAT") != "json":
            self.error(gw, "GEOPUSH_LOG_FORMAT must be json")
        listen = config.get("GEOPUSH_LISTEN", "127.0.0.1:8080")
        host, _, port = listen.rpartition(":")
        if host not in ("0.0.0.0", "[::]"):
            self.error(gw, f"GEOPUSH_LISTEN {listen} does not listen on every interface")
        if not any(p.get("containerPort") == int(port) for p in c.get("ports", [])):
            self.error(gw, f"GEOPUSH_LISTEN port {port} is no containerPort")
        zones = [t for t in pod.get("topologySpreadConstraints", [])
                 if t.get("topologyKey") == "topology.kubernetes.io/zone"]
        if not zones:
            self.error(gw, "needs a topologySpreadConstraint across topology.kubernetes.io/zone")
        for kind in ("HorizontalPodAutoscaler", "PodDisruptionBudget"):
            if not any(o["metadata"]["name"] == "geopush-gateway" for o in by_kind.get(kind, [])):
                self.error(where, f"no {kind} geopush-gateway")

    def check_rules(self, where: str, rule: dict, gateway: dict | None, configmaps: dict) -> None:
        rules = [r for g in rule["spec"].get("groups", []) for r in g.get("rules", [])]
        alerts = {r.get("alert"): r for r in rules if r.get("alert")}
        for name in REQUIRED_ALERTS:
            if name not in alerts:
                self.error(where, f"alert {name} is missing")
        near = alerts.get("GeopushConnectionsNearLimit")
        if near and gateway is not None:
            m = re.search(r"geopush_connections\)?\s*>\s*[0-9.]+\s*\*\s*([0-9]+)", str(near["expr"]))
            limit = resolved_env(gateway["spec"]["template"]["spec"]["containers"][0], configmaps).get(
                "GEOPUSH_MAX_CONNECTIONS", GATEWAY_DEFAULTS["GEOPUSH_MAX_CONNECTIONS"])
            if not m:
                self.error(where, "GeopushConnectionsNearLimit: expected `geopush_connections > F * LIMIT`")
            elif m.group(1) != str(limit):
                self.error(where, f"GeopushConnectionsNearLimit compares to {m.group(1)} but the gateway's "
                                  f"GEOPUSH_MAX_CONNECTIONS is {limit}: change both together")
        self.check_metric_names(where, yaml.safe_dump(rule), [str(r.get("expr", "")) for r in rules])
        self.promtool_rules(where, {"groups": rule["spec"]["groups"]})

    # ---------------------------------------------------------------- metrics + PromQL

    def exported_metrics(self) -> set[str]:
        if hasattr(self, "_exported"):
            return self._exported
        exported: set[str] = set()
        self._families: set[str] = set()
        register = re.compile(r'\.register\(\s*"(geopush_[a-z0-9_]+)"\s*,\s*"(?:[^"\\]|\\.)*"\s*,'
                              r'\s*([A-Za-z_][\w.]*)\.clone\(\)')
        found = 0
        for src in ("gateway/src", "worker/src"):
            for path in sorted((self.root / src).rglob("*.rs")):
                text = path.read_text()
                for m in register.finditer(text):
                    found += 1
                    name, ident = m.group(1), m.group(2).rsplit(".", 1)[-1]
                    self._families.add(name)
                    kinds = set()
                    for pat in (rf"\b{ident}\s*:\s*(?:Family<[^,<>]+,\s*)?(Counter|Gauge|Histogram)\b",
                                rf"\blet\s+{ident}\s*=\s*(?:Family::<[^,<>]+,\s*)?(Counter|Gauge|Histogram)\b"):
                        kinds.update(re.findall(pat, text))
                    if len(kinds) != 1:
                        self.error(f"{path.relative_to(self.root)}", f"cannot tell the type of metric {name} "
                                                                     f"(`{ident}`: {sorted(kinds) or 'not found'})")
                        continue
                    kind = kinds.pop()
                    if kind == "Counter":
                        exported.add(name + "_total")
                    elif kind == "Histogram":
                        exported.update(name + s for s in ("_bucket", "_sum", "_count"))
                    else:
                        exported.add(name)
        if found == 0:
            self.error("gateway/src, worker/src", "found no metric registrations: has the code moved?")
        self._exported = exported
        return exported

    def check_metric_names(self, where: str, text: str, queries: list[str]) -> None:
        """Every geopush_* name in `queries` (PromQL) must be an exported series; in the rest of
        `text` (descriptions) a registered family name (`geopush_delivery_seconds`) also does."""
        series = self.exported_metrics()
        families = series | self._families
        for name in sorted(set(METRIC_RE.findall(" ".join(queries)))):
            if name not in series:
                self.error(where, f"metric {name} is not exported by the binaries")
        for name in sorted(set(METRIC_RE.findall(text)) - set(METRIC_RE.findall(" ".join(queries)))):
            if name not in families:
                self.error(where, f"metric {name} (in a description) is not exported by the binaries")

    def promtool_rules(self, where: str, rules: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "rules.yaml"
            path.write_text(yaml.safe_dump(rules))
            result = subprocess.run([self.promtool, "check", "rules", str(path)],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                out = " ".join((result.stdout + result.stderr).replace(str(path), "rules").split())
                self.error(where, "promtool check rules failed: " + out)

    def check_dashboard(self) -> None:
        path = self.root / DASHBOARD
        try:
            dash = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            self.error(DASHBOARD, f"not valid JSON: {e}")
            return
        if not dash.get("uid") or not dash.get("title"):
            self.error(DASHBOARD, "needs a uid and a title")
        exprs = []
        for p in walk_panels(dash.get("panels", [])):
            for t in p.get("targets", []):
                if t.get("expr"):
                    exprs.append((p.get("title", "?"), t["expr"]))
        if len(exprs) < 10:
            self.error(DASHBOARD, f"only {len(exprs)} queries: is the file truncated?")
        queries = [e for _, e in exprs] + [json.dumps(v.get("query", "")) for v in
                                           (dash.get("templating") or {}).get("list", [])]
        self.check_metric_names(DASHBOARD, json.dumps(dash), queries)
        records = []
        for i, (title, expr) in enumerate(exprs):
            records.append({"record": f"dashboard:query_{i}", "expr": grafana_to_promql(expr),
                            "labels": {"panel": title}})
        self.promtool_rules(DASHBOARD, {"groups": [{"name": "dashboard", "rules": records}]})
        self.info(f"ok: {DASHBOARD}: {len(exprs)} queries, PromQL and metric names checked")

    # ---------------------------------------------------------------- Dockerfile

    def check_dockerfile(self) -> None:
        where = "Dockerfile"
        try:
            text = (self.root / "Dockerfile").read_text()
        except OSError as e:
            self.error(where, str(e))
            return
        lines = join_continuations(text)
        args: dict[str, str] = {}
        stages: dict[str, list[str]] = {}
        current = None
        for line in lines:
            word, _, rest = line.partition(" ")
            word = word.upper()
            if word == "ARG" and current is None:
                k, _, v = rest.strip().partition("=")
                args[k] = v
            elif word == "FROM":
                parts = rest.split()
                image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), ""), parts[0])
                if image not in stages:  # not a reference to an earlier stage
                    self.check_base_image(where, parts[0], image)
                current = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else f"#{len(stages)}"
                stages[current] = []
            elif current is not None:
                stages[current].append(line)
        if not any("cargo build --release --locked" in line for s in stages.values() for line in s):
            self.error(where, "no `cargo build --release --locked`")
        for target in ("gateway", "worker"):
            body = stages.get(target)
            if body is None:
                self.error(where, f"no `{target}` stage (docker build --target {target})")
                continue
            users = [line.split(None, 1)[1].strip() for line in body if line.upper().startswith("USER ")]
            if not users:
                self.error(where, f"stage {target}: no USER (it would run as root)")
            elif not re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", users[-1]):
                self.error(where, f"stage {target}: USER {users[-1]} must be a numeric non-root UID "
                                  "(runAsNonRoot can only verify a number)")
            entry = [line for line in body if line.upper().startswith("ENTRYPOINT ")]
            if not entry:
                self.error(where, f"stage {target}: no ENTRYPOINT")
            else:
                try:
                    argv = json.loads(entry[-1].split(None, 1)[1])
                except json.JSONDecodeError:
                    argv = None
                if not isinstance(argv, list) or not argv or argv[0] != f"/usr/local/bin/geopush-{target}":
                    self.error(where, f"stage {target}: ENTRYPOINT must be the exec form "
                                      f'["/usr/local/bin/geopush-{target}", ...] so the binary is PID 1')
            if any(line.upper().startswith("RUN ") for line in body):
                self.error(where, f"stage {target}: RUN in the runtime stage (the image has no shell)")
        try:
            ignore = {ln.strip().rstrip("/") for ln in (self.root / ".dockerignore").read_text().splitlines()}
        except OSError:
            self.error(".dockerignore", "missing")
        else:
            for needed in ("target", ".git"):
                if needed not in ignore:
                    self.error(".dockerignore", f"does not exclude {needed}")
        self.info("ok: Dockerfile checked" if not any(e.startswith(("Dockerfile", ".dockerignore"))
                                                      for e in self.errors) else "Dockerfile: problems")

    def check_base_image(self, where: str, written: str, image: str) -> None:
        if not image:
            self.error(where, f"FROM {written}: unresolved image")
            return
        if "@sha256:" in image:
            return
        last = image.rsplit("/", 1)[-1]
        if ":" not in last:
            self.error(where, f"FROM {image}: no tag (means latest); pin a version")
        elif last.rsplit(":", 1)[1] == "latest":
            self.error(where, f"FROM {image}: `latest` tag; pin a version")

    # ---------------------------------------------------------------- all

    def run(self, parts=("k8s", "dashboard", "docker")) -> list[str]:
        self.errors = []
        if "k8s" in parts:
            self.check_k8s()
        if "dashboard" in parts:
            self.check_dashboard()
        if "docker" in parts:
            self.check_dockerfile()
        return self.errors

    def check_k8s(self) -> None:
        base = self.render(BASE)
        if base is not None:
            core, crd = self.validate_schemas(BASE, base)
            self.info(f"ok: {BASE}: rendered {len(base)} objects ({core} core, {crd} CRD)")
        for overlay in OVERLAYS:
            docs = self.render(overlay)
            if docs is None:
                continue
            before = len(self.errors)
            core, crd = self.validate_schemas(overlay, docs)
            self.check_objects(overlay, docs, overlay in EXTERNAL_SECRET_OVERLAYS)
            if len(self.errors) == before:
                self.info(f"ok: {overlay}: {len(docs)} objects ({core} core kinds valid against Kubernetes "
                          f"{MIN_KUBERNETES} and {kv.latest_version()}, strict; {crd} ServiceMonitor/"
                          "PrometheusRule valid against the prometheus-operator schema; geopush rules hold)")
        for path in sorted((self.root / EXAMPLES).glob("*.yaml")):
            rel = str(path.relative_to(self.root))
            try:
                docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
            except yaml.YAMLError as e:
                self.error(rel, f"not YAML: {e}")
                continue
            core, crd = self.validate_schemas(rel, docs)
            self.check_metric_names(rel, path.read_text(), [path.read_text()])
            self.info(f"ok: {rel}: {core + crd} objects")


# ------------------------------------------------------------------------ helpers

def innermost(error):
    """The most specific cause of an anyOf/oneOf failure (a field's pattern, not its parent)."""
    while error.context:
        error = max(error.context, key=lambda e: (len(e.absolute_path), e.validator not in ("type", "anyOf")))
    return error


def short(message: str, limit: int = 240) -> str:
    return message if len(message) <= limit else message[:limit] + " ..."


def strictify(schema) -> None:
    """Reject unknown fields, as the API server's strict field validation does."""
    if isinstance(schema, dict):
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        for v in schema.values():
            strictify(v)
    elif isinstance(schema, list):
        for v in schema:
            strictify(v)


def labels_match(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def resolved_env(container: dict, configmaps: dict) -> dict:
    """The container's literal environment: envFrom ConfigMaps in order, then `env` values."""
    env: dict[str, str] = {}
    for ref in container.get("envFrom", []):
        if "configMapRef" in ref:
            env.update(configmaps.get(ref["configMapRef"]["name"], {}))
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
    return env


def walk_panels(panels: list) -> list:
    out = []
    for p in panels:
        out.append(p)
        out.extend(walk_panels(p.get("panels", [])))
    return out


def grafana_to_promql(expr: str) -> str:
    """Substitute Grafana's variables so that promtool can parse the query."""
    expr = re.sub(r"\$__(rate_interval|interval|range)\b|\$\{__(rate_interval|interval|range)\}", "5m", expr)
    expr = expr.replace("$max_connections", "50000").replace("${max_connections}", "50000")
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def join_continuations(text: str) -> list[str]:
    lines, buf = [], ""
    for raw in text.splitlines():
        s = raw.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if s.startswith("#"):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        lines.append((buf + s).strip())
        buf = ""
    return lines


# ------------------------------------------------------------------------ self-test

# (what, file, old, new, expected in an error). Each must be caught by the checks above.
BREAKAGES = [
    ("misspelt field (strict core schema)", "deploy/k8s/base/gateway-deployment.yaml",
     "          readinessProbe:", "          readinesProbe:", "readinesProbe"),
    ("wrong type (core schema)", "deploy/k8s/base/worker-service.yaml",
     "      port: 8081", '      port: "eighty"', "Kubernetes"),
    ("ServiceMonitor field typo (CRD schema)", "deploy/k8s/components/monitoring/servicemonitor.yaml",
     "scrapeTimeout:", "scrapeTimout:", "scrapeTimout"),
    ("PrometheusRule bad duration (CRD schema)", "deploy/k8s/components/monitoring/prometheusrule.yaml",
     "for: 1m", "for: 1 minute", "CRD schema"),
    ("unparsable PromQL (promtool)", "deploy/k8s/components/monitoring/prometheusrule.yaml",
     "(geopush_bus_up) == 0", "(geopush_bus_up == 0", "promtool"),
    ("renamed metric in the dashboard", DASHBOARD,
     "geopush_fixes_total", "geopush_fix_total", "geopush_fix_total"),
    ("gauge given a counter suffix in an alert", "deploy/k8s/components/monitoring/prometheusrule.yaml",
     "(geopush_bus_up) == 0", "(geopush_bus_up_total) == 0", "geopush_bus_up_total"),
    ("dashboard not JSON", DASHBOARD, '"panels": [', '"panels": [,', "not valid JSON"),
    ("grace period shorter than preStop + drain + grace", "deploy/k8s/base/gateway-deployment.yaml",
     "terminationGracePeriodSeconds: 30", "terminationGracePeriodSeconds: 15", "terminationGracePeriodSeconds"),
    ("alert limit out of step with GEOPUSH_MAX_CONNECTIONS", "deploy/k8s/overlays/prod/kustomization.yaml",
     "GEOPUSH_MAX_CONNECTIONS=50000", "GEOPUSH_MAX_CONNECTIONS=80000", "GEOPUSH_MAX_CONNECTIONS is 80000"),
    ("a Secret in the prod overlay", "deploy/k8s/overlays/prod/kustomization.yaml",
     "\npatches:\n", "\nsecretGenerator:\n  - name: geopush-secrets\n    literals: [GEOPUSH_JWT_SECRET=x]\n"
                   "\npatches:\n", "externally provided Secret"),
    ("privilege escalation allowed", "deploy/k8s/base/worker-deployment.yaml",
     "allowPrivilegeEscalation: false", "allowPrivilegeEscalation: true", "allowPrivilegeEscalation"),
    ("Service selecting no pod", "deploy/k8s/base/gateway-service.yaml",
     "  selector:\n    app.kubernetes.io/name: geopush-gateway",
     "  selector:\n    app.kubernetes.io/name: geopush-gatewya", "matches no pod"),
    ("missing resource (kustomize)", "deploy/k8s/base/kustomization.yaml",
     "  - networkpolicy.yaml", "  - networkpolicy.yaml\n  - no-such-file.yaml", "kustomize failed"),
    ("Dockerfile base image `latest`", "Dockerfile",
     "gcr.io/distroless/cc-debian12:nonroot", "gcr.io/distroless/cc-debian12:latest", "latest"),
    ("Dockerfile runs as root", "Dockerfile", "USER 65532:65532", "USER root", "numeric non-root"),
    ("Dockerfile shell-form ENTRYPOINT", "Dockerfile",
     'ENTRYPOINT ["/usr/local/bin/geopush-worker"]', "ENTRYPOINT /usr/local/bin/geopush-worker", "exec form"),
]


def self_test(root: Path, kubectl: str, promtool: str) -> list[str]:
    failures = []
    with tempfile.TemporaryDirectory(prefix="geopush-k8s-selftest-") as tmp:
        copy = Path(tmp)
        for rel in ("deploy/k8s", "deploy/grafana", "gateway/src", "worker/src"):
            shutil.copytree(root / rel, copy / rel)
        for rel in ("Dockerfile", ".dockerignore"):
            shutil.copy2(root / rel, copy / rel)
        for what, rel, old, new, expected in BREAKAGES:
            path = copy / rel
            original = path.read_text()
            if old not in original:
                failures.append(f"self-test '{what}': {old!r} not found in {rel}; update the self-test")
                continue
            path.write_text(original.replace(old, new, 1))
            # Only the checks that read the broken file: a Dockerfile cannot break a manifest.
            part = ("docker" if rel in ("Dockerfile", ".dockerignore")
                    else "dashboard" if rel == DASHBOARD else "k8s")
            errors = Checker(copy, kubectl, promtool, quiet=True).run(parts=(part,))
            path.write_text(original)
            caught = [e for e in errors if expected in e]
            if caught:
                print(f"ok: broken on purpose, caught: {what}: {caught[0][:160]}")
            else:
                failures.append(f"self-test '{what}' was NOT caught (errors: {errors[:3]})")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--kubectl", required=True)
    parser.add_argument("--promtool", required=True)
    parser.add_argument("--no-self-test", action="store_true")
    args = parser.parse_args()
    for tool in (args.kubectl, args.promtool):
        if not shutil.which(tool):
            print(f"k8s-validate.py: {tool} not found", file=sys.stderr)
            return 2
    errors = Checker(args.root, args.kubectl, args.promtool).run()
    for e in errors:
        print(f"ERROR: {e}")
    if not args.no_self_test:
        failures = self_test(args.root, args.kubectl, args.promtool)
        for f in failures:
            print(f"ERROR: {f}")
        errors += failures
    if errors:
        print(f"k8s-validate: FAILED with {len(errors)} problem(s)")
        return 1
    print(f"k8s-validate: all deployment files valid; {len(BREAKAGES)} deliberate breakages all caught")
    return 0


if __name__ == "__main__":
    sys.exit(main())
