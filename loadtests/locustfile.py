"""Locust scenario for mtrank: /rank with a realistic mix of candidate counts, and feedback.

Run it through ``loadtests/run.py`` (which starts the stack, paces the load, publishes bundle versions
during the reload scenario and checks the results), or by hand against running replicas::

    MTRANK_LT_HOSTS=http://127.0.0.1:8000,http://127.0.0.1:8001 MTRANK_LT_DATA=demo-run/demo.parquet \\
        locust -f loadtests/locustfile.py --headless -u 8 -r 8 -t 60s

Environment:

* ``MTRANK_LT_HOSTS``: replica URLs; user k talks to replica k mod N over its own keep-alive connection
  (``--host`` is ignored).
* ``MTRANK_LT_DATA``: the synthetic feed (``mtrank demo`` writes ``demo.parquet``): users, contexts
  and item features of the bodies are drawn from it.
* ``MTRANK_LT_MIX``: candidate counts and weights, default ``50:4,200:3,500:2,1000:1``. Requests are
  named ``/rank [n]`` so locust reports each class on its own.
* ``MTRANK_LT_RATE``: requests/s per user (``constant_throughput``); 0 = closed loop, no pause.
* ``MTRANK_LT_FEEDBACK``: clicks per impression (default 0.02): after each /rank a ``/feedback`` batch
  labels ``ctr`` (and ``like`` for some) of that many of the returned items, as a client logging clicks
  and skips would (``ctr: 0`` for a few items shown above a click).
* ``MTRANK_LT_LOG``: a JSON-lines file each locust process appends its responses to (start, end,
  replica, class, status, model version, degraded): the runner checks versions against its publish log.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from itertools import count
from pathlib import Path
from typing import Any

from locust import FastHttpUser, between, constant_throughput, events, task

HOSTS = [h for h in os.environ.get("MTRANK_LT_HOSTS", "http://127.0.0.1:8000").split(",") if h]
MIX = [(int(n), float(w)) for n, w in (p.split(":") for p in os.environ.get("MTRANK_LT_MIX", "50:4,200:3,500:2,1000:1").split(","))]
RATE = float(os.environ.get("MTRANK_LT_RATE", "0"))
CLICK_RATE = float(os.environ.get("MTRANK_LT_FEEDBACK", "0.02"))
LOG = os.environ.get("MTRANK_LT_LOG")
USER_COLS = ["user_age_bucket", "user_country", "user_activity", "device", "hour"]
ITEM_COLS = ["item_category", "item_price", "item_tags", "item_popularity"]


def _rows() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(users with their context, items with their features) from the synthetic feed."""
    path = os.environ.get("MTRANK_LT_DATA")
    if not path:
        users = [{"user_id": f"u{k}", "context": {"device": "ios", "hour": k % 24}} for k in range(100)]
        items = [{"item_id": f"i{k}", "features": {"item_category": f"c{k % 9}", "item_price": 1.0 + k % 50}}
                 for k in range(5000)]
        return users, items
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["user_id", *USER_COLS, "item_id", *ITEM_COLS]).slice(0, 50_000).to_pylist()
    users = {r["user_id"]: {"user_id": r["user_id"], "context": {c: r[c] for c in USER_COLS}} for r in table}
    items = {r["item_id"]: {"item_id": r["item_id"], "features": {c: r[c] for c in ITEM_COLS}} for r in table}
    return list(users.values()), list(items.values())


USERS, ITEMS = _rows()
_ids = count()
_RUN = os.urandom(4).hex()  # request ids are single-use in the join store: unique across runs on one Redis too
_log_lock = threading.Lock()
_records: list[str] = []
POOL = 24  # bodies per candidate class, built once: the load generator's CPU goes to sending, not to JSON


def _bodies(rng: random.Random) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for n, _ in MIX:
        out[n] = []
        for _k in range(POOL):
            user = rng.choice(USERS)
            out[n].append(json.dumps({"request_id": "__RID__", "user_id": user["user_id"], "context": user["context"],
                                      "candidates": rng.sample(ITEMS, min(n, len(ITEMS))), "top_k": 50}))
    return out


BODIES = _bodies(random.Random(0))
JSON = {"content-type": "application/json"}


class RankUser(FastHttpUser):
    wait_time = constant_throughput(RATE) if RATE > 0 else between(0, 0)
    _next = count()

    def on_start(self) -> None:
        k = next(RankUser._next)
        self.replica = HOSTS[k % len(HOSTS)]
        self.rng = random.Random(k)

    @task
    def rank(self) -> None:
        n = self.rng.choices([m for m, _ in MIX], [w for _, w in MIX])[0]
        request_id = f"lt-{_RUN}-{os.getpid()}-{next(_ids)}"
        data = self.rng.choice(BODIES[n]).replace("__RID__", request_id, 1)
        start = time.time()
        # absolute URLs: each user keeps to its replica (the session's base URL is --host)
        with self.client.post(f"{self.replica}/rank", data=data, headers=JSON, name=f"/rank [{n}]",
                              catch_response=True) as r:
            end = time.time()
            version = degraded = None
            if r.status_code == 200:
                doc = r.json()
                version, degraded = doc.get("model_version"), doc.get("degraded")
                if len(doc.get("items", [])) != min(50, n):
                    r.failure(f"{len(doc.get('items', []))} items for top_k 50 of {n}")
            else:
                r.failure(f"status {r.status_code}: {r.text[:200]}")
            if LOG:
                rec = json.dumps({"start": start, "end": end, "replica": self.replica, "n": n,
                                  "status": r.status_code, "version": version, "degraded": degraded})
                with _log_lock:
                    _records.append(rec)
        if r.status_code == 200:
            self.feedback(request_id, doc["items"])

    def feedback(self, request_id: str, items: list[dict[str, Any]]) -> None:
        clicks = [k for k in range(len(items)) if self.rng.random() < CLICK_RATE]
        if not clicks:
            return
        events_ = []
        for k in clicks:
            labels: dict[str, float] = {"ctr": 1.0}
            if self.rng.random() < 0.3:
                labels["like"] = 1.0
            events_.append({"request_id": request_id, "item_id": items[k]["item_id"], "labels": labels})
            if k > 0 and k - 1 not in clicks:  # the item shown just above a click was skipped
                events_.append({"request_id": request_id, "item_id": items[k - 1]["item_id"], "labels": {"ctr": 0.0}})
        with self.client.post(f"{self.replica}/feedback", json={"events": events_}, name="/feedback",
                              catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"status {r.status_code}: {r.text[:200]}")


@events.test_stop.add_listener
def _write_log(**_: Any) -> None:
    if LOG:
        with _log_lock, Path(LOG).open("a") as fh:
            fh.write("".join(line + "\n" for line in _records))
            _records.clear()
