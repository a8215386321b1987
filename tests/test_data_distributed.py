"""The train loader across ranks: global-batch determinism for any DP size, and replication.

Ranks are real processes (this file is also their entry point) with the env torchrun would
set and a gloo process group, as the trainer has when it builds the loader.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_SAMPLES = 22  # epoch = 20 samples (a multiple of the global batch 4): 5 steps per epoch
STEPS = 12  # crosses two epoch boundaries
SEED = 11


def run_ranks(tmp_path, world: int, configs: list[dict]) -> list[list[list[list[int]]]]:
    """Run ``configs`` one after another on ``world`` rank processes; [rank][config][micro-batch] -> ids."""
    env = {**os.environ, "PYTHONPATH": REPO, "TMPDIR": str(tmp_path)}
    job = {"world": world, "configs": configs, "out": str(tmp_path / "rank{}.json"),
           "init": tempfile.mkdtemp(prefix="pg", dir=tmp_path) + "/store"}
    # A new session, so that a hung run can be killed with all its ranks.
    proc = subprocess.Popen([sys.executable, __file__, json.dumps(job)], env=env, cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = proc.communicate(timeout=240)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, f"ranks failed:\n{out[-4000:]}"
    result = []
    for rank in range(world):
        with open(job["out"].format(rank)) as f:
            result.append(json.load(f))
    return result


def take(path: str, n: int, resume: dict | None = None, with_state: bool = False, **kw):
    """``n`` micro-batches (sample ids); with ``with_state`` also the loader state after them."""
    from kiln.data.loader import build_train_loader

    loader = build_train_loader(path, seed=SEED, **kw)
    if resume is not None:
        loader.load_state_dict(resume)
    ids = [next(loader)["tokens"][:, 0].tolist() for _ in range(n)]
    return (ids, loader.state_dict()) if with_state else ids


def steps_of(per_rank: list[list[list[int]]], accumulation: int) -> list[list[int]]:
    """Global batches (sorted sample ids) from each rank's micro-batches."""
    n = len(per_rank[0]) // accumulation
    return [sorted(i for mbs in per_rank for mb in mbs[k * accumulation:(k + 1) * accumulation] for i in mb)
            for k in range(n)]


@pytest.fixture
def dataset(tmp_path, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    import numpy as np

    from kiln.data.pack import write_samples_to_mds

    # Sample i starts with token i, so a batch's first column names its samples; several shards.
    samples = (np.concatenate([[i], np.arange(1, 9)]).astype(np.uint16) for i in range(N_SAMPLES))
    path = str(tmp_path / "ds")
    write_samples_to_mds(samples, path, sample_len=9, vocab_size=4096, size_limit=400)
    return path


def test_global_batches_independent_of_dp_size(tmp_path, dataset):
    ref = steps_of([take(dataset, STEPS, micro_batch_size=4, dp_rank=0, dp_size=1)], 1)
    accum = steps_of([take(dataset, 2 * STEPS, micro_batch_size=2, dp_rank=0, dp_size=1, global_batch_size=4)], 2)
    assert accum == ref
    assert ref[:5] != [list(range(4 * k, 4 * k + 4)) for k in range(5)]  # shuffled, not in stored order

    base = {"path": dataset, "dp_size": 2, "replication": 1}
    configs = [
        {**base, "n": STEPS, "micro_batch_size": 2},  # DP=2 × micro-batch 2
        {**base, "n": 2 * STEPS, "micro_batch_size": 1, "global_batch_size": 4},  # DP=2 × 1 × accumulation 2
        {**base, "n": STEPS, "micro_batch_size": 2, "num_workers": 2},  # DataLoader worker processes
    ]
    ranks = run_ranks(tmp_path, 2, configs)
    assert steps_of([ranks[0][0], ranks[1][0]], 1) == ref
    assert steps_of([ranks[0][1], ranks[1][1]], 2) == ref
    assert steps_of([ranks[0][2], ranks[1][2]], 1) == ref
    for e in range(STEPS // 5):  # each epoch: 20 distinct samples
        assert len({i for step in ref[e * 5:(e + 1) * 5] for i in step}) == 20


def test_stop_at_dp2_resume_at_dp1_continues_the_same_sample_sequence(tmp_path, dataset):
    ref = steps_of([take(dataset, STEPS, micro_batch_size=4, dp_rank=0, dp_size=1)], 1)
    stop = 7  # inside the second epoch
    cfg = {"path": dataset, "dp_size": 2, "replication": 1, "n": stop, "micro_batch_size": 2, "with_state": True}
    (ids0, state0), (ids1, state1) = [ranks[0] for ranks in run_ranks(tmp_path, 2, [cfg])]
    assert state0 == state1  # the position is global, not per rank
    assert steps_of([ids0, ids1], 1) == ref[:stop]
    # Resume on one rank, with accumulation 2 to keep the global batch of 4.
    resumed = take(dataset, 2 * (STEPS - stop), resume=state0, micro_batch_size=2, dp_rank=0, dp_size=1,
                   global_batch_size=4)
    assert steps_of([resumed], 2) == ref[stop:]


def test_replication_feeds_each_replica_the_same_batches(tmp_path, dataset):
    ref = steps_of([take(dataset, STEPS, micro_batch_size=4, dp_rank=0, dp_size=1)], 1)
    # 4 ranks = 2 data-parallel replicas of R=2 ranks (e.g. TP=2): dp_rank = rank // 2.
    cfg = {"path": dataset, "dp_size": 2, "replication": 2, "n": STEPS, "micro_batch_size": 2}
    r = [ranks[0] for ranks in run_ranks(tmp_path, 4, [cfg])]
    assert r[0] == r[1] and r[2] == r[3]
    for a, b in zip(r[0], r[2]):
        assert not set(a) & set(b)  # the two replicas see different samples
    assert steps_of([r[0], r[2]], 1) == ref


def _rank_main(job: dict, rank: int) -> None:
    import torch.distributed as dist

    world = job["world"]
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"file://{job['init']}", rank=rank, world_size=world)
    out = []
    for cfg in job["configs"]:
        cfg = dict(cfg)
        path, n, r = cfg.pop("path"), cfg.pop("n"), cfg["replication"]
        out.append(take(path, n, dp_rank=rank // r, **cfg))
        dist.barrier()
    with open(job["out"].format(rank), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


def _launch(job: dict) -> int:
    """Import the heavy stack once, then fork one process per rank (4 imports would take ~30 s on 2 cores)."""
    import atexit
    import traceback

    import streaming  # noqa: F401
    import torch.distributed  # noqa: F401

    pids = []
    for rank in range(job["world"]):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _rank_main(job, rank)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                atexit._run_exitfuncs()  # streaming unlinks its shared memory at exit
                os._exit(code)
        pids.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    print("rank exit codes:", codes)
    return int(any(codes))


if __name__ == "__main__":
    sys.exit(_launch(json.loads(sys.argv[1])))
