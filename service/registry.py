"""Model registry: which bundle serves, hot reload, rollback.

``BUNDLES_DIR`` holds version directories and the ``CURRENT`` pointer (``mtrank.bundle``). Triggers:

* ``poll``: the pointer is read every ``reload.poll_interval_ms``; a *change* of its content loads
  the named version (a pointer that did not change is not re-applied, so an admin pin or a
  rollback sticks until the pointer moves again);
* ``admin``: ``POST /admin/reload`` (a given version, or "follow CURRENT");
* ``pubsub``: a message on the Redis channel ``reload.pubsub_channel`` (payload: a version, or empty
  for "follow CURRENT"), so a fleet reloads together;
* ``rollback``: ``POST /admin/rollback`` swaps back to the previous version (kept loaded);
* ``shadow``: ``PUT /admin/shadow`` (or ``shadow.version`` at start) loads a version into the shadow slot.

Models live in named **slots**: ``primary`` (serves ``/rank``), ``previous`` (the rollback target)
and ``shadow`` (scored on a sample of traffic off the request path, ``service.shadow``). The slot
map is immutable and replaced whole, so a reader sees one consistent set. After every change the
registry calls its ``listeners`` with the slot and its new model (or None): that is how metrics
learn the active version, pre-create its series and reset their monitoring window.

A load runs on the triggering thread (poller, pub/sub listener or a worker thread of the admin
request), never on the event loop: ``verify_bundle`` (manifest, checksums, I/O names, golden
outputs), the serving session built with the configured threads, fusion profiles compiled
against the bundle's tasks, golden outputs re-checked on the serving session, warm-up. Only a
model passing all of it is swapped in, by replacing one reference: a request holds the model it
read at its start until it finishes. A failed load leaves the old model serving and is recorded
(``last_error`` in ``/models``, an error log line, ``mtrank_model_reloads_total{result="failure"}``).
Loads are serialised by a lock. At most three models stay loaded (primary, previous, shadow; one
object when two slots name the same version); others are dropped and freed once no request holds them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtrank.bundle import BundleError, list_versions, read_current
from service.fusion import ExpressionError
from service.logs import RateLimitedLogger
from service.metrics import Metrics
from service.scorer import Model
from service.settings import Settings

log = logging.getLogger("mtrank.service.registry")

_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


class ReloadError(Exception):
    """A version could not be loaded (or there is nothing to roll back to); the old model keeps serving."""

    def __init__(self, msg: str, config_error: bool = False, not_found: bool = False) -> None:
        super().__init__(msg)
        self.config_error = config_error
        self.not_found = not_found


PRIMARY, PREVIOUS, SHADOW = "primary", "previous", "shadow"
SlotListener = Callable[[str, Model | None], None]


@dataclass(frozen=True)
class Outcome:
    status: str  # loaded | unchanged | rolled_back
    active: str | None
    previous: str | None


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


class Registry:
    def __init__(self, settings: Settings, metrics: Metrics,
                 loader: Callable[[Path], Model] | None = None) -> None:
        self.settings = settings
        self.dir = Path(settings.bundles_dir)
        self.metrics = metrics
        self._loader = loader or self._load_dir
        self._slots: dict[str, Model] = {}  # never mutated: replaced whole under the lock
        self.listeners: list[SlotListener] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._pointer_seen: str | None = None
        self.last_error: dict[str, Any] | None = None
        self.last_reload: dict[str, Any] | None = None
        self.pubsub_connected = False
        self._ratelog = RateLimitedLogger(log, 30.0)

    # ------------------------------------------------------------------------------ state
    @property
    def current(self) -> Model | None:
        return self._slots.get(PRIMARY)  # one attribute read: atomic

    @property
    def previous(self) -> Model | None:
        return self._slots.get(PREVIOUS)

    @property
    def shadow(self) -> Model | None:
        return self._slots.get(SHADOW)

    def loaded_versions(self) -> list[str]:
        return list(dict.fromkeys(m.version for m in self._slots.values()))

    def _set(self, **changes: Model | None) -> None:
        """Replace slots (``None`` empties one) and tell the listeners; call with the lock held."""
        slots = dict(self._slots)
        for name, model in changes.items():
            if model is None:
                slots.pop(name, None)
            else:
                slots[name] = model
        self._slots = slots
        for name, model in changes.items():
            for listener in self.listeners:
                listener(name, model)

    def _loaded(self, version: str) -> Model | None:
        """A model of ``version`` already in a slot (loaded and verified): reused, not loaded twice."""
        return next((m for m in self._slots.values() if m.version == version), None)

    def pointer(self) -> str | None:
        try:
            return read_current(self.dir)
        except OSError:
            return None

    def available(self) -> list[str]:
        try:
            return list_versions(self.dir)
        except OSError:
            return []

    # ----------------------------------------------------------------------------- loading
    def _load_dir(self, bundle_dir: Path) -> Model:
        model = Model.load(bundle_dir, self.settings.onnx, self.settings.fusion)
        if model.version != bundle_dir.name:
            raise BundleError(f"{bundle_dir}: manifest model_version {model.version!r} differs from the directory name")
        return model

    def _swap(self, model: Model, trigger: str, started: float) -> Outcome:
        old = self.current
        self._set(primary=model, previous=old)  # the swap; the model before ``old`` is dropped here
        self.metrics.reloads.labels("success", trigger).inc()
        self.last_reload = {"version": model.version, "trigger": trigger, "at": _now(),
                            "seconds": round(time.perf_counter() - started, 4)}
        log.info("serving model %s (trigger %s, previous %s)", model.version, trigger, old.version if old else None)
        return Outcome("loaded", model.version, old.version if old else None)

    def _fail(self, version: str | None, trigger: str, msg: str) -> None:
        self.metrics.reloads.labels("failure", trigger).inc()
        self.last_error = {"version": version, "error": msg, "trigger": trigger, "at": _now()}
        log.error("bundle %s rejected (trigger %s): %s; still serving %s", version, trigger, msg,
                  self.current.version if self.current else None)

    def _check_version(self, version: str | None, trigger: str) -> str:
        if version is None:
            version = self.pointer()
            self._pointer_seen = version
            if version is None:
                msg = f"{self.dir / 'CURRENT'}: no CURRENT pointer"
                self._fail(None, trigger, msg)
                raise ReloadError(msg, not_found=True)
        if not _VERSION.fullmatch(version) or version == "CURRENT":
            msg = f"version {version!r}: not a valid version name"
            self._fail(version, trigger, msg)
            raise ReloadError(msg, not_found=True)
        return version

    def _load(self, version: str, trigger: str) -> Model:
        """The model of ``version``: already in a slot, or loaded and verified now; ReloadError if not."""
        hit = self._loaded(version)
        if hit is not None:
            return hit
        bundle_dir = self.dir / version
        if not bundle_dir.is_dir():
            msg = f"{bundle_dir}: no such bundle version"
            self._fail(version, trigger, msg)
            raise ReloadError(msg, not_found=True)
        try:
            return self._loader(bundle_dir)
        except ExpressionError as err:
            msg = f"fusion profiles do not fit bundle {version}: {err}"
            self._fail(version, trigger, msg)
            raise ReloadError(msg, config_error=True) from None
        except BundleError as err:
            self._fail(version, trigger, str(err))
            raise ReloadError(str(err)) from None
        except Exception as err:  # noqa: BLE001 - onnxruntime/numpy raise their own types; reject the bundle
            msg = f"{bundle_dir}: {type(err).__name__}: {err}"
            self._fail(version, trigger, msg)
            raise ReloadError(msg) from None

    def reload(self, version: str | None = None, trigger: str = "admin") -> Outcome:
        """Load ``version`` (None: what CURRENT names) into the primary slot; raises ReloadError on failure."""
        with self._lock:
            started = time.perf_counter()
            version = self._check_version(version, trigger)
            cur, prev = self.current, self.previous
            if cur is not None and cur.version == version:
                return Outcome("unchanged", version, prev.version if prev else None)
            return self._swap(self._load(version, trigger), trigger, started)

    def rollback(self) -> Outcome:
        with self._lock:
            cur, prev = self.current, self.previous
            if prev is None or cur is None:
                raise ReloadError("no previous version to roll back to", not_found=True)
            self._set(primary=prev, previous=cur)
            self.metrics.reloads.labels("success", "rollback").inc()
            self.last_reload = {"version": prev.version, "trigger": "rollback", "at": _now(), "seconds": 0.0}
            log.warning("rolled back from %s to %s", cur.version, prev.version)
            return Outcome("rolled_back", prev.version, cur.version)

    def set_shadow(self, version: str | None) -> str | None:
        """Load ``version`` into the shadow slot (None clears it); returns the shadow version before."""
        with self._lock:
            before = self.shadow
            if version is None:
                self._set(shadow=None)
            else:
                version = self._check_version(version, "shadow")
                if before is None or before.version != version:
                    self._set(shadow=self._load(version, "shadow"))
                    self.metrics.reloads.labels("success", "shadow").inc()
            log.info("shadow slot: %s (was %s)", version, before.version if before else None)
            return before.version if before else None

    # ------------------------------------------------------------------------------ threads
    def initial_load(self) -> None:
        """Start-up: load what CURRENT names. A fusion profile not fitting the bundle is fatal
        (ReloadError with config_error); a missing pointer or broken bundle is not (not ready, 503)."""
        pointer = self.pointer()
        self._pointer_seen = pointer
        if pointer is None:
            log.warning("%s: no CURRENT pointer yet; not ready until one appears", self.dir)
            return
        try:
            self.reload(pointer, trigger="startup")
        except ReloadError as err:
            if err.config_error:
                raise
        if self.settings.shadow.version:
            try:
                self.set_shadow(self.settings.shadow.version)
            except ReloadError as err:  # a broken shadow never stops the service (recorded in last_error)
                log.error("shadow.version %s not loaded: %s", self.settings.shadow.version, err)

    def start(self) -> None:
        self._stop.clear()
        if self.settings.reload.poll_interval_ms > 0:
            self._spawn("mtrank-reload-poll", self._poll_loop)
        if self.settings.pubsub_url:
            self._spawn("mtrank-reload-pubsub", self._pubsub_loop)

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _poll_loop(self) -> None:
        interval = self.settings.reload.poll_interval_ms / 1000.0
        while not self._stop.wait(interval):
            pointer = self.pointer()
            if pointer is None or pointer == self._pointer_seen:
                continue
            self._pointer_seen = pointer
            try:
                self.reload(pointer, trigger="poll")
            except ReloadError:
                pass  # recorded in last_error; retried when the pointer changes again

    def _pubsub_loop(self) -> None:
        import redis

        url, channel = self.settings.pubsub_url, self.settings.reload.pubsub_channel
        while not self._stop.is_set():
            client = None
            try:
                client = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=None)
                ps = client.pubsub(ignore_subscribe_messages=True)
                ps.subscribe(channel)
                self.pubsub_connected = True
                log.info("listening for reloads on %s channel %s", url, channel)
                while not self._stop.is_set():
                    msg = ps.get_message(timeout=0.5)
                    if msg is None or msg.get("type") != "message":
                        continue
                    data = msg["data"]
                    version = (data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)).strip()
                    try:
                        self.reload(version or None, trigger="pubsub")
                    except ReloadError:
                        pass
            except Exception as err:  # noqa: BLE001 - connection refused / dropped: retry after a pause
                self._ratelog.warning("pubsub", "reload channel %s on %s unavailable: %s", channel, url, err)
            finally:
                self.pubsub_connected = False
                if client is not None:
                    with contextlib.suppress(redis.RedisError, OSError):
                        client.close()
            self._stop.wait(1.0)

    def publish(self, version: str | None) -> int:
        """Publish a reload on the channel (every subscribed worker/replica follows); returns receivers."""
        import redis

        url, channel = self.settings.pubsub_url, self.settings.reload.pubsub_channel
        if not url or not channel:
            raise ReloadError("broadcast needs reload.pubsub_channel and a Redis URL (reload.redis_url)")
        client = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)
        try:
            return int(client.publish(channel, version or ""))
        except redis.RedisError as err:
            raise ReloadError(f"broadcast on {channel}: {err}") from None
        finally:
            client.close()
