"""Factorize large numbers across the cluster (the minimalcluster example 2).

Run:  python examples/factorize.py
"""
import sys

from minicw import LocalCluster

ENVIRONMENT = '''
def factorize_naive(n):
    """A naive factorization: the prime factors of n, smallest first."""
    if n < 2:
        return []
    factors = []
    p = 2
    while True:
        if n == 1:
            return factors
        if n % p == 0:
            factors.append(p)
            n = n // p
        elif p * p >= n:
            factors.append(n)
            return factors
        elif p > 2:
            p += 2
        else:
            p += 1
'''


def make_nums(count):
    """count large odd numbers, 999999999999 stepping by 2."""
    return [999999999999 + 2 * i for i in range(count)]


def product(numbers):
    result = 1
    for number in numbers:
        result *= number
    return result


def main():
    nums = make_nums(200)
    with LocalCluster() as cluster:
        cluster.load_envir(ENVIRONMENT, from_file=False)
        cluster.register_target_function("factorize_naive")
        cluster.load_args(nums)
        factors = cluster.execute()
    for n in nums[:5]:
        print(n, factors[n])
    wrong = [n for n in nums if product(factors[n]) != n]
    if len(factors) != len(nums) or wrong:
        print("FAILED: %d numbers factorized wrongly: %s" % (len(wrong), wrong[:5]))
        return 1
    print("all %d numbers factorized correctly" % len(nums))
    return 0


if __name__ == "__main__":
    sys.exit(main())
