"""Chunk sizes: the policy (chunking.py) and what it does on a real cluster."""
import math
import os

import pytest

from minicw import MasterNode, chunking

# A slow function that says which process ran it: sized chunks must spread
# a short run of slow jobs over every process instead of one chunk of all.
WHERE = """
import os, time
def where(x):
    time.sleep(0.05)
    return os.getpid()
"""


def test_untimed_function_goes_one_job_per_chunk():
    assert chunking.jobs_per_chunk(None, 10_000, 2) == 1
    assert chunking.jobs_per_chunk(None) == 1


def test_fast_function_gets_chunks_of_about_the_target_work():
    seconds = chunking.CHUNK_TARGET_S / 100
    assert chunking.jobs_per_chunk(seconds) == 100
    assert chunking.jobs_per_chunk(0.0) == chunking.MAX_JOBS_PER_CHUNK
    assert chunking.jobs_per_chunk(1e-9) == chunking.MAX_JOBS_PER_CHUNK


def test_slow_function_gets_one_job_per_chunk():
    assert chunking.jobs_per_chunk(1.0, 1_000_000, 2) == 1


def test_slow_jobs_of_a_known_run_share_chunks_until_its_tail():
    # 12 ms jobs (the factorization benchmark's), 300 of them on 2 processes:
    # chunks of CHUNK_WORK_S while much is left, one job each at the end.
    seconds = 0.012
    early = int(chunking.CHUNK_WORK_S / seconds)
    assert early == 4
    assert chunking.jobs_per_chunk(seconds, 300, 2) == early
    assert chunking.jobs_per_chunk(seconds, 300, 2, jobs_left=300) == early
    assert chunking.jobs_per_chunk(seconds, 300, 2, jobs_left=10) == 3
    assert chunking.jobs_per_chunk(seconds, 300, 2, jobs_left=4) == 1
    assert chunking.jobs_per_chunk(seconds, 300, 2, jobs_left=1) == 1
    sizes, left = [], 300
    while left:
        sizes.append(min(left, chunking.jobs_per_chunk(seconds, 300, 2, jobs_left=left)))
        left -= sizes[-1]
    assert sizes[-4:] == [1, 1, 1, 1]
    assert max(sizes) == early and sum(sizes) == 300
    # A run of unknown length keeps the short target: its end cannot be seen.
    assert chunking.jobs_per_chunk(seconds) == 1


