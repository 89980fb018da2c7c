import dask.array as da

from agriland_scale.config.schema import RuntimeConfig
from agriland_scale.pipeline.runtime import dask_client, gpu_resources


def test_local_cluster_has_a_dashboard_and_limits_threads():
    cfg = RuntimeConfig(n_workers=1, threads_per_worker=1, memory_limit="2GiB", dashboard_address=":0")
    with dask_client(cfg) as client:
        assert client.dashboard_link.startswith("http://127.0.0.1:")
        env = client.run(lambda: __import__("os").environ.get("TF_NUM_INTRAOP_THREADS"))
        assert set(env.values()) == {"1"}
        assert gpu_resources(client) is None
        assert int(da.ones((100, 100), chunks=10).sum().compute()) == 10_000


def test_unreachable_scheduler_is_a_clear_error():
    import pytest

    from agriland_scale.errors import SchedulerError

    with pytest.raises(SchedulerError, match="no Dask scheduler answers at tcp://127.0.0.1:9"):
        with dask_client(RuntimeConfig(), "tcp://127.0.0.1:9"):
            pass


def test_dashboard_listens_on_loopback_only_by_default():
    assert RuntimeConfig().dashboard_address.startswith("127.0.0.1:")

    def hosts(address: str) -> set[str]:
        cfg = RuntimeConfig(n_workers=1, threads_per_worker=1, memory_limit="2GiB", dashboard_address=address)
        with dask_client(cfg) as client:
            server = client.cluster.scheduler.http_server
            return {s.getsockname()[0] for s in server._sockets.values()}

    assert hosts("127.0.0.1:0") == {"127.0.0.1"}
    assert hosts(":0") - {"127.0.0.1", "::1"}  # opened to the network only when asked


def test_own_workers_exit_at_once_with_their_streams_flushed(tmp_path):
    """The run's own LocalCluster workers skip the interpreter's teardown at exit (FastExit)
    and lose nothing they wrote; the workers of an existing cluster are left alone."""
    import sys

    from distributed import LocalCluster

    def has_plugin(dask_worker) -> bool:
        return "agriland-fast-exit" in dask_worker.plugins

    def last_words() -> None:
        sys.stderr.write("last words, unflushed")  # no newline: still in the buffer at exit

    cfg = RuntimeConfig(n_workers=1, threads_per_worker=1, memory_limit="2GiB", dashboard_address=":0")
    log = tmp_path / "workers.log"
    with dask_client(cfg, worker_log=str(log)) as client:
        assert all(client.run(has_plugin).values())
        client.run(last_words)
    assert log.read_text().endswith("last words, unflushed")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as lc:
        with dask_client(cfg, lc.scheduler_address) as client:
            assert not any(client.run(has_plugin).values())


def test_inference_precision_is_one_for_the_run():
    """``auto`` gives the U-Net bfloat16 only where every worker's CPU has it, never beside a
    GPU, and keeps the encoder in float32; the explicit settings apply to both models. A
    resumed run recomputes model blocks of another precision: it is part of the model stages'
    settings (float32 runs keep their old ones)."""
    from agriland_scale.config.schema import RunConfig
    from agriland_scale.models.worker import cpu_has_bfloat16
    from agriland_scale.pipeline.context import stage_settings
    from agriland_scale.pipeline.runtime import inference_precision

    bf, f32 = "mixed_bfloat16", "float32"
    cfg = RuntimeConfig(n_workers=1, threads_per_worker=1, memory_limit="2GiB", dashboard_address=":0")
    with dask_client(cfg) as client:
        native = cpu_has_bfloat16()
        assert inference_precision(client, "auto", False) == {"embeddings": f32,
                                                              "segmentation": bf if native else f32}
        assert inference_precision(client, "auto", True) == {"embeddings": f32, "segmentation": f32}
        assert inference_precision(client, "float32", False) == {"embeddings": f32, "segmentation": f32}
        assert inference_precision(client, "bfloat16", True) == {"embeddings": bf, "segmentation": bf}
    run = RunConfig.model_validate({"name": "t", "search": {"api": "local", "catalog": ".",
                                                            "collections": ["c"], "bbox": [0, 0, 1, 1]}})
    record = {"precision": {"embeddings": f32, "segmentation": bf}}
    assert stage_settings(run, record, "segmentation")["precision"] == bf
    for stage in ("embeddings", "clusters"):
        assert "precision" not in stage_settings(run, record, stage)
    assert "precision" not in stage_settings(run, {}, "segmentation")
