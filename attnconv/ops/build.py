"""Build the C++ kernels ahead of first use: ``python -m attnconv.ops.build`` (``make`` runs
it after installing). Prints where the library is, or why it could not be built; exits 0 either
way, since the layers run their eager formulation where the kernels are missing."""

from __future__ import annotations

import sys

from attnconv.ops._build import build_dir, load_extension


def main() -> int:
    reason = load_extension("rfa_fused")
    if reason is None:
        print(f"attnconv: fused RFA kernels ready in {build_dir('rfa_fused')}")
    else:
        print(f"attnconv: fused RFA kernels not built, the RFA layers will run eager: {reason}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
