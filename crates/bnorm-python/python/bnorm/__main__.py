"""``python -m bnorm inspect|convert|fold|conformance ...``: the ``bnorm`` command-line
tool (the same Rust code as the binary, built without the ``demo`` and ``bench``
subcommands). ``python -m bnorm --help`` lists the commands."""

import sys

from . import _bnorm


def main(argv=None):
    """Runs the tool on ``argv`` (default: ``sys.argv[1:]``) and returns its exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    return _bnorm.cli(["bnorm", *argv])


if __name__ == "__main__":
    sys.exit(main())
