"""The agent's int8 front (LiteRT) against the same layers in float Keras, and the agent's memory.

    .venv/bin/python bench/agent_front.py            # the demo's task design (about a minute)
    .venv/bin/python bench/agent_front.py --quick    # a small design, fewer repeats (seconds)

1. Latency. The task's front model is built once with ``coordinator.task_model.design_task`` (TF);
   its float Keras front is captured from that very call (the layers the int8 model was converted
   from). Both run on the same inputs (24-hour windows of a generated household) at batch 1 and
   batch 128, single-threaded on both sides (the agent runs LiteRT with one thread). Figures are
   medians of per-call times, divided by the batch size. The Keras side is timed twice: the plain
   eager call the agent would make, and a ``tf.function`` (graph) call, the stronger baseline.
2. Memory. ``crowdfl-agent run`` as its own process against the embedded broker, the real
   coordinator and a real edge server (``tests/agent/world.py``); its resident set (VmRSS from
   /proc) is sampled while idle after joining the task and during a release of one round, and its
   peak (VmHWM) at the end. Baseline in the same run: a process that imports TensorFlow and runs
   the float Keras front on a batch of 128, the cheapest way to get the same features with TF.
3. The agent's import closure holds no TensorFlow (checked in a fresh interpreter).
4. Noise. One round's release (96 samples x the task's features) through
   ``agent.privacy.privatise_features``: the exact discrete Laplace sampler on the OS CSPRNG the
   device uses (batched with numpy), against the same sampler one value at a time (the device's
   before it was batched) and the float Laplace draw it replaced (numpy ``Generator.laplace``,
   which leaks through its floating-point representation, Mironov 2012), timed in the same run.

Figures go to bench/results/agent_front.json (``bench.results_io.write_result``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for tests.agent.world / process (the bench reuses the test harness)

START = datetime(2026, 9, 1, tzinfo=UTC)


def design_with_keras_front(quick: bool) -> tuple[Any, Any]:
    """design_task, plus the float Keras front it converted (captured from the conversion call)."""
    import coordinator.task_model as tm

    captured: dict[str, Any] = {}
    convert = tm.to_int8_tflite

    def spy(front: Any, representative: np.ndarray) -> bytes:
        captured["front"] = front
        return convert(front, representative)

    # 128 samples a release, as timed before the default task moved to one window per 25 hours (13 a round)
    design = tm.TaskDesign(lab_households=3, lab_days=14, samples_per_round=64, seed=7) if quick else tm.TaskDesign(samples_per_round=128, seed=7)
    tm.to_int8_tflite = spy  # type: ignore[assignment]
    try:
        designed = tm.design_task(design, START)
    finally:
        tm.to_int8_tflite = convert  # type: ignore[assignment]
    return designed, captured["front"]


def inputs_for(spec: Any, n: int) -> np.ndarray:
    from crowdfl import household
    from crowdfl.task import task_samples

    (_, matrix), = household.generate_households(1, 1234, START, 14, 3600)
    samples = task_samples(spec, matrix, int(START.timestamp() // 3600))
    assert len(samples.inputs) >= n, len(samples.inputs)
    return samples.inputs[:n].astype(np.float32)


def per_sample_us(fn: Callable[[], Any], batch: int, repeats: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / batch * 1e6


def latency(designed: Any, keras_front: Any, quick: bool) -> dict[str, Any]:
    import tensorflow as tf

    from crowdfl.front import FrontModel

    spec = designed.spec
    front = FrontModel(designed.front_tflite, spec.front_model_hash, num_threads=1)
    x128 = inputs_for(spec, 128)
    x1 = x128[:1]
    graph = tf.function(lambda x: keras_front(x, training=False), reduce_retracing=True)
    out: dict[str, Any] = {}
    for batch, x in ((1, x1), (128, x128)):
        reps = (200 if quick else 2000) if batch == 1 else (30 if quick else 300)
        xt = tf.constant(x)
        out[f"batch{batch}"] = {
            "int8_litert_us": per_sample_us(lambda x=x: front(x), batch, reps),
            "keras_eager_us": per_sample_us(lambda xt=xt: keras_front(xt, training=False), batch, reps),
            "keras_graph_us": per_sample_us(lambda xt=xt: graph(xt), batch, reps),
        }
    f_int8 = front(x128)
    f_float = keras_front(tf.constant(x128), training=False).numpy()
    out["max_abs_feature_error"] = float(np.abs(f_int8 - f_float).max())
    out["mean_abs_feature_error"] = float(np.abs(f_int8 - f_float).mean())
    out["model_bytes"] = len(designed.front_tflite)
    return out


def _rss_kb(pid: int, field: str = "VmRSS") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


class RssSampler:
    """VmRSS of one process every ``interval`` seconds, in a thread."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            kb = _rss_kb(self.pid)
            if kb:
                self.samples.append(kb)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def agent_memory(designed: Any, workdir: Path) -> dict[str, Any]:
    from crowdfl.identity import Identity
    from crowdfl.mqtt import MqttSettings
    from crowdfl_sim.broker import EmbeddedBroker
    from tests.agent.process import AgentProcess, read_ledger, write_jsonl
    from tests.agent.world import World, household_reports, wait_for

    broker = EmbeddedBroker()
    broker.start()
    mqtt = MqttSettings(host=broker.host, port=broker.port)
    state_dir = workdir / "agent"
    device, _ = Identity.load_or_create(state_dir / "identity.json")
    world = World(workdir, designed, lambda role, short: mqtt, [device])
    cfg = workdir / "agent.toml"
    cfg.write_text(world.agent_toml(state_dir, mqtt))
    agent = AgentProcess(cfg, workdir / "agent.log")
    n = designed.spec.samples_per_round
    days = max(3, (n + 40) // 24 + 2)
    done = agent.cli("import", str(write_jsonl(workdir / "history.jsonl", household_reports("bench-home", START, days))))
    assert done.returncode == 0, done.stderr
    state_db = state_dir / "state.sqlite"
    try:
        world.start_edge()
        agent.start()
        wait_for(lambda: (state_dir / "models").exists() and any((state_dir / "models").iterdir()), 60,
                 f"the agent to join the task\n{agent.log()}")
        time.sleep(1.0)
        with RssSampler(agent.pid, 0.05) as idle:
            time.sleep(3.0)
        with RssSampler(agent.pid, 0.005) as busy:
            t0 = time.perf_counter()
            world.open_round(1)
            wait_for(lambda: read_ledger(state_db).released, 60, f"the release\n{agent.log()}", interval=0.01)
            released_s = time.perf_counter() - t0
            wait_for(lambda: not read_ledger(state_db).spool, 60, "the acknowledgement", interval=0.01)
            acked_s = time.perf_counter() - t0
        hwm = _rss_kb(agent.pid, "VmHWM")
        rc = agent.terminate(30)
    finally:
        agent.stop()
        world.close()
        broker.stop()
    return {
        "idle_rss_mb": statistics.median(idle.samples) / 1024,
        "release_rss_max_mb": max(busy.samples) / 1024,
        "peak_hwm_mb": hwm / 1024,
        "samples_released": n,
        "round_open_to_spooled_s": released_s,
        "round_open_to_acknowledged_s": acked_s,
        "sigterm_exit_code": rc,
    }


_TF_BASELINE = """
import sys, numpy as np, keras, tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(1)
m = keras.models.load_model(sys.argv[1], compile=False, safe_mode=False)
x = np.load(sys.argv[2])
for _ in range(5):
    m(tf.constant(x), training=False)
print(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
"""


def tf_baseline_memory(keras_front: Any, inputs: np.ndarray, workdir: Path) -> float:
    """Peak RSS (MB) of a process that gets the same features with TensorFlow."""
    import keras

    model_path = workdir / "front.keras"
    # the front has no custom layers (the privacy layer sits behind it), so it reloads as is
    keras.saving.save_model(keras.Model(keras_front.inputs, keras_front.outputs), model_path)
    np.save(workdir / "x.npy", inputs)
    done = subprocess.run([sys.executable, "-c", _TF_BASELINE, str(model_path), str(workdir / "x.npy")],
                          capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"TF baseline failed: {done.stderr[-2000:]}")
    return int(done.stdout.strip().splitlines()[-1]) / 1024


def import_closure_has_no_tf() -> bool:
    code = 'import agent.cli, agent.service; import sys; assert "tensorflow" not in sys.modules'
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=120, check=False).returncode == 0


