"""The API contract, fuzzed: schemathesis against a real uvicorn server, every operation, every check.

What ``schemathesis run URL/openapi.json --checks all`` does, through its Python API (the engine the
CLI drives): the examples, coverage, fuzzing and stateful phases over every operation of
``/openapi.json``, positive and negative data, all checks, a fixed seed, the admin bearer token as a
header. The default run (``MAX_EXAMPLES`` per operation) is part of the normal suite; the slow one
(``SLOW_EXAMPLES``) is marked ``slow``.

One check is replaced, not dropped: ``positive_data_acceptance`` (schema-valid data must not get a
4xx other than 401/403/404/409/429) becomes ``positive_data_acceptance_at_runtime``, the same check
except that a 422 whose every error names a schema node marked ``x-mtrank-runtime-check`` passes. Those
marks (service/schemas.py, service/openapi.py) document what JSON Schema cannot state: which features
are numeric in the loaded bundle, its task names and binary labels, the uniqueness of ``item_id``
within a request. Any other 422 on schema-valid data still fails.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis.engine import events as st_events
from schemathesis.engine import from_schema
from schemathesis.specs.openapi.checks import positive_data_acceptance

from service.schemas import RUNTIME_CHECK

SEED = 20261126
TOKEN = "contract-token"
MAX_EXAMPLES = 50
SLOW_EXAMPLES = 500
_docs: dict[str, dict[str, Any]] = {}  # schema URL -> the OpenAPI document the server serves


# ----------------------------------------------------------------------------- runtime-check marks


def _resolve(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = doc
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def _children(doc: dict[str, Any], node: dict[str, Any], key: str | int) -> list[dict[str, Any]]:
    """The schemas of ``key`` (a property name or a list index) inside ``node``, through $ref, anyOf and oneOf (one
    per branch that has it)."""
    node = _resolve(doc, node)
    out = []
    for branch in [node, *node.get("anyOf", ()), *node.get("oneOf", ())]:
        branch = _resolve(doc, branch)
        if isinstance(key, int) and "items" in branch:
            out.append(branch["items"])
        elif isinstance(key, str) and key in branch.get("properties", {}):
            out.append(branch["properties"][key])
        elif isinstance(key, str) and isinstance(branch.get("additionalProperties"), dict):
            out.append(branch["additionalProperties"])
    return out


def runtime_checked(doc: dict[str, Any], body_schema: dict[str, Any], loc: list[Any]) -> bool:
    """Whether a node along ``loc`` (``["body", ...]``) of the request body schema carries RUNTIME_CHECK, on any
    branch of the body's unions that ``loc`` can follow."""
    if not loc or loc[0] != "body":
        return False

    def marked(node: dict[str, Any], rest: list[Any]) -> bool:
        if not rest:
            return False
        for child in _children(doc, node, rest[0]):
            if RUNTIME_CHECK in child or RUNTIME_CHECK in _resolve(doc, child) or marked(child, rest[1:]):
                return True
        return False

    return marked(body_schema, list(loc[1:]))


def _body_schema(doc: dict[str, Any], method: str, path: str) -> dict[str, Any] | None:
    op = doc["paths"].get(path, {}).get(method.lower(), {})
    return op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")


@schemathesis.check
def positive_data_acceptance_at_runtime(ctx: Any, response: Any, case: Any) -> bool | None:
    """``positive_data_acceptance``, except for a 422 whose errors all name ``x-mtrank-runtime-check`` nodes."""
    if response.status_code == 422 and case.meta is not None and case.meta.generation.mode.is_positive:
        doc = _docs.get(str(case.operation.schema.location))
        body_schema = _body_schema(doc, case.method, case.path) if doc else None
        try:
            detail = json.loads(response.content)["detail"]
        except (ValueError, KeyError, TypeError):
            detail = None
        if body_schema is not None and isinstance(detail, list) and detail and all(
                runtime_checked(doc, body_schema, d.get("loc", [])) for d in detail):
            return None
    return positive_data_acceptance(ctx, response, case)


# ------------------------------------------------------------------------------------------- runs


def run_contract(url: str, max_examples: int) -> tuple[list[str], dict[str, Any]]:
    """Run schemathesis against ``url``; returns (failures as text, statistics)."""
    schema_url = f"{url}/openapi.json"
    _docs[schema_url] = httpx.get(schema_url).json()
    config = schemathesis.Config.from_dict({
        "seed": SEED,
        "cache": {"enabled": False},  # no state carried between runs (nor a .schemathesis/ folder in the tree)
        "headers": {"Authorization": f"Bearer {TOKEN}"},
        "generation": {"max-examples": max_examples, "mode": "all", "database": "none"},
        "checks": {"enabled": True, "positive_data_acceptance": {"enabled": False},
                   # schemathesis' defaults plus 413: a body over limits.max_body_bytes is rejected by its size
                   "negative_data_rejection": {"expected-statuses": [
                       "400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]}},
        "phases": {"stateful": {"max-steps": 10}},
        "request-timeout": 10,
        "warnings": False,
    })
    schema = schemathesis.openapi.from_url(schema_url, config=config)
    failures: list[str] = []
    stats: dict[str, Any] = {"phases": {}, "requests": 0, "operations": set()}
    for event in from_schema(schema).execute():
        if isinstance(event, st_events.PhaseFinished):
            stats["phases"][str(event.phase.name)] = str(event.status)
        elif isinstance(event, st_events.ScenarioFinished | st_events.FuzzScenarioFinished):
            rec = event.recorder
            stats["requests"] += len(rec.interactions)
            stats["operations"].update(c.value.operation.label for c in rec.cases.values())
            for checks in rec.checks.values():
                for check in checks:
                    if check.failure_info is not None:
                        f = check.failure_info.failure
                        failures.append(f"{rec.label} [{check.name}] {f.title}: {f.message}\n{check.failure_info.code_sample}")
        elif isinstance(event, st_events.NonFatalError | st_events.FatalError):
            failures.append(f"error {getattr(event, 'label', '')}: {event.info.format() if hasattr(event, 'info') else event}")
    return sorted(set(failures)), stats


@pytest.fixture
def contract_server(tmp_path: Path, make_bundle, start_server) -> Iterator[Any]:
    make_bundle(tmp_path)
    yield start_server(tmp_path, admin={"token": TOKEN},
                       fusion={"profiles": {"ctr_only": {"type": "weighted_sum", "weights": {"ctr": 1.0}}}})


def _check(url: str, max_examples: int) -> dict[str, Any]:
    failures, stats = run_contract(url, max_examples)
    assert not failures, f"{len(failures)} schemathesis failures:\n\n" + "\n\n".join(failures)
    return stats


def test_contract_fuzz(contract_server) -> None:
    stats = _check(contract_server.url, MAX_EXAMPLES)
    doc = _docs[f"{contract_server.url}/openapi.json"]
    n_ops = sum(len(ops) for ops in doc["paths"].values())
    assert len(stats["operations"]) == n_ops, stats
    assert stats["phases"].get("stateful") == "success", stats


@pytest.mark.slow
def test_contract_fuzz_slow(contract_server) -> None:
    stats = _check(contract_server.url, SLOW_EXAMPLES)
    assert stats["phases"].get("stateful") == "success", stats
