"""`crowdfl-edge evidence DEVICE ROUND`: a device's signed batches with proofs a third party can check."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

from crowdfl.messages import CODEC
from edge_server.cli import main
from edge_server.evidence import verify_evidence
from edge_server.ingest import Ingestor
from edge_server.store import EdgeStore
from tests.edge_server.fakes import make_world


def test_evidence_export_verifies_and_catches_a_changed_batch(tmp_path: Path) -> None:
    w = make_world(devices=2)
    (tmp_path / "identity.json").parent.mkdir(exist_ok=True)
    store = EdgeStore(f"sqlite:///{tmp_path / 'edge.sqlite'}")
    store.register_devices([(d.node_id, d.public.enc_key.hex()) for d in w.devices])
    store.save_task(w.spec.task_id, CODEC.encode(w.spec))
    ing = Ingestor(w.edge, store, {w.spec.task_id: w.spec}.get)
    ing.refresh_devices()
    dev = w.devices[0]
    for r in (1, 2):
        out = ing.drain([w.batch(dev, r, list(range(10 * r, 10 * r + 5)), round_=r), w.batch(w.devices[1], r, [100 * r], round_=r)])
        assert not out.rejections
    store.close()
    cfg = tmp_path / "edge.toml"
    cfg.write_text(f'state_dir = "{tmp_path}"\n')
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["evidence", dev.node_id, "2", "--config", str(cfg)]) == 0
    [doc] = json.loads(buf.getvalue())
    assert (doc["device"], doc["round"], doc["num_samples"], len(doc["batches"])) == (dev.node_id, 2, 10, 2)
    assert verify_evidence(doc) == []
    # a batch changed after the fact (here: one sample dropped) no longer sits under the device's signed root
    import base64

    from crowdfl.messages import FeatureBatch

    b = CODEC.decode(base64.b64decode(doc["batches"][0]["batch"]), FeatureBatch)
    forged = FeatureBatch(b.task_id, b.round, b.sample_ids[:4], b.features[:4], b.labels[:4], b.epsilon, b.clip_l1)
    doc["batches"][0]["batch"] = base64.b64encode(CODEC.encode(forged)).decode()
    problems = verify_evidence(doc)
    assert any("not under the device's signed root" in p for p in problems) and any("signed for 10" in p for p in problems)
    # another device's round holds nothing of this one
    with redirect_stdout(io.StringIO()):
        assert main(["evidence", dev.node_id, "3", "--config", str(cfg)]) == 2


def test_retention_deletes_a_finished_tasks_batches(tmp_path: Path) -> None:
    from edge_server.service import EdgeServer

    w = make_world(devices=1)
    store = EdgeStore(f"sqlite:///{tmp_path / 'edge.sqlite'}")
    store.register_devices([(d.node_id, d.public.enc_key.hex()) for d in w.devices])
    ing = Ingestor(w.edge, store, {w.spec.task_id: w.spec}.get)
    ing.refresh_devices()
    ing.drain([w.batch(w.devices[0], 1, [1, 2, 3])])
    server = EdgeServer(w.edge, w.coordinator.public, store, None, None, w.fetch, retention_s=3600.0)  # type: ignore[arg-type]
    server.tasks[w.spec.task_id] = w.spec
    assert server.purge_expired(now=w.spec.deadline + 3599) == 0 and store.counts()["batches"] == 1
    assert server.purge_expired(now=w.spec.deadline + 3601) == 1 and store.counts()["batches"] == 0
    store.close()
