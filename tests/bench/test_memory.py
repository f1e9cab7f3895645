import subprocess
import sys

from diffmem.bench.memory import peak_rss_mb


def test_a_fresh_child_process_reports_its_own_peak_not_its_parents():
    # ru_maxrss survives exec: the memory benchmarks' fresh child processes reported the peak of the
    # parent that had written their data or scored with the model, until they passed it
    held = bytearray(600 * 2**20)
    held[::4096] = b"\x01" * len(range(0, len(held), 4096))  # touched, so resident
    assert peak_rss_mb() >= 600
    code = ("import resource; from diffmem.bench.memory import peak_rss_mb; "
            "print(peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    own, inherited = map(float, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                               check=True).stdout.split())
    assert inherited >= 600 and own < 200, (own, inherited)
