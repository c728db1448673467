"""A real S3-compatible server for tests: moto's standalone server on 127.0.0.1, spoken to over
HTTP by s3fs exactly as a bucket in the cloud would be (no mock of the client)."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def s3_server() -> Iterator[tuple[str, dict[str, str]]]:
    """Start the server with one bucket (named after its port: moto keeps one in-memory backend per
    process, so servers started one after another would otherwise share buckets); yield (``s3://bucket``, the environment s3fs needs to
    find it: credentials and ``AWS_ENDPOINT_URL``). The caller sets that environment where the
    store is used: this process (monkeypatch) and, for a cluster, its nodes."""
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    bucket = f"stackcomp-test-{port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    try:
        s3fs.S3FileSystem(skip_instance_cache=True, key="testing", secret="testing",
                          endpoint_url=env["AWS_ENDPOINT_URL"]).mkdir(bucket)
        yield f"s3://{bucket}", env
    finally:
        server.stop()
