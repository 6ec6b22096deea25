"""deploy/: the Prometheus config and rules (promtool, rule unit tests), the Grafana dashboard (every query parses
and names metrics the service exports) and the Kubernetes manifests (the API's schemas, and how they fit)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from moviematch_ml.api.app import create_app
from moviematch_ml.features import EXAMPLE
from moviematch_ml.settings import Settings
from promtools import DEPLOY, promtool

PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "moviematch-ml.json"
KUBERNETES = DEPLOY / "kubernetes"
JOB = "moviematch-ml"


# --- Prometheus ---------------------------------------------------------------------------------------------------


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((PROMETHEUS / "rules.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_the_prometheus_config_and_its_rules_are_valid() -> None:
    done = promtool("check", "config", "prometheus.yml", cwd=PROMETHEUS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 13 rules found" in done.stdout


def test_the_rules_pass_their_unit_tests() -> None:
    done = promtool("test", "rules", "rules.test.yml", cwd=PROMETHEUS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_a_broken_rule_test_fails(tmp_path: Path) -> None:
    # The unit tests can fail: the same tests with one expected annotation changed.
    text = (PROMETHEUS / "rules.test.yml").read_text().replace("50% of predictions", "40% of predictions")
    (tmp_path / "rules.test.yml").write_text(text)
    (tmp_path / "rules.yml").write_text((PROMETHEUS / "rules.yml").read_text())
    done = promtool("test", "rules", "rules.test.yml", cwd=tmp_path)
    assert done.returncode != 0
    assert "MovieMatchFallbackShare" in done.stdout + done.stderr


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    assert alerts == {
        "MovieMatchDown",
        "MovieMatchReplicaDown",
        "MovieMatchErrorRate",
        "MovieMatchRefusedPredictions",
        "MovieMatchSlowPredictions",
        "MovieMatchFallbackShare",
        "MovieMatchDegraded",
        "MovieMatchFeatureDrift",
        "MovieMatchHighMemory",
        "MovieMatchStoreFailures",
        "MovieMatchRedisFailures",
    }
    tests = yaml.safe_load((PROMETHEUS / "rules.test.yml").read_text())["tests"]
    fired = {t["alertname"] for test in tests for t in test.get("alert_rule_test", []) if t["exp_alerts"]}
    quiet = {t["alertname"] for test in tests for t in test.get("alert_rule_test", []) if not t["exp_alerts"]}
    assert fired == alerts
    assert {"MovieMatchDown", "MovieMatchErrorRate", "MovieMatchFeatureDrift"} <= quiet  # and stay quiet when fine
    for rule in rules():
        if "alert" in rule:
            assert set(rule["annotations"]) == {"summary", "description"}, rule["alert"]


def test_the_scrape_config_finds_the_pods_the_manifests_make() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert (job["job_name"], job["metrics_path"]) == (JOB, "/metrics")
    (sd,) = job["dns_sd_configs"]
    service = manifest("service-pods.yaml")
    name = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    assert sd["names"] == [name]
    assert service["spec"]["clusterIP"] == "None"  # headless: one address per pod
    assert sd["port"] == container()["ports"][0]["containerPort"]


# --- Grafana --------------------------------------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def queries() -> list[tuple[str, str]]:
    """(panel title, expression) of every query, Grafana's $__rate_interval as Prometheus would see it."""
    return [
        (panel["title"], target["expr"].replace("$__rate_interval", "1m"))
        for panel in dashboard()["panels"]
        for target in panel.get("targets", [])
    ]


