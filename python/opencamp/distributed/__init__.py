"""opencamp on Ray Serve: engine replicas behind a prefix-aware router (`pip install
opencamp[ray]`; `opencamp serve --replicas N`).

    from opencamp.distributed import BuildArgs, start, stop
    url = start(BuildArgs("path/to/model", replicas=2, threads=1), port=8000)

deployments.py: the engine replica (the server's own app, one LLM each) and the gateway;
routing.py: the prefix-aware request router; metrics.py: /metrics over replicas; launch.py:
building and starting the application (`app_builder` for `serve run` / `serve deploy`).
"""
from __future__ import annotations

try:
    import ray  # noqa: F401
    from ray import serve  # noqa: F401
except ImportError as error:  # pragma: no cover - the optional extra is missing
    raise ImportError("opencamp on Ray Serve needs the optional extra: "
                      "pip install 'opencamp[ray]'") from error

from .launch import BuildArgs, app_builder, build_app, start, stop  # noqa: E402

__all__ = ["BuildArgs", "app_builder", "build_app", "start", "stop"]
