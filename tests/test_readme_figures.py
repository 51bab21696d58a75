"""Every figure the README quotes comes from a committed bench result.

The README's "Measured" table (the demo's wall time and memory among its rows) and the ingest limit quoted under
"Status and known limits" are rebuilt here from bench/results/<name>.json (written by
bench/results_io.py) and compared with the text. A row without a committed, full (not --quick)
result fails; so does a figure that drifted from its result. When a bench is rerun, paste the
expected text this test prints.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS = ROOT / "bench" / "results"


def result(name: str) -> dict[str, Any]:
    path = RESULTS / f"{name}.json"
    assert path.exists(), f"no committed result {path.relative_to(ROOT)}: run the bench fully and commit it"
    record = json.loads(path.read_text())
    assert record["quick"] is False, f"{path.name} is from a --quick run"
    for key in ("command", "date", "machine", "versions", "figures"):
        assert record.get(key), f"{path.name} lacks {key}"
    return record


def _row(rows: list[dict[str, Any]], rule: str, n: int) -> dict[str, Any]:
    return next(r for r in rows if r["rule"].startswith(rule) and r["n"] == n)


def ingest_figure() -> str:
    f = result("ingest")["figures"]
    cpu = f["edge"]["0"]["stats"]["cpu_us_per_msg_this_process"]
    return (f"{f['best_edge_msg_s']:,.0f} vs {f['raw_median_msg_s']:,.0f} msg/s of {f['samples_per_batch']} samples each "
            f"({f['best_ratio']:.2f}); CPU a message, inline: {cpu:.0f} µs vs {f['raw_median_cpu_us_per_msg']:.0f} µs")


def aggregation_figure() -> str:
    f = result("aggregation")["figures"]
    n = f["n"]

    def pair(rule: str, digits: int) -> str:
        r = _row(f["rows"], rule, n)
        theirs = f"{r['flower_s']:.{digits}f} s" if r["flower_s"] is not None else "not run (over the time budget)"
        return f"{r['crowdfl_s']:.{digits}f} s vs {theirs}"

    krum = _row(f["rows"], "multi_krum", n)
    if krum["flower_s"] is None:  # Flower's quadratic Krum was only timed at the smaller n
        small = next(r for r in f["rows"] if r["rule"].startswith("multi_krum") and r["n"] < n)
        estimate = re.search(r"Flower estimated (\d+)s", krum["note"])
        assert estimate, krum["note"]
        krum_text = (f"{krum['crowdfl_s']:.1f} s vs an estimated {estimate.group(1)} s "
                     f"(at n = {small['n']}: {small['crowdfl_s']:.2f} vs {small['flower_s']:.2f} s)")
    else:
        krum_text = pair("multi_krum", 1)
    return f"Multi-Krum {krum_text}; median {pair('coordinate_median', 2)}; FedAvg {pair('fedavg', 2)}"


def demo_figure() -> str:
    f = result("demo")["figures"]
    wall, rss, base = f["wall_s"], f["peak_rss_mb"], f["baseline_tensorflow_import"]
    seeds = ", ".join(str(s) for s in f["seeds"])
    return (f"{wall['mean']:.0f} s wall ({wall['min']:.0f}–{wall['max']:.0f} s over seeds {seeds}), "
            f"{rss['mean'] / 1024:.2f} GB peak RSS, TensorFlow included; a process that only imports "
            f"TensorFlow: {base['wall_s']:.0f} s, {base['peak_rss_mb'] / 1024:.2f} GB")


def front_figure() -> str:
    f = result("agent_front")["figures"]
    b = f["latency"]["batch128"]
    return (f"{b['int8_litert_us']:.2f} µs vs {b['keras_graph_us']:.2f} µs per sample (batch 128, graph mode); "
            f"agent RSS {f['agent_memory']['peak_hwm_mb']:.0f} MB vs {f['tf_baseline_peak_mb']:.0f} MB for a TF process")


def noise_figure() -> str:
    n = result("agent_front")["figures"]["noise"]
    return (f"{n['discrete_os_csprng_ms_per_release']:.2f} ms batched vs {n['discrete_scalar_ms_per_release']:.0f} ms one value at a time "
            f"vs {n['float_laplace_ms_per_release']:.2f} ms float, for {n['samples']} samples × {n['values'] // n['samples']} features "
            f"({n['discrete_us_per_value']:.2f} µs a value)")


def _mgas(x: float) -> str:
    return f"{x / 1e6:.2f} M" if x < 1e6 else f"{x / 1e6:.1f} M" if x < 1e7 else f"{x / 1e6:.0f} M"


def gas_figure() -> str:
    rows = sorted(result("gas")["figures"]["rows"], key=lambda r: r["customers"])
    sizes = " / ".join(f"{r['customers']:,}" for r in rows)
    ours = " / ".join(f"{r['crowdfl_round_gas']:,}" for r in rows)
    growth = rows[-1]["crowdfl_round_gas"] / rows[0]["crowdfl_round_gas"]
    per_key = " / ".join(_mgas(r["per_key_round_gas"]) for r in rows)
    per_update = " / ".join(_mgas(r["per_update_anchor_gas"]) for r in rows)
    claims = [r["claim_gas"] for r in rows]
    proofs = [r["claim_proof_len"] for r in rows]
    return (f"{ours} gas at {sizes} customers ({growth:.3f}× from {rows[0]['customers']:,} to {rows[-1]['customers']:,}), "
            f"vs {per_key} per-key and {per_update} per-update; one customer's claim {min(claims):,}–{max(claims):,} gas "
            f"(proof of {min(proofs)}–{max(proofs)} hashes). Baselines measured on "
            f"{max(r['per_key_measured_keys'] for r in rows)} keys / {max(r['per_update_measured'] for r in rows)} updates "
            f"and scaled linearly (same transaction each time)")


def edge_trainer_figure() -> str:
    f = result("edge_trainer")["figures"]["sizes"]

    def size(n: str) -> str:
        r = f[n]
        return (f"{r['ours_ms']['median']:.1f} ms vs {r['legacy_ms']['median']:,.0f} ms ({r['ratio_legacy_over_ours']:.0f}×) "
                f"at {r['samples']} samples")

    loads = [x for n in f for x in f[n]["load_avg_1m"]]
    return f"{size('768')}; {size('39')} (medians; load {min(loads):.0f}–{max(loads):.0f} on 2 CPUs)"


def _range(d: dict[str, float], digits: int, unit: str) -> str:
    if d["n"] == 1:
        return f"{d['mean']:.{digits}f} {unit} (1 boot)"
    return f"{d['mean']:.{digits}f} {unit} ({d['min']:.{digits}f}–{d['max']:.{digits}f}, {d['n']} boots)"


def image_build_figure() -> str:
    b = result("image")["figures"]["build"]
    return (f"base stage {b['base_stage_cold_s']} s from an empty cache, image stage {b['image_stage_s']} s, "
            f"cached run {b['cached_rerun_s']:.1f} s; image {b['image_bytes'] / 1e9:.2f} GB "
            f"({b['image_allocated_bytes'] / 2**20:.0f} MiB allocated, sparse)")


def image_boot_figure() -> str:
    f = result("image")["figures"]
    v = f["virt"]
    text = (f"virt: agent running with its usage log {_range(v['agent_ready_s'], 0, 's')} after power-on, "
            f"its features at the edge {_range(v['first_batch_after_task_s'], 1, 's')} after the task")
    if "raspi3b" in f:
        text += f"; raspi3b: agent active {f['raspi3b']['agent_active_s']:.0f} s after power-on (1 boot)"
    return text


def image_memory_figure() -> str:
    f = result("image")["figures"]
    v = f["virt"]
    return (f"{_range(v['rss_mb'], 1, 'MB')} RSS after its batch (peak {v['hwm_mb']['mean']:.1f} MB) with "
            f"{', '.join(f['memory_env'])} vs {_range(v['control_rss_mb'], 1, 'MB')} (peak "
            f"{v['control_hwm_mb']['mean']:.1f} MB) without; target ≤ {f['target_rss_mb']:.0f} MB")


# README "Measured" row (the start of its first cell) -> (bench result, the figure cell rebuilt from it)
TABLE: dict[str, tuple[str, Callable[[], str]]] = {
    "edge ingest": ("ingest", ingest_figure),
    "aggregation,": ("aggregation", aggregation_figure),
    "`crowdfl demo`": ("demo", demo_figure),
    "int8 front on the device": ("agent_front", front_figure),
    "one release's noise": ("agent_front", noise_figure),
    "gas of a whole round": ("gas", gas_figure),
    "edge training, per customer and round": ("edge_trainer", edge_trainer_figure),
    "SD-card image build": ("image", image_build_figure),
    "SD-card image boot": ("image", image_boot_figure),
    "the agent's memory on arm64": ("image", image_memory_figure),
    "devices through edges on the real parts": ("scale", lambda: scale_figure()),
}
# figure cells that are only a link to a report generated from a committed result
LINKED_REPORTS = {
    "docs/quality.md": RESULTS / "quality" / "results.json",
    "docs/robustness.md": RESULTS / "robustness" / "results.json",
}


def measured_rows() -> list[tuple[str, str, str]]:
    text = README.read_text()
    section = text.split("\n## Measured\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("what", "---"):
            rows.append((cells[0], cells[1], cells[2]))
    return rows


def flat_readme() -> str:
    return re.sub(r"\s+", " ", README.read_text())


def test_the_measured_table_is_found() -> None:
    assert len(measured_rows()) >= 3


@pytest.mark.parametrize("row", measured_rows(), ids=lambda r: r[0][:30])
def test_every_measured_row_matches_its_committed_result(row: tuple[str, str, str]) -> None:
    what, command, figure = row
    link = re.fullmatch(r"\[[^\]]*\]\(([^)]+)\)", figure)
    if link:
        assert link.group(1) in LINKED_REPORTS, f"{what}: links {link.group(1)}, not a report generated from a result"
        assert (ROOT / link.group(1)).exists() and LINKED_REPORTS[link.group(1)].exists()
        return
    key = next((k for k in TABLE if what.startswith(k)), None)
    assert key is not None, f"README row {what!r} quotes {figure!r} with no committed bench result behind it"
    name, expected = TABLE[key]
    script = f"bench/{name}.py"
    assert script in command and script in result(name)["command"], (command, result(name)["command"])
    assert figure == expected(), f"README says {figure!r}; bench/results/{name}.json says {expected()!r}"


def test_the_demo_paragraph_points_to_the_table() -> None:
    """The demo's timing is quoted once, in the table, not as a second, unchecked number."""
    assert "the demo row of Measured gives its wall time and peak memory" in flat_readme()