def noise_timing(spec: Any, quick: bool) -> dict[str, Any]:
    """Median time of one round's release: exact discrete Laplace (OS CSPRNG) vs float Laplace."""
    from agent.privacy import OsRandom, privatise_features
    from crowdfl.task import laplace_scale, prepare_features

    x = np.random.default_rng(3).uniform(0, 1, (spec.samples_per_round, spec.feature_dim)).astype(np.float32)
    float_rng = np.random.default_rng(4)

    def float_laplace() -> np.ndarray:  # the agent's sampler before issue 14
        p = prepare_features(x, spec.feature_scale, spec.clip_l1)
        return (p + float_rng.laplace(0.0, laplace_scale(spec.epsilon, spec.clip_l1, p.shape[1]), p.shape)).astype(np.float32)

    reps = 5 if quick else 30
    out: dict[str, Any] = {"samples": int(x.shape[0]), "values": int(x.size), "epsilon": spec.epsilon}
    def scalar_exact() -> np.ndarray:  # the device's sampler before it was batched: one value at a time
        return privatise_features(x, spec, OsRandom())

    for name, fn in (("discrete_os_csprng", lambda: privatise_features(x, spec)), ("discrete_scalar", scalar_exact),
                     ("float_laplace", float_laplace)):
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[f"{name}_ms_per_release"] = statistics.median(times) * 1000
    out["discrete_us_per_value"] = out["discrete_os_csprng_ms_per_release"] * 1000 / x.size
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small task design and fewer repeats")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--skip-memory", action="store_true", help="latency only (no agent process)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import logging

    logging.basicConfig(level=logging.WARNING)
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    t0 = time.perf_counter()
    designed, keras_front = design_with_keras_front(args.quick)
    design_s = time.perf_counter() - t0
    lat = latency(designed, keras_front, args.quick)
    result: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cpu(s), Python {platform.python_version()}",
        "design_s": design_s, "latency": lat, "agent_imports_tensorflow": not import_closure_has_no_tf(),
        "noise": noise_timing(designed.spec, args.quick),
    }
    if not args.skip_memory:
        with tempfile.TemporaryDirectory(prefix="crowdfl-bench-") as tmp:
            result["agent_memory"] = agent_memory(designed, Path(tmp))
            result["tf_baseline_peak_mb"] = tf_baseline_memory(keras_front, inputs_for(designed.spec, 128), Path(tmp))
    from bench.results_io import write_result

    path = write_result("agent_front", result, quick=args.quick)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"agent front: int8 LiteRT vs float Keras, same inputs, 1 thread each ({result['machine']})")
    print(f"  task designed in {design_s:.1f}s; int8 model {lat['model_bytes']} bytes; "
          f"int8 vs float features: max |diff| {lat['max_abs_feature_error']:.4f}, mean {lat['mean_abs_feature_error']:.4f}")
    print(f"  {'batch':>5}  {'int8 LiteRT':>12}  {'Keras eager':>12}  {'ratio':>6}  {'Keras graph':>12}  {'ratio':>6}   (us per sample)")
    for b in (1, 128):
        r = lat[f"batch{b}"]
        print(f"  {b:>5}  {r['int8_litert_us']:>12.2f}  {r['keras_eager_us']:>12.2f}  {r['keras_eager_us'] / r['int8_litert_us']:>5.1f}x"
              f"  {r['keras_graph_us']:>12.2f}  {r['keras_graph_us'] / r['int8_litert_us']:>5.1f}x")
    if "agent_memory" in result:
        m, base = result["agent_memory"], result["tf_baseline_peak_mb"]
        print("agent process (crowdfl-agent run) resident memory; baseline: a TF process running the float front")
        print(f"  idle (task joined)         {m['idle_rss_mb']:7.1f} MB")
        print(f"  during a release ({m['samples_released']} samples) {m['release_rss_max_mb']:7.1f} MB max "
              f"(round open -> spooled {m['round_open_to_spooled_s']:.2f}s, acknowledged {m['round_open_to_acknowledged_s']:.2f}s)")
        print(f"  peak (VmHWM)               {m['peak_hwm_mb']:7.1f} MB   vs TF baseline {base:7.1f} MB: {base / m['peak_hwm_mb']:.1f}x less")
        print(f"  SIGTERM exit code {m['sigterm_exit_code']}")
    nz = result["noise"]
    print(f"noise for one release ({nz['samples']} samples, {nz['values']} values, epsilon {nz['epsilon']:g}): exact discrete "
          f"Laplace on the OS CSPRNG {nz['discrete_os_csprng_ms_per_release']:.2f} ms ({nz['discrete_us_per_value']:.2f} us a value) "
          f"vs {nz['discrete_scalar_ms_per_release']:.1f} ms one value at a time, vs float Laplace {nz['float_laplace_ms_per_release']:.2f} ms")
    print(f"agent import closure holds TensorFlow: {'YES (regression)' if result['agent_imports_tensorflow'] else 'no'}")
    print(f"figures written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
