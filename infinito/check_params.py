"""check-params stage: validate the whole params file before any other stage runs.

``python -m infinito.check_params --out data/params.ok`` loads ``params.yaml`` through
``infinito.config`` (every key present, every value of the right type and in range; a local
``data.source`` must exist) and writes a marker whose content is the same whenever the params
are valid. dvc.yaml makes this stage depend on every param and every other stage depend on its
marker, so:

- a valid edit re-runs this stage, which writes the same marker: the later stages see an
  unchanged dependency and re-run only for the keys they read themselves;
- an invalid edit (``dvc exp run -S lr=abc``) fails here, before DVC has removed any later
  stage's outputs: ``git checkout params.yaml && dvc checkout`` returns to the last good state.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from infinito.atomic import DiskFull, write_text
from infinito.config import PARAMS_FILE, ConfigError, ParamsChanged, stage_params
from infinito.data.download import resolve_source

PARAMS_KEYS = None  # the whole file (dvc.yaml: `- params.yaml:`)
MARKER = "valid\n"  # never changes: a valid edit leaves the later stages' dependency alone


def build_parser() -> argparse.ArgumentParser:
    """The stage's command line. Paths have no defaults: dvc.yaml's command gives them."""
    parser = argparse.ArgumentParser(
        prog="python -m infinito.check_params", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--params", type=Path, default=Path(PARAMS_FILE))
    parser.add_argument("--out", type=Path, help="marker to write when the params are valid")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with stage_params(args.params, PARAMS_KEYS) as params:
            resolve_source(params.data)  # a local data.source must exist (the Hub is not asked)
            if args.out is not None:
                write_text(args.out, MARKER)
    except ParamsChanged as e:
        print(f"check-params: error: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(
            f"check-params: error: {e} (no other stage ran; to return to the last good state: "
            f"git checkout {args.params} && dvc checkout)",
            file=sys.stderr,
        )
        return 2
    except DiskFull as e:
        print(f"check-params: error: {e}", file=sys.stderr)
        return 2
    print(f"check-params: {args.params} is valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
