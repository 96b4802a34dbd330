"""Object-store datasets: ranks racing to fetch a remote dataset's manifest and tokenizer into
one node's cache.  The object store is a local S3 emulation (moto's server on 127.0.0.1, the
real boto3 client through streaming's S3 downloader): no network."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port

pytestmark = pytest.mark.slow  # starts processes

BUCKET, PREFIX = "mythos-data", "shards/v1"
FILES = {"manifest.json": json.dumps({"seq_len": 32, "pad": "x" * 200_000}).encode(),
         "tokenizer.json": bytes(range(256)) * 1200}  # big enough that a download takes a while
PROCESSES = 3


def worker(rank: int, env: dict[str, str], cache: str, log: str, group_port: int | None) -> None:
    """One process: join the group (when ``group_port``), then resolve the remote dataset,
    logging each download's (file, start, end) to ``log``."""
    os.environ.update(env)
    from streaming.base.storage import CloudDownloader

    from mythos_scale.data.sources import resolve_dataset

    if group_port is not None:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{group_port}", rank=rank,
                                world_size=PROCESSES)
    real = CloudDownloader.direct_download

    def logged(remote, local, *args):
        start = time.time()
        real(remote, local, *args)
        with open(log, "a") as f:
            f.write(json.dumps([Path(remote).name, start, time.time(), os.getpid()]) + "\n")

    CloudDownloader.direct_download = logged
    root = resolve_dataset(f"s3://{BUCKET}/{PREFIX}", cache, 32, 512)
    for name, content in FILES.items():  # what this process reads right after is whole
        assert (root / name).read_bytes() == content, name
    if group_port is not None:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def s3_env():
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"S3_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "OMP_NUM_THREADS": "1"}
    s3 = boto3.client("s3", endpoint_url=env["S3_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket=BUCKET)
    for name, content in FILES.items():
        s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{name}", Body=content)
    yield env
    server.stop()


def race(tmp_path: Path, env: dict[str, str], grouped: bool) -> tuple[list[list], Path]:
    cache, log = tmp_path / "cache", tmp_path / "downloads.jsonl"
    mp.start_processes(worker, args=(env, str(cache), str(log), free_port() if grouped else None),
                       nprocs=PROCESSES, start_method="spawn")
    (root,) = (cache / "remote").iterdir()
    left = sorted(p.name for p in root.iterdir() if p.name not in FILES and p.name != ".download.lock")
    assert left == [] and all((root / name).read_bytes() == FILES[name] for name in FILES), left  # no partial file
    return [json.loads(line) for line in log.read_text().splitlines()], root


def test_ranks_of_one_node_download_once(tmp_path, s3_env):
    """3 ranks of one process group on one host: the node's first rank downloads each file once."""
    downloads, _ = race(tmp_path, s3_env, grouped=True)
    assert sorted(d[0] for d in downloads) == sorted(FILES), downloads
    assert len({d[3] for d in downloads}) == 1  # by one process


def test_independent_processes_take_turns(tmp_path, s3_env):
    """3 processes on their own (e.g. jobs sharing a cache): each downloads, but one at a time
    (the file lock): the downloads never overlap, and every process read whole files."""
    downloads, _ = race(tmp_path, s3_env, grouped=False)
    assert len(downloads) == PROCESSES * len(FILES)
    by_process: dict[int, list] = {}
    for _, start, end, pid in downloads:
        by_process.setdefault(pid, []).append((start, end))
    spans = sorted((min(s for s, _ in v), max(e for _, e in v)) for v in by_process.values())
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:])), spans