def test_the_tail_never_cuts_fast_jobs_below_the_target_work():
    # 10 us jobs on 200 processes: the tail share (jobs left / 400) would be
    # small, but a chunk keeps CHUNK_TARGET_S of work until the spread limit.
    share_s = 10e-6 * 100_000 / 200
    spread = -(-100_000 // chunking.spread_chunks(200, share_s))
    assert chunking.jobs_per_chunk(10e-6, 100_000, 200, jobs_left=100_000) == spread
    assert chunking.jobs_per_chunk(10e-6, 100_000, 200, jobs_left=50) == spread


def test_known_run_is_spread_over_every_process():
    # 10 processes, 10,000 jobs of 10 us: no chunk may take more than a share of the run.
    size = chunking.jobs_per_chunk(1e-5, 10_000, 10)
    assert size == 10_000 // (chunking.SPREAD_PER_PROCESS * 10)
    assert chunking.jobs_per_chunk(0.0, 3, 100) == 1


def test_a_large_cluster_gets_one_chunk_per_process_and_a_few_spares():
    # 200 processes, 1 s of work each: one chunk each and MAX_SPARE_CHUNKS more, not two each.
    assert chunking.spread_chunks(200, 1.0) == 200 + chunking.MAX_SPARE_CHUNKS
    assert chunking.spread_chunks(200) == 200 + chunking.MAX_SPARE_CHUNKS
    assert chunking.spread_chunks(2, 1.0) == 2 * chunking.SPREAD_PER_PROCESS
    size = chunking.jobs_per_chunk(1e-5, 20_000_000, 200)
    assert size == min(chunking.MAX_JOBS_PER_CHUNK, int(chunking.CHUNK_WORK_S / 1e-5))
    size = chunking.jobs_per_chunk(1e-5, 100_000, 200)
    assert size == -(-100_000 // (200 + chunking.MAX_SPARE_CHUNKS))


def test_a_run_too_short_to_balance_gets_no_spare_chunks():
    # 100,000 jobs of 1 us on 200 processes: half a millisecond each, less
    # than the calls of a spare chunk cost, so one chunk per process.
    assert chunking.spread_chunks(200, 100_000 * 1e-6 / 200) == 200
    assert chunking.jobs_per_chunk(1e-6, 100_000, 200) == 500
    assert chunking.jobs_per_chunk(0.0, 100_000, 200) == 500
    # Just over the threshold the spares come back.
    share_s = chunking.MIN_SPARE_WORK_S * 1.01
    assert chunking.spread_chunks(200, share_s) == 200 + chunking.MAX_SPARE_CHUNKS
    assert chunking.jobs_per_chunk(share_s * 200 / 100_000, 100_000, 200) == \
        -(-100_000 // (200 + chunking.MAX_SPARE_CHUNKS))


def test_job_times_keep_a_moving_average_weighted_by_jobs():
    times = chunking.JobTimes()
    assert times.estimate("k") is None
    times.record(("k",), 1.0, 10)
    assert times.estimate("k") == pytest.approx(0.1)
    keep = 1 - chunking.EMA_WEIGHT
    times.record(("k",), 0.0, 10)
    assert times.estimate("k") == pytest.approx(keep * 1.0 / (keep * 10 + 10))


def test_a_few_jobs_that_waited_barely_move_an_estimate():
    # 400-job chunks at 1 us a job, then a report of 2 jobs that took 70 ms
    # (sent early, after its process lost the CPU): the next chunks stay large.
    times = chunking.JobTimes()
    for _ in range(5):
        times.record(("k",), 400e-6, 400)
    times.record(("k",), 0.07, 2)
    assert times.estimate("k") < 2e-6      # an unweighted average gave 21 ms
    # (One chunk per process: half a millisecond each needs no spares.)
    assert chunking.jobs_per_chunk(times.estimate("k"), 100_000, 200) == 500


def test_a_function_that_got_slower_is_believed_at_once():
    times = chunking.JobTimes()
    times.record(("k",), 1e-3, 1000)         # 1 us a job
    times.record(("k",), 10.0, 1000)         # a whole chunk at 10 ms a job
    assert times.estimate("k") > 5e-3


def test_master_node_takes_none_or_a_positive_chunksize():
    assert MasterNode(chunksize=None).chunksize is None
    assert MasterNode(chunksize=7).chunksize == 7
    with pytest.raises(ValueError, match="chunksize must be None or at least 1"):
        MasterNode(chunksize=0)


def test_default_execute_spreads_slow_jobs_over_both_processes(cluster):
    assert cluster.chunksize is None
    cluster.load_envir(WHERE, from_file=False)
    cluster.register_target_function("where")
    cluster.load_args(range(8))
    pids = cluster.execute()
    assert sorted(pids) == list(range(8))
    assert len(set(pids.values())) == 2


def test_fixed_chunksize_keeps_args_together(cluster):
    cluster.load_envir(WHERE, from_file=False)
    cluster.register_target_function("where")
    cluster.load_args(range(4))
    cluster.chunksize = 4
    try:
        pids = cluster.execute()
    finally:
        cluster.chunksize = None
    assert len(set(pids.values())) == 1


def test_default_map_spreads_a_timed_fast_run_over_both_processes(cluster):
    with cluster.executor() as executor:
        assert len(list(executor.map(_pid_after, range(100)))) == 100  # now it is timed
        counts = {}
        for pid in executor.map(_pid_after, range(2000)):
            counts[pid] = counts.get(pid, 0) + 1
    assert sum(counts.values()) == 2000
    assert len(counts) == 2


def _pid_after(x):
    return os.getpid()


def test_submit_calls_carry_about_a_megabyte_of_payloads_each():
    from minicw import client, config, protocol
    limit = config.SUBMIT_BYTES_PER_CALL
    specs = [protocol.ChunkSpec(i, ("k",), 1, b"x" * (limit // 4), None, 2, None)
             for i in range(10)]
    specs.insert(5, protocol.ChunkSpec(99, ("k",), 1, b"y" * (2 * limit), None, 2,
                                       None))  # larger than a call
    batches = list(client.submit_batches(specs))
    assert [[spec[0] for spec in batch] for batch in batches] == [
        [0, 1, 2, 3], [4], [99], [5, 6, 7, 8], [9]]
    assert list(client.submit_batches([])) == []


def test_an_estimate_from_a_few_jobs_cuts_small_chunks_until_more_report():
    # 20 one-job reports of 1 ms (a warm-up of jobs that happened to be
    # quick): the work limit alone would cut 912 jobs into chunks of 50.
    times = chunking.JobTimes()
    assert times.timed_jobs("k") is None
    for _ in range(20):
        times.record(("k",), 0.001, 1)
    seen = times.timed_jobs("k")
    assert seen == pytest.approx(1 / chunking.EMA_WEIGHT, rel=0.01)
    assert chunking.jobs_per_chunk(0.001, 912, 2) == 50
    capped = chunking.jobs_per_chunk(0.001, 912, 2, timed_jobs=seen)
    assert capped == math.ceil(chunking.CONFIDENCE_FACTOR * seen) < 50
    assert times.jobs_per_chunk("k", 912, 2) == capped   # as the clients ask for it
    # One report of such a chunk lifts the cap past the work limit.
    times.record(("k",), 0.001 * capped, capped)
    assert chunking.jobs_per_chunk(0.001, 912, 2, timed_jobs=times.timed_jobs("k")) == 50
    assert times.jobs_per_chunk("k", 912, 2) == 50
    assert times.jobs_per_chunk("never timed", 912, 2) == 1


def test_the_confidence_limit_never_binds_on_a_function_timed_over_a_few_chunks():
    times = chunking.JobTimes()
    for _ in range(4):
        times.record(("k",), 4096e-6, 4096)
    for run in ((1e-6, 100_000, 2), (1e-6, None, 0), (0.0, 1_000_000, 2)):
        assert chunking.jobs_per_chunk(*run[:3], timed_jobs=times.timed_jobs("k")) == \
            chunking.jobs_per_chunk(*run[:3])
