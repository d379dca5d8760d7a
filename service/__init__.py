"""The online ranking service (onnxruntime + FastAPI; no torch, nothing from ``model/``). See docs/service.md."""
