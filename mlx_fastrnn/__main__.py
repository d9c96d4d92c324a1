"""``python -m mlx_fastrnn SCRIPT [ARGS...]``: run an unmodified script with mlx.nn patched."""

import os
import runpy
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m mlx_fastrnn SCRIPT [ARGS...]\n"
              "Runs SCRIPT with mlx.nn.GRU/LSTM/RNN replaced by mlx_fastrnn's layers.",
              file=sys.stderr if not argv else sys.stdout)
        return 2 if not argv else 0
    import mlx_fastrnn

    mlx_fastrnn.patch()
    sys.argv = list(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))  # as `python SCRIPT` does
    runpy.run_path(argv[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
