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
request), never on the event loop: ``verify_bundle`` on the serving session built with the configured
threads (the signature when ``bundles.public_keys`` are configured, manifest, checksums, I/O names,
golden outputs, output sanity on the reference rows), fusion profiles compiled against the bundle's
tasks, warm-up. Only a model passing all of it is swapped in, by replacing one reference: a request
holds the model it read at its start until it finishes. A failed load leaves the old model serving and
is recorded (``last_error`` in ``/models``, an error log line, ``mtrank_model_reloads_total{result="failure"}``).

Errors have two texts (:class:`ReloadError`): ``public`` names versions, files inside the bundle and the
problem, never a server path (it goes into ``last_error``, which unauthenticated ``/models`` and
``/readyz`` show, and into HTTP error bodies); ``detail`` has the paths and goes to the log. Version
names follow ``mtrank.bundle.check_version_name``.
Loads are serialised by a lock. At most three models stay loaded (primary, previous, shadow; one
object when two slots name the same version); others are dropped and freed once no request holds them.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtrank.bundle import BundleError, check_version_name, list_versions, read_current
from service.fusion import ExpressionError
from service.logs import RateLimitedLogger
from service.metrics import Metrics
from service.scorer import Model
from service.settings import Settings
from service.threads import NamedThread

if TYPE_CHECKING:  # mtrank.signing (cryptography) is imported when keys are configured
    from mtrank.signing import Trust

log = logging.getLogger("mtrank.service.registry")

# An absolute path with at least two components (what onnxruntime and OSError messages may embed).
_ABS_PATH = re.compile(r"(?<![\w.~-])/(?:[^\s/:'\"()\[\],]+/)+([^\s/:'\"()\[\],]*)")


class ReloadError(Exception):
    """A version could not be loaded (or there is nothing to roll back to); the old model keeps serving.

    ``str(err)`` and ``err.public`` are the public message (no server paths: fit for an HTTP body and
    ``last_error``); ``err.detail`` the full one for the log. The flags say which answer fits:
    ``invalid`` (a version name breaking the rule: 422), ``not_found`` (404), ``unavailable`` (the reload
    channel cannot be reached: 503), ``config_error`` (fusion profiles do not fit the bundle); none: the
    bundle failed a check or a precondition does not hold (409).
    """

    def __init__(self, public: str, detail: str | None = None, *, config_error: bool = False,
                 not_found: bool = False, invalid: bool = False, unavailable: bool = False) -> None:
        super().__init__(public)
        self.public = public
        self.detail = detail or public
        self.config_error = config_error
        self.not_found = not_found
        self.invalid = invalid
        self.unavailable = unavailable


PRIMARY, PREVIOUS, SHADOW = "primary", "previous", "shadow"
SlotListener = Callable[[str, Model | None], None]