def test_the_ingest_limit_matches_the_ingest_bench() -> None:
    f = result("ingest")["figures"]
    edge = f["edge"]
    text = (f"Edge ingest reaches {edge['0']['ratio']:.2f} of the raw broker rate inline ({edge['1']['ratio']:.2f} with one worker "
            f"process), not the 0.5 aimed at, with no public-key operation left on the per-message path: the edge process "
            f"spends {edge['0']['stats']['cpu_us_per_msg_this_process']:.0f} µs of CPU a message against the raw subscriber's "
            f"{f['raw_median_cpu_us_per_msg']:.0f} µs")
    assert text in flat_readme(), f"the README's known limits should say: {text}"


def _scale() -> dict[str, Any]:
    return result("scale")["figures"]


def scale_figure() -> str:
    """The Measured row of bench/scale.py: round time, system CPU per device, gas, per size."""
    rows = _scale()["rows"]
    f = _scale()
    sizes = " / ".join(f"{r['devices']:,}" for r in rows)
    edges = " / ".join(str(r["edges"]) for r in rows)
    secs = " / ".join(f"{r['seconds_per_round']:.0f}" for r in rows)
    cpu = " / ".join(f"{r['system_cpu_s_per_device'] * 1000:,.0f}" for r in rows)
    gas = sorted({r["gas_per_round"] for r in rows})
    gas_text = f"{gas[0]:,}" if len(gas) == 1 else f"{gas[0]:,}–{gas[-1]:,}"
    acc = " / ".join(f"{r['accuracy']:.2f}" for r in rows)
    return (f"{sizes} devices through {edges} edges: {secs} s a round; {cpu} ms of system CPU per device "
            f"({f['per_device_cpu_ratio_top_vs_control']:.2f}× at {rows[-1]['devices']:,} vs {f['control_devices']:,}); "
            f"{gas_text} gas a round; accuracy {acc}")


