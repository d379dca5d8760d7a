"""Fusion profiles, the expression whitelist and experiment arms (no bundle needed)."""

from __future__ import annotations

import numpy as np
import pytest

from service import fusion as F

TASKS = {"ctr", "like", "ctcvr", "watch_time", "cvr"}


def scores(n: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {t: rng.uniform(0.01, 0.99, n) for t in TASKS}


def test_weighted_sum_and_product() -> None:
    s = scores()
    ws = F.weighted_sum("p", {"ctr": 2.0, "like": 0.5}, TASKS)
    np.testing.assert_allclose(ws(s, 4), 2 * s["ctr"] + 0.5 * s["like"])
    wp = F.weighted_product("p", {"ctr": 1.0, "cvr": 0.5}, TASKS, eps=1e-6)
    np.testing.assert_allclose(wp(s, 4), s["ctr"] * s["cvr"] ** 0.5)
    with pytest.raises(F.ExpressionError, match="unknown task.*'ctrr'"):
        F.weighted_sum("typo", {"ctrr": 1.0}, TASKS)


def test_expression_evaluates_vectorised() -> None:
    s = scores(6)
    f = F.expression("e", "ctr * (1 + 2 * like) - 0.1 * log(watch_time) + max(cvr, 0.3, ctcvr) / exp(-ctr) "
                          "+ clip(ctr, 0.2, 0.4) + min(ctr, like) ** 2 + -cvr", TASKS)
    want = (s["ctr"] * (1 + 2 * s["like"]) - 0.1 * np.log(s["watch_time"])
            + np.maximum(np.maximum(s["cvr"], 0.3), s["ctcvr"]) / np.exp(-s["ctr"])
            + np.clip(s["ctr"], 0.2, 0.4) + np.minimum(s["ctr"], s["like"]) ** 2 - s["cvr"])
    np.testing.assert_allclose(f(s, 6), want)
    assert F.expression("c", "3", TASKS)(s, 6).shape == (6,)  # constants broadcast


def test_non_finite_results_are_mapped_to_finite() -> None:
    s = {t: np.array([0.0, 0.5, 1.0]) for t in TASKS}
    out = F.expression("e", "log(ctr) + 1 / (1 - like) - like / like", TASKS)(s, 3)
    assert np.isfinite(out).all()
    assert out[0] < out[1] < out[2]  # -inf lowest, +inf highest
    huge = F.expression("e", "9 ** 9 ** 9", TASKS)(s, 3)
    assert np.isfinite(huge).all()


@pytest.mark.parametrize("text, fragment", [
    ("__import__('os')", "not allowed"),
    ("__import__('os').system('true')", "not allowed"),
    ("ctr.__class__", "attribute access"),
    ("ctr.real", "attribute access"),
    ("(lambda: 1)()", "not allowed"),
    ("lambda x: x", "lambda"),
    ("open('/etc/passwd')", "'open' is not allowed"),
    ("eval('1')", "'eval' is not allowed"),
    ("ctr[0]", "subscripts"),
    ("ctr if like else cvr", "conditional"),
    ("ctr > like", "comparisons"),
    ("ctr and like", "boolean operators"),
    ("'abc'", "not a number"),
    ("ctr % 2", "Mod"),
    ("ctr // 2", "FloorDiv"),
    ("ctr @ like", "MatMult"),
    ("~ctr", "unary operator Invert"),
    ("not ctr", "unary operator Not"),
    ("[ctr]", "List"),
    ("{'a': ctr}", "Dict"),
    ("(x := ctr)", "assignment"),
    ("log(x=ctr)", "keyword"),
    ("log(ctr, like)", "takes 1 arguments"),
    ("clip(ctr)", "takes 3 arguments"),
    ("min(ctr)", "at least 2"),
    ("log", "is a function"),
    ("_secret", "not allowed"),
    ("ctr +", "not a valid expression"),
    ("import os", "not a valid expression"),
    ("x = 1", "not a valid expression"),
    ("", "empty"),
    ("1" + "+1" * 300, "more than"),
    ("1e999999", None),  # parses as inf: allowed, a (finite-mapped) constant
    ("10**400", None),
    ("1" + "0" * 400, "too large"),
    ("f'{ctr}'", "JoinedStr"),
    ("ctr[::-1]", "subscripts"),
    ("1j", "not a number"),
    ("True", "not a number"),
])
def test_whitelist_rejects(text: str, fragment: str | None) -> None:
    if fragment is None:
        F.parse_expression(text)
        return
    with pytest.raises(F.ExpressionError, match=None) as err:
        F.parse_expression(text)
    assert fragment in str(err.value), str(err.value)


def test_unknown_task_names_rejected_at_compile() -> None:
    parsed = F.parse_expression("ctr + lik")
    with pytest.raises(F.ExpressionError, match=r"unknown task name\(s\) \['lik'\]"):
        F.compile_expression(parsed, TASKS)
    with pytest.raises(F.ExpressionError, match="unknown task"):
        F.compile_expression(F.parse_expression("os"), TASKS)


def test_default_weights() -> None:
    tasks = [("ctr", "binary", False), ("like", "binary", False), ("ctcvr", "binary", False),
             ("watch_time", "regression", False), ("cvr", "binary", True)]
    assert F.default_weights(tasks) == {"ctr": 1.0, "like": 1.0, "ctcvr": 1.0}
    assert F.default_weights([("wt", "regression", False)]) == {"wt": 1.0}


def test_one_key_hashes_as_the_core_hash() -> None:
    from mtrank.encoding import fnv1a64, fnv1a64_text

    keys = ["", "a", "mtrank:user-42", "ünïcödé ☃", "x" * 300, "lone \ud800 surrogate"] + [f"s:{i}" for i in range(200)]
    assert [fnv1a64_text(k) for k in keys] == [int(h) for h in fnv1a64(np.asarray(keys))]


def test_arms_are_deterministic_and_split_traffic() -> None:
    arms = [("a", 0.3), ("b", 0.5)]
    picks = [F.choose_arm(f"user{i}", arms, "s") for i in range(4000)]
    assert picks == [F.choose_arm(f"user{i}", arms, "s") for i in range(4000)]  # stable
    share = {k: picks.count(k) / len(picks) for k in ("a", "b", None)}
    assert abs(share["a"] - 0.3) < 0.04 and abs(share["b"] - 0.5) < 0.04 and abs(share[None] - 0.2) < 0.04
    # another salt reshuffles users
    other = [F.choose_arm(f"user{i}", arms, "t") for i in range(4000)]
    assert other != picks
    assert F.choose_arm("u", [], "s") is None
