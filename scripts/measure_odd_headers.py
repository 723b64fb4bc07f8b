"""Peak RSS and time of reading one odd header, each in a fresh interpreter, with both readers.

    python scripts/measure_odd_headers.py [--dir TMP]

Generates (sparse or streamed, see tests/odd_files.py) a deflate bomb (about 1 MB inflating to
1 GiB), a 'DICM' preamble followed by 2 GiB of zeros, and files with a 512 MiB private element
before the needed tags (explicit and implicit VR), and prints the result, seconds and peak RSS of
``header.read_header`` on each. Exits 1 if a peak RSS exceeds 1 GiB.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import odd_files  # noqa: E402

RSS_LIMIT_MIB = 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="where to write the files (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        cases = {
            "deflate bomb (1 GiB inflated)": ("bomb.dcm", lambda p: odd_files.deflate_bomb(p, odd_files.GiB)),
            "2 GiB of zeros after the preamble": ("zeros.dcm", odd_files.zeros_after_preamble),
            "512 MiB private element, explicit VR": (
                "private.dcm", lambda p: odd_files.private_element_before_needed(p, 512 * odd_files.MiB)),
            "512 MiB private element, implicit VR": (
                "private_implicit.dcm",
                lambda p: odd_files.private_element_before_needed(p, 512 * odd_files.MiB, implicit=True)),
        }
        worst = 0.0
        print(f"{'case':40s} {'file size':>12s} {'reader':8s} {'result':28s} {'seconds':>8s} {'peak RSS':>9s}")
        for label, (name, make) in cases.items():
            path = os.path.join(folder, name)
            make(path)
            size = os.path.getsize(path)
            for reader in ("fast", "pydicom"):
                result = odd_files.read_in_child(path, reader)
                outcome = result["kind"] if result["kind"] != "error" else f"error {result['reason']}"
                worst = max(worst, result["max_rss_mib"])
                print(f"{label:40s} {size:>12,d} {reader:8s} {outcome:28s} {result['seconds']:8.3f} "
                      f"{result['max_rss_mib']:6.0f} MiB")
            os.remove(path)
    return 1 if worst > RSS_LIMIT_MIB else 0


if __name__ == "__main__":
    sys.exit(main())
