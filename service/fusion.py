"""Score fusion: per-task scores {task: float [n]} -> one ranking score float [n].

Three profile types (``service.settings``):

* ``weighted_sum``      sum_t w_t * s_t
* ``weighted_product``  prod_t max(s_t, eps) ** w_t   (computed as exp(sum_t w_t * log max(s_t, eps)))
* ``expression``        a safe arithmetic expression over task names, e.g. ``ctr * (1 + 2 * like) + 0.1 * log(watch_time)``

Expressions are parsed with :mod:`ast` and checked against a whitelist: numbers, task names, the
binary operators ``+ - * / **``, unary ``-``/``+``, and calls to ``min(a, b, ...)``, ``max(...)``,
``log(x)``, ``exp(x)``, ``clip(x, lo, hi)``. Nothing else is accepted: no attribute access, no
subscripts, no comparisons, no lambdas, no keyword arguments, no other names or calls; the text is
never passed to ``eval``. The tree is compiled into nested numpy closures evaluated on whole score
arrays (no per-candidate Python). ``min``/``max`` are element-wise (``np.minimum``/``np.maximum``).
Non-finite results (``log(0)``, ``x / 0``) are mapped to finite values so the ranking is total:
NaN sorts last, +-inf become the largest/smallest float.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from mtrank.encoding import fnv1a64_text

Scores = Mapping[str, np.ndarray]  # task -> float64 [n]
Evaluator = Callable[[Scores], np.ndarray]  # -> float64 [n] (or a 0-d array for constants)

MAX_NODES = 200
_FMAX = np.finfo(np.float64).max


class ExpressionError(ValueError):
    """An expression outside the whitelist, or naming an unknown task."""


_BINOPS: dict[type, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    ast.Add: np.add, ast.Sub: np.subtract, ast.Mult: np.multiply, ast.Div: np.divide, ast.Pow: np.power,
}
_FUNCS: dict[str, tuple[int, int | None]] = {"min": (2, None), "max": (2, None), "log": (1, 1), "exp": (1, 1),
                                             "clip": (3, 3)}


def _describe(node: ast.AST) -> str:
    return {ast.Attribute: "attribute access", ast.Subscript: "subscripts", ast.Lambda: "lambda",
            ast.Compare: "comparisons", ast.BoolOp: "boolean operators", ast.IfExp: "conditional expressions",
            ast.Starred: "starred arguments", ast.NamedExpr: "assignment expressions"}.get(
        type(node), type(node).__name__)


@dataclass(frozen=True)
class ParsedExpression:
    text: str
    tree: ast.expr
    names: frozenset[str]  # task names it reads


def parse_expression(text: str) -> ParsedExpression:
    """Parse and whitelist-check ``text``; raises ExpressionError naming the offending construct."""
    if not isinstance(text, str) or not text.strip():
        raise ExpressionError("expression is empty")
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        raise ExpressionError(f"not a valid expression: {getattr(err, 'msg', err)}") from None
    names: set[str] = set()
    count = 0

    def check(node: ast.AST) -> None:
        nonlocal count
        count += 1
        if count > MAX_NODES:
            raise ExpressionError(f"expression has more than {MAX_NODES} nodes")
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                raise ExpressionError(f"constant {node.value!r} is not a number")
            try:
                float(node.value)
            except OverflowError:
                raise ExpressionError("numeric constant is too large") from None
        elif isinstance(node, ast.Name):
            if node.id in _FUNCS:
                raise ExpressionError(f"{node.id!r} is a function; call it")
            if node.id.startswith("_"):
                raise ExpressionError(f"name {node.id!r} is not allowed")
            names.add(node.id)
        elif isinstance(node, ast.BinOp):
            if type(node.op) not in _BINOPS:
                raise ExpressionError(f"operator {type(node.op).__name__} is not allowed (use + - * / **)")
            check(node.left)
            check(node.right)
        elif isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, (ast.USub, ast.UAdd)):
                raise ExpressionError(f"unary operator {type(node.op).__name__} is not allowed")
            check(node.operand)
        elif isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCS:
                what = node.func.id if isinstance(node.func, ast.Name) else _describe(node.func)
                raise ExpressionError(f"call to {what!r} is not allowed (functions: {', '.join(_FUNCS)})")
            if node.keywords:
                raise ExpressionError(f"{node.func.id}(): keyword arguments are not allowed")
            lo, hi = _FUNCS[node.func.id]
            n = len(node.args)
            if n < lo or (hi is not None and n > hi):
                want = str(lo) if lo == hi else f"at least {lo}"
                raise ExpressionError(f"{node.func.id}() takes {want} arguments, got {n}")
            for a in node.args:
                check(a)
        else:
            raise ExpressionError(f"{_describe(node)} is not allowed")

    check(tree)
    return ParsedExpression(text=text, tree=tree, names=frozenset(names))


def _compile(node: ast.expr) -> Evaluator:
    if isinstance(node, ast.Constant):
        c = np.float64(node.value)
        return lambda s: c
    if isinstance(node, ast.Name):
        name = node.id
        return lambda s: s[name]
    if isinstance(node, ast.BinOp):
        op, left, right = _BINOPS[type(node.op)], _compile(node.left), _compile(node.right)
        return lambda s: op(left(s), right(s))
    if isinstance(node, ast.UnaryOp):
        operand = _compile(node.operand)
        return (lambda s: np.negative(operand(s))) if isinstance(node.op, ast.USub) else operand
    assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    args = [_compile(a) for a in node.args]
    fn = node.func.id
    if fn == "log":
        return lambda s: np.log(args[0](s))
    if fn == "exp":
        return lambda s: np.exp(args[0](s))
    if fn == "clip":
        return lambda s: np.clip(args[0](s), args[1](s), args[2](s))
    reduce = np.minimum if fn == "min" else np.maximum

    def minmax(s: Scores) -> np.ndarray:
        out = args[0](s)
        for a in args[1:]:
            out = reduce(out, a(s))
        return out

    return minmax


def compile_expression(parsed: ParsedExpression, task_names: set[str] | frozenset[str]) -> Evaluator:
    unknown = sorted(parsed.names - set(task_names))
    if unknown:
        raise ExpressionError(f"unknown task name(s) {unknown} (tasks: {sorted(task_names)})")
    return _compile(parsed.tree)


# ------------------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class Fusion:
    """A profile compiled against one bundle's task names."""

    name: str
    kind: str
    evaluate: Evaluator

    def __call__(self, scores: Scores, n: int) -> np.ndarray:
        """scores {task: float [n]} -> fused float64 [n], finite."""
        with np.errstate(all="ignore"):
            out = np.asarray(self.evaluate(scores), dtype=np.float64)
            out = np.broadcast_to(out, (n,)) if out.shape != (n,) else out
            return np.nan_to_num(out, nan=-_FMAX, posinf=_FMAX, neginf=-_FMAX)


