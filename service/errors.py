"""The one error-body format of the API: ``{"detail": [{"loc", "msg", "type"}], "message"}``.

``detail`` is FastAPI's list (``loc`` names the field, e.g. ``["body", "candidates", 3, "features",
"item_price"]``); ``message`` joins them into one line, ``"body.candidates.3.features.item_price: ..."``.
Used by the exception handlers (service/app.py) and by routes that answer an error themselves.
"""

from __future__ import annotations

from typing import Any


def _text(v: Any) -> Any:
    """A string safe to encode as UTF-8: lone surrogates (from a ``\\ud800`` JSON escape, e.g. in a rejected
    key that an error's loc names) become their escape text ``\\ud800``; anything else is returned as is."""
    if type(v) is str and not v.isascii():
        return v.encode("utf-8", "backslashreplace").decode("utf-8")
    return v


def error_body(errors: list[dict[str, Any]]) -> dict[str, Any]:
    detail = [{"loc": [_text(p) for p in e.get("loc", ())], "msg": _text(e.get("msg", "")),
               "type": e.get("type", "value_error")} for e in errors]
    message = "; ".join(f"{'.'.join(str(p) for p in d['loc'])}: {d['msg']}" for d in detail)
    return {"detail": detail, "message": message}
