"""``python -m mlx_fastrnn SCRIPT [ARGS...]``: run an unmodified script with mlx.nn patched."""

import os
import runpy
import sys


def main(argv=None):
    from_command_line = argv is None  # `python -m mlx_fastrnn ...`, not main([...]) from other code
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m mlx_fastrnn SCRIPT [ARGS...]\n"
              "Runs SCRIPT with mlx.nn.GRU/LSTM/RNN replaced by mlx_fastrnn's layers.",
              file=sys.stderr if not argv else sys.stdout)
        return 2 if not argv else 0
    import mlx_fastrnn

    mlx_fastrnn.patch()
    sys.argv = list(argv)
    script_dir = os.path.dirname(os.path.abspath(argv[0]))
    # sys.path[0] is the script's directory, as `python SCRIPT` makes it; `python -m` put
    # the working directory there, which `python SCRIPT` does not add. (runpy keeps
    # argv[0] and __file__ as given: a relative path stays relative.)
    if from_command_line and sys.path and sys.path[0] in ("", os.getcwd()):
        sys.path[0] = script_dir
    else:
        sys.path.insert(0, script_dir)
    runpy.run_path(argv[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
