"""Run as a script by tests/test_serialize.py: define things in __main__, dump
a function that uses them and write the payload (hex) to stdout."""
import sys

from minicw import serialize

SCALE = 10


class Counter:
    def __init__(self, start):
        self.count = start

    def bump(self):
        self.count += 1
        return self.count


def triple(x):
    return 3 * x


def make_adder(n):
    return lambda x: x + n


def main_check(value):
    counter = Counter(value)
    counter.bump()
    add_two = make_adder(2)
    return (triple(value) * SCALE, add_two(value), counter.count,
            type(counter).__module__, main_check.__module__)


if __name__ == "__main__":
    sys.stdout.write(serialize.dumps(main_check).hex())