@dataclass(frozen=True)
class Outcome:
    status: str  # loaded | unchanged | rolled_back
    active: str | None
    previous: str | None


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``) after a model was dropped, so RSS follows
    the models loaded rather than the allocator's high-water mark (without it RSS wanders by tens of MiB
    across reloads); a no-op where glibc is absent."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
        self.trust = self._trust()

    def _trust(self) -> Trust | None:
        """The signature policy of ``bundles``: None (signatures not checked) when no key is configured."""
        b = self.settings.bundles
        if not b.public_keys:
            return None
        from mtrank.signing import Trust

        trust = Trust.from_files(b.public_keys, require=b.required)
        log.info("bundle signatures: %d trusted key(s) %s, unsigned bundles %s", len(trust.keys), sorted(trust.keys),
                 "refused" if trust.require else "accepted")
        return trust

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
        """``Model.load`` with the signature policy (``self.trust``); the manifest must name the directory."""
        model = Model.load(bundle_dir, self.settings.onnx, self.settings.fusion, trust=self.trust)
        if model.version != bundle_dir.name:
            raise BundleError(f"{bundle_dir / 'manifest.json'}: model_version {model.version!r} differs "
                              "from the directory name")
        return model

    def public(self, msg: str) -> str:
        """``msg`` without server paths: the bundles directory becomes relative (``v1/model.onnx``), any
        other absolute path is cut to its last component."""
        for root in {str(self.dir), str(self.dir.absolute()), os.path.realpath(self.dir)}:
            msg = msg.replace(root.rstrip(os.sep) + os.sep, "")
        return _ABS_PATH.sub(lambda m: m.group(1) or "<path>", msg)

    def _swap(self, model: Model, trigger: str, started: float) -> Outcome:
        old = self.current
        self._set(primary=model, previous=old)  # the swap; the model before ``old`` is dropped here
        _trim_heap()
        self.metrics.reloads.labels("success", trigger).inc()
        self.last_reload = {"version": model.version, "trigger": trigger, "at": _now(),
                            "seconds": round(time.perf_counter() - started, 4)}
        log.info("serving model %s (trigger %s, previous %s)", model.version, trigger, old.version if old else None)
        return Outcome("loaded", model.version, old.version if old else None)

    def _fail(self, version: str | None, trigger: str, err: ReloadError) -> ReloadError:
        """Record a rejected load (metric, ``last_error`` with the public message, the log with the detail);
        returns ``err`` for the caller to raise."""
        self.metrics.reloads.labels("failure", trigger).inc()
        self.last_error = {"version": version, "error": err.public, "trigger": trigger, "at": _now()}
        log.error("bundle %s rejected (trigger %s): %s; still serving %s", version, trigger, err.detail,
                  self.current.version if self.current else None)
        return err

    def _check_version(self, version: str | None, trigger: str) -> str:
        """``version`` (None: what CURRENT names) when it follows the version-name rule; else ReloadError:
        ``invalid`` for a name given by the caller, a plain (409) one for a bad pointer."""
        from_pointer = version is None or trigger in ("poll", "startup")  # poll and startup pass what CURRENT names
        if version is None:
            version = self.pointer()
            self._pointer_seen = version
            if version is None:
                missing = ReloadError("no CURRENT pointer", f"{self.dir / 'CURRENT'}: missing or empty", not_found=True)
                raise self._fail(None, trigger, missing)
        try:
            return check_version_name(version)
        except BundleError as err:
            msg = f"CURRENT names an invalid version: {err}" if from_pointer else str(err)
            raise self._fail(version[:200], trigger, ReloadError(msg, invalid=not from_pointer)) from None

    def _load(self, version: str, trigger: str) -> Model:
        """The model of ``version``: already in a slot, or loaded and verified now; ReloadError if not."""
        hit = self._loaded(version)
        if hit is not None:
            return hit
        bundle_dir = self.dir / version
        if not bundle_dir.is_dir():
            raise self._fail(version, trigger, ReloadError(f"version {version!r}: no such bundle version",
                                                           f"{bundle_dir}: no such bundle version", not_found=True))
        try:
            return self._loader(bundle_dir)
        except ExpressionError as err:
            msg = f"fusion profiles do not fit bundle {version}: {err}"
            raise self._fail(version, trigger, ReloadError(self.public(msg), msg, config_error=True)) from None
        except BundleError as err:
            raise self._fail(version, trigger, ReloadError(self.public(str(err)), str(err))) from None
        except Exception as err:  # noqa: BLE001 - onnxruntime/numpy raise their own types; reject the bundle
            msg = f"{bundle_dir}: {type(err).__name__}: {err}"
            raise self._fail(version, trigger, ReloadError(self.public(msg), msg)) from None

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
                _trim_heap()
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
            self._spawn("mtrank-reload", self._poll_loop)
        if self.settings.pubsub_url:
            self._spawn("mtrank-pubsub", self._pubsub_loop)

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        t = NamedThread(target=target, name=name, daemon=True)
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

    def _channel(self) -> tuple[str, str]:
        url, channel = self.settings.pubsub_url, self.settings.reload.pubsub_channel
        if not url or not channel:
            raise ReloadError("broadcast needs reload.pubsub_channel and a Redis URL (reload.redis_url)")
        return url, channel

    def check_broadcast(self) -> None:
        """The preconditions of a broadcast, checked before anything changes: a reload channel is configured
        (else ReloadError, a 409) and its Redis answers a PING (else ReloadError ``unavailable``, a 503)."""
        import redis

        url, channel = self._channel()
        client = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)
        try:
            client.ping()
        except (redis.RedisError, OSError) as err:
            log.warning("reload channel %s on %s unreachable: %s", channel, url, err)
            raise ReloadError(f"reload channel {channel} unreachable; nothing changed", f"{url}: {err}",
                              unavailable=True) from None
        finally:
            client.close()

    def publish(self, version: str | None) -> int:
        """Publish a reload on the channel (every subscribed worker/replica follows); returns receivers.
        ReloadError (``unavailable``) when Redis cannot be reached; the detail (with the URL) is logged."""
        import redis

        url, channel = self._channel()
        client = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)
        try:
            return int(client.publish(channel, version or ""))
        except (redis.RedisError, OSError) as err:
            log.error("broadcast on channel %s (%s) failed: %s", channel, url, err)
            raise ReloadError(f"broadcast on channel {channel} failed", f"{url}: {err}", unavailable=True) from None
        finally:
            client.close()
