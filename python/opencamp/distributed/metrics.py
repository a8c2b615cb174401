"""Every replica's /metrics (Prometheus text) into one: summed over replicas, or each labelled
with its replica.

Counters, histograms and most gauges add up across replicas (requests, tokens, KV blocks, queue
lengths); ratios and means are averaged; opencamp_model_info keeps one line per replica.
"""
from __future__ import annotations

AVERAGED = {"opencamp_kv_cache_usage_ratio", "opencamp_scheduler_mean_batch_tokens"}
PER_REPLICA = {"opencamp_model_info"}


def _split_sample(line: str) -> tuple[str, str, str]:
    """'name{a="b"} 3' -> ('name', '{a="b"}', '3')."""
    series, _, value = line.rpartition(" ")
    brace = series.find("{")
    if brace < 0:
        return series, "", value
    return series[:brace], series[brace:], value


def _with_label(name: str, labels: str, key: str, value: str) -> str:
    label = f'{key}="{value}"'
    if not labels:
        return f"{name}{{{label}}}"
    return f"{name}{{{label},{labels[1:]}"


def _family(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _lines(texts: dict[str, str]):
    """Every replica's exposition, replicas in id order, as (replica, family, header, sample):
    header a HELP/TYPE line (sample None), or sample (name, labels, value) (header None)."""
    for replica, text in sorted(texts.items()):
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                parts = line.split(" ", 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    yield replica, parts[2], line, None
                continue
            name, labels, value = _split_sample(line)
            yield replica, _family(name), None, (name, labels, value)


def aggregate(texts: dict[str, str]) -> str:
    """One exposition for the whole deployment: `texts` maps replica id -> its /metrics."""
    header: dict[str, list[str]] = {}  # families in first-seen order, each its HELP and TYPE
    samples: dict[str, dict[tuple[str, str], list[float]]] = {}
    kept: dict[str, list[str]] = {}
    for replica, family, line, sample in _lines(texts):
        lines = header.setdefault(family, [])
        if line is not None:
            if len(lines) < 2 and line not in lines:
                lines.append(line)
            continue
        name, labels, value = sample
        if family in PER_REPLICA:
            labelled = _with_label(name, labels, "replica", replica)
            kept.setdefault(family, []).append(f"{labelled} {value}")
        else:
            samples.setdefault(family, {}).setdefault((name, labels), []).append(float(value))
    lines = ["# HELP opencamp_replicas Engine replicas answering /metrics.",
             "# TYPE opencamp_replicas gauge", f"opencamp_replicas {len(texts)}"]
    for family, family_header in header.items():
        lines.extend(family_header)
        lines.extend(kept.get(family, []))
        for (name, labels), values in samples.get(family, {}).items():
            total = sum(values) / len(values) if family in AVERAGED else sum(values)
            lines.append(f"{name}{labels} {_number(total)}")
    return "\n".join(lines) + "\n"


def per_replica(texts: dict[str, str]) -> str:
    """Every replica's series, each sample labelled replica="ID" (one HELP/TYPE per family)."""
    by_family: dict[str, list[str]] = {}  # families in first-seen order
    seen: set[str] = set()
    for replica, family, line, sample in _lines(texts):
        lines = by_family.setdefault(family, [])
        if line is not None:
            if line not in seen:
                seen.add(line)
                lines.append(line)
        else:
            name, labels, value = sample
            lines.append(f"{_with_label(name, labels, 'replica', replica)} {value}")
    return "\n".join(line for lines in by_family.values() for line in lines) + "\n"


def routing(decisions: dict[str, int]) -> str:
    """The gateway's own series: how its router placed requests."""
    lines = ["# HELP opencamp_routing_decisions_total Requests the gateway routed, by how: to "
             "the replica holding their prefix, to the least loaded, to a named replica "
             "(per-replica /metrics), or at random (--routing random).",
             "# TYPE opencamp_routing_decisions_total counter"]
    lines += [f'opencamp_routing_decisions_total{{decision="{k}"}} {v}'
              for k, v in sorted(decisions.items())]
    return "\n".join(lines) + "\n"
