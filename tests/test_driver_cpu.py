"""The driver's CPU split by thread (rare_ray.driver_cpu): the groups, and that they add up."""

import _thread
import sys
import threading
import time

import pytest

from rare_ray.driver_cpu import NATIVE, REMAINDER, DriverCPU, thread_group


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("StreamingExecutor-bm25_035AB7ntnnkwUSwi6Rc0OC_0", "StreamingExecutor-bm25"),
        ("StreamingExecutor-dataset_035AB6PPPzG6uIHGIC9qTK_0", "StreamingExecutor-dataset"),
        ("Thread-7 (run_one)", "run_one"),
        ("iter_threaded_3", "iter_threaded"),
        ("stage-doc2query", "stage-doc2query"),
        ("MainThread", "MainThread"),
        ("Thread-3", "Thread"),
        ("native: grpc_global_tim", "native: grpc_global_tim"),
        ("native: AwsEventLoop-2", "native: AwsEventLoop"),
    ],
)
def test_thread_group(name: str, group: str) -> None:
    assert thread_group(name) == group


def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_by_thread_splits_the_process_cpu() -> None:
    burned, release = threading.Event(), threading.Event()

    def burner() -> None:
        _burn(0.4)
        burned.set()
        release.wait()

    with DriverCPU(interval=0.05) as cpu:
        # A thread that burns CPU and ends before the split is asked for: its time is kept.
        # It ends only after a sample has seen all of its CPU (``by_thread`` samples), so
        # the check does not depend on the sampler's thread getting the GIL in time.
        thread = threading.Thread(target=burner, name="burner-1")
        thread.start()
        burned.wait()
        assert cpu.by_thread()["burner"] >= 0.38
        release.set()
        thread.join()
        _burn(0.2)
        split = cpu.by_thread()
        total = cpu.seconds()
    assert split["burner"] >= 0.38  # 0.4 s, less a clock tick or two
    assert split["MainThread"] >= 0.15
    assert REMAINDER in split
    # The groups add up to the process's CPU (rounded to 0.01 s each).
    assert sum(split.values()) == pytest.approx(total, abs=0.01 * len(split) + 0.02)
    assert list(split.values()) == sorted(split.values(), reverse=True)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="threads' names from /proc")
def test_a_thread_python_does_not_know_is_named_by_the_kernel() -> None:
    # A thread started below Python's threading module (as Ray's and Arrow's native threads
    # are: threading.enumerate() does not list it), named through /proc as they name theirs.
    burned, release = threading.Event(), threading.Event()

    def native() -> None:
        with open("/proc/thread-self/comm", "w") as f:
            f.write("rr-native-burn")
        _burn(0.3)
        burned.set()
        release.wait()

    with DriverCPU(interval=0.05) as cpu:
        _thread.start_new_thread(native, ())
        burned.wait()
        split = cpu.by_thread()
        release.set()
    assert split[NATIVE + "rr-native-burn"] >= 0.28
