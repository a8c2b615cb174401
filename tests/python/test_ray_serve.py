"""opencamp on Ray Serve (opencamp.distributed): two engine replicas of the tiny chat model on a
local Ray instance bound to 127.0.0.1, started once for the module and stopped at its end.

Multi-turn conversations stay on the replica holding their KV cache (cached tokens on every
later turn), new ones spread over both replicas, the official openai client works unchanged,
/metrics adds the replicas up, and killing a replica's process mid-run loses no request that
had not begun and leaves no stream hanging; Ray then starts a replica in its place.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("ray.serve", reason="opencamp on Ray Serve needs the optional extra "
                    "opencamp[ray] (ray[serve]), which is not installed here")

from opencamp.distributed import BuildArgs  # noqa: E402
from opencamp.distributed.launch import ENGINE  # noqa: E402
from opencamp.distributed.routing import (PrefixAffinityRouter, PrefixTable,  # noqa: E402
                                          block_hashes, prompt_text)
from serverkit import MODEL, TINY_CONTEXT, ServeProcess, sse_events  # noqa: E402

REPLICA = "x-opencamp-replica"
APP = "opencamp"


@pytest.fixture(scope="module")
def ray_url(tiny_dir):
    """A local Ray instance (this process is its driver, for serve.status and handles), and
    `opencamp serve --replicas 2 --ray-address ...` joining it as a child process."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=100 * 2**20, log_to_driver=False)
    server = None
    try:
        server = ServeProcess([
            "--model", str(tiny_dir), "--served-model-name", MODEL, "--replicas", "2",
            "--threads", "1", "--max-context", str(TINY_CONTEXT),
            "--kv-cache-tokens", str(4 * TINY_CONTEXT), "--max-running", "16",
            "--temperature", "0", "--ray-address", ray.get_runtime_context().gcs_address])
        yield server.wait_ready(timeout=180)
    finally:
        if server is not None:
            assert server.stop() == 0, server.output
        ray.shutdown()


def chat(client, messages, max_tokens=8, **extra):
    response = client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": messages, "max_tokens": max_tokens, **extra})
    assert response.status_code == 200, response.text
    return response


# ---- routing without Ray: the prompt's text and the prefix table ---------------------------

