"""Bundle hardening: the version-name rule, Ed25519 signatures and the output sanity check on load.

The attack of the "Hardening" issue: 16 embedding values of ``model.onnx`` changed and the manifest's
sha256 recomputed; ``verify`` accepted it and the service ranked with ``watch_time`` 1.8e36. Now the
reference sweep refuses it (naming the task), and a configured key refuses it by its signature.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

from mtrank.bundle import (
    CURRENT,
    MANIFEST,
    MODEL,
    BundleError,
    check_version_name,
    list_versions,
    load_golden,
    read_current,
    read_manifest,
    verify_bundle,
    write_current,
)

# ------------------------------------------------------------------------------------------ helpers


def tamper_embeddings(bundle: Path, value: float = 1e6, count: int = 16) -> list[int]:
    """The issue's attack: ``count`` values of the embedding table set to ``value``, in rows the golden
    rows never read (so the golden check still passes), and ``manifest.files`` sha256 recomputed.
    Returns the rows changed."""
    import onnx
    from onnx import numpy_helper

    manifest = json.loads((bundle / MANIFEST).read_text())
    table_size = manifest["schema"]["table_size"]
    model = onnx.load(str(bundle / MODEL))
    init = next(i for i in model.graph.initializer if len(i.dims) == 2 and i.dims[0] == table_size)
    table = numpy_helper.to_array(init).copy()
    inputs, _ = load_golden(bundle)
    used = set(np.concatenate([v.ravel() for k, v in inputs.items() if k.endswith("_ids")]).tolist())
    dim = table.shape[1]
    rows = [r for r in range(1, table_size) if r not in used][: -(-count // dim)]
    flat = [(r, c) for r in rows for c in range(dim)][:count]
    for r, c in flat:
        table[r, c] = value
    init.CopyFrom(numpy_helper.from_array(table, init.name))
    data = model.SerializeToString()
    (bundle / MODEL).write_bytes(data)
    manifest["files"][MODEL] = hashlib.sha256(data).hexdigest()
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return rows


def copy_bundle(src: Path, bundles_dir: Path, name: str | None = None) -> Path:
    """A byte-for-byte copy (signature and all) under ``bundles_dir``."""
    dst = bundles_dir / (name or src.name)
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from mtrank.signing import generate_keypair

    private, public, _ = generate_keypair(tmp_path_factory.mktemp("keys") / "release")
    return private, public


@pytest.fixture(scope="module")
def signed_bundle(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Path:
    from model.export import export_run

    return export_run(tiny_run, tmp_path_factory.mktemp("signed"), version="signed-1", activate=False,
                      sign_key=keys[0])


# ------------------------------------------------------------------------------------ version names


@pytest.mark.parametrize("name", ["v1", "20261124-225323-9201eb2c", "a.b_c-d", "V" * 200])
def test_version_names_accepted(name: str) -> None:
    assert check_version_name(name) == name


@pytest.mark.parametrize("name", ["v 1", "../x", "a/b", ".hidden", "-x", "", "v1\n", CURRENT, "v" * 201, "é"])
def test_version_names_refused(name: str) -> None:
    with pytest.raises(BundleError, match="not a valid version name"):
        check_version_name(name)


def test_pointer_and_listing_follow_the_rule(tmp_path: Path) -> None:
    (tmp_path / "v 1").mkdir()
    (tmp_path / "v 1" / MANIFEST).write_text("{}")
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / MANIFEST).write_text("{}")
    with pytest.raises(BundleError, match="not a valid version name"):
        write_current(tmp_path, "v 1")
    assert read_current(tmp_path) is None
    assert list_versions(tmp_path) == ["ok"]


@pytest.mark.parametrize("version", ["v 1", "../x"])
def test_export_refuses_an_invalid_version_naming_the_option(tiny_run: Path, tmp_path: Path, capsys,
                                                             version: str) -> None:
    """Was: ``--version "v 1"`` exited 0 with CURRENT naming a version the service refuses; ``../x`` failed
    with a temporary-path error."""
    from mtrank.cli import main

    bundles = tmp_path / "bundles"
    assert main(["export", str(tiny_run), "--out", str(bundles), "--version", version]) == 2
    err = capsys.readouterr().err
    assert f"--version {version!r}: not a valid version name" in err and "tmp" not in err
    assert not bundles.exists() or not any(bundles.iterdir())
    assert read_current(bundles) is None


# --------------------------------------------------------------------------------------- signatures


def test_keygen_writes_a_private_key_only_its_owner_reads(tmp_path: Path, capsys) -> None:
    from mtrank.cli import main

    assert main(["bundle", "keygen", "--out", str(tmp_path / "k")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert stat.S_IMODE((tmp_path / "k.key").stat().st_mode) == 0o600
    assert out["private_key"].endswith("k.key") and out["public_key"].endswith("k.pub") and len(out["key_id"]) == 16
    assert main(["bundle", "keygen", "--out", str(tmp_path / "k")]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err


def test_signed_export_verifies_with_the_key(signed_bundle: Path, keys: tuple[Path, Path], capsys) -> None:
    from mtrank.cli import main
    from mtrank.signing import SIGNATURE, Trust, key_id, load_public_key

    doc = json.loads((signed_bundle / SIGNATURE).read_text())
    assert doc["key_id"] == key_id(load_public_key(keys[1])) and doc["signed_file"] == MANIFEST
    verify_bundle(signed_bundle, trust=Trust.from_files([keys[1]]))
    assert main(["bundle", "verify", str(signed_bundle), "--public-key", str(keys[1])]) == 0
    assert f"signature by key {doc['key_id']} verified" in capsys.readouterr().out
    assert main(["bundle", "verify", str(signed_bundle)]) == 0
    assert "not checked: no --public-key" in capsys.readouterr().out


def test_unsigned_wrong_key_and_altered_manifest_are_refused(signed_bundle: Path, keys: tuple[Path, Path],
                                                            tmp_path: Path, capsys) -> None:
    from mtrank.cli import main
    from mtrank.signing import SIGNATURE, SignatureError, Trust, generate_keypair

    trust = Trust.from_files([keys[1]])
    unsigned = copy_bundle(signed_bundle, tmp_path, "unsigned")
    (unsigned / SIGNATURE).unlink()
    with pytest.raises(SignatureError, match=r"signature\.json: missing"):
        verify_bundle(unsigned, trust=trust)
    verify_bundle(unsigned, trust=Trust(trust.keys, require=False))  # allowed when not required
    _, other_pub, other_id = generate_keypair(tmp_path / "other")
    with pytest.raises(SignatureError, match="not a trusted public key"):
        verify_bundle(signed_bundle, trust=Trust.from_files([other_pub]))
    edited = copy_bundle(signed_bundle, tmp_path, "edited")
    raw = json.loads((edited / MANIFEST).read_text())
    raw["metrics"]["validation"] = {"forged": 1.0}  # any edit, even one no other check notices
    (edited / MANIFEST).write_text(json.dumps(raw, indent=2))
    with pytest.raises(SignatureError, match="manifest.json changed after it was signed"):
        verify_bundle(edited, trust=trust)
    assert main(["bundle", "verify", str(unsigned), "--public-key", str(keys[1])]) == 2
    assert "signature.json: missing" in capsys.readouterr().err


def test_sign_command_signs_a_verified_bundle(signed_bundle: Path, keys: tuple[Path, Path], tmp_path: Path,
                                              capsys) -> None:
    from mtrank.cli import main
    from mtrank.signing import SIGNATURE, Trust

    bundle = copy_bundle(signed_bundle, tmp_path, "resign")
    (bundle / SIGNATURE).unlink()
    assert main(["bundle", "sign", str(bundle), "--key", str(keys[0])]) == 0
    assert "signed:" in capsys.readouterr().out
    verify_bundle(bundle, trust=Trust.from_files([keys[1]]))
    assert main(["bundle", "sign", str(bundle), "--key", str(keys[1])]) == 2  # a public key cannot sign
    assert "not a PEM private key" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- output sanity


def test_manifest_records_score_ranges_and_the_sweep(signed_bundle: Path) -> None:
    m = read_manifest(signed_bundle)
    ref = m.reference
    assert set(ref.score_range) == set(m.scored_names)
    assert ref.sweep_rows >= max(f.size for f in m.schema.features)  # every embedding row is read
    for t in m.tasks:
        r = ref.score_range[t.name]
        assert r.min <= r.max
        if t.type == "binary":
            assert 0.0 <= r.min and r.max <= 1.0


def test_the_issues_attack_is_refused_by_the_sanity_check(signed_bundle: Path, tmp_path: Path) -> None:
    """16 embedding values changed, sha256 recomputed: the golden rows still pass, the sweep does not."""
    from mtrank.bundle import check_golden, onnx_runner

    bundle = copy_bundle(signed_bundle, tmp_path, "attacked")
    tamper_embeddings(bundle)
    check_golden(bundle, onnx_runner(bundle / MODEL))  # what verify checked before: it passes
    with pytest.raises(BundleError, match=r"sweep rows .*: task 'watch_time' .* outside"):
        verify_bundle(bundle)


def test_the_issues_attack_is_refused_by_the_signature(signed_bundle: Path, keys: tuple[Path, Path],
                                                        tmp_path: Path) -> None:
    from mtrank.signing import SignatureError, Trust

    bundle = copy_bundle(signed_bundle, tmp_path, "attacked")
    tamper_embeddings(bundle)
    with pytest.raises(SignatureError, match="invalid signature"):
        verify_bundle(bundle, trust=Trust.from_files([keys[1]]))


def test_nonfinite_and_out_of_range_outputs_name_the_task(signed_bundle: Path) -> None:
    from mtrank.bundle import check_outputs

    m = read_manifest(signed_bundle)
    n = 3
    ok = {t.output: np.full(n, (m.reference.score_range[t.name].min + m.reference.score_range[t.name].max) / 2,
                            dtype=np.float32) for t in m.tasks}
    check_outputs(m, ok, "rows")
    with pytest.raises(BundleError, match=r"rows: task 'ctr' \(p_ctr\) has non-finite outputs"):
        check_outputs(m, {**ok, "p_ctr": np.array([0.5, np.nan, 0.1], np.float32)}, "rows")
    with pytest.raises(BundleError, match=r"task 'like' .* outside \[0, 1\]"):
        check_outputs(m, {**ok, "p_like": np.array([0.5, 1.5, 0.1], np.float32)}, "rows")
    r = m.reference.score_range["watch_time"]
    check_outputs(m, {**ok, "p_watch_time": np.full(n, r.max + 0.9 * (r.max - r.min), np.float32)}, "rows")
    with pytest.raises(BundleError, match=r"task 'watch_time' .* outside .*recorded range"):
        check_outputs(m, {**ok, "p_watch_time": np.full(n, r.max + 3 * (r.max - r.min) + 1, np.float32)}, "rows")


def test_old_bundles_without_ranges_still_load(signed_bundle: Path, tmp_path: Path, caplog) -> None:
    bundle = copy_bundle(signed_bundle, tmp_path, "old-1")
    raw = json.loads((bundle / MANIFEST).read_text())
    del raw["reference"]["score_range"], raw["reference"]["sweep_rows"]
    raw["model_version"] = "old-1"
    (bundle / MANIFEST).write_text(json.dumps(raw, indent=2))
    with caplog.at_level("INFO", logger="mtrank.bundle"):
        m, _ = verify_bundle(bundle)
    assert m.reference.score_range == {} and "output range check skipped" in caplog.text
