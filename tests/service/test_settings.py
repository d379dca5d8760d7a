"""Service settings: YAML file < MTRANK_* env < arguments; errors name the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtrank.config import ConfigError
from service.settings import load_settings


def test_precedence_file_env_args(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "service.yaml"
    cfg.write_text("""
port: 9001
limits: {max_candidates: 50, max_body_bytes: 2048}
feature_store: {backend: redis, redis: {socket_timeout_ms: 15, key_prefix: fs}}
fusion:
  profiles:
    ctr_only: {type: weighted_sum, weights: {ctr: 1}}
    blend: {type: expression, expression: "ctr * (1 + like)"}
  default: blend
experiments: [{name: treat, profile: ctr_only, traffic: 0.5}]
admin: {token: s3cret}
""")
    monkeypatch.setenv("MTRANK_FEATURE_STORE__REDIS__SOCKET_TIMEOUT_MS", "25")
    monkeypatch.setenv("MTRANK_LIMITS__MAX_CANDIDATES", "70")
    monkeypatch.setenv("MTRANK_REQUIRE_BINARIES", "0")  # unrelated MTRANK_* variables are ignored
    s = load_settings(cfg, port=9100)
    assert s.port == 9100  # argument > file
    assert s.limits.max_candidates == 70 and s.limits.max_body_bytes == 2048  # env > file, merged
    assert s.feature_store.redis.socket_timeout_ms == 25 and s.feature_store.redis.key_prefix == "fs"
    assert s.fusion.default == "blend" and s.experiments[0].traffic == 0.5
    assert s.admin.token is not None and s.admin.token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(s)
    assert s.pubsub_url == "redis://127.0.0.1:6379/0"  # the feature store's Redis
    monkeypatch.setenv("MTRANK_CONFIG", str(cfg))
    assert load_settings().port == 9001


@pytest.mark.parametrize("yaml_text, message", [
    ("limits: {max_candidates: -1}", "limits.max_candidates: Input should be greater than 0"),
    ("limits: {max_candidate: 5}", "limits.max_candidate: Extra inputs are not permitted"),
    ("feature_store: {backend: memcached}", "feature_store.backend: Input should be 'embedded', 'redis' or 'none'"),
    ("fusion: {profiles: {x: {type: expression, expression: 'ctr.__class__'}}}",
     "fusion.profiles.x.expression: attribute access is not allowed"),
    ("fusion: {profiles: {x: {type: weighted_sum, weights: {ctr: abc}}}}", "fusion.profiles.x.weights.ctr"),
    ("fusion: {profiles: {x: {type: nope}}}", "fusion.profiles.x: Input tag 'nope'"),
    ("fusion: {default: missing}", "fusion.default: profile 'missing' is not defined"),
    ("feedback: {log: {kind: jsonl, dir: /tmp/x, max_bytes: 0}}", "feedback.log.max_bytes: Input should be greater than 0"),
    ("feedback: {log: {kind: kafka}}", "feedback.log: Input tag 'kafka'"),
    ("experiments: [{name: a, profile: nope, traffic: 0.5}]", "experiments.0.profile: profile 'nope' is not defined"),
    ("experiments: [{name: a, profile: default, traffic: 0.7}, {name: b, profile: default, traffic: 0.7}]",
     "experiments: traffic adds up to 1.4"),
    ("interpreter: {switch_interval_ms: 0}", "interpreter.switch_interval_ms: Input should be greater than 0"),
    ("- just a list", "top level must be a mapping"),
    ("a: [unclosed", "not valid YAML"),
])
def test_bad_config_names_the_key(tmp_path: Path, yaml_text: str, message: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert message in str(err.value), str(err.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml")


def test_bad_env_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTRANK_ONNX__INTRA_OP_THREADS", "many")
    with pytest.raises(ConfigError, match=r"onnx.intra_op_threads: an integer >= 0 or auto, got 'many'"):
        load_settings()



@pytest.mark.parametrize(("env", "workers", "intra"), [
    ({}, 8, 1),  # workers auto = cores, one intra-op thread each
    ({"MTRANK_WORKERS": "1"}, 1, 4),  # 8 // (1 worker x 2 executor threads): two runs in flight at once
    ({"MTRANK_WORKERS": "1", "MTRANK_ONNX__EXECUTOR_THREADS": "1"}, 1, 8),  # one run at a time: every core
    ({"MTRANK_WORKERS": "2", "MTRANK_ONNX__EXECUTOR_THREADS": "1"}, 2, 4),
    ({"MTRANK_WORKERS": "3", "MTRANK_ONNX__EXECUTOR_THREADS": "1"}, 3, 2),  # 8 // 3
    ({"MTRANK_WORKERS": "3"}, 3, 1),  # 8 // 6
    ({"MTRANK_WORKERS": "16"}, 16, 1),  # more workers than cores: still one thread
    ({"MTRANK_WORKERS": "1", "MTRANK_ONNX__INTRA_OP_THREADS": "6"}, 1, 6),  # a count is kept as given
])
def test_auto_threads_share_the_cores_among_the_workers(
        env: dict[str, str], workers: int, intra: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("service.settings.available_cores", lambda: 8)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s = load_settings()
    assert (s.workers, s.onnx.intra_op_threads) == (workers, intra)
