"""Building the Ray Serve application, and running it (`opencamp serve --replicas N`).

    from opencamp.distributed import build_app
    app = build_app("path/to/model", ServerOptions(model_name="smollm2"), replicas=2, threads=1)
    serve.run(app, name="opencamp", route_prefix="/")

`app_builder` is the same for Ray's own tools (`serve run` / `serve deploy` with a config file,
KubeRay's RayService): import path `opencamp.distributed:app_builder`, arguments as in
`BuildArgs`.
"""
from __future__ import annotations

import os
import signal
import socket
import threading
from dataclasses import dataclass, field, fields
from typing import Any

ENGINE = "OpencampEngine"
GATEWAY = "OpencampGateway"


@dataclass
class BuildArgs:
    """Everything one deployment of opencamp on Ray Serve is made of."""
    model: str  # a model folder or GGUF file, at this path on every node
    model_name: str | None = None  # the id clients send (default: the folder's or file's name)
    replicas: int | None = 2  # fixed count; None with min/max_replicas: autoscaling
    min_replicas: int | None = None
    max_replicas: int | None = None
    threads: int = 1  # per replica (and the CPUs Ray reserves for it)
    backend: str = "auto"
    dtype: str = "auto"
    max_context: int | None = None
    kv_cache_tokens: int | None = None  # per replica
    kv_cache_dtype: str = "auto"
    parallel: int = 8  # sequences per batch, per replica (--max-running)
    max_waiting: int = 256  # queued per replica before 429
    routing: str = "prefix"  # "prefix", or "random" (for comparison)
    # Requests in flight more than the least-loaded replica beyond which a conversation's
    # replica gives way (its turn is recomputed elsewhere). None: one batch (parallel).
    imbalance_threshold: int | None = None
    api_key: str | None = None
    allowed_hosts: tuple[str, ...] | None = None
    allowed_origins: tuple[str, ...] = ()  # CORS, as opencamp serve --allowed-origins
    max_request_bytes: int = 1 << 20
    http_timeout: float = 30.0
    stream_buffer_tokens: int = 64
    stream_idle_timeout: float = 60.0
    defaults: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, args: dict[str, Any]) -> "BuildArgs":
        known = {f.name for f in fields(cls)}
        unknown = set(args) - known
        if unknown:
            raise ValueError(f"unknown argument(s) for opencamp on Ray Serve: "
                             f"{', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
        return cls(**args)


def _scaling(args: BuildArgs) -> dict[str, Any]:
    if args.min_replicas is None and args.max_replicas is None:
        return {"num_replicas": args.replicas or 1}
    low = args.min_replicas if args.min_replicas is not None else 1
    high = args.max_replicas if args.max_replicas is not None else max(low, args.replicas or 1)
    if not 0 <= low <= high or high < 1:
        raise ValueError(f"need 0 <= --min-replicas ({low}) <= --max-replicas ({high}), and at "
                         "least one replica at most")
    # Queue depth: Ray adds replicas while the requests in flight per replica (running and
    # waiting) stay above one full batch, and removes them when they stay below.
    return {"autoscaling_config": {
        "min_replicas": low, "max_replicas": high,
        "initial_replicas": min(max(args.replicas or low, low), high),
        "target_ongoing_requests": args.parallel,
        "upscale_delay_s": 5, "downscale_delay_s": 60}}


def build_app(args: BuildArgs):
    """The Ray Serve application: the gateway bound to the engine deployment."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from ..server import ServerOptions
    from .deployments import EngineReplica, Gateway

    if args.routing not in ("prefix", "random"):
        raise ValueError(f"routing must be 'prefix' or 'random', not {args.routing!r}")
    name = args.model_name or os.path.basename(os.path.normpath(args.model))
    options = ServerOptions(
        model_name=name, model_aliases=(args.model,), api_key=args.api_key,
        parallel=args.parallel, max_waiting=args.max_waiting,
        max_request_bytes=args.max_request_bytes,
        allowed_hosts=tuple(args.allowed_hosts) if args.allowed_hosts else None,
        allowed_origins=tuple(args.allowed_origins),
        body_timeout=args.http_timeout, stream_buffer_tokens=args.stream_buffer_tokens,
        stream_idle_timeout=args.stream_idle_timeout, defaults=dict(args.defaults))
    options.sampling_defaults()  # a bad default fails here, not in every replica
    llm_options = dict(backend=args.backend, dtype=args.dtype, threads=args.threads,
                       max_context=args.max_context, kv_cache_tokens=args.kv_cache_tokens,
                       kv_cache_dtype=args.kv_cache_dtype, max_running=args.parallel)
    engine = serve.deployment(
        EngineReplica, name=ENGINE,
        # Every request a replica's own queue takes (its 429 decides beyond that), and a
        # little room for /health and /metrics.
        max_ongoing_requests=args.parallel + args.max_waiting + 8,
        ray_actor_options={"num_cpus": args.threads},
        request_router_config=RequestRouterConfig(
            request_router_class="opencamp.distributed.routing:PrefixAffinityRouter",
            request_router_kwargs={"prefix_routing": args.routing == "prefix",
                                   "imbalance_threshold": args.parallel if args.imbalance_threshold is None
                                   else args.imbalance_threshold}),
        health_check_period_s=2, health_check_timeout_s=30, graceful_shutdown_timeout_s=5,
        **_scaling(args))
    gateway = serve.deployment(Gateway, name=GATEWAY, num_replicas=1,
                               ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=100_000)
    return gateway.bind(engine.bind(str(args.model), llm_options, options), ENGINE,
                        max_request_bytes=args.max_request_bytes,
                        body_timeout=args.http_timeout)


def app_builder(args: dict[str, Any]):
    """For `serve run opencamp.distributed:app_builder model=...` and serve config files."""
    return build_app(BuildArgs.from_dict(dict(args)))


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start(args: BuildArgs, *, host: str = "127.0.0.1", port: int = 8000,
          ray_address: str | None = None, num_cpus: int | None = None,
          app_name: str = "opencamp") -> str:
    """Starts Ray (a local instance on `host`, or joins `ray_address`), Serve's HTTP proxy on
    host:port, and the application; returns once every replica has loaded the model. The URL."""
    import ray
    from ray import serve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        if ray_address:
            ray.init(address=ray_address, log_to_driver=False)
        else:
            high = args.max_replicas or args.replicas or 1
            ray.init(num_cpus=num_cpus or max(os.cpu_count() or 1, high * args.threads),
                     include_dashboard=False, _node_ip_address=host if host[0].isdigit() and
                     not host.startswith("0.") else "127.0.0.1",
                     object_store_memory=200 * 2**20, log_to_driver=False)
    port = port or free_port(host)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(args), name=app_name, route_prefix="/", blocking=False)
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def stop(app_name: str | None = None) -> None:
    """Stops what `start` started: on a local instance Serve and Ray; on a cluster joined with
    a ray_address only the application `app_name` (other applications there go on)."""
    import ray
    from ray import serve

    try:
        if app_name is not None:
            serve.delete(app_name)
        else:
            serve.shutdown()
    finally:
        ray.shutdown()


def serve_until_signalled(args: BuildArgs, *, announce: str = "opencamp", **start_options) -> None:
    """`opencamp serve --replicas N`: runs until SIGTERM or Ctrl-C, then stops."""
    stopping = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stopping.set())
                for s in (signal.SIGINT, signal.SIGTERM)}
    joined = bool(start_options.get("ray_address"))
    app_name = start_options.get("app_name", "opencamp")
    try:
        url = start(args, **start_options)
        print(f"serving {announce} on {url} (chat page: {url}/ , API: {url}/v1, per-replica "
              f"metrics: {url}/metrics/replicas); Ctrl-C stops", flush=True)
        stopping.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        stop(app_name if joined else None)
