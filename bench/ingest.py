"""Edge ingest throughput against the raw broker rate, and training time per customer per round.

    .venv/bin/python bench/ingest.py                    # 4,000 batches of 128 samples, ~1 min
    .venv/bin/python bench/ingest.py --messages 1000    # quicker
    .venv/bin/python bench/ingest.py --quick            # proves the script runs (CI), seconds

Figures go to bench/results/ingest.json (bench/results_io.py; ``ingest.quick.json`` for --quick).

Ingest: the same N signed and encrypted FeatureBatch envelopes (one payload size) are queued on a
real mosquitto (started here, debug logging off, plain listener with passwords and ACLs) for a
persistent subscriber session, then that subscriber connects and drains the backlog:

* baseline: a plain paho subscriber that only counts messages (the most the broker and a Python
  client deliver on this machine);
* crowdfl: the real EdgeServer (MqttLink -> drain -> Ingestor: parse, dedupe, open the channel
  envelope (AES-GCM under the device's cached channel key), decode, validate, decode and bind the
  receipt, one SQLite transaction per drain, signed acks published), timed until the last batch is
  committed.

Queueing first keeps the publishers' CPU out of both timings; both runs pay the same broker
delivery (QoS 1, mosquitto's in-flight window). The figure is edge rate / raw rate; beside it, the
CPU time of this process per message for both (the MQTT and ingest threads; inline only, since a
worker pool's CPU is elsewhere), which a machine shared with other work distorts far less.

Training: real per-customer TensorFlow training (EdgeServer.train_job: load the customer's
samples, fit the dense layers from the global model, sign, save) for R rounds of
``samples_per_round`` fresh samples each, beside a bare Keras fit of the same layers on the same
arrays (the edge's overhead is the ratio).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from crowdfl.backmodel import initial_back_weights  # noqa: E402
from crowdfl.envelope import seal  # noqa: E402
from crowdfl.identity import Identity, short_id  # noqa: E402
from crowdfl.messages import CODEC, FeatureBatch, ModelWeights, RoundStart, sha256_hex  # noqa: E402
from crowdfl.mqtt import Incoming, MqttLink, MqttSettings, feature_topic  # noqa: E402
from bench.results_io import write_result  # noqa: E402
from tests.helpers import make_spec, with_receipt  # noqa: E402
from tests.support.mosquitto import MosquittoBroker, running_mosquitto  # noqa: E402


def envelope(edge: Identity, device: Identity, seq: int, round_: int, samples: int, spec, rng: np.random.Generator,  # type: ignore[no-untyped-def]
             history: dict[tuple[str, str], list[tuple[bytes, int]]] | None = None) -> Incoming:
    """Batch number ``seq`` of a device: fresh sample ids, features in [0, 1] as the agent sends them,
    with the device's signed receipt over its batches so far (``history``)."""
    ids = np.arange(seq * samples, (seq + 1) * samples, dtype=np.uint64)
    feats = rng.random((samples, spec.feature_dim), dtype=np.float32)
    labels = rng.integers(0, spec.num_classes, samples).astype(np.int8)
    b = with_receipt(FeatureBatch(spec.task_id, round_, ids, feats, labels, spec.epsilon, spec.clip_l1), device, edge.node_id, history)
    topic = feature_topic(short_id(edge.node_id), short_id(device.node_id))
    return Incoming(topic, seal(CODEC.encode(b), device, seq, edge.public, context=topic.encode()), False)