def test_prompt_text_of_a_later_turn_starts_with_the_earlier_turn():
    first = [{"role": "user", "content": "Hello"}]
    later = first + [{"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "More"}]
    body = lambda messages: json.dumps({"messages": messages}).encode()  # noqa: E731
    assert prompt_text("/v1/chat/completions", body(later)).startswith(
        prompt_text("/v1/chat/completions", body(first)))
    assert prompt_text("/v1/completions", b'{"prompt": "abc"}') == "abc"
    assert prompt_text("/v1/chat/completions", b"{not json") == ""
    assert prompt_text("/health", b"") == ""


def test_prefix_table_finds_the_longest_run_of_leading_blocks():
    table = PrefixTable()
    a, b = "x" * 64 * 3, "x" * 64 + "y" * 64 * 2
    table.remember(block_hashes(a), "r1")
    table.remember(block_hashes(b), "r2")
    assert table.longest_match(block_hashes(a + "z" * 64), {"r1", "r2"}) == (3, {"r1"})
    assert table.longest_match(block_hashes(b), {"r1", "r2"}) == (3, {"r2"})
    assert table.longest_match(block_hashes("x" * 64 + "q" * 64), {"r1", "r2"}) == \
        (1, {"r1", "r2"})
    assert table.longest_match(block_hashes(a), {"r2"}) == (1, {"r2"})  # r1 is gone
    table.forget("r1")
    assert table.longest_match(block_hashes(a), {"r1", "r2"}) == (1, {"r2"})


def test_the_deploy_configs_in_docs_are_valid():
    """docs/ray: the `serve deploy` config and the KubeRay RayService pass Ray's own schema,
    and their arguments are opencamp's."""
    import yaml
    from ray.serve.schema import ServeDeploySchema
    from conftest import REPO

    config = yaml.safe_load((REPO / "docs" / "ray" / "serve-config.yaml").read_text())
    service = yaml.safe_load((REPO / "docs" / "ray" / "rayservice.yaml").read_text())
    assert service["kind"] == "RayService"
    for deploy in (config, yaml.safe_load(service["spec"]["serveConfigV2"])):
        app = ServeDeploySchema.model_validate(deploy).applications[0]
        assert app.import_path == "opencamp.distributed:app_builder"
        BuildArgs.from_dict(app.args)
    with pytest.raises(ValueError, match="unknown argument"):
        BuildArgs.from_dict({"model": "m", "replica": 2})


def test_replica_bounds_become_ray_autoscaling(tiny_dir):
    from opencamp.distributed import build_app
    from opencamp.distributed.launch import _scaling

    fixed = BuildArgs(str(tiny_dir), replicas=3)
    assert _scaling(fixed) == {"num_replicas": 3}
    bounds = BuildArgs(str(tiny_dir), min_replicas=1, max_replicas=4, parallel=8)
    config = _scaling(bounds)["autoscaling_config"]
    assert (config["min_replicas"], config["max_replicas"]) == (1, 4)
    assert config["target_ongoing_requests"] == 8  # a batch in flight per replica
    build_app(bounds)  # Ray Serve accepts the deployment options
    with pytest.raises(ValueError, match="min-replicas"):
        _scaling(BuildArgs(str(tiny_dir), min_replicas=5, max_replicas=2))


class _Replica:
    def __init__(self, name):
        from ray.serve.request_router import ReplicaID
        from ray.serve._private.common import DeploymentID
        self.replica_id = ReplicaID(name, DeploymentID(name=ENGINE, app_name=APP))
        self.max_ongoing_requests = 100


def _router(queue_lens, imbalance_threshold=4):
    """The router's choice logic on stand-in replicas with the given queue lengths."""
    router = PrefixAffinityRouter.__new__(PrefixAffinityRouter)
    router._deployment_id = None
    router.initialize_state(imbalance_threshold=imbalance_threshold)
    router._queue_len = lambda r: queue_lens[r.replica_id.unique_id]
    return router


def _choose(router, replicas, text):
    import asyncio
    from types import SimpleNamespace
    from opencamp.distributed.routing import ForwardedRequest
    request = ForwardedRequest("POST", "/v1/chat/completions", b"", [], b"", prefix_text=text)
    pending = SimpleNamespace(args=[request], routing_context=SimpleNamespace())
    ranks = asyncio.run(router.choose_replicas(replicas, pending))
    return [[r.replica_id.unique_id for r in rank] for rank in ranks]


def test_router_prefers_the_prefix_holder_until_it_is_too_busy():
    replicas = [_Replica("a"), _Replica("b")]
    text = "conversation " * 40
    queue = {"a": 0, "b": 1}
    router = _router(queue)
    assert _choose(router, replicas, text) == [["a", "b"]]  # unseen: least loaded first
    router.table.remember(block_hashes(text), "b")
    assert _choose(router, replicas, text + "next turn")[0] == ["b"]  # b holds it
    queue["b"] = 6  # 6 - 0 > the threshold of 4: the least loaded instead
    assert _choose(router, replicas, text + "next turn") == [["a", "b"]]
    queue.update(a=3, b=3)  # equal loads, a prompt nobody has: b already holds more
    assert _choose(router, replicas, "fresh " * 40)[0][0] == "a"


# ---- on a local Ray instance ----------------------------------------------------------------

def test_conversations_stay_on_the_replica_holding_their_cache(ray_url):
    """20 conversations of 3 turns, all at once: turns 2 and 3 land where turn 1 did, with
    cached prompt tokens; the conversations spread over both replicas."""
    def conversation(i):
        messages = [{"role": "user", "content": f"Conversation {i}: tell me about the number {i}."}]
        served = []
        with httpx.Client(base_url=ray_url, timeout=120) as client:
            for turn in range(3):
                response = chat(client, messages)
                body = response.json()
                served.append((response.headers[REPLICA],
                               body["usage"]["prompt_tokens_details"]["cached_tokens"]))
                messages += [{"role": "assistant", "content": body["choices"][0]["message"]["content"]},
                             {"role": "user", "content": f"And after that, part {turn + 2}?"}]
        return served

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(conversation, range(20)))
    for i, served in enumerate(results):
        first = served[0][0]
        assert [replica for replica, _ in served] == [first] * 3, (i, served)
        assert all(cached > 0 for _, cached in served[1:]), (i, served)
    spread = {served[0][0] for served in results}
    assert len(spread) == 2, f"every conversation went to {spread}"


def test_the_openai_client_works_unchanged(ray_url):
    openai = pytest.importorskip("openai", reason="the openai package is part of the test extra")
    client = openai.OpenAI(base_url=f"{ray_url}/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == [MODEL]
    whole = client.chat.completions.create(model=MODEL, max_tokens=5,
                                           messages=[{"role": "user", "content": "Hi"}])
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 5
    pieces = list(client.chat.completions.create(
        model=MODEL, max_tokens=5, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Hi"}]))
    assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == \
        whole.choices[0].message.content  # greedy: the same text either way
    assert pieces[-1].usage.completion_tokens == 5
    with pytest.raises(openai.NotFoundError) as error:  # the replica's own 404, passed through
        client.chat.completions.create(model="nope", max_tokens=1,
                                       messages=[{"role": "user", "content": "Hi"}])
    assert error.value.body["code"] == "model_not_found"


def test_metrics_add_up_the_replicas(ray_url):
    with httpx.Client(base_url=ray_url, timeout=60) as client:
        messages = [{"role": "user", "content": "A conversation for the metrics test"}]
        answer = chat(client, messages).json()["choices"][0]["message"]["content"]
        chat(client, messages + [{"role": "assistant", "content": answer},
                                 {"role": "user", "content": "Go on"}])
        per_replica = client.get("/metrics/replicas")
        total = client.get("/metrics")
    assert per_replica.status_code == total.status_code == 200
    assert "opencamp_replicas 2" in total.text

    def samples(text, name):
        return [line for line in text.splitlines() if line.startswith(name + "{")
                or line.startswith(name + " ")]

    lines = samples(per_replica.text, "opencamp_generation_tokens_total")
    assert len(lines) == 2 and len({line.split('"')[1] for line in lines}) == 2
    # Nothing runs now: the sum matches exactly.
    summed = sum(float(line.rsplit(" ", 1)[1]) for line in lines)
    assert samples(total.text, "opencamp_generation_tokens_total") == \
        [f"opencamp_generation_tokens_total {int(summed)}"]
    assert summed > 0
    assert len(samples(total.text, "opencamp_model_info")) == 2  # one per replica
    prefix_routed = samples(total.text, "opencamp_routing_decisions_total")
    assert 'opencamp_routing_decisions_total{decision="prefix"}' in "\n".join(prefix_routed)
    assert float(next(line for line in prefix_routed if '"prefix"' in line).split()[-1]) >= 1


def test_a_replica_killed_mid_run_loses_nothing_that_had_not_begun(ray_url):
    """Long streams on both replicas, then a burst of short requests, then SIGKILL to one
    replica's process: its streams end with an OpenAI-shaped error and [DONE], the others
    finish, every short request is answered (retried elsewhere if it had not begun), and
    Ray brings the replica count back to 2."""
    import ray
    from ray import serve

    handle = serve.get_deployment_handle(ENGINE, app_name=APP)
    pids = {}
    deadline = time.monotonic() + 30
    while len(pids) < 2 and time.monotonic() < deadline:
        info = handle.process.remote().result(timeout_s=30)
        pids[info["replica"]] = info["pid"]
    assert len(pids) == 2, pids

    streams = {}  # index -> (replica, events)
    began = {}  # index -> replica, once the stream has its first token
    started = threading.Barrier(7)

    def long_stream(i):
        body = {"model": MODEL, "max_tokens": 1500, "stream": True,
                "messages": [{"role": "user", "content": f"Long story number {i}, please."}]}
        with httpx.Client(base_url=ray_url, timeout=60) as client:
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                lines = response.iter_lines()
                events = sse_events([next(lines), next(lines), next(lines)])  # role, token
                began[i] = response.headers[REPLICA]
                started.wait(timeout=60)
                events += sse_events(list(lines))
                streams[i] = (began[i], events)

    with ThreadPoolExecutor(6) as pool:
        running = [pool.submit(long_stream, i) for i in range(6)]
        started.wait(timeout=60)
        victim = began[0]
        with httpx.Client(base_url=ray_url, timeout=120) as client:
            def short(i):
                return chat(client, [{"role": "user", "content": f"Short one {i}"}],
                            max_tokens=48).json()

            with ThreadPoolExecutor(16) as burst_pool:
                burst = [burst_pool.submit(short, i) for i in range(16)]
                time.sleep(0.3)
                os.kill(pids[victim], signal.SIGKILL)
                answers = [f.result(timeout=120) for f in burst]
        for future in running:
            future.result(timeout=120)

    assert all(a["choices"][0]["finish_reason"] == "length" for a in answers)  # none lost
    ended = {"error": 0, "finished": 0}
    for i, (replica, events) in streams.items():
        assert events[-1] == "[DONE]", (i, events[-3:])
        last = events[-2]
        if "error" in last:
            assert replica == victim, (i, last)
            assert set(last["error"]) == {"message", "type", "param", "code"}
            assert last["error"]["code"] == "replica_failed"
            ended["error"] += 1
        else:
            assert last["choices"][0]["finish_reason"] == "length", (i, last)
            ended["finished"] += 1
    on_victim = sum(1 for replica, _ in streams.values() if replica == victim)
    assert ended["error"] == on_victim >= 1, (ended, on_victim)

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        status = serve.status().applications[APP].deployments[ENGINE]
        if status.replica_states.get("RUNNING", 0) == 2:
            break
        time.sleep(1)
    assert status.replica_states.get("RUNNING", 0) == 2, status
    with httpx.Client(base_url=ray_url, timeout=60) as client:
        chat(client, [{"role": "user", "content": "Still there?"}])
    assert ray.is_initialized()