def growth_fragments() -> list[str]:
    """What "Growing past one machine" quotes from bench/results/scale.json."""
    top = _scale()["rows"][-1]
    n, m = top["devices"], top["edges"]
    rss, grow = top["peak_rss_mb"], top["growth_bytes_per_round"]
    edge_ms = top["edge_cpu_s_per_device"] * 1000
    return [
        f"{n:,} devices through {m} edges",
        f"{n // m:,} devices an edge",
        f"{edge_ms:.0f} ms of edge CPU per device and round",
        f"about {3600 / top['edge_cpu_s_per_device'] / 1000:.0f},000 devices per edge core per hour of round",
        f"peak RSS {rss['one_edge']:.0f} MB per edge",
        f"coordinator: {top['coordinator_cpu_s_per_round']:.0f} CPU-seconds per round, peak RSS {rss['coordinator']:.0f} MB",
        f"its database grows {grow['coordinator_db'] / 2**20:.1f} MB and the content store {grow['store'] / 2**20:.1f} MB per round",
        f"chain: {top['gas_per_round']:,} gas per round, {top['chain_cpu_s_per_round']:.0f} CPU-seconds of the node",
        f"the RoundStart is {top['round_start_bytes'] / 1024:.0f} KiB",
    ]


def test_the_growth_section_matches_the_scale_bench() -> None:
    text = flat_readme()
    section = text.split("## Growing past one machine", 1)[1].split(" ## ", 1)[0]
    missing = [f for f in growth_fragments() if f not in section]
    assert not missing, f"README 'Growing past one machine' should say: {missing}"
    assert "bench/results/scale.json" in section
