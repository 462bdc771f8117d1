"""Data-parallel retraining across two Ray nodes: the replicas stay bit-identical, basis included.

A two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head and a worker node
with one CPU each, so the two Train workers can only be placed one per node) runs the real
``retrain`` stage loop for two epochs with ``alternate_every=1``: epoch 0 trains the
coefficients, epoch 1 the basis. The loop all-reduces every rank's ``replica_digest`` each
epoch; the test checks that both ranks agree at every epoch, that the workers really ran on two
nodes, and that the basis and the coefficients both moved (so "in sync" is not vacuous).
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

import penni
from penni.models import build_model
from pipeline.config.loading import load_config, to_dict
from pipeline.stages.functions import retrain_training
from pipeline.training.distributed import TrainJob, replica_digest, run_training

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(900)


def _basis_and_coefficients(model) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    basis, coefficients = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, penni.PenniConv2d):
            basis[name] = module.basis.detach().clone()
            coefficients[name] = module.coefficients.detach().clone()
    return basis, coefficients


def _decomposed_cnn(seed: int = 0):
    torch.manual_seed(seed)
    return penni.decompose(build_model("fashion_cnn", num_classes=10, in_channels=1), d=5)


def test_replica_digest_sees_one_basis_element_change():
    """The sync check below can fail: one perturbed basis entry changes the digest."""
    a = _decomposed_cnn()
    b = _decomposed_cnn()
    assert replica_digest(a) == replica_digest(b)
    layer = next(m for m in b.modules() if isinstance(m, penni.PenniConv2d))
    with torch.no_grad():
        layer.basis[0, 0, 0] = torch.nextafter(layer.basis[0, 0, 0], torch.tensor(float("inf")))
    assert replica_digest(a) != replica_digest(b)


@pytest.fixture
def two_node_cluster(tmp_path, monkeypatch):
    """Head (1 CPU) + worker node (1 CPU) on this machine, with a driver connected to it."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # another module's Ray (conftest's local_ray is module-scoped)
        ray.shutdown()
    # Cluster.add_node writes the head address to /tmp/ray/ray_current_cluster, which makes any
    # plain ray.init() on this machine (another run, another test session) attach to this
    # cluster; keep the address private to the test.
    monkeypatch.setattr(ray._private.utils, "write_ray_address", lambda *args, **kwargs: None)
    monkeypatch.setattr(ray._common.utils, "reset_ray_address", lambda *args, **kwargs: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cluster = Cluster(initialize_head=False)
    try:
        cluster.add_node(num_cpus=1, object_store_memory=100 * 1024 * 1024, dashboard_port=_free_port())
        cluster.add_node(num_cpus=1, object_store_memory=100 * 1024 * 1024)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, runtime_env={"env_vars": {
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"),
            # Train's PlacementGroupCleaner finds the cluster through the state API with no address:
            # with other Ray instances on this machine that is ambiguous, so name ours
            "RAY_ADDRESS": cluster.address}})
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_worker_nodes(address: str) -> list[str]:
    """Node ids of the Ray Train worker actors of the run (dead by now, still in the state API)."""
    from ray.util.state import list_actors

    actors = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker")], detail=True,
                         limit=100, raise_on_missing_output=False)
    return [a.node_id for a in actors]


def test_retrain_on_two_nodes_keeps_replicas_identical(two_node_cluster, tmp_path):
    import ray

    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2
    assert ray.cluster_resources().get("CPU") == 2

    start = _decomposed_cnn()
    input_path = tmp_path / "decomposed.safetensors"
    penni.save(start, input_path)
    cfg = load_config("tiny", [
        f"storage={tmp_path / 'runs'}", "retrain.epochs=2", "retrain.alternate_every=1",
        "retrain.start_with=coefficients", "ray.num_workers=2", "ray.cpus_per_worker=1"])
    job = TrainJob(stage="retrain", config=to_dict(cfg), input_model=str(input_path),
                   training=retrain_training(cfg.retrain))  # L1 and the alternating basis/coefficient schedule

    final_dir, result = run_training(
        job, use_ray=True, run_name="multinode-retrain", storage=(str(tmp_path / "train"), None),
        num_workers=2, use_gpu=False, cpus_per_worker=1.0, max_failures=0, local_dir=tmp_path / "work")

    # one Train worker per node: two distinct node ids, both of this cluster
    worker_nodes = _train_worker_nodes(two_node_cluster.address)
    assert len(worker_nodes) == 2, worker_nodes
    assert set(worker_nodes) == set(nodes)

    # both ranks' digests of every parameter and buffer agree at every epoch, in both phases
    history = result["history"]
    assert [h["phase"] for h in history] == ["coefficients", "basis"]
    for h in history:
        digests = h["replica_digests"]
        assert len(digests) == 2 and digests[0] == digests[1], h
        assert h["replicas_in_sync"] == 1.0
    assert history[0]["replica_digests"] != history[1]["replica_digests"]

    # the final checkpoint is rank 0's replica, and equals the last in-sync digest
    trained = penni.load(final_dir / "model.safetensors")
    assert replica_digest(trained) == history[-1]["replica_digests"][0]

    # not vacuous: the basis (epoch 1) and the coefficients (epoch 0) both changed
    basis0, coef0 = _basis_and_coefficients(start)
    basis1, coef1 = _basis_and_coefficients(trained)
    assert basis0.keys() == basis1.keys() and basis0
    assert all(not torch.equal(basis0[k], basis1[k]) for k in basis0), "a basis did not train"
    assert all(not torch.equal(coef0[k], coef1[k]) for k in coef0), "coefficients did not train"
