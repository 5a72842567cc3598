"""A multiprocessing.Pool script moved onto the cluster by changing its import.

Run:  python examples/pool_primes.py
      MINICW_MASTER=host:port MINICW_AUTHKEY=key python examples/pool_primes.py

No ``if __name__ == "__main__"`` guard is needed.  Where no master is named or
found, Pool(2) starts a LocalCluster of 2 worker processes for the run; with
MINICW_MASTER (or a launcher's run directory) it uses that cluster, whole.
"""
from minicw import Pool          # was: from multiprocessing import Pool

LIMIT = 200_000
SMALL_PRIMES = []


def load_small_primes(limit):
    """The initializer: once in each worker process, before its first task."""
    global SMALL_PRIMES
    sieve = bytearray([1]) * (limit + 1)
    sieve[0:2] = b"\0\0"
    for n in range(2, int(limit ** 0.5) + 1):
        if sieve[n]:
            sieve[n * n::n] = bytearray(len(sieve[n * n::n]))
    SMALL_PRIMES = [n for n in range(limit + 1) if sieve[n]]


def is_prime(n):
    for p in SMALL_PRIMES:
        if p * p > n:
            return True
        if n % p == 0:
            return False
    return True


def count_primes(bounds):
    low, high = bounds
    return sum(1 for n in range(max(low, 2), high) if is_prime(n))


with Pool(2, initializer=load_small_primes, initargs=(int(LIMIT ** 0.5) + 1,)) as pool:
    blocks = [(low, low + 10_000) for low in range(0, LIMIT, 10_000)]
    counts = pool.map(count_primes, blocks)
    first = next(pool.imap(count_primes, blocks))

total = sum(counts)
assert total == 17984, total           # primes below 200,000
assert first == 1229, first            # primes below 10,000
print("%d primes below %d, in %d blocks" % (total, LIMIT, len(blocks)))