def exported_names(tmp_path: Path) -> set[str]:
    """Every sample name the service's /metrics shows, read from the service itself after a prediction."""
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'd.sqlite3'}")
    with TestClient(create_app(settings)) as client:
        client.post("/predict-batch", json={"movies": [{"movie_id": 1, **EXAMPLE}]})
        text = client.get("/metrics").text
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name + ("_total" if family.type == "counter" else ""))
        if family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_sum", "_count")}
    return names


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    found = queries()
    assert len(found) >= 20
    records = [{"record": f"dashboard:query_{i}", "expr": expr} for i, (_, expr) in enumerate(found)]
    (tmp_path / "queries.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    done = promtool("check", "rules", str(tmp_path / "queries.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    # promtool does refuse a query that does not parse.
    bad = {"groups": [{"name": "d", "rules": [{"record": "a:b", "expr": "sum(("}]}]}
    (tmp_path / "bad.yml").write_text(yaml.safe_dump(bad))
    assert promtool("check", "rules", str(tmp_path / "bad.yml")).returncode != 0


def test_every_dashboard_query_names_metrics_the_service_exports(tmp_path: Path) -> None:
    exported = exported_names(tmp_path) | {"up"}
    assert {"moviematch_http_requests_total", "moviematch_drift_inputs_total", "process_cpu_seconds_total"} <= exported
    for title, expr in queries():
        selected = set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", expr))
        named = set(re.findall(r"\b(?:moviematch|process)_[a-z0-9_]+", expr))
        assert selected, f"{title}: no metric selected"
        assert selected | named <= exported, f"{title}: {sorted((selected | named) - exported)} are not exported"
        # Every selector keeps to the service's job.
        assert expr.count("{") == expr.count(f'{{job="{JOB}"'), title


def test_the_dashboard_has_the_panels_operators_need() -> None:
    board = dashboard()
    titles = {panel["title"] for panel in board["panels"]}
    assert {
        "Request rate by route",
        "Error rate",
        "Prediction latency p50 / p95 / p99",
        "Predictions by source and variant",
        "Fallback share",
        "PSI per feature (last hour)",
        "Memory per replica",
        "Store latency p99 and failures",
    } <= titles
    # The PSI panel is the recording rule's expression, word for word.
    (psi,) = [expr for title, expr in queries() if title.startswith("PSI")]
    (recorded,) = [rule["expr"] for rule in rules() if rule.get("record") == "moviematch:drift_psi:1h"]
    assert " ".join(psi.split()) == " ".join(recorded.split())
    # Every panel asks the dashboard's Prometheus, chosen by its variable.
    assert {p["datasource"]["uid"] for p in board["panels"] if p["type"] != "row"} == {"${datasource}"}
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))


# --- Kubernetes -----------------------------------------------------------------------------------------------------


def manifest(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((KUBERNETES / name).read_text())
    return loaded


def container() -> dict[str, Any]:
    (only,) = manifest("deployment.yaml")["spec"]["template"]["spec"]["containers"]
    found: dict[str, Any] = only
    return found


def test_the_manifests_are_valid_kubernetes_resources() -> None:
    kustomization = manifest("kustomization.yaml")
    files = sorted(p.name for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == files
    version = kubernetes_validate.latest_version()
    for name in files:
        kubernetes_validate.validate(manifest(name), version, strict=True)
    # The validator refuses what Kubernetes refuses: a misspelt field.
    broken = manifest("deployment.yaml")
    broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_the_deployment_probes_drains_and_is_sized() -> None:
    pod = manifest("deployment.yaml")["spec"]["template"]["spec"]
    c = container()
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert c["startupProbe"]["httpGet"]["path"] == "/health/live"
    # SIGTERM comes after the preStop pause; the drain then takes up to GRACEFUL_TIMEOUT: all before the SIGKILL.
    pause = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    drain = float(manifest("configmap.yaml")["data"]["GRACEFUL_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] > pause + drain
    assert {"cpu", "memory"} <= set(c["resources"]["requests"])
    assert "memory" in c["resources"]["limits"]
    assert c["ports"][0]["name"] == "http"


def test_service_autoscaler_and_disruption_budget_select_the_deployment() -> None:
    deployment = manifest("deployment.yaml")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for name in ("service.yaml", "service-pods.yaml"):
        assert manifest(name)["spec"]["selector"].items() <= labels.items()
    assert manifest("pdb.yaml")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = manifest("hpa.yaml")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "moviematch-ml"}
    assert manifest("pdb.yaml")["spec"]["minAvailable"] < hpa["minReplicas"]


def test_the_configmap_and_secret_are_settings_the_service_reads() -> None:
    env = {e["name"]: e["value"] for e in container()["env"]}
    sources = {s.get("configMapRef", s.get("secretRef", {}))["name"] for s in container()["envFrom"]}
    assert sources == {manifest("configmap.yaml")["metadata"]["name"], manifest("secret.yaml")["metadata"]["name"]}
    env |= manifest("configmap.yaml")["data"]
    secret = manifest("secret.yaml")["stringData"]
    assert {"DATABASE_URL", "API_KEYS"} <= set(secret)
    assert secret["DATABASE_URL"].startswith("postgresql://")  # replicas share one store
    # Every setting but the access keys (which come with their own work) is one Settings reads, and valid.
    known = {name.upper() for name in Settings.model_fields}
    given = {k: v for k, v in (env | secret).items() if k != "API_KEYS"}
    assert set(given) <= known
    settings = Settings.model_validate({k.lower(): v for k, v in given.items()})
    assert (settings.workers, settings.metrics_enabled, settings.graceful_timeout) == (1, True, 30.0)