def _check_weights(weights: Mapping[str, float], task_names: set[str], profile: str) -> None:
    unknown = sorted(set(weights) - task_names)
    if unknown:
        raise ExpressionError(f"profile {profile!r}: unknown task name(s) {unknown} (tasks: {sorted(task_names)})")


def weighted_sum(name: str, weights: Mapping[str, float], task_names: set[str]) -> Fusion:
    _check_weights(weights, task_names, name)
    items = [(t, np.float64(w)) for t, w in weights.items()]

    def evaluate(s: Scores) -> np.ndarray:
        out = items[0][1] * s[items[0][0]]
        for t, w in items[1:]:
            out = out + w * s[t]
        return out

    return Fusion(name, "weighted_sum", evaluate)


def weighted_product(name: str, weights: Mapping[str, float], task_names: set[str], eps: float = 1e-6) -> Fusion:
    _check_weights(weights, task_names, name)
    items = [(t, np.float64(w)) for t, w in weights.items()]

    def evaluate(s: Scores) -> np.ndarray:
        log = sum(w * np.log(np.maximum(s[t], eps)) for t, w in items)
        return np.exp(log)

    return Fusion(name, "weighted_product", evaluate)


def expression(name: str, text: str | ParsedExpression, task_names: set[str]) -> Fusion:
    parsed = parse_expression(text) if isinstance(text, str) else text
    try:
        ev = compile_expression(parsed, task_names)
    except ExpressionError as err:
        raise ExpressionError(f"profile {name!r}: {err}") from None
    return Fusion(name, "expression", ev)


def build_profile(name: str, profile: object, task_names: set[str]) -> Fusion:
    """A settings profile (WeightedSumProfile | WeightedProductProfile | ExpressionProfile) -> Fusion."""
    kind = profile.type
    if kind == "weighted_sum":
        return weighted_sum(name, profile.weights, task_names)  # type: ignore[attr-defined]
    if kind == "weighted_product":
        return weighted_product(name, profile.weights, task_names, profile.eps)  # type: ignore[attr-defined]
    return expression(name, profile.expression, task_names)  # type: ignore[attr-defined]


def default_weights(tasks: list[tuple[str, str, bool]]) -> dict[str, float]:
    """(name, type, derived) per task -> weight 1 on every non-derived binary task."""
    w = {name: 1.0 for name, typ, derived in tasks if typ == "binary" and not derived}
    return w or {tasks[0][0]: 1.0}


# ---------------------------------------------------------------------------------- experiments


def arm_bucket(key: str, salt: str) -> float:
    """Stable position in [0, 1) of ``key``: fnv1a64 of ``salt:key``, mod 10^6."""
    return (fnv1a64_text(f"{salt}:{key}") % 1_000_000) / 1_000_000.0


def choose_arm(key: str, arms: list[tuple[str, float]], salt: str) -> str | None:
    """arms: (name, traffic) in config order; the key's bucket picks an arm, or None (remainder)."""
    if not arms:
        return None
    x = arm_bucket(key, salt)
    edge = 0.0
    for name, traffic in arms:
        edge += traffic
        if x < edge:
            return name
    return None
