"""What a full disk, a read-only folder and a lost object store say, as Python raises them and
as the Rust engines (Icechunk, obstore) word them: one paragraph naming the place (the
end-to-end faults are in test_faults.py)."""

from __future__ import annotations

import errno

import pytest

from agriland_scale.faults import storage_fault
from agriland_scale.files import cache_dir, use_storage_options, write_json_anyhow


def _raised(inner: BaseException) -> BaseException:
    """``inner`` wrapped as a Dask or engine error would be: raised from it."""
    try:
        try:
            raise inner
        except BaseException as e:
            raise RuntimeError("a task failed") from e
    except RuntimeError as outer:
        return outer


@pytest.mark.parametrize(
    ("err", "expect"),
    [
        (
            OSError(errno.ENOSPC, "No space left on device", "/data/run/agriland.icechunk/chunks/x"),
            r"the disk holding /data/run/agriland\.icechunk/chunks/x is full",
        ),
        (
            _raised(ValueError("error writing chunk: I/O error: No space left on device (os error 28)")),
            r"the disk holding /data/run is full",
        ),
        (
            OSError(errno.EROFS, "Read-only file system", "/data/run/run.json"),
            r"/data/run/run\.json can no longer be written",
        ),
        (
            _raised(Exception("icechunk error: storage error: Read-only file system (os error 30)")),
            r"/data/run can no longer be written",
        ),
        (
            OSError(errno.ENOSPC, "No space left on device", str(cache_dir() / "runs" / "k")),
            r"agriland cache, \$AGRILAND_CACHE\) is full",
        ),
    ],
)
def test_disk_faults_name_the_place_and_what_to_do(err, expect):
    import re

    fault = storage_fault(err, "/data/run")
    assert fault is not None and re.search(expect, str(fault)), fault
    assert "rerun the same command" in str(fault) and "\n" not in str(fault)


def test_a_lost_object_store_names_its_endpoint(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    text = (
        "Generic S3 error: Error performing PUT http://127.0.0.1:9/b/x in 7.0s, after 10 retries - HTTP error: "
        'error sending request\n\nDebug source:\nGeneric {\n    store: "S3",\n' + "    ...\n" * 140 + "}"
    )
    use_storage_options("s3://b/x", {"endpoint_url": "http://127.0.0.1:9"})
    try:
        fault = storage_fault(_raised(OSError(text)), "s3://b/x")
    finally:
        use_storage_options("s3://b/x", None)
    assert fault is not None
    assert str(fault).startswith(
        "the object store at http://127.0.0.1:9 holding s3://b/x stopped answering "
        "during the run (the connection failed)"
    )
    assert "Debug source" not in str(fault)
    # the same words on a local run are not a lost object store
    assert storage_fault(_raised(OSError("error sending request")), "/data/run") is None


def test_other_errors_are_not_storage_faults():
    assert storage_fault(ValueError("cube.resolution must be > 0"), "/data/run") is None
    assert storage_fault(KeyError("x"), "s3://b/x") is None


def test_a_failure_is_recorded_in_place_where_the_folder_takes_no_new_file(tmp_path):
    """``write_json_anyhow``: a folder whose permissions forbid a new file (the atomic rename's
    temporary) still gets the record rewritten in place; it never raises."""
    import json
    import os

    rec = tmp_path / "run.json"
    rec.write_text(json.dumps({"stages": {"embeddings": "running"}}))
    os.chmod(tmp_path, 0o555)
    try:
        if os.access(tmp_path, os.W_OK):  # root ignores the folder's permissions
            pytest.skip("permissions are not enforced for this user")
        assert write_json_anyhow({"stages": {"embeddings": "failed"}}, rec)
        assert json.loads(rec.read_text())["stages"]["embeddings"] == "failed"
    finally:
        os.chmod(tmp_path, 0o755)
    assert not write_json_anyhow({"x": 1}, tmp_path / "missing" / "deeper" / "run.json.d" / "\0")