def make_envelopes(edge: Identity, devices: list[Identity], n: int, samples: int, spec) -> list[Incoming]:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    history: dict[tuple[str, str], list[tuple[bytes, int]]] = {}
    return [envelope(edge, devices[i % len(devices)], i // len(devices) + 1, 1, samples, spec, rng, history) for i in range(n)]


def _client(broker: MosquittoBroker, user: str, client_id: str, clean: bool) -> mqtt.Client:
    creds = broker.credentials(user)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean)
    c.username_pw_set(creds.username, creds.password)
    return c


def prepare_session(broker: MosquittoBroker, user: str, client_id: str, topic: str) -> None:
    """Create a persistent session with a QoS 1 subscription, then leave: the broker queues for it."""
    c = _client(broker, user, client_id, clean=False)
    done = threading.Event()
    c.on_subscribe = lambda *a: done.set()
    c.on_connect = lambda client, *a: client.subscribe(topic, qos=1)
    c.connect(broker.host, broker.plain_port)
    c.loop_start()
    if not done.wait(10):
        raise RuntimeError("subscription not acknowledged")
    c.disconnect()
    c.loop_stop()


def drop_session(broker: MosquittoBroker, user: str, client_id: str) -> None:
    c = _client(broker, user, client_id, clean=True)
    c.connect(broker.host, broker.plain_port)
    c.loop_start()
    time.sleep(0.2)
    c.disconnect()
    c.loop_stop()


def publish_all(broker: MosquittoBroker, devices: list[Identity], msgs: list[Incoming]) -> None:
    """Each device publishes its own envelopes (the ACL allows nothing else), waiting for every PUBACK."""
    clients = {}
    for d in devices:
        c = _client(broker, short_id(d.node_id), f"pub-{short_id(d.node_id)}", clean=True)
        c.max_inflight_messages_set(100)
        c.connect(broker.host, broker.plain_port)
        c.loop_start()
        clients[short_id(d.node_id)] = c
    infos = [clients[m.topic.rsplit("/", 1)[1]].publish(m.topic, m.payload, qos=1) for m in msgs]
    for info in infos:
        info.wait_for_publish(60)
    for c in clients.values():
        c.disconnect()
        c.loop_stop()


def raw_rate(broker: MosquittoBroker, edge_user: str, topic: str, devices: list[Identity], msgs: list[Incoming]) -> tuple[float, float]:
    """(messages per second, CPU seconds of this process per message) for a plain subscriber."""
    client_id = "raw-subscriber"
    prepare_session(broker, edge_user, client_id, topic)
    publish_all(broker, devices, msgs)
    got = 0
    done = threading.Event()

    def on_message(client, userdata, msg):  # type: ignore[no-untyped-def]
        nonlocal got
        got += 1
        if got == len(msgs):
            done.set()

    c = _client(broker, edge_user, client_id, clean=False)
    c.on_message = on_message
    t0, cpu0 = time.perf_counter(), time.process_time()
    c.connect(broker.host, broker.plain_port)
    c.loop_start()
    if not done.wait(600):
        raise RuntimeError(f"raw subscriber got {got}/{len(msgs)}")
    dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    c.disconnect()
    c.loop_stop()
    drop_session(broker, edge_user, client_id)
    return len(msgs) / dt, cpu / len(msgs)


def edge_rate(broker: MosquittoBroker, edge: Identity, devices: list[Identity], msgs: list[Incoming], spec, workdir: Path, workers: int) -> tuple[float, dict]:  # type: ignore[no-untyped-def]
    from edge_server.service import EdgeServer
    from edge_server.store import EdgeStore
    from edge_server.submit import CoordinatorClient

    if workers:
        from edge_server.ingest import make_pool

    short = short_id(edge.node_id)
    client_id = f"edge-{short}"
    prepare_session(broker, short, client_id, f"crowdfl/v1/feat/{short}/+")
    publish_all(broker, devices, msgs)
    db = workdir / f"edge-{workers}.sqlite"
    store = EdgeStore(f"sqlite:///{db}")
    store.register_devices([(d.node_id, d.public.enc_key.hex()) for d in devices])
    creds = broker.credentials(short)
    link = MqttLink(MqttSettings(host=broker.host, port=broker.plain_port, username=creds.username, password=creds.password), client_id, EdgeServer.subscriptions(short))
    kw = {"ingest_workers": workers} if "ingest_workers" in inspect.signature(EdgeServer).parameters else {}
    server = EdgeServer(edge, Identity.generate().public, store, link, CoordinatorClient("http://127.0.0.1:9"), lambda h: b"", **kw)
    server.tasks[spec.task_id] = spec  # as if the retained TaskSpec had arrived (works on old and new code)
    if workers:  # start the worker processes before the clock (a running edge has them already)
        from concurrent.futures import wait

        server.ingestor._pool = make_pool(workers)
        wait([server.ingestor._pool.submit(abs, 0) for _ in range(workers)])
    t0, cpu0 = time.perf_counter(), time.process_time()
    server.start()
    deadline = time.monotonic() + 900
    while server.ingestor.stats.accepted + sum(server.ingestor.stats.rejected.values()) < len(msgs):
        if time.monotonic() > deadline:
            raise RuntimeError(f"edge accepted {server.ingestor.stats.accepted}/{len(msgs)}")
        time.sleep(0.005)
    dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    # CPU of this process (MQTT thread + ingest thread); a worker pool's processes are not in it
    stats = {"accepted": server.ingestor.stats.accepted, "rejected": dict(server.ingestor.stats.rejected), "drains": getattr(server.ingestor.stats, "drains", None),
             "cpu_us_per_msg_this_process": cpu / len(msgs) * 1e6}
    server.stop()
    drop_session(broker, short, client_id)
    return len(msgs) / dt, stats




def training(rounds: int, customers: int, samples: int, workdir: Path) -> tuple[list[list[float]], list[list[float]]]:
    """(edge train_job seconds, bare Keras fit seconds) per round per customer."""
    import keras

    from crowdfl.backmodel import keras_back
    from edge_server.service import EdgeServer, TrainJob
    from edge_server.store import EdgeStore

    base = make_spec(rounds=rounds, samples_per_round=samples)
    weights = initial_back_weights(base, 1)
    model = CODEC.encode(ModelWeights(base.task_id, 0, tuple(weights)))
    spec = make_spec(rounds=rounds, samples_per_round=samples, initial_model_hash=sha256_hex(model))
    edge, coord = Identity.generate(), Identity.generate()
    devices = [Identity.generate() for _ in range(customers)]
    store = EdgeStore(f"sqlite:///{workdir / 'train.sqlite'}")
    store.register_devices([(d.node_id, d.public.enc_key.hex()) for d in devices])

    class NoLink:
        inbox = None

        def publish(self, *a: object, **k: object) -> None:
            pass

    server = EdgeServer(edge, coord.public, store, NoLink(), None, lambda h: model)  # type: ignore[arg-type]
    server.tasks[spec.task_id] = spec
    server.ingestor.refresh_devices()
    edge_times: list[list[float]] = []
    bare_times: list[list[float]] = []
    rng = np.random.default_rng(1)
    history: dict[tuple[str, str], list[tuple[bytes, int]]] = {}  # each round's receipt covers the device's batches so far
    for r in range(1, rounds + 1):
        server.rounds[spec.task_id] = RoundStart(spec.task_id, r, spec.initial_model_hash, tuple(d.node_id for d in devices), spec.deadline)
        out = server.ingestor.drain([envelope(edge, d, r, r, samples, spec, rng, history) for d in devices])
        assert len(out.accepted) == customers, out.rejections
        e_row, b_row = [], []
        for d in devices:
            t0 = time.perf_counter()
            server.train_job(TrainJob(spec.task_id, r, d.node_id))
            e_row.append(time.perf_counter() - t0)
            data = store.customer_data(d.node_id, spec.task_id, spec.feature_dim)
            t0 = time.perf_counter()
            keras.utils.set_random_seed(0)
            m = keras_back(spec)
            m.set_weights(weights)
            m.compile(optimizer=keras.optimizers.Adam(spec.learning_rate), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            m.fit(data.features, data.labels, epochs=spec.local_epochs, batch_size=32, shuffle=True, verbose=0)
            b_row.append(time.perf_counter() - t0)
        edge_times.append(e_row)
        bare_times.append(b_row)
    store.close()
    return edge_times, bare_times


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/ingest.py", description=__doc__, formatter_class=_Help)
    p.add_argument("--messages", type=int, default=4000, help="FeatureBatch envelopes queued per timed run (count)")
    p.add_argument("--samples", type=int, default=128, help="samples per FeatureBatch (the demo's samples_per_round)")
    p.add_argument("--devices", type=int, default=40, help="devices publishing the envelopes (count)")
    p.add_argument("--rounds", type=int, default=3, help="training rounds to time (count)")
    p.add_argument("--customers", type=int, default=5, help="customers trained per round (count)")
    p.add_argument("--workers", default="0,1", help="ingest worker processes to try, comma-separated (0: inline)")
    p.add_argument("--no-train", action="store_true", help="skip the training timings")
    p.add_argument("--quick", action="store_true",
                   help="400 envelopes from 8 devices, inline only, 1 round of 2 customers; writes ingest.quick.json")
    args = p.parse_args(argv)
    if args.quick:
        args.messages, args.devices, args.workers, args.rounds, args.customers = 400, 8, "0", 1, 2
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import crowdfl.envelope as envmod
    import edge_server

    crypto = "cryptography (OpenSSL)" if hasattr(envmod, "AESGCM") else "pycryptodome " + __import__("Crypto").__version__
    print(f"crowdfl edge ingest bench: Python {platform.python_version()}, {os.cpu_count()} cpus; edge_server from {Path(edge_server.__file__).parent}; envelope crypto: {crypto}")
    spec = make_spec()
    edge = Identity.generate()
    devices = [Identity.generate() for _ in range(args.devices)]
    msgs = make_envelopes(edge, devices, args.messages, args.samples, spec)
    size = len(msgs[0].payload)
    with tempfile.TemporaryDirectory(prefix="crowdfl-bench-") as tmp:
        work = Path(tmp)
        with running_mosquitto(work / "mq", plain_listener=True, debug_log=False, devices=[short_id(d.node_id) for d in devices], edges=[short_id(edge.node_id)]) as broker:
            topic = f"crowdfl/v1/feat/{short_id(edge.node_id)}/+"
            print(f"  {args.messages} FeatureBatch envelopes of {args.samples} samples ({size} bytes each) from {args.devices} devices, QoS 1, mosquitto")
            # the raw rate is measured before, between and after the edge runs: on a shared machine the
            # load drifts, and the ratio uses their median
            raw_runs = [raw_rate(broker, short_id(edge.node_id), topic, devices, msgs)]
            results = []
            for w in [int(x) for x in args.workers.split(",")]:
                results.append((w, *edge_rate(broker, edge, devices, msgs, spec, work, w)))
                raw_runs.append(raw_rate(broker, short_id(edge.node_id), topic, devices, msgs))
            raws = [r for r, _ in raw_runs]
            raw = statistics.median(raws)
            raw_cpu_us = statistics.median(c for _, c in raw_runs) * 1e6
            figures: dict[str, object] = {
                "messages": args.messages, "samples_per_batch": args.samples, "devices": args.devices, "payload_bytes": size,
                "raw_rates_msg_s": raws, "raw_median_msg_s": raw,
                # CPU per message is what a loaded, shared machine does not distort: the wall rates
                # depend on how much of the 2 cores the bench got; CPU per message does not
                "raw_cpu_us_per_msg": [c * 1e6 for _, c in raw_runs], "raw_median_cpu_us_per_msg": raw_cpu_us,
                "inline_cpu_ratio": next((raw_cpu_us / stats["cpu_us_per_msg_this_process"] for w, _, stats in results if w == 0), None),
                "edge": {str(w): {"msg_s": ours, "ratio": ours / raw, "stats": stats} for w, ours, stats in results},
                "best_edge_msg_s": max(ours for _, ours, _ in results),
                "best_ratio": max(ours for _, ours, _ in results) / raw,
            }
            print(f"  raw paho subscriber                 {raw:8.0f} msg/s  (median of {', '.join(f'{r:.0f}' for r in raws)}); {raw_cpu_us:.0f} us CPU a message")
            for w, ours, stats in results:
                print(f"  crowdfl edge ingest, {w} workers     {ours:8.0f} msg/s  ratio {ours / raw:.3f} (target >= 0.5); {stats}")
        if not args.no_train:
            e, b = training(args.rounds, args.customers, 128, work)
            print(f"  training, {args.customers} customers x {args.rounds} rounds, 128 new samples per customer per round:")
            for r, (er, br) in enumerate(zip(e, b), 1):
                print(
                    f"    round {r}: edge train_job median {statistics.median(er):.3f}s (max {max(er):.3f}s), "
                    f"bare Keras fit median {statistics.median(br):.3f}s, ratio {statistics.median(er) / statistics.median(br):.2f}"
                )
            figures["training"] = {
                "rounds": args.rounds, "customers": args.customers, "samples_per_customer_round": 128,
                "edge_train_job_s": e, "bare_keras_fit_s": b,
                "median_ratio_per_round": [statistics.median(er) / statistics.median(br) for er, br in zip(e, b)],
            }
    print(f"  figures: {write_result('ingest', figures, quick=args.quick)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
